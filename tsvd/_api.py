"""Public tensor-algebra API: validation, dtype handling and backend dispatch.

Every function takes third-order tensors of shape ``(..., n3, n1, n2)`` (dim -3 is
the tube axis, leading dims are batch dims that broadcast like ``torch.matmul``).
MATLAB's ``n1 x n2 x n3`` array ``A`` is ``A.permute(2, 0, 1)`` here.
float32 and float64 are computed as given; float16/bfloat16 are computed in float32
and returned in the input dtype.
"""
from __future__ import annotations

import torch

from . import _backend, reference as ref
from ._validate import (check_broadcast, check_rank, check_same_device, check_tensor,
                        compute_dtype, result_dtype)
from .transforms import get_transform, is_fft

__all__ = [
    "tprod", "ttranspose", "teye", "tinv", "tsvd", "tsvdvals", "treconstruct", "tqr",
    "tnn", "tsn", "tubal_rank", "prox_tnn", "bcirc", "fdiag",
]


def _ext():
    from . import _ext as ext
    return ext


def _cast(x, dt):
    """``x`` in dtype ``dt``. Narrowing a finite result to float16/bfloat16 must stay finite:
    an overflow (e.g. singular values above 65504 in float16) is an ``OverflowError``, never a
    silent Inf; compute in float32 (``X.float()``) to get such results."""
    if x is None or x.dtype == dt:
        return x
    y = x.to(dt)
    if dt in (torch.float16, torch.bfloat16) and y.device.type != "meta" \
            and not bool(torch.isfinite(y).all()) and bool(torch.isfinite(x).all()):
        big = float(x.abs().max())
        raise OverflowError(f"result: values up to {big:.4g} do not fit in {dt} (largest finite "
                            f"{torch.finfo(dt).max:.4g}); pass the input as float32 to get a "
                            f"float32 result")
    return y


def _flat(x, batch: tuple, tail: tuple):
    """``x`` of shape ``(*b, *tail)``, ``b`` broadcastable to ``batch``, as ``(B, *tail)``
    (expanded only when ``b != batch``: each skipped call is host time saved, issue 13)."""
    if tuple(x.shape[:x.dim() - len(tail)]) != batch:
        x = x.expand(*batch, *tail)
    return x.reshape(-1, *tail)


def _transform(transform, n3, name="X"):
    tr = get_transform(transform)
    tr.check_n3(n3, name)
    return tr


# --------------------------------------------------------------------------------------
#: dtypes the compiled ops take as they are (a direct call skips the API's casts)
_DIRECT_DTYPES = (torch.float32, torch.float64)


def _direct_backend(op: str, dev) -> bool:
    """True when a direct call of the compiled ``op`` is what :func:`_backend.choose` would
    pick (mode "auto" or "compiled" and kernels for ``dev``); records it."""
    if _backend.get_backend() not in ("auto", "compiled") \
            or not _backend.compiled_available(dev):
        return False
    _backend.record(op, "compiled")
    return True


