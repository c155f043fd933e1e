"""Truncated (top-k) SVD of every transform-domain slice by randomized subspace iteration.

``hat_topk_svd`` is what ``tsvd.tsvd(X, k, method="randomized")`` calls: its cost grows
with k (``O(n1 n2 l)`` per iteration and slice, ``l = k + oversample``) instead of the
``O(n1 n2 min(n1, n2))`` of a full SVD, and every slice's result is verified a posteriori;
slices that cannot be verified get a full ``torch.linalg.svd`` (batched over just them).

Method (Halko, Martinsson & Tropp 2011, Alg. 4.4 with Rayleigh-Ritz every step), for all
slices at once with batched ``matmul``/``qr``, never a loop over slices::

    Q = orth(X Ω)                               Ω: (n2, l) Gaussian, fixed seed
    repeat:
        B = Qᴴ X = Rᴴ Pᴴ   (P, R = qr(Bᴴ))      P: (n2, l) orthonormal, R: (l, l)
        Rᴴ = Ur diag(σ̂) Vrᴴ                     small SVD in float64
        U = Q Ur,  V = P Vr                      Ritz triplets (σ̂_i, u_i, v_i), i < l
        Y = X P                                  next sketch, also gives X V = Y Vr
        r_i = ‖X v_i - σ̂_i u_i‖                  (Xᴴ u_i - σ̂_i v_i = 0 by construction)
        stop for the slice when est <= tol;  Q = orth(Y)

The two products with X (``Qᴴ X`` and ``X P``) run in the input precision (float32 for
float32 input); everything of size ``(n1 + n2) x l`` or ``l x l`` (QR, SVD, residuals) runs
in float64, which is cheap.

Accuracy check (per slice). For a Ritz triplet with residual ``r_i`` and a gap
``δ_i = σ̂_i - σ_{k+1} > 0``, the Jordan-Wielandt form ``[[0, X], [Xᴴ, 0]]`` gives
(Davis-Kahan/Wedin for one vector) ``sin∠((u_i, v_i), top-k singular subspace) <= r_i / δ_i``
and ``|σ_i - σ̂_i| <= r_i``. ``σ_{k+1}`` is estimated by ``σ̂_{k+1} + r_{k+1}``
(Ritz values are lower bounds, ``σ̂_j <= σ_j``; Weyl: some σ lies within r of σ̂). The slice is
accepted when::

    est = sqrt(Σ_{i<=k} c_i²) / sqrt(Σ_{i<=k} σ̂_i²) <= tol,   c_i = σ̂_i min(1, r_i/δ_i) + r_i

``est`` is a first-order estimate of the relative Frobenius error of the principal part
``U_k diag(S_k) V_kᴴ`` against the exact one (each triplet moves the product by about
``σ_i sin∠_i``). Without a spectral gap at k (a flat spectrum), δ is ~0, est stays ~1 and
the slice falls back to the full SVD. Limits: the check is only as good as the computed
subspace - a singular direction that the Gaussian start misses entirely is invisible to
Rayleigh-Ritz (probability ~0 for a Gaussian start) - and in float32 the residual itself
has a floor of a few ``eps ‖X‖`` (rounding in ``X P``), so tol must stay above
``~eps σ̂_1 σ̂_k / δ_k``. The default tol (2e-5 in float32, 1e-10 in float64) keeps the
principal part within 1e-4 (float32) of a float64 full SVD on spectra with a gap.

``last_info()`` returns what the most recent call did (iterations, fallback slices).
"""
from __future__ import annotations

import torch

from .transforms import Transform

__all__ = ["hat_topk_svd", "topk_svd", "last_info", "auto_oversample"]

_LAST_INFO: dict = {}

#: default tolerance on the estimated relative error of the principal part
DEFAULT_TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
DEFAULT_MAX_ITER = 12


def last_info() -> dict:
    """What the most recent ``hat_topk_svd`` call did: ``iterations`` (the most any part
    needed), ``slices`` (number of matrices), ``fallback`` (how many got a full SVD),
    ``est`` (largest accepted error estimate), ``l`` (subspace size), ``parts`` (per
    real/complex group)."""
    return dict(_LAST_INFO)


def _real_dtype(dt):
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dt, dt)


def _hi(dt):
    return torch.complex128 if dt.is_complex else torch.float64


