"""Plain-PyTorch reference implementation of every tsvd op.

These functions are what the tests compare the compiled extension against and what
``bench/`` times as the "best plain PyTorch" baseline: half-spectrum ``rfft``,
batched ``matmul``, batched ``torch.linalg`` decompositions, never a Python loop
over slices. They assume validated, broadcast-compatible inputs in a compute dtype
(float32/float64) and are fully differentiable through PyTorch autograd.

Layout: a third-order tensor has shape ``(..., n3, n1, n2)``; dim -3 is the tube
axis. f-diagonal tensors are passed as their diagonal tubes ``(..., n3, k)``.
"""
from __future__ import annotations

import torch

from .transforms import Transform, get_transform

__all__ = [
    "tprod", "ttranspose", "teye", "tinv", "tsvd", "tsvdvals", "treconstruct", "tqr",
    "tnn", "tsn", "tubal_rank", "prox_tnn", "bcirc", "fdiag", "unfold", "fold",
    "hat_svd", "hat_qr", "tubes_forward", "tubes_inverse", "full_spectrum_index",
]


def _tr(transform) -> Transform:
    return get_transform(transform)


# --------------------------------------------------------------------------------------
# transform-domain helpers
# --------------------------------------------------------------------------------------
def tubes_forward(s: torch.Tensor, tr: Transform) -> torch.Tensor:
    """Transform diagonal tubes ``(..., n3, k)`` along dim -2 -> ``(..., m, k)``."""
    return tr.forward(s.unsqueeze(-1)).squeeze(-1)


def tubes_inverse(sh: torch.Tensor, tr: Transform, n3: int) -> torch.Tensor:
    """Inverse of :func:`tubes_forward`: ``(..., m, k)`` -> real ``(..., n3, k)``."""
    if tr.is_complex and not sh.is_complex():
        sh = sh.to(torch.complex128 if sh.dtype == torch.float64 else torch.complex64)
    return tr.inverse(sh.unsqueeze(-1), n3).squeeze(-1)


def full_spectrum_index(n3: int, m: int, device=None) -> torch.Tensor:
    """Index of the stored half-spectrum slice for each of the n3 FFT frequencies."""
    k = torch.arange(n3, device=device)
    return torch.where(k < m, k, n3 - k)


def _real_split(tr: Transform, n3: int, m: int):
    """For the FFT, the stored slices that are real (DC, Nyquist) and the complex range."""
    if not tr.is_complex:
        return None
    nyq = n3 % 2 == 0 and n3 > 1
    lo, hi = 1, (m - 1 if nyq else m)
    return nyq, lo, hi


def _complex(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.complex128 if t.dtype == torch.float64 else torch.complex64)


def hat_svd(xh: torch.Tensor, tr: Transform, n3: int):
    """Economy SVD of every stored transform-domain slice.

    For the FFT the DC (and, for even n3, the Nyquist) slices are real, and are
    decomposed in real arithmetic so that their singular vectors stay real (a complex
    SVD would give them arbitrary phases, which the inverse rfft would discard).
    Returns ``(Uh (..., m, a, p), Sh (..., m, p) real, Vh (..., m, b, p))``.
    """
    split = _real_split(tr, n3, xh.shape[-3])
    if split is None:
        u, s, vh = torch.linalg.svd(xh, full_matrices=False)
        return u, s, vh.mH
    nyq, lo, hi = split
    us, ss, vs = [], [], []

    def add_real(i):
        u, s, vh = torch.linalg.svd(xh[..., i:i + 1, :, :].real, full_matrices=False)
        us.append(_complex(u)); ss.append(s); vs.append(_complex(vh.mH))

    add_real(0)
    if hi > lo:
        u, s, vh = torch.linalg.svd(xh[..., lo:hi, :, :], full_matrices=False)
        us.append(u); ss.append(s); vs.append(vh.mH)
    if nyq:
        add_real(xh.shape[-3] - 1)
    return torch.cat(us, -3), torch.cat(ss, -2), torch.cat(vs, -3)