def _tprod_direct(A, B, transform):
    """The compiled op called on A, B as they are, or None (see :func:`_treconstruct_direct`):
    FFT; both 3-D, or both 4-D with the same batch; non-empty, one float32/float64 dtype and
    device; n3 and the inner dims matching."""
    if not (isinstance(transform, str) and transform == "fft"
            and isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
        return None
    dt, nd = A.dtype, A.dim()
    if (dt not in _DIRECT_DTYPES or B.dtype != dt or nd not in (3, 4) or B.dim() != nd
            or B.device != A.device or A.shape[:nd - 2] != B.shape[:nd - 2]
            or A.shape[-1] != B.shape[-2] or A.numel() == 0 or B.numel() == 0):
        return None
    if not _direct_backend("tprod", A.device):
        return None
    if nd == 4:
        return _ext().tprod(A, B)
    return _ext().tprod(A[None], B[None])[0]


def tprod(A: torch.Tensor, B: torch.Tensor, *, transform="fft") -> torch.Tensor:
    """t-product ``C = A * B`` (Lu's ``tprod``).

    Args:
        A: ``(..., n3, n1, n2)``.
        B: ``(..., n3, n2, n4)``; batch dims broadcast with A's.
        transform: ``"fft"`` (default), ``"dct"`` or an invertible ``(n3, n3)`` tensor.
    Returns:
        ``(..., n3, n1, n4)``; ``bcirc(C) == bcirc(A) @ bcirc(B)`` for the FFT.
    """
    out = _tprod_direct(A, B, transform)
    if out is not None:
        return out
    check_tensor("A", A)
    check_tensor("B", B)
    check_same_device(A=A, B=B)
    if A.shape[-3] != B.shape[-3]:
        raise ValueError(f"tube lengths differ: A has n3 = {A.shape[-3]}, B has n3 = {B.shape[-3]}")
    if A.shape[-1] != B.shape[-2]:
        raise ValueError(f"inner dims differ: A is (..., n3, n1, {A.shape[-1]}), "
                         f"B is (..., n3, {B.shape[-2]}, n4)")
    batch = check_broadcast("A", A.shape[:-3], "B", B.shape[:-3])
    tr = _transform(transform, A.shape[-3], "A")
    dt, out_dt = compute_dtype(A, B), result_dtype(A, B)
    A, B = _cast(A, dt), _cast(B, dt)
    which = _backend.record("tprod", _backend.choose("tprod", A.device, eligible=is_fft(tr)))
    if which == "compiled":
        n3 = A.shape[-3]
        a, b = _flat(A, batch, tuple(A.shape[-3:])), _flat(B, batch, tuple(B.shape[-3:]))
        out = _ext().tprod(a, b).reshape(*batch, n3, A.shape[-2], B.shape[-1])
    else:
        out = ref.tprod(A, B, tr)
    return _cast(out, out_dt)


def ttranspose(A: torch.Tensor, *, transform="fft") -> torch.Tensor:
    """t-transpose ``Aᵀ`` (Lu's ``tran``): ``(..., n3, n1, n2) -> (..., n3, n2, n1)``.

    For the FFT: slice 0 transposed, slices 1..n3-1 transposed in reverse order.
    For real transforms (DCT, a real matrix): every slice transposed.
    """
    check_tensor("A", A)
    tr = _transform(transform, A.shape[-3], "A")
    return ref.ttranspose(A, tr)


def teye(n: int, n3: int, *, transform="fft", dtype=None, device=None) -> torch.Tensor:
    """Identity tensor ``(n3, n, n)`` (Lu's ``teye``): ``I * A == A * I == A``."""
    for name, v in (("n", n), ("n3", n3)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.float16,
                                           torch.bfloat16):
        raise TypeError(f"dtype: expected a real floating dtype, got {dtype}")
    tr = _transform(transform, n3, "the identity")
    dt = compute_dtype(torch.empty(0, dtype=dtype or torch.get_default_dtype()))
    return ref.teye(n, n3, tr, dtype=dt, device=device).to(dtype or torch.get_default_dtype())


def tinv(A: torch.Tensor, *, transform="fft") -> torch.Tensor:
    """Inverse tensor (Lu's ``tinv``): ``A * tinv(A) == I``. ``A``: ``(..., n3, n, n)``.

    Raises ``ValueError`` if any transform-domain slice is singular (to working precision).
    """
    check_tensor("A", A, finite=True)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A: expected square frontal slices (..., n3, n, n), got {tuple(A.shape)}")
    tr = _transform(transform, A.shape[-3], "A")
    dt, out_dt = compute_dtype(A), A.dtype
    a = _cast(A, dt)
    ah = tr.forward(a)
    with torch.no_grad():
        sv = torch.linalg.svdvals(ah)
        eps = torch.finfo(dt).eps
        bad = sv[..., -1] <= sv[..., 0] * A.shape[-1] * eps
        if bool(bad.any()):
            raise ValueError("A: the tensor is singular (a transform-domain slice has condition "
                             "number beyond 1/eps); it has no inverse")
    return _cast(tr.inverse(torch.linalg.inv(ah), A.shape[-3]), out_dt)


def tsvd(X: torch.Tensor, k: int | None = None, *, transform="fft", method: str = "auto",
         oversample: int | None = None, tol: float | None = None,
         generator: torch.Generator | None = None):
    """t-SVD ``X = U * fdiag(S) * Vᵀ`` (Lu's ``tsvd``; economy or truncated).

    Args:
        X: ``(..., n3, n1, n2)``, finite.
        k: ``None`` for the economy t-SVD (``k = min(n1, n2)``), else the number of
            principal singular values and vectors kept in each transform-domain slice
            (``1 <= k <= min(n1, n2)``). The truncation is the best tubal-rank-k
            approximation of X (Eckart-Young, per slice), to within ``tol`` (below).
        method: ``"full"`` (a full SVD of every slice), ``"randomized"`` (block Krylov from
            a Gaussian start, with Rayleigh-Ritz, whose cost grows with k, checked per slice
            against the contract below after every block step, up to 40 steps (with
            ``"auto"``: the cost model's budget, and up to half as many again for a slice
            whose estimate is about to meet it); a slice that does not meet it then gets a
            full SVD), or
            ``"auto"`` (the default: a cost model measured on a 2-core CPU,
            :func:`tsvd._lowrank.plan`, decides up front between the two and caps the
            iterations at the cost of a full SVD; the full SVD whenever X requires grad).
        oversample: randomized method's extra columns: the block size is
            ``k + oversample`` (default None: ``max(k + 8, 16)`` columns, see
            :func:`tsvd._lowrank.auto_oversample`).
        tol: randomized method's accuracy contract (default 1e-4 for float32/float16/
            bfloat16, 1e-10 for float64). For every transform-domain slice ``X̂_f`` with
            singular values ``σ_1 >= σ_2 >= ...``, optimal rank-k part ``X̂_k`` and returned
            ``X̃_k = Û_f diag(Ŝ_f) V̂_fᴴ``:

            (a) ``‖X̂_f - X̃_k‖_F² - ‖X̂_f - X̂_k‖_F² <= tol · ‖X̂_k‖_F²``;
            (b) ``|Ŝ_f,i - σ_i| <= tol · σ_1`` for every ``i <= k``.

            Neither needs a gap between σ_k and σ_{k+1}. Where there is one, (a) bounds the
            singular subspaces: ``‖sin Θ(Û_f, U_k)‖_F² <= tol · ‖X̂_k‖_F² / (σ_k² - σ_{k+1}²)``
            (the same for V). The check is a posteriori, from Ritz values and residuals (see
            :mod:`tsvd._lowrank`); the norm of X outside the subspace is estimated, so the
            contract rests on the Gaussian start reaching the top singular directions.
            Summed over the slices (Parseval), (a) gives the same relative bound for the
            tensor: ``‖X - X̃‖_F² - ‖X - X_k‖_F² <= tol · ‖X_k‖_F²``.
        generator: randomized method's ``torch.Generator`` for the Gaussian start (default:
            one seeded 0): the result is deterministic for a fixed generator state.
    Returns:
        ``U (..., n3, n1, k)``, ``S (..., n3, k)`` (diagonal tubes, see :func:`fdiag`),
        ``V (..., n3, n2, k)``, all real, orthogonal in the t-product sense.
        Gradients: exact for ``method="full"`` (and ``"auto"``, which takes it when X requires
        grad); for ``"randomized"`` the last Rayleigh-Ritz step is differentiated with the
        subspace held fixed (exact for S, approximate for U and V).
    """
    check_tensor("X", X, finite=True)
    n3, n1, n2 = X.shape[-3:]
    if k is not None:
        k = check_rank("k", k, n1, n2)
    if method not in ("auto", "full", "randomized"):
        raise ValueError(f"method: expected 'auto', 'full' or 'randomized', got {method!r}")
    if method == "randomized" and k is None:
        raise ValueError("k: method='randomized' computes a truncated t-SVD and needs k "
                         "(1 <= k <= min(n1, n2)); use method='full' for the economy t-SVD")
    if oversample is not None and (isinstance(oversample, bool) or not isinstance(oversample, int)
                                   or oversample < 0):
        raise ValueError(f"oversample: expected a non-negative int or None, got {oversample!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not tol > 0):            # `not >` also rejects NaN
        raise ValueError(f"tol: expected a positive number or None, got {tol!r}")
    tr = _transform(transform, n3)
    dt, out_dt = compute_dtype(X), X.dtype
    x = _cast(X, dt)
    p = min(n1, n2)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    cost_model = method == "auto"
    if method == "auto":
        method = "full"
        if k is not None and not (torch.is_grad_enabled() and X.requires_grad):
            from ._lowrank import auto_oversample, plan
            extra = oversample if oversample is not None else auto_oversample(k)
            if plan(n1, n2, k, min(p, k + max(extra, 1)), tr.is_complex)[0]:
                method = "randomized"
    which = _backend.record("tsvd", _backend.choose("tsvd", x.device, eligible=is_fft(tr)))
    if which == "compiled":
        xh = _ext().tube_rfft(x.reshape(-1, n3, n1, n2)).reshape(*x.shape[:-3], -1, n1, n2)
    else:
        xh = tr.forward(x)
    if method == "randomized":
        from ._lowrank import hat_topk_svd
        uh, sh, vh = hat_topk_svd(xh, k, tr, n3, oversample=oversample, tol=tol,
                                  generator=generator, cost_model=cost_model)
    else:
        uh, sh, vh = ref.hat_svd(xh, tr, n3)
        if k is not None:
            uh, sh, vh = uh[..., :k], sh[..., :k], vh[..., :k]
    if which == "compiled":
        kk = uh.shape[-1]
        u = _ext().tube_irfft(uh.reshape(-1, *uh.shape[-3:]), n3).reshape(*x.shape[:-3], n3, n1, kk)
        v = _ext().tube_irfft(vh.reshape(-1, *vh.shape[-3:]), n3).reshape(*x.shape[:-3], n3, n2, kk)
    else:
        u, v = tr.inverse(uh, n3), tr.inverse(vh, n3)
    s = ref.tubes_inverse(sh, tr, n3)
    return _cast(u, out_dt), _cast(s, out_dt), _cast(v, out_dt)


def tsvdvals(X: torch.Tensor, *, transform="fft") -> torch.Tensor:
    """Transform-domain singular values ``(..., n3, min(n1, n2))``, descending per slice
    (like ``torch.linalg.svdvals``); for the FFT the mirrored half is filled in."""
    check_tensor("X", X, finite=True)
    tr = _transform(transform, X.shape[-3])
    return _cast(ref.tsvdvals(_cast(X, compute_dtype(X)), tr), X.dtype)


def _treconstruct_direct(U, S, V, residual, transform):
    """The compiled op called on the inputs as they are, or None. Only for the cases the op
    takes unchanged (issue 13: the host overhead of a call): FFT; U, V (and the residual)
    with no batch dim or one that all four share; every tensor non-empty with the same
    float32/float64 dtype and device; the compiled backend chosen. Everything else returns
    None and goes through :func:`treconstruct`'s checks, casts and broadcasting, so its
    errors and results are the same either way."""
    if not (isinstance(transform, str) and transform == "fft"
            and isinstance(U, torch.Tensor) and isinstance(S, torch.Tensor)
            and isinstance(V, torch.Tensor)):
        return None
    dt, dev, nd = U.dtype, U.device, U.dim()
    if (dt not in _DIRECT_DTYPES or S.dtype != dt or V.dtype != dt or nd not in (3, 4)
            or S.dim() != nd - 1 or V.dim() != nd or S.device != dev or V.device != dev):
        return None
    lead = U.shape[:nd - 2]                               # (B, n3) or (n3,)
    n1, k = U.shape[-2:]
    if S.shape != (*lead, k) or V.shape[:nd - 2] != lead or V.shape[-1] != k:
        return None
    if U.numel() == 0 or S.numel() == 0 or V.numel() == 0:
        return None
    if residual is not None and not (
            isinstance(residual, torch.Tensor) and residual.dtype == dt
            and residual.device == dev and residual.shape == (*lead, n1, V.shape[-2])
            and residual.numel() > 0):
        return None
    if not _direct_backend("treconstruct", dev):
        return None
    if nd == 4:
        return _ext().treconstruct(U, S, V, residual)
    return _ext().treconstruct(U[None], S[None], V[None],
                               None if residual is None else residual[None])[0]


def treconstruct(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, *,
                 residual: torch.Tensor | None = None, transform="fft") -> torch.Tensor:
    """``residual + U * fdiag(S) * Vᵀ`` in one fused op: the LoRA-PT hot path.

    Args:
        U: ``(..., n3, n1, k)``.
        S: ``(..., n3, k)`` diagonal tubes (as returned by :func:`tsvd`).
        V: ``(..., n3, n2, k)``.
        residual: optional ``(..., n3, n1, n2)``.
    Returns:
        ``(..., n3, n1, n2)``; differentiable in U, S, V and residual.
    """
    out = _treconstruct_direct(U, S, V, residual, transform)
    if out is not None:
        return out
    check_tensor("U", U)
    check_tensor("S", S, min_dim=2)
    check_tensor("V", V)
    if residual is not None:
        check_tensor("residual", residual)
    check_same_device(U=U, S=S, V=V, residual=residual)
    n3, n1, k = U.shape[-3:]
    n2 = V.shape[-2]
    if S.shape[-2:] != (n3, k):
        raise ValueError(f"S: expected diagonal tubes (..., {n3}, {k}) matching U "
                         f"(..., n3={n3}, n1, k={k}), got {tuple(S.shape)}")
    if V.shape[-3] != n3 or V.shape[-1] != k:
        raise ValueError(f"V: expected (..., {n3}, n2, {k}) matching U, got {tuple(V.shape)}")
    batch = check_broadcast("U", U.shape[:-3], "S", S.shape[:-2])
    batch = check_broadcast("U/S", batch, "V", V.shape[:-3])
    if residual is not None:
        if residual.shape[-3:] != (n3, n1, n2):
            raise ValueError(f"residual: expected (..., {n3}, {n1}, {n2}), got "
                             f"{tuple(residual.shape)}")
        batch = check_broadcast("U/S/V", batch, "residual", residual.shape[:-3])
    tr = _transform(transform, n3, "U")
    dt, out_dt = compute_dtype(U, S, V, residual), result_dtype(U, S, V, residual)
    U, S, V, residual = (_cast(t, dt) for t in (U, S, V, residual))
    which = _backend.record("treconstruct",
                            _backend.choose("treconstruct", U.device, eligible=is_fft(tr)))
    if which == "compiled":
        u, s, v, r = (None if x is None else _flat(x, batch, tail) for x, tail in
                      ((U, (n3, n1, k)), (S, (n3, k)), (V, (n3, n2, k)),
                       (residual, (n3, n1, n2))))
        out = _ext().treconstruct(u, s, v, r).reshape(*batch, n3, n1, n2)
    else:
        out = ref.treconstruct(U, S, V, residual, tr)
    return _cast(out, out_dt)


def tqr(X: torch.Tensor, *, transform="fft", mode: str = "reduced"):
    """t-QR ``X = Q * R`` (Lu's ``tqr``).

    ``mode="reduced"``: Q ``(..., n3, n1, p)``, R ``(..., n3, p, n2)``, p = min(n1, n2);
    ``mode="complete"``: Q ``(..., n3, n1, n1)``, R ``(..., n3, n1, n2)``.
    Q is orthogonal (``Qᵀ * Q = I``) and every transform-domain slice of R is upper
    triangular.
    """
    check_tensor("X", X, finite=True)
    if mode not in ("reduced", "complete"):
        raise ValueError(f"mode: expected 'reduced' or 'complete', got {mode!r}")
    tr = _transform(transform, X.shape[-3])
    q, r = ref.tqr(_cast(X, compute_dtype(X)), tr, mode)
    return _cast(q, X.dtype), _cast(r, X.dtype)


def tnn(X: torch.Tensor, *, transform="fft") -> torch.Tensor:
    """Tensor nuclear norm (Lu's ``tnn``): ``(1/ℓ) Σ_k ‖X̂_k‖_*``; shape ``(...)``.

    ``ℓ = n3`` for the FFT (the sum runs over the full spectrum) and 1 for the orthonormal
    DCT and for a matrix transform M. That is the ⋆_M tensor nuclear norm (the dual of
    :func:`tsn`) when M is orthogonal; for ``M Mᵀ = c I`` with ``c != 1`` (Lu's toolbox 2.0
    convention ``ℓ = c``) divide the result by c; for other invertible M the quantity is
    still computed but is not the dual norm of :func:`tsn`.
    """
    check_tensor("X", X, finite=True)
    tr = _transform(transform, X.shape[-3])
    return _cast(ref.tnn(_cast(X, compute_dtype(X)), tr), X.dtype)


def tsn(X: torch.Tensor, *, transform="fft") -> torch.Tensor:
    """Tensor spectral norm (Lu's ``tsn``): ``max_k ‖X̂_k‖_2``; shape ``(...)``."""
    check_tensor("X", X, finite=True)
    tr = _transform(transform, X.shape[-3])
    return _cast(ref.tsn(_cast(X, compute_dtype(X)), tr), X.dtype)


def tubal_rank(X: torch.Tensor, tol: float | None = None, *, transform="fft") -> torch.Tensor:
    """Tubal rank (Lu's ``tubalrank``): the number of singular tubes whose first entry
    exceeds ``tol`` (default ``max(n1, n2) * eps(largest)``). int64, shape ``(...)``."""
    check_tensor("X", X, finite=True)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not tol >= 0):          # `not >=` also rejects NaN
        raise ValueError(f"tol: expected a non-negative number or None, got {tol!r}")
    tr = _transform(transform, X.shape[-3])
    return ref.tubal_rank(_cast(X, compute_dtype(X)), tol, tr)


def prox_tnn(X: torch.Tensor, rho: float, *, transform="fft") -> torch.Tensor:
    """Proximal operator of the tensor nuclear norm (Lu's ``prox_tnn``):
    ``argmin_Y rho * tnn(Y) + ½‖Y - X‖_F²``; every transform-domain singular value is
    shrunk by ``rho``. Same shape as X."""
    check_tensor("X", X, finite=True)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:  # and NaN
        raise ValueError(f"rho: expected a non-negative number, got {rho!r}")
    tr = _transform(transform, X.shape[-3])
    return _cast(ref.prox_tnn(_cast(X, compute_dtype(X)), float(rho), tr), X.dtype)


def bcirc(A: torch.Tensor) -> torch.Tensor:
    """Block-circulant matrix (Lu's ``bcirc``): ``(..., n3, n1, n2) -> (..., n3*n1, n3*n2)``,
    block (i, j) = ``A[(i - j) mod n3]``."""
    check_tensor("A", A)
    return ref.bcirc(A)


def fdiag(S: torch.Tensor, n1: int | None = None, n2: int | None = None) -> torch.Tensor:
    """f-diagonal tensor from diagonal tubes: ``(..., n3, k) -> (..., n3, n1, n2)``
    (square ``k x k`` slices by default)."""
    check_tensor("S", S, min_dim=2)
    k = S.shape[-1]
    for name, v in (("n1", n1), ("n2", n2)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < k):
            raise ValueError(f"{name}: expected an int >= k = {k} (the number of diagonal "
                             f"tubes), got {v!r}")
    return ref.fdiag(S, n1, n2)