def _qr(y):
    """Reduced QR of tall ``y (a, n, l)`` (float64/complex128) by CholeskyQR2: two Gram
    matrices, Cholesky factors and triangular solves, i.e. matmuls, which are much cheaper
    here than batched Householder QR (and immune to the LAPACK thread contention seen on
    small CPUs). Entries whose Gram matrix is not numerically positive definite (rank-
    deficient or cond > ~1e7 in float64) get Householder ``torch.linalg.qr``.
    Returns ``Q (a, n, l)`` with orthonormal columns and ``R (a, l, l)``, ``y = Q R``."""
    g = y.mH @ y
    r1, info1 = torch.linalg.cholesky_ex(g, upper=True)
    q = torch.linalg.solve_triangular(r1, y, upper=True, left=False)
    r2, info2 = torch.linalg.cholesky_ex(q.mH @ q, upper=True)
    q = torch.linalg.solve_triangular(r2, q, upper=True, left=False)
    r = r2 @ r1
    bad = (info1 != 0) | (info2 != 0) | ~torch.isfinite(q).all(-1).all(-1)
    if bool(bad.any()):
        qb, rb = torch.linalg.qr(y[bad])
        q = q.clone(); r = r.clone()
        q[bad], r[bad] = qb, rb
    return q, r


def _orth(y):
    return _qr(y)[0]


def _full(x, k):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[..., :k], s[..., :k], vh[..., :k, :].mH


def auto_oversample(k: int) -> int:
    """Default extra columns: ``k + 16`` (l = 2k + 16). On CPU a product with l <= ~32
    columns costs about the same as with 16 (it is bound by reading X), and a larger l makes
    each iteration contract the error by (σ_{l+1}/σ_k)² instead of (σ_{k+9}/σ_k)²."""
    return k + 16


def topk_svd(x: torch.Tensor, k: int, *, oversample: int | None = None,
             tol: float | None = None,
             max_iter: int | None = None, seed: int = 0):
    """Top-k SVD of a batch of matrices ``x (..., n1, n2)`` (real or complex).

    Returns ``U (..., n1, k)``, ``S (..., k)`` real descending, ``V (..., n2, k)`` in x's
    dtype with ``x ≈ U diag(S) Vᴴ``, and an info dict (``iterations``, ``fallback``,
    ``est``, ``l``, ``slices``).
    """
    *batch, n1, n2 = x.shape
    p = min(n1, n2)
    dt = x.dtype
    rdt = _real_dtype(dt)
    hdt = _hi(dt)
    if tol is None:
        tol = DEFAULT_TOL.get(rdt, 2e-5)
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER
    if oversample is None:
        oversample = auto_oversample(k)
    l = min(p, k + max(int(oversample), 1))
    xb = x.reshape(-1, n1, n2)
    nb = xb.shape[0]
    info = {"slices": nb, "iterations": 0, "fallback": 0, "est": 0.0, "l": l}
    if nb == 0:
        return (x.new_zeros(*batch, n1, k), x.new_zeros(*batch, k, dtype=rdt),
                x.new_zeros(*batch, n2, k), info)
    if l <= k:                      # no room for a gap estimate: the subspace is everything
        u, s, v = _full(xb, k)
        info["fallback"] = nb
        return (u.reshape(*batch, n1, k), s.reshape(*batch, k), v.reshape(*batch, n2, k), info)

    U = x.new_empty(nb, n1, k)
    S = torch.empty(nb, k, dtype=rdt, device=x.device)
    V = x.new_empty(nb, n2, k)
    g = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn(n2, l, dtype=dt, device=x.device, generator=g)
    idx = torch.arange(nb, device=x.device)          # slices still iterating
    xa = xb
    q = _orth((xa @ omega).to(hdt))
    worst = 0.0
    it = 0
    while idx.numel() > 0 and it < max_iter:
        it += 1
        bmat = q.to(dt).mH @ xa                                    # (a, l, n2)
        pq, r = _qr(bmat.to(hdt).mH)                               # P (a, n2, l), R (a, l, l)
        ur, sig, vrh = torch.linalg.svd(r.mH)                      # Rᴴ = Ur diag Vrᴴ
        vr = vrh.mH
        y = (xa @ pq.to(dt)).to(hdt)                               # X P  (a, n1, l)
        uu = q @ ur[..., :, :k + 1]                                # (a, n1, k+1)
        res = y @ vr[..., :, :k + 1] - uu * sig[..., None, :k + 1].to(hdt)
        rn = torch.linalg.vector_norm(res, dim=-2)                 # (a, k+1)
        sk1 = sig[..., k:k + 1] + rn[..., k:k + 1]                 # estimate of σ_{k+1}
        s_k = sig[..., :k]
        r_k = rn[..., :k]
        delta = s_k - sk1
        sin = torch.where(delta > 0, r_k / delta.clamp_min(torch.finfo(sig.dtype).tiny),
                          torch.ones_like(r_k)).clamp(max=1.0)
        sin = torch.where(r_k == 0, torch.zeros_like(sin), sin)
        c = s_k * sin + r_k
        den = torch.linalg.vector_norm(s_k, dim=-1)
        num = torch.linalg.vector_norm(c, dim=-1)
        est = torch.where(den > 0, num / den.clamp_min(torch.finfo(sig.dtype).tiny),
                          torch.zeros_like(num))
        ok = est <= tol
        if bool(ok.any()):
            sel = idx[ok]
            U[sel] = uu[ok][..., :k].to(dt)
            S[sel] = sig[ok][..., :k].to(rdt)
            V[sel] = (pq[ok] @ vr[ok][..., :, :k]).to(dt)
            worst = max(worst, float(est[ok].max()))
            keep = ~ok
            idx = idx[keep]
            if idx.numel() == 0:
                break
            xa = xa[keep]
            y = y[keep]
        q = _orth(y)
    info["iterations"] = it
    info["est"] = worst
    if idx.numel() > 0:                       # not verified: full SVD of just these slices
        u, s, v = _full(xb[idx], k)
        U[idx], S[idx], V[idx] = u, s, v
        info["fallback"] = int(idx.numel())
    return (U.reshape(*batch, n1, k), S.reshape(*batch, k), V.reshape(*batch, n2, k), info)


