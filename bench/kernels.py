"""Benchmark of the tsvd kernels against plain PyTorch, in one process.

    python bench/kernels.py [--device cpu|cuda] [--json PATH] [--quick] [--ops OP ...]

For every op and shape, the tsvd implementation (public API; the compiled extension
when it is built for the device) and its baselines are timed interleaved (each repeat
runs every candidate once, in turn) and reported as min and median milliseconds:

* ``reference``: the best plain-PyTorch formulation (tsvd.reference: rfft half
  spectrum, batched matmul, batched torch.linalg.svd);
* ``published``: the published LoRA-PT code's formulation (full complex torch.fft.fft
  along the tubes, a Python loop of per-slice complex SVDs / products, ifft, real part);
* ``clone``: a clone() of the output, the memory-traffic floor of treconstruct.

``ratio`` is baseline time / tsvd time (the speed-up; for the clone row, tsvd time /
clone time). ``err`` is the max relative error (max |x - x64| / max |x64|) of the tsvd
result against a float64 computation; for tsvd(X, k) it is the principal-part error
||U_k S_k V_k^T - X_k||_F / ||X_k||_F against a float64 full t-SVD. Ops: treconstruct
(forward with residual), treconstruct_fb (forward + backward), tprod, rfft, irfft, tsvd.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import tsvd
from tsvd import reference as ref

LORA_SHAPES = [(48, 768, 768), (12, 3072, 768), (12, 768, 3072)]
SMALL = (8, 64, 48)
BATCHED = (16, 12, 128, 96)
RANK = 8
ALL_OPS = ["treconstruct", "treconstruct_fb", "tprod", "rfft", "irfft", "tsvd"]


# --------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


INNER = 1  # calls per CUDA timing sample (main sets it for --device cuda)


def bench(cands: dict, device, repeats: int, warmup: int = 1, inner: int | None = None) -> dict:
    """Time each candidate (a no-arg callable) interleaved; returns name -> list of ms per call.

    On CUDA each sample is ``inner`` back-to-back calls between two CUDA events (divided by
    ``inner``), so launch latency overlaps the previous call's work as it does in a real
    training step; on CPU each sample is one call timed with ``perf_counter``.
    """
    inner = INNER if inner is None else inner
    for _ in range(warmup):
        for fn in cands.values():
            fn()
            sync(device)
    times = {k: [] for k in cands}
    for _ in range(repeats):
        for k, fn in cands.items():
            sync(device)
            if device.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(inner):
                    fn()
                e1.record()
                e1.synchronize()
                times[k].append(e0.elapsed_time(e1) / inner)
            else:
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def relerr(x, x64):
    x64 = x64.double()
    return ((x.double() - x64).abs().max() / x64.abs().max()).item()


# published formulations (full complex FFT along the tubes, per-slice Python loops) ----
def published_treconstruct(U, S, V, R):
    n3 = U.shape[-3]
    Uf, Sf, Vf = (torch.fft.fft(t, dim=-3) for t in (U, S.unsqueeze(-1), V))
    out = torch.empty(U.shape[:-3] + (n3, U.shape[-2], V.shape[-2]), dtype=Uf.dtype, device=U.device)
    for i in range(n3):
        out[..., i, :, :] = (Uf[..., i, :, :] * Sf[..., i, :, :].mT) @ Vf[..., i, :, :].mH
    return R + torch.fft.ifft(out, dim=-3).real


def published_tprod(A, B):
    n3 = A.shape[-3]
    Af, Bf = torch.fft.fft(A, dim=-3), torch.fft.fft(B, dim=-3)
    out = torch.empty(A.shape[:-3] + (n3, A.shape[-2], B.shape[-1]), dtype=Af.dtype, device=A.device)
    for i in range(n3):
        out[..., i, :, :] = Af[..., i, :, :] @ Bf[..., i, :, :]
    return torch.fft.ifft(out, dim=-3).real


def published_tsvd(X, k):
    n3 = X.shape[-3]
    Xf = torch.fft.fft(X, dim=-3)
    us, ss, vs = [], [], []
    for i in range(n3):
        u, s, vh = torch.linalg.svd(Xf[..., i, :, :], full_matrices=False)
        us.append(u[..., :k]); ss.append(s[..., :k]); vs.append(vh[..., :k, :].mH)
    U = torch.fft.ifft(torch.stack(us, -3), dim=-3).real
    V = torch.fft.ifft(torch.stack(vs, -3), dim=-3).real
    S = torch.fft.ifft(torch.stack(ss, -2).to(Xf.dtype), dim=-2).real
    return U, S, V


def decaying(shape, device, seed=0):
    """A weight-like tensor whose every Fourier slice has singular values 1/i (i = 1..p),
    plus noise of relative size 1e-3: built in the Fourier domain (Hermitian half spectrum,
    real slices at frequency 0 and n3/2) and brought back with irfft along the tubes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    *b, n3, n1, n2 = shape
    p, nf = min(n1, n2), n3 // 2 + 1
    dev = torch.device(device)
    gen_dev = dev if dev.type == "cuda" else torch.device("cpu")

    def orth(n):
        z = torch.randn(*b, nf, n, p, 2, generator=g).to(gen_dev)
        z = torch.view_as_complex(z)
        real = [0] + ([n3 // 2] if n3 % 2 == 0 else [])
        z[..., real, :, :] = z[..., real, :, :].real.to(z.dtype)
        return torch.linalg.qr(z)[0]

    s = (1.0 / torch.arange(1, p + 1, dtype=torch.float32, device=gen_dev)).to(torch.complex64)
    Xf = (orth(n1) * s) @ orth(n2).mH * n3 ** 0.5
    X = torch.fft.irfft(Xf, n=n3, dim=-3)
    X = X + 1e-3 * X.std() * torch.randn(*X.shape, generator=g).to(gen_dev)
    return X.to(dev)


def factors(shape, r, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    *b, n3, n1, n2 = shape
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    return mk(*b, n3, n1, r) / n1 ** 0.5, mk(*b, n3, r), mk(*b, n3, n2, r) / n2 ** 0.5, mk(*b, n3, n1, n2)


# --------------------------------------------------------------------------------------
def rows_for(op, shape, device, repeats, quick):
    """Returns a list of result dicts for one op and shape."""
    out = []
    st = lambda ts: (min(ts), statistics.median(ts))  # noqa: E731

    def add(baseline, tb, tt, err, note="", **extra):
        bmin, bmed = st(tb)
        tmin, tmed = st(tt)
        ratio = (tmin / bmin) if baseline == "clone" else (bmin / tmin)
        out.append(dict(op=op, shape=list(shape), dtype="float32", device=str(device),
                        threads=torch.get_num_threads(), baseline=baseline,
                        baseline_ms_min=bmin, baseline_ms_median=bmed, tsvd_ms_min=tmin,
                        tsvd_ms_median=tmed, ratio=ratio, err=err, note=note,
                        backend=tsvd.last_backend(op_backend(op)), **extra))

    if op in ("treconstruct", "treconstruct_fb"):
        U, S, V, R = factors(shape, RANK, device)
        if op == "treconstruct":
            c = {"tsvd": lambda: tsvd.treconstruct(U, S, V, residual=R),
                 "reference": lambda: ref.treconstruct(U, S, V, R),
                 "clone": lambda: R.clone()}
            if not quick:
                c["published"] = lambda: published_treconstruct(U, S, V, R)
            t = bench(c, device, repeats)
            y64 = ref.treconstruct(U.double(), S.double(), V.double(), R.double())
            err = relerr(tsvd.treconstruct(U, S, V, residual=R), y64)
            add("reference", t["reference"], t["tsvd"], err)
            if "published" in t:
                add("published", t["published"], t["tsvd"], err)
            # memory traffic that cannot be avoided: the residual read once, the output
            # written once (the factors are tiny); the clone moves the same bytes
            nbytes = 2 * R.numel() * R.element_size()
            gbps = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
            add("clone", t["clone"], t["tsvd"], err, "ratio = tsvd / clone (target <= 3)",
                tsvd_GBps=gbps(min(t["tsvd"])), clone_GBps=gbps(min(t["clone"])),
                bandwidth_fraction=gbps(min(t["tsvd"])) / gbps(min(t["clone"])))
        else:
            G = torch.randn_like(R)
            leaves = [x.clone().requires_grad_() for x in (U, S, V)]

            def fb(fn):
                for x in leaves:
                    x.grad = None
                fn(*leaves, R).backward(G)

            c = {"tsvd": lambda: fb(lambda u, s, v, r: tsvd.treconstruct(u, s, v, residual=r)),
                 "reference": lambda: fb(ref.treconstruct)}
            if not quick:
                c["published"] = lambda: fb(published_treconstruct)
            t = bench(c, device, repeats)
            fb(lambda u, s, v, r: tsvd.treconstruct(u, s, v, residual=r))
            got = [x.grad.clone() for x in leaves]
            l64 = [x.detach().double().requires_grad_() for x in leaves]
            ref.treconstruct(*l64, R.double()).backward(G.double())
            err = max(relerr(a, b.grad) for a, b in zip(got, l64))
            add("reference", t["reference"], t["tsvd"], err, "forward + backward (grads of U, S, V)")
            if "published" in t:
                add("published", t["published"], t["tsvd"], err, "forward + backward")
    elif op == "tprod":
        A = factors(shape, RANK, device)[3]
        Bm = torch.randn(*shape[:-3], shape[-3], shape[-1], RANK, device=device)
        c = {"tsvd": lambda: tsvd.tprod(A, Bm), "reference": lambda: ref.tprod(A, Bm)}
        if not quick:
            c["published"] = lambda: published_tprod(A, Bm)
        t = bench(c, device, repeats)
        err = relerr(tsvd.tprod(A, Bm), ref.tprod(A.double(), Bm.double()))
        add("reference", t["reference"], t["tsvd"], err, f"A {tuple(shape)} x B (..., {shape[-1]}, {RANK})")
        if "published" in t:
            add("published", t["published"], t["tsvd"], err)
    elif op in ("rfft", "irfft"):
        from tsvd import _ext
        X = factors(shape, RANK, device)[3]
        n3 = shape[-3]
        X4 = X.reshape(-1, *shape[-3:])
        if not _ext.available(device):
            return out
        if op == "rfft":
            c = {"tsvd": lambda: _ext.tube_rfft(X4), "reference": lambda: torch.fft.rfft(X4, dim=1)}
            t = bench(c, device, repeats)
            err = relerr(torch.view_as_real(_ext.tube_rfft(X4)),
                         torch.view_as_real(torch.fft.rfft(X4.double(), dim=1)))
        else:
            # contiguous, as every producer in tsvd hands it over (cuFFT's own output has the
            # transformed dim innermost: timing on it would time a layout copy)
            Xh = torch.fft.rfft(X4, dim=1).contiguous()
            c = {"tsvd": lambda: _ext.tube_irfft(Xh, n3),
                 "reference": lambda: torch.fft.irfft(Xh, n=n3, dim=1)}
            t = bench(c, device, repeats)
            err = relerr(_ext.tube_irfft(Xh, n3), torch.fft.irfft(Xh.to(torch.complex128), n=n3, dim=1))
        add("reference", t["reference"], t["tsvd"], err, "torch.fft along dim -3")
    elif op == "tsvd":
        X = decaying(shape, device)
        k = RANK
        c = {"tsvd": lambda: tsvd.tsvd(X, k), "reference": lambda: ref.tsvd(X, k)}
        big = shape[-1] * shape[-2] * shape[-3] > 1e6
        if not quick:
            c["published"] = lambda: published_tsvd(X, k)
        if device.type == "cuda":  # the GPU handles every shape quickly; warm cuSOLVER up
            t = bench(c, device, min(repeats, 3), warmup=1, inner=1)
        else:
            t = bench(c, device, max(1, repeats // 2) if big else repeats, warmup=0 if big else 1)
        U, S, V = tsvd.tsvd(X, k)
        U64, S64, V64 = ref.tsvd(X.double(), k)
        Xk64 = ref.treconstruct(U64, S64, V64)
        err = (torch.linalg.vector_norm(ref.treconstruct(U.double(), S.double(), V.double()) - Xk64)
               / torch.linalg.vector_norm(Xk64)).item()
        add("reference", t["reference"], t["tsvd"], err, "principal-part error vs float64 full t-SVD")
        if "published" in t:
            add("published", t["published"], t["tsvd"], err)
    return out


def op_backend(op):
    return {"treconstruct_fb": "treconstruct", "rfft": "tsvd", "irfft": "tsvd"}.get(op, op)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, no published-code baselines (the slow per-slice loops)")
    p.add_argument("--ops", nargs="+", default=ALL_OPS, choices=ALL_OPS)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--shapes", choices=["all", "lora"], default="all")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    device = torch.device(a.device)
    global INNER
    INNER = 10 if device.type == "cuda" else 1
    repeats = a.repeats or ((5 if a.quick else 15) if device.type == "cuda" else (3 if a.quick else 5))
    shapes = LORA_SHAPES + ([SMALL, BATCHED] if a.shapes == "all" else [])
    rows = []
    print(f"tsvd bench: device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"compiled={tsvd.compiled_available(a.device)} date={time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")
    hdr = f"{'op':16s} {'shape':20s} {'baseline':10s} {'base min/med ms':>17s} {'tsvd min/med ms':>17s} {'ratio':>7s} {'err':>8s}"
    print(hdr)
    print("-" * len(hdr))
    meta = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                build=tsvd.build_info(), python=platform.python_version(),
                machine=platform.machine(), processor=platform.processor(),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), quick=a.quick,
                repeats=repeats, inner=INNER,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    summary = {}

    def write_json():  # after every row, so a run cut short still leaves its numbers
        if a.json:
            tmp = a.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1, default=str)
            os.replace(tmp, a.json)

    for op in a.ops:
        sh_list = shapes if op not in ("rfft", "irfft") else [(12, 3072, 768), (48, 768, 768)]
        for shape in sh_list:
            for r in rows_for(op, shape, device, repeats, a.quick):
                rows.append(r)
                bw = (f"  {r['tsvd_GBps']:.0f} GB/s = {100 * r['bandwidth_fraction']:.0f}% of clone"
                      if "tsvd_GBps" in r else "")
                print(f"{r['op']:16s} {str(tuple(r['shape'])):20s} {r['baseline']:10s} "
                      f"{r['baseline_ms_min']:8.2f}/{r['baseline_ms_median']:<8.2f} "
                      f"{r['tsvd_ms_min']:8.2f}/{r['tsvd_ms_median']:<8.2f} {r['ratio']:7.2f} "
                      f"{r['err']:8.1e}{bw}", flush=True)
                write_json()
    # sums over the three LoRA-PT shapes
    for op in a.ops:
        for base in ("reference", "published", "clone"):
            sel = [r for r in rows if r["op"] == op and r["baseline"] == base
                   and tuple(r["shape"]) in LORA_SHAPES]
            if len(sel) == 3:
                b = sum(r["baseline_ms_min"] for r in sel)
                t = sum(r["tsvd_ms_min"] for r in sel)
                summary[f"{op}/{base}"] = dict(baseline_ms=b, tsvd_ms=t,
                                               ratio=(t / b) if base == "clone" else (b / t))
    if summary:
        print("\nsum over the three LoRA-PT shapes (min times):")
        for k, v in summary.items():
            print(f"  {k:30s} baseline {v['baseline_ms']:9.2f} ms  tsvd {v['tsvd_ms']:9.2f} ms  ratio {v['ratio']:6.2f}")
    write_json()
    if a.json:
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
