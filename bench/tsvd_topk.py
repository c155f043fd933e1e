"""Timing of the truncated t-SVD (randomized path) on the UNETR-Base LoRA-PT shapes.

    python bench/tsvd_topk.py [--k 8] [--loop] [--noise 1e-3] [--shapes small]

Weights with a decaying spectrum: X = Q1 * fdiag(S) * Q2ᵀ + noise, Q1, Q2 t-orthogonal (tqr of
Gaussians), every transform-domain slice with singular values s_i = 1/i, and Gaussian noise of
spectral norm ~ ``noise`` (relative to σ_1) per Fourier slice. Times, in the same process:
batched torch.linalg.svd on the rfft half spectrum, the published per-slice loop (full
complex fft + one complex SVD per slice, with --loop), tsvd.tsvd(X, k) (randomized) and its
transform-domain part alone; error of the principal part U_k S_k V_kᴴ per Fourier slice
against a float64 full SVD (max over slices of the relative Frobenius error).
"""
from __future__ import annotations

import argparse
import time

import torch

import tsvd
from tsvd import _lowrank, reference as ref
from tsvd.transforms import get_transform

SHAPES = {"unetr": [(48, 768, 768), (12, 3072, 768), (12, 768, 3072)],
          "small": [(8, 200, 150), (9, 96, 256)]}


def make(n3, n1, n2, noise, seed=0):
    """Built in the rfft domain: slice f = Q1_f diag(s) Q2_fᴴ (real DC/Nyquist slices),
    s_i = 1/i, then irfft and Gaussian noise of relative spectral norm ~noise per slice."""
    g = torch.Generator().manual_seed(seed)
    p, m = min(n1, n2), n3 // 2 + 1
    real = [0] + ([m - 1] if n3 % 2 == 0 and n3 > 1 else [])

    def orth(n):
        a = torch.randn(m, n, p, 2, generator=g)
        a[real, ..., 1] = 0
        return _lowrank._qr(torch.view_as_complex(a).to(torch.complex128))[0].to(torch.complex64)
    s = (1.0 / torch.arange(1, p + 1)).to(torch.complex64)
    xh = (orth(n1) * s) @ orth(n2).mH
    x = torch.fft.irfft(xh, n=n3, dim=-3) * n3 ** 0.5
    c = noise / (n3 ** 0.5 * (n1 ** 0.5 + n2 ** 0.5))
    return x + c * torch.randn(n3, n1, n2, generator=g)


def principal(u, s, v):
    return (u * s.unsqueeze(-2).to(u.dtype)) @ v.mH


def timeit(f, reps=1):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--noise", type=float, default=1e-3)
    ap.add_argument("--shapes", default="unetr", choices=sorted(SHAPES))
    ap.add_argument("--loop", action="store_true", help="also time the per-slice loop")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--oversample", type=int, default=None)
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--check", type=int, default=None,
                    help="compare only the first N stored slices with float64 (default all)")
    a = ap.parse_args()
    k = a.k
    tr = get_transform("fft")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, k={k}, "
          f"noise={a.noise}")
    xs = [make(*sh, a.noise, seed=i) for i, sh in enumerate(SHAPES[a.shapes])]
    print("data built", flush=True)
    xhs = [torch.fft.rfft(x, dim=-3) for x in xs]
    tot = {"svd": 0.0, "loop": 0.0, "tsvd": 0.0, "hat": 0.0}
    for x, xh in zip(xs, xhs):
        n3 = x.shape[-3]
        t_svd, _ = timeit(lambda: ref.hat_svd(torch.fft.rfft(x, dim=-3), tr, n3))
        t_loop = float("nan")
        if a.loop:
            def loop():
                xf = torch.fft.fft(x.to(torch.complex64), dim=-3)
                return [torch.linalg.svd(xf[i], full_matrices=False) for i in range(n3)]
            t_loop, _ = timeit(loop)
        kw = dict(oversample=a.oversample, tol=a.tol)
        t_tsvd, _ = timeit(lambda: tsvd.tsvd(x, k, method="randomized", **kw), a.reps)
        t_hat, (uh, sh, vh) = timeit(lambda: _lowrank.hat_topk_svd(xh, k, tr, n3, **kw), a.reps)
        info = _lowrank.last_info()
        c = slice(None) if a.check is None else slice(0, a.check)     # slices checked
        xh6 = xh[c].to(torch.complex128)
        u6, s6, v6 = ref.hat_svd(xh6, tr, n3) if c == slice(None) or a.check >= xh.shape[0] \
            else torch.linalg.svd(xh6, full_matrices=False)[:2] + (None,)
        if v6 is None:                      # no real-slice handling needed for the values
            u6, s6, vh6 = torch.linalg.svd(xh6, full_matrices=False)
            v6 = vh6.mH
        p64 = principal(u6[..., :k], s6[..., :k], v6[..., :k])
        err = (torch.linalg.matrix_norm(principal(uh[c], sh[c], vh[c]).to(torch.complex128) - p64)
               / torch.linalg.matrix_norm(p64)).max().item()
        gap = ((s6[..., k - 1] - s6[..., k]) / s6[..., 0]).min().item()
        print(f"{tuple(x.shape)}: svd-half {t_svd:.3f}s loop {t_loop:.3f}s | tsvd(k) "
              f"{t_tsvd:.3f}s, hat_topk {t_hat:.3f}s | iters {info['iterations']} fallback "
              f"{info['fallback']}/{info['slices']} est {info['est']:.2e} | principal-part "
              f"err {err:.2e} (min rel gap {gap:.3g})", flush=True)
        tot["svd"] += t_svd; tot["loop"] += t_loop; tot["tsvd"] += t_tsvd; tot["hat"] += t_hat
    print(f"total: svd-half {tot['svd']:.2f}s, loop {tot['loop']:.2f}s, tsvd(k) "
          f"{tot['tsvd']:.2f}s, hat_topk {tot['hat']:.2f}s; speedup vs svd-half "
          f"{tot['svd'] / tot['tsvd']:.1f}x, vs loop {tot['loop'] / tot['tsvd']:.1f}x")


if __name__ == "__main__":
    main()