def hat_topk_svd(xh: torch.Tensor, k: int, tr: Transform, n3: int, *,
                 oversample: int | None = None,
                 tol: float | None = None, max_iter: int | None = None):
    """Top-k SVD of every stored transform-domain slice.

    Args:
        xh: ``(..., m, n1, n2)`` transform-domain tensor (complex, ``m = n3 // 2 + 1``, for
            the FFT; real for the DCT and matrix transforms).
        k: number of singular triplets kept, ``1 <= k <= min(n1, n2)``.
        tr, n3: the transform and the tube length (for the FFT the DC slice and, for even
            n3 > 1, the Nyquist slice are real and decomposed in real arithmetic, so that
            their singular vectors stay real, as in ``reference.hat_svd``).
        oversample: extra subspace columns, ``l = min(k + oversample, n1, n2)``; None for
            :func:`auto_oversample` (``k + 16``).
        tol: accepted estimated relative error of each slice's principal part (see the
            module docstring); default 2e-5 (float32) / 1e-10 (float64).
    Returns:
        ``Uh (..., m, n1, k)``, ``Sh (..., m, k)`` real descending, ``Vh (..., m, n2, k)``
        with ``X̂_f ≈ Uh_f diag(Sh_f) Vh_fᴴ``.
    """
    global _LAST_INFO
    m = xh.shape[-3]
    kw = dict(oversample=oversample, tol=tol, max_iter=max_iter)
    if not tr.is_complex:
        u, s, v, info = topk_svd(xh, k, **kw)
        _LAST_INFO = dict(info, parts=[info])
        return u, s, v
    nyq = n3 % 2 == 0 and n3 > 1
    ridx = [0] + ([m - 1] if nyq else [])
    lo, hi = 1, (m - 1 if nyq else m)
    parts = []
    ur, sr, vr, info = topk_svd(xh[..., ridx, :, :].real, k, **kw)    # real slices
    parts.append(info)
    cdt = xh.dtype
    ur, vr = ur.to(cdt), vr.to(cdt)
    us, ss, vs = [ur[..., :1, :, :]], [sr[..., :1, :]], [vr[..., :1, :, :]]
    if hi > lo:
        uc, sc, vc, info = topk_svd(xh[..., lo:hi, :, :], k, seed=1, **kw)
        parts.append(info)
        us.append(uc); ss.append(sc); vs.append(vc)
    if nyq:
        us.append(ur[..., 1:, :, :]); ss.append(sr[..., 1:, :]); vs.append(vr[..., 1:, :, :])
    _LAST_INFO = {
        "slices": sum(p["slices"] for p in parts),
        "iterations": max(p["iterations"] for p in parts),
        "fallback": sum(p["fallback"] for p in parts),
        "est": max(p["est"] for p in parts),
        "l": parts[0]["l"],
        "parts": parts,
    }
    return torch.cat(us, -3), torch.cat(ss, -2), torch.cat(vs, -3)