def hat_svdvals(xh: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(xh)


def hat_qr(xh: torch.Tensor, tr: Transform, n3: int, mode: str = "reduced"):
    split = _real_split(tr, n3, xh.shape[-3])
    if split is None:
        return torch.linalg.qr(xh, mode=mode)
    nyq, lo, hi = split
    qs, rs = [], []

    def add_real(i):
        q, r = torch.linalg.qr(xh[..., i:i + 1, :, :].real, mode=mode)
        qs.append(_complex(q)); rs.append(_complex(r))

    add_real(0)
    if hi > lo:
        q, r = torch.linalg.qr(xh[..., lo:hi, :, :], mode=mode)
        qs.append(q); rs.append(r)
    if nyq:
        add_real(xh.shape[-3] - 1)
    return torch.cat(qs, -3), torch.cat(rs, -3)


# --------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------
def tprod(a: torch.Tensor, b: torch.Tensor, transform="fft") -> torch.Tensor:
    """t-product ``C = A * B``: ``(..., n3, n1, n2) x (..., n3, n2, n4) -> (..., n3, n1, n4)``."""
    tr = _tr(transform)
    n3 = a.shape[-3]
    return tr.inverse(tr.forward(a) @ tr.forward(b), n3)


def ttranspose(a: torch.Tensor, transform="fft") -> torch.Tensor:
    """t-transpose: for the FFT, slice 0 transposed and slices 1..n3-1 transposed and
    reversed (Lu's ``tran``); for real transforms, every slice transposed."""
    tr = _tr(transform)
    if tr.is_complex:
        return torch.cat([a[..., :1, :, :], a[..., 1:, :, :].flip(-3)], dim=-3).mT
    return a.mT


def teye(n: int, n3: int, transform="fft", *, dtype=None, device=None) -> torch.Tensor:
    """Identity tensor ``(n3, n, n)``: identity in every transform-domain slice."""
    tr = _tr(transform)
    dtype = dtype or torch.get_default_dtype()
    if tr.is_complex:
        out = torch.zeros(n3, n, n, dtype=dtype, device=device)
        out[0] = torch.eye(n, dtype=dtype, device=device)
        return out
    eye_h = torch.eye(n, dtype=dtype, device=device).expand(n3, n, n)
    return tr.inverse(eye_h, n3).contiguous()


def tinv(a: torch.Tensor, transform="fft") -> torch.Tensor:
    """Inverse tensor (Lu's ``tinv``): the inverse of every transform-domain slice."""
    tr = _tr(transform)
    return tr.inverse(torch.linalg.inv(tr.forward(a)), a.shape[-3])


def tsvd(x: torch.Tensor, k: int | None = None, transform="fft"):
    """Economy (k=None) or truncated t-SVD from full SVDs of every stored slice.

    Returns ``U (..., n3, n1, k)``, ``S (..., n3, k)`` (diagonal tubes) and
    ``V (..., n3, n2, k)`` with ``X ≈ U * fdiag(S) * Vᵀ``.
    """
    tr = _tr(transform)
    n3 = x.shape[-3]
    uh, sh, vh = hat_svd(tr.forward(x), tr, n3)
    if k is not None:
        uh, sh, vh = uh[..., :k], sh[..., :k], vh[..., :k]
    return tr.inverse(uh, n3), tubes_inverse(sh, tr, n3), tr.inverse(vh, n3)


def tsvdvals(x: torch.Tensor, transform="fft") -> torch.Tensor:
    """Transform-domain singular values ``(..., n3, p)``, descending in each slice."""
    tr = _tr(transform)
    n3 = x.shape[-3]
    sh = torch.linalg.svdvals(tr.forward(x))
    if tr.is_complex:
        sh = sh[..., full_spectrum_index(n3, sh.shape[-2], sh.device), :]
    return sh


def treconstruct(u, s, v, residual=None, transform="fft") -> torch.Tensor:
    """``residual + U * fdiag(S) * Vᵀ``: ``U (..., n3, n1, k)``, ``S (..., n3, k)``,
    ``V (..., n3, n2, k)`` -> ``(..., n3, n1, n2)``."""
    tr = _tr(transform)
    n3 = u.shape[-3]
    uh = tr.forward(u) * tubes_forward(s, tr).unsqueeze(-2)
    out = tr.inverse(uh @ tr.forward(v).mH, n3)
    return out if residual is None else residual + out


def tqr(x: torch.Tensor, transform="fft", mode: str = "reduced"):
    """t-QR: ``X = Q * R`` with Q orthogonal and R f-upper-triangular.

    ``mode="reduced"``: Q ``(..., n3, n1, p)``, R ``(..., n3, p, n2)``, p = min(n1, n2);
    ``mode="complete"``: Q ``(..., n3, n1, n1)``, R ``(..., n3, n1, n2)``.
    """
    tr = _tr(transform)
    n3 = x.shape[-3]
    qh, rh = hat_qr(tr.forward(x), tr, n3, mode)
    return tr.inverse(qh, n3), tr.inverse(rh, n3)


def _weighted_svals(x, tr):
    n3 = x.shape[-3]
    sh = torch.linalg.svdvals(tr.forward(x))                      # (..., m, p)
    w = tr.weights(n3, dtype=sh.dtype, device=sh.device) if tr.is_complex else \
        torch.ones(sh.shape[-2], dtype=sh.dtype, device=sh.device)
    return sh, w


def tnn(x: torch.Tensor, transform="fft") -> torch.Tensor:
    """Tensor nuclear norm ``(1/ell) Σ_k ‖X̂_k‖_*`` over the full spectrum; shape ``(...)``."""
    tr = _tr(transform)
    sh, w = _weighted_svals(x, tr)
    return (sh.sum(-1) * w).sum(-1) / tr.ell(x.shape[-3])


def tsn(x: torch.Tensor, transform="fft") -> torch.Tensor:
    """Tensor spectral norm ``max_k ‖X̂_k‖_2``; shape ``(...)``."""
    tr = _tr(transform)
    return torch.linalg.svdvals(tr.forward(x))[..., 0].amax(-1)


def tubal_rank(x: torch.Tensor, tol: float | None = None, transform="fft") -> torch.Tensor:
    """Number of nonzero singular tubes (Lu's ``tubalrank``); int64 of shape ``(...)``.

    A tube counts when the first entry of its spatial-domain singular tube,
    ``(1/ell) Σ_k σ_i(X̂_k)``, exceeds ``tol`` (default ``max(n1, n2) * eps(max)``).
    """
    tr = _tr(transform)
    sh, w = _weighted_svals(x, tr)
    s = (sh * w[:, None]).sum(-2) / tr.ell(x.shape[-3])       # (..., p)
    if tol is None:
        eps = torch.finfo(s.dtype).eps
        tol_t = max(x.shape[-2], x.shape[-1]) * eps * s.amax(-1, keepdim=True)
    else:
        tol_t = torch.as_tensor(tol, dtype=s.dtype, device=s.device)
    return (s > tol_t).sum(-1)


def prox_tnn(x: torch.Tensor, rho: float, transform="fft") -> torch.Tensor:
    """Proximal operator of ``rho * tnn``: every slice's singular values shrunk by rho."""
    tr = _tr(transform)
    n3 = x.shape[-3]
    uh, sh, vh = hat_svd(tr.forward(x), tr, n3)
    sh = torch.clamp(sh - rho, min=0)
    yh = (uh * sh.unsqueeze(-2).to(uh.dtype)) @ vh.mH
    return tr.inverse(yh, n3)


def bcirc(a: torch.Tensor) -> torch.Tensor:
    """Block-circulant matrix ``(..., n3*n1, n3*n2)``; block (i, j) is ``A[(i - j) mod n3]``."""
    n3, n1, n2 = a.shape[-3:]
    i = torch.arange(n3, device=a.device)
    idx = (i[:, None] - i[None, :]) % n3                          # (n3, n3)
    blocks = a[..., idx, :, :]                                    # (..., n3, n3, n1, n2)
    blocks = blocks.transpose(-3, -2)                             # (..., n3, n1, n3, n2)
    return blocks.reshape(*a.shape[:-3], n3 * n1, n3 * n2)


def fdiag(s: torch.Tensor, n1: int | None = None, n2: int | None = None) -> torch.Tensor:
    """f-diagonal tensor from diagonal tubes: ``(..., n3, k) -> (..., n3, n1, n2)``
    (``n1 = n2 = k`` by default)."""
    d = torch.diag_embed(s)
    k = s.shape[-1]
    n1 = k if n1 is None else n1
    n2 = k if n2 is None else n2
    if (n1, n2) != (k, k):
        if n1 < k or n2 < k:
            raise ValueError(f"fdiag: n1 and n2 must be >= k = {k}, got ({n1}, {n2})")
        d = torch.nn.functional.pad(d, (0, n2 - k, 0, n1 - k))
    return d


def unfold(x: torch.Tensor) -> torch.Tensor:
    """``(..., n3, n1, n2) -> (..., n3*n1, n2)``: the frontal slices stacked vertically."""
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def fold(m: torch.Tensor, n3: int) -> torch.Tensor:
    """Inverse of :func:`unfold`."""
    return m.reshape(*m.shape[:-2], n3, m.shape[-2] // n3, m.shape[-1])
