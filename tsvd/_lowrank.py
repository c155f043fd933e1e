"""Truncated (top-k) SVD of every transform-domain slice with a gap-independent contract.

``hat_topk_svd`` is what ``tsvd.tsvd(X, k, method="randomized")`` (and ``"auto"`` where the
cost model prefers it) calls. Its cost grows with k (``O(n1 n2 l)`` per iteration and slice,
``l = k + oversample``) instead of the ``O(n1 n2 min(n1, n2))`` of a full SVD.

Contract (per slice ``X`` with singular values ``σ_1 >= σ_2 >= ...``; ``X_k`` the optimal
rank-k part, ``X̃_k = U_k diag(S_k) V_kᴴ`` the returned one)::

    (a)  ‖X - X̃_k‖_F² - ‖X - X_k‖_F²  <=  tol · ‖X_k‖_F²            (= tol · Σ_{i<=k} σ_i²)
    (b)  |S_i - σ_i|                  <=  tol · σ_1                    for every i <= k

Neither needs a gap at k: where σ_k ≈ σ_{k+1} every near-optimal rank-k approximation is
accepted. Where there is a gap, (a) pins the subspace: with ``δ = σ_k² - σ_{k+1}²`` the
returned left/right subspaces satisfy ``‖sin Θ‖_F² <= tol · ‖X_k‖_F² / δ`` (the excess error of
a rank-k projection ``U Uᴴ X`` is at least ``δ ‖sin Θ(U, U_k)‖_F²``).

Method (default, :data:`ALGORITHM` = "krylov"): block Krylov, i.e. block Lanczos on ``A Aᴴ``
with full reorthogonalisation (A = X, or Xᴴ when that makes the basis the shorter side),
batched over all slices with ``matmul``, never a loop over slices::

    Q_0 = orth(A Ω),  P_0 = Aᴴ Q_0                  Ω: (n, b) Gaussian from `generator`
    repeat (block step j):
        G = Qᴴ A Aᴴ Q = Pᴴ P = W diag(θ) Wᴴ          Q = [Q_0 .. Q_j], P = [P_0 .. P_j]
        U = Q W, σ̂ = sqrt(θ), V = P W / σ̂          Ritz triplets: Aᴴ U = V diag(σ̂) exactly
        Y = (I - Q Qᴴ) A P_j                        A Aᴴ U - U diag(θ) = Y W_j (W_j: last rows)
        accept the slice if the bounds below meet tol;  else Q_{j+1} = orth(Y), P_{j+1} = Aᴴ Q_{j+1}

Each step costs two products with b columns (``b = k + oversample``, default
``max(k + 8, 16)``), and the Ritz values converge like Chebyshev polynomials of the whole
Krylov space: the error of σ̂_i² after j steps falls roughly like ``exp(-4 j sqrt(γ))``, γ
the relative gap between σ_i² and σ_{b+1}² (Saad's bounds; Musco & Musco 2015 for gap-free
rates), where subspace iteration's falls like ``(1 + γ')^(-2 j)``, γ' relative to σ_{l+1}²:
measured on Gaussian 768 x 768 complex slices at k = 8, about 350 column-products (blocks of
16) against 1600 (l = 48) to reach 1e-4 in (a) and (b). The residuals of all Ritz pairs lie in
span(Y), so their Gram matrix has rank b: ``Fᴴ F`` with ``F = Λ^½ Eᴴ W_j`` (``Yᴴ Y = E Λ Eᴴ``),
which keeps the sharp bound's eigenvalue problems b x b. The products run in the input
precision; ``G``, ``P`` (a float64 copy) and everything ``L x L`` in float64/complex128.
Because the residuals come from the projected matrices rather than from a fresh product, the
estimates are floored at the products' rounding level (:func:`_rounding_floor`).

Subspace iteration (``algorithm="subspace"``, the method before; Halko, Martinsson & Tropp
2011, Alg. 4.4; Ritz values converge at the rate ``(σ_{l+1}/σ_i)^4`` per iteration)::

    Q = orth(X Ω)                                   Ω: (n2, l) Gaussian from `generator`
    repeat:
        B = Qᴴ X = W diag(σ̂) Vᴴ_B                    (SVD of the l x n2 B, float64)
        U = Q W,  V = Bᴴ W diag(1/σ̂)               Ritz triplets: Xᴴ U = V diag(σ̂) exactly
        Y = X V;  r_i = ‖Y_i - σ̂_i U_i‖              residuals (orthogonal to Q)
        accept the slice if the bounds below meet tol;  else Q = orth(Y)

The two products with X run in the input precision; everything of size ``(n1 + n2) x l`` or
``l x l`` runs in float64/complex128.

A-posteriori check (per slice). Ritz values are lower bounds, ``σ̂_i <= σ_i`` (interlacing), so
(a) = ``Σ_{i<=k} (σ_i² - σ̂_i²)`` (the error of ``U_k U_kᴴ X`` is ``‖X‖_F² - Σ σ̂_i²``) and
(b) = ``max (σ_i - σ̂_i)`` need upper bounds on ``σ_i²``. The residuals ``res_m`` are orthogonal
to the whole subspace, so for a split j in ``k..l-1`` ``X Xᴴ`` in the basis (top-j Ritz
vectors, complement) is ``[[diag(σ̂_1²..σ̂_j²), E_j], [E_jᴴ, B_j]]`` with ``E_j E_jᴴ`` the Gram
matrix of ``σ̂_m res_m`` (m <= j). For every t > 0 it is majorised by
``blkdiag(diag(σ̂²) + E_j E_jᴴ / t, B_j + t I)`` (the difference is a Gram matrix), which gives
per-value and Ky Fan (sum) bounds quadratic in the residuals; :func:`contract_bounds` minimises
them over t and j (formulas there). They work far below the float32 residual floor, and a
split j > k uses the oversampled gap σ̂_k vs σ̂_{j+1} instead of σ̂_k vs σ̂_{k+1}. What is
estimated rather than bounded: ``μ_j = ‖B_j‖``, the norm of X X^H outside the top-j Ritz
vectors, taken as ``max_{m>j} (σ̂_m + r_m)²``; that is right once the Gaussian start has reached
the top singular directions. Measured: the accepted bound is 10-20x above the true error on
Gaussian matrices (it costs a few iterations), and the tests compare the contract with
float64 SVDs on flat, gapped, repeated and decaying spectra.

Cost model (chosen before any work, per group of same-shaped slices, :func:`plan`), in units
of one multiply-add with X: a full economy SVD costs ``FULL_SVD_COST * n1 n2 p`` and a product
with l columns ``n1 n2 (l + 16)`` (bound by reading X until l is well above 16); a block
Krylov step adds its projections and its ``L x L`` eigenproblem. :data:`FULL_SVD_COST` was
measured on the 2-core CPU this was developed on. The budget is the number of steps that
together cost at most a full SVD (capped by ``max_iter``); if it is below :data:`MIN_ITERS` + 1
the full SVD is used from the start; slices not accepted within it get a full SVD. (Subspace
iteration also gives up early, after :data:`MIN_ITERS` iterations, on a slice whose measured
convergence rate predicts that it will not meet tol within the budget.)

``last_info()`` returns what the most recent call did.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .transforms import Transform

__all__ = ["hat_topk_svd", "topk_svd", "last_info", "auto_oversample", "plan",
           "contract_bounds", "DEFAULT_TOL"]

_LAST_INFO: dict = {}

#: default tolerance of the contract (a), (b)
DEFAULT_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
#: most iterations ever run (the cost model usually allows fewer)
DEFAULT_MAX_ITER = 40
#: iterations run before a slice may be sent to the full SVD on its measured rate
MIN_ITERS = 3
#: the sharper (eigenvalue) form of the a-posteriori bound is computed for slices whose
#: cheap trace form is within this factor of tol
SHARP_WITHIN = 100.0
#: cost of a batched economy SVD per ``n1 n2 min(n1, n2)`` in units of one column of a
#: batched product with X (``n1 n2`` multiply-adds at l ~ 32-64 columns). Measured on the
#: project's 2-core CPU (torch 2.13) on 2026-12-04 with the machine quiet, as the time of the
#: batched half-spectrum SVD over the time of one whole iteration (products, orthonormalisation,
#: Rayleigh-Ritz, bounds) at k = 8, l = 48: 20 iterations for 48x768x768 (3.3 units), 18 for
#: 12x3072x768 (3.0); bench/results/cpu_2core_topk_2026-12-04/quick_run4.log. (An earlier
#: value, 5.5, came from a loaded machine, where the LAPACK SVD slows far more than matmul.)
FULL_SVD_COST = 3.0
#: where the small dense factorisations of each iteration run. "device": on x's device.
#: "host": on the CPU, with x's device running only the products with X and the basis:
#: block Krylov's ``L x L`` and ``r x r`` eigenproblems, bounds and per-slice decisions;
#: CholeskyQR2's ``l x l`` Cholesky factors and inverses (:func:`_orth`); the final QR of
#: the accepted slices' V; subspace iteration's Rayleigh-Ritz SVD of the projected
#: ``B (a, l, n2)`` as B = Rᴴ Q_Bᴴ (CholeskyQR2) and the SVD of the ``l x l`` Rᴴ (the same
#: factorisation up to rounding: Rᴴ = B Q_B has B's singular values and left vectors, the
#: right ones are Q_B Z). "auto" (default): "host" for CUDA tensors, "device" otherwise. Why:
#: on an H200 (torch 2.11, 2026-12-04, bench/results/h200_torch2.11_2026-12-04_v2/
#: gpu_check.log, bench/tsvd_profile.py) a t-SVD of 48x768x768 at k = 8 by subspace
#: iteration took 240 ms, of which cuSOLVER's batched SVD of B (complex128, 48 x 768 per
#: slice) was 113 ms of device time and the bounds' eigvalsh 69 ms; block Krylov with the
#: eigenproblems on the host took 59.5 ms there (bench/results/h200_torch2.11_2026-12-04c/),
#: bound by the host's launches. The CholeskyQR2 and QR parts moved to the host after that
#: run and are untimed on a GPU.
SMALL_LINALG = "auto"
#: block Krylov's cost model (:func:`plan`), in units of a product of X with one column.
#: Measured on the 2-core CPU (torch 2.13, 2 threads, 23 complex64 slices of 768 x 768,
#: 2026-12-04): a batched full SVD 9.1 p units; a (23, L, L) complex128 eigh on one thread
#: 19 / 96 / 335 / 949 units at L = 64 / 128 / 216 / 320, about 25 L³ / (n1 n2) above L = 128;
#: the basis work fitted to the step times of Gaussian k = 32 runs (550 units a step at
#: L ≈ 170, b = 40, of which 112 products and about 200 eigh).
KRYLOV_FULL_SVD = 9.0
#: block Krylov is chosen only when the budget allows this many block steps: flat spectra took
#: 7-18 steps at tol 1e-3/1e-4 (bench/tsvd_topk.py, 2026-12-04), and with a budget of 5-6 steps
#: (the cpu preset's 192-wide UNETR stacks) every slice of the trained weights fell back to the
#: full SVD after iterating: 0.55x the full SVD's speed. With 8 those shapes take the full SVD
#: up front.
KRYLOV_MIN_STEPS = 8
KRYLOV_EIGH = 25.0
KRYLOV_BASIS = 25.0
#: the iteration: "krylov" (block Krylov, the default) or "subspace" (subspace iteration, kept
#: for comparison: ``bench/tsvd_topk.py --algorithms``)
ALGORITHM = "krylov"
#: the FFT's real slices (DC and, for even n3, Nyquist) in :func:`hat_topk_svd`: "separate"
#: (their own batch in real arithmetic: a second block Krylov run), "merged" (in the complex
#: slices' batch, kept real by a real start and real eigenproblems, ``topk_svd(real=...)``:
#: one run, so half the launches and host syncs, but their products cost complex
#: arithmetic), or "auto" (default): "merged" where the small work runs on the host
#: (:data:`SMALL_LINALG`, i.e. CUDA tensors: there a t-SVD is bound by its launches, about
#: 1000 for 48x768x768 at k = 8 on an H200, 2026-12-04), "separate" otherwise (on a CPU the
#: products dominate: merging would add a third to them at n3 = 12). Either way the real
#: slices' singular vectors are real.
REAL_SLICES = "auto"
#: threads over which the small batched eigenproblems on the CPU (a block step's ``L x L``
#: and ``r x r`` ones) are split, each thread a share of the matrices on one core (torch
#: solves a batch one matrix after another on one thread); same results bit for bit. 1
#: (default, or the environment's ``TSVD_HOST_THREADS``): no split. Measured on the 2-core VM
#: (MKL, torch 2.13, 2026-12-04, machine otherwise idle): two threads took 0.55-1.45x the time
#: of one on batches of 25-150 matrices of 16-64 rows, too uneven to make it the default; on
#: a many-core GPU host, where the t-SVD waits on these (about a third of its host time on
#: an H200's host), ``bench/tsvd_profile.py`` times 8 beside 1.
HOST_THREADS = os.environ.get("TSVD_HOST_THREADS", "1")
_POOL: ThreadPoolExecutor | None = None


def last_info() -> dict:
    """What the most recent ``hat_topk_svd`` call did: ``iterations`` (the most any part
    needed), ``slices`` (number of matrices), ``fallback`` (slices given a full SVD after
    iterating), ``full`` (slices given a full SVD by the up-front cost model), ``est_a``,
    ``est_b`` (largest accepted bounds of (a) and (b)), ``l`` (subspace size), ``parts`` (per
    real/complex group)."""
    return dict(_LAST_INFO)


def _real_dtype(dt):
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dt, dt)


def _hi(dt):
    return torch.complex128 if dt.is_complex else torch.float64


def auto_oversample(k: int, algorithm: str | None = None) -> int:
    """Default extra columns. Block Krylov: ``max(8, 16 - k)``, a block of ``max(k + 8, 16)``
    columns (a product with fewer than ~16 columns costs about as much as with 16 on a CPU,
    bound by reading X; with more, each block step costs more and the Krylov space grows
    coarser: on 48x768x768 i^-0.7 slices at k = 8, blocks of 16 needed 224 column-products
    to reach (a), (b) <= 1e-4, blocks of 24 240 and of 32 320). Subspace iteration: ``k + 32``
    (l = 2k + 32): its Ritz values' error shrinks by ``(σ_{l+1}/σ_k)^4`` per iteration, so a
    larger l pays for itself on flat spectra."""
    if (ALGORITHM if algorithm is None else algorithm) == "krylov":
        return max(8, 16 - k)
    return k + 32


def plan(n1: int, n2: int, k: int, l: int, complex_: bool, max_iter: int | None = None,
         algorithm: str | None = None):
    """Cost model: ``(use_iteration, budget)``. ``budget`` is the number of iterations (block
    Krylov: block steps; subspace iteration: iterations) whose modelled cost stays at or
    below a full SVD of the same slice (at most ``max_iter``); iterate only when that budget
    is at least :data:`MIN_ITERS` + 1 (subspace iteration) or :data:`KRYLOV_MIN_STEPS`
    (block Krylov).

    Units: a product of X with one column, ``n1 n2`` multiply-adds; a product with c columns
    costs ``c + 16`` (bound by reading X below ~16 columns). Subspace iteration: a full SVD
    costs ``FULL_SVD_COST * p`` (``p = min(n1, n2)``) and an iteration two products. Block
    Krylov (constants measured on the 2-core CPU, torch 2.13, 768 x 768 complex64 slices,
    2026-12-04, in these units): a full SVD ``KRYLOV_FULL_SVD * p``; a block step with block l
    and basis L two products, the basis work (projections, the float64 copy of Xᴴ Q and its
    Gram update, restarts: ``KRYLOV_BASIS * L l / p``) and the ``L x L`` complex128
    eigendecomposition (``KRYLOV_EIGH * L³ / (n1 n2)``), L following :func:`restart_size`."""
    algorithm = ALGORITHM if algorithm is None else algorithm
    p, big = min(n1, n2), max(n1, n2)
    cap = DEFAULT_MAX_ITER if max_iter is None else int(max_iter)
    full = FULL_SVD_COST * p
    if algorithm == "subspace":
        if l >= p:
            return False, 0
        one = 2.0 * (l + 16)
        budget = min(int(full // one) - 1, cap)         # -1: the initial sketch
        return budget >= MIN_ITERS + 1, max(budget, 0)
    full = KRYLOV_FULL_SVD * p
    spent, steps = 2.0 * (l + 16), 0                     # the start: X Ω and Xᴴ Q_0
    lmax, kept = restart_size(k, l)
    L = l
    while steps < cap and (lmax < p or L + l <= p):
        one = 2.0 * (l + 16) + KRYLOV_BASIS * L * l / p + KRYLOV_EIGH * L ** 3 / (n1 * n2)
        if spent + one > full:
            break
        spent, steps = spent + one, steps + 1
        L = kept + l if L + l > lmax else L + l
    return steps >= KRYLOV_MIN_STEPS, steps


def contract_bounds(sig: torch.Tensor, rn: torch.Tensor, k: int,
                    gram: torch.Tensor | None = None, max_splits: int = 6, host: bool = False,
                    factor: torch.Tensor | None = None):
    """Upper bounds on the contract errors from Ritz values and residuals.

    Args:
        sig: ``(a, l)`` Ritz values σ̂, descending (float64).
        rn: ``(a, l)`` residual norms ``r_m = ‖X v_m - σ̂_m u_m‖``.
        k: number of triplets kept (``k < l``).
        gram: ``(a, l, l)`` Gram matrix ``G_mn = σ̂_m σ̂_n <res_m, res_n>`` of the scaled
            residual vectors (the coupling of the Ritz vectors to the rest in ``X Xᴴ``), or
            None to bound its eigenvalues by its trace.
        max_splits: at most this many split points j (evenly spaced in ``k..l-1``) are tried.
        host: compute the small eigenvalue problems on the CPU (see :data:`SMALL_LINALG`).
        factor: ``(a, r, l)`` with ``gram = factorᴴ factor``, given instead of ``gram`` when
            the residuals span only r << l directions (block Krylov: the next block). The
            eigenvalues of every ``G_j`` are then those of the ``r x r`` ``F_j F_jᴴ``.
    Returns:
        ``(est_a, est_b)``, each ``(a,)``: bounds on (a) / ‖X_k‖_F² and (b) / σ_1.

    For a split j, in the basis (top-j Ritz vectors, their complement), ``H = X Xᴴ`` is
    ``[[Θ_j, E_j], [E_jᴴ, B_j]]`` with ``Θ_j = diag(σ̂_1², ..., σ̂_j²)`` and ``E_j E_jᴴ = G[:j, :j]``
    (the residuals are orthogonal to the whole subspace). For every t > 0,
    ``H ≼ blkdiag(Θ_j + E_j E_jᴴ / t, B_j + t I)`` (the difference is a Gram matrix), hence
    with ``μ_j >= ‖B_j‖``::

        σ_i² - σ̂_i²              <= max(‖G_j‖ / t, μ_j + t - σ̂_i²)          (i <= k)
        Σ_{i<=k} (σ_i² - σ̂_i²)   <= KyFan_k(G_j) / t + Σ_{i<=k} max(0, μ_j + t - σ̂_i²)

    minimised over t (the first in closed form, ``2‖G_j‖ / (η + sqrt(η² + 4‖G_j‖))`` with
    ``η = σ̂_i² - μ_j``) and over j. Bounds are quadratic in the residuals, and a split j > k
    uses the oversampled gap σ̂_k vs σ̂_{j+1}. ``μ_j`` is *estimated* as
    ``max_{m > j} (σ̂_m + r_m)²`` (each Ritz pair lies within r_m of a singular value; the part
    of X outside the subspace is taken to be no larger than its Ritz pairs show).
    """
    sig = sig.to(torch.float64)
    rn = rn.to(torch.float64)
    a, l = sig.shape
    tiny = torch.finfo(sig.dtype).tiny
    th = sig * sig
    # split points j: keep the top j Ritz triplets, k <= j <= l - 1
    js = torch.arange(k, l, device=sig.device)
    if js.numel() > max_splits:
        js = js[torch.linspace(0, js.numel() - 1, max_splits, device=sig.device).round().long()]
    # μ_j: suffix max of (σ̂_m + r_m)² over m >= j (0-based: the triplets not kept)
    w = (sig + rn) ** 2
    suff = w.flip(-1).cummax(-1).values.flip(-1)             # suff[:, m] = max_{m' >= m} w
    mu = suff[:, js]                                         # (a, J)
    gd = (sig * rn) ** 2                                     # diag(G): σ̂_m² r_m²
    if gram is None and factor is None:
        tr = torch.cumsum(gd, -1)[:, js - 1]                 # tr(G_j) bounds both
        lam1, kf, cn = tr, tr, torch.full_like(tr, float(l))
    else:
        mask = (torch.arange(l, device=sig.device)[None, :] < js[:, None])
        if factor is not None:
            f = factor.to(torch.complex128 if factor.is_complex() else torch.float64)
            gd = (f.real ** 2 + (f.imag ** 2 if f.is_complex() else 0)).sum(-2)
            sc = torch.where(gd > 0, gd.rsqrt(), torch.zeros_like(gd))
            fj = f[:, None] * mask[None, :, None, :].to(gd.dtype)          # (a, J, r, l)
            m_ev = fj @ fj.mH                                              # (a, J, r, r)
            fc = fj * sc[:, None, None, :]
            m_cn = fc @ fc.mH
        else:
            g = gram.to(torch.complex128 if gram.is_complex() else torch.float64)
            g = 0.5 * (g + g.mH)
            gd = torch.diagonal(g, dim1=-2, dim2=-1).real.clamp_min(0)
            mk = mask.to(gd.dtype)
            m2 = mk[:, :, None] * mk[:, None, :]
            sc = torch.where(gd > 0, gd.rsqrt(), torch.zeros_like(gd))
            corr = g * (sc[:, :, None] * sc[:, None, :])     # unit diagonal where g_m > 0
            m_ev, m_cn = g[:, None] * m2, corr[:, None] * m2
        if host:
            m_ev, m_cn = m_ev.cpu(), m_cn.cpu()
        with _one_thread():
            ev = _split(torch.linalg.eigvalsh, m_ev).flip(-1).clamp_min(0)  # (a, J, l)
            cn = _split(torch.linalg.eigvalsh, m_cn)[..., -1].clamp_min(0)  # (a, J)
        ev, cn = ev.to(sig.device), cn.to(sig.device)
        if ev.shape[-1] < k:                                 # factor with r < k rows
            ev = torch.nn.functional.pad(ev, (0, k - ev.shape[-1]))
        lam1, kf = ev[..., 0], ev[..., :k].sum(-1)
    thk = th[:, None, :k]                                    # (a, 1, k)
    # (b): per i, closed-form minimum over t, then the best split
    eta = thk - mu[..., None]                                # (a, J, k)
    l1 = lam1[..., None]
    root = torch.sqrt(eta * eta + 4 * l1)
    per_i = torch.where(eta > 0, 2 * l1 / (eta + root).clamp_min(tiny), 0.5 * (root - eta))
    bi = per_i.amin(1)                                       # (a, k) bounds on σ_i² - σ̂_i²
    # (a): candidates t = breakpoints σ̂_i² - μ_j and the stationary points sqrt(K / c)
    c = torch.arange(1, k + 1, dtype=sig.dtype, device=sig.device)
    cand = torch.cat([eta.clamp_min(tiny), torch.sqrt(kf[..., None] / c).clamp_min(tiny)], -1)
    f = kf[..., None] / cand + torch.relu(mu[..., None, None] + cand[..., None]
                                          - thk[:, :, None, :]).sum(-1)   # (a, J, 2k)
    fa = torch.where(kf[..., None] > 0, f, torch.relu(mu[..., None, None] + cand[..., None]
                                                      - thk[:, :, None, :]).sum(-1))
    sum_a = torch.minimum(fa.amin((-2, -1)), bi.sum(-1))
    if gram is None and factor is None:
        return _normalised(sig, th, k, bi, sum_a)
    # Row-wise variant: G_j ≼ ‖C_j‖ diag(g) (C_j the correlation matrix of the residuals), so
    # H ≼ blkdiag(diag(σ̂_m² + ‖C_j‖ g_m / t)_{m<=j}, (μ_j + t) I): the i-th eigenvalue is at
    # most the i-th largest of those diagonal values, the top-k sum at most their top-k sum.
    ts = th[:, k - 1, None] * torch.pow(2.0, -torch.arange(0, 30, 0.5, dtype=sig.dtype,
                                                           device=sig.device))   # (a, T)
    keep = (torch.arange(l, device=sig.device)[None, :] < js[:, None])           # (J, l)
    dv = th[:, None, None, :] + (cn[..., None, None] * gd[:, None, None, :]
                                 / ts[:, None, :, None])                          # (a, J, T, l)
    dv = torch.where(keep[None, :, None, :], dv, torch.zeros_like(dv))
    top = (mu[..., None] + ts[:, None, :])[..., None].expand(*dv.shape[:-1], k)
    vals = torch.cat([dv, top], -1).topk(k, dim=-1).values                      # (a, J, T, k)
    bi = torch.minimum(bi, (vals.amin((1, 2)) - th[:, :k]).clamp_min(0))
    sum_a = torch.minimum(sum_a, (vals.sum(-1).amin((1, 2)) - th[:, :k].sum(-1)).clamp_min(0))
    return _normalised(sig, th, k, bi, sum_a)


def _normalised(sig, th, k, bi, sum_a):
    """(a) and (b) bounds relative to Σ_{i<=k} σ̂_i² and σ̂_1 (both at most the true ones)."""
    tiny = torch.finfo(sig.dtype).tiny
    head = th[:, :k].sum(-1)
    est_a = torch.where(sum_a > 0, sum_a / head.clamp_min(tiny), torch.zeros_like(sum_a))
    db = ((th[:, :k] + bi).sqrt() - sig[:, :k]).amax(-1)
    s1 = sig[:, 0]
    est_b = torch.where(db > 0, db / s1.clamp_min(tiny), torch.zeros_like(db))
    return est_a, est_b


def _host_threads() -> int:
    val = HOST_THREADS
    try:
        n = int(val)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(val, bool):
        raise ValueError(f"tsvd._lowrank.HOST_THREADS (environment TSVD_HOST_THREADS): expected "
                         f"an integer >= 1, got {val!r}")
    return n


def _forget_pool():
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)     # a forked child starts its own pool


def _split(fn, x):
    """``fn(x)`` for a batched ``torch.linalg`` function of ``x (..., L, L)``; on the CPU
    with :data:`HOST_THREADS` > 1 the matrices are split into that many shares, solved in
    a thread pool and joined (a tensor, or a plain tuple for several outputs)."""
    global _POOL
    n = _host_threads()
    if n < 2 or x.device.type != "cpu" or x.dim() < 3 or x.shape[:-2].numel() < 2:
        return fn(x)
    lead = x.shape[:-2]
    xf = x.reshape(-1, *x.shape[-2:])
    if _POOL is None or _POOL._max_workers < n:
        _POOL = ThreadPoolExecutor(n, thread_name_prefix="tsvd-small-linalg")
    parts = list(_POOL.map(fn, xf.tensor_split(min(n, xf.shape[0]))))
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts).reshape(*lead, *parts[0].shape[1:])
    return tuple(torch.cat(p).reshape(*lead, *p[0].shape[1:]) for p in zip(*parts))


class _one_thread:
    """Run small LAPACK calls (l x l eigh, Cholesky, triangular inverse) on one thread: with
    two or more, the batched calls of such tiny matrices were measured 7-15x slower on the
    2-core CPU (thread start-up per matrix and contention with the other process)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.n > 1:
            torch.set_num_threads(self.n)


def _orth(y, host: bool = False):
    """Orthonormal basis of the columns of tall ``y (a, n, l)`` in y's dtype by CholeskyQR2
    on column-scaled y (Gram matrices in y's dtype, Cholesky and inverse factors of the
    l x l matrices in float64, then matmuls: far cheaper here than batched Householder QR).
    Entries whose Gram matrix is not numerically positive definite or whose first pass is far
    from orthonormal (rank-deficient or very ill-conditioned y, or non-finite entries) get
    Householder ``torch.linalg.qr`` in float64, which completes the basis with arbitrary
    columns. host: the ``l x l`` Cholesky factors and their inverses are computed on the CPU
    (:data:`SMALL_LINALG`), so that y's device runs only the two Gram products, the two
    basis products and the transfers, and the test for the fallback needs no further sync.

    The second pass's Gram matrix decides, for both passes: it is finite and within 0.1 of
    the identity only if the first pass's basis is finite and nearly orthonormal, and then
    its Cholesky factor's inverse (checked finite) keeps the final basis finite."""
    hdt = _hi(y.dtype)
    nrm = torch.linalg.vector_norm(y, dim=-2, keepdim=True)
    q = y / nrm.clamp_min(torch.finfo(nrm.dtype).tiny)
    sdev = torch.device("cpu") if host else y.device
    bad = torch.zeros(y.shape[0], dtype=torch.bool, device=sdev)
    eye = torch.eye(y.shape[-1], dtype=hdt, device=sdev)
    for pass_ in range(2):
        g = (q.mH @ q).to(hdt).to(sdev)
        if pass_ == 1:
            bad |= ~((g - eye).abs().amax((-2, -1)) <= 0.1)     # NaN counts as far
        with _one_thread():
            r, info = torch.linalg.cholesky_ex(g, upper=True)
            bad |= info != 0
            r = torch.where((info != 0)[:, None, None], eye, r)
            rinv = torch.linalg.solve_triangular(r, eye.expand_as(r), upper=True)
        q = q @ rinv.to(y.device, y.dtype)
    bad |= ~torch.isfinite(rinv).all(-1).all(-1)
    if bool(bad.any()):
        bad = bad.to(y.device)
        q = q.clone()
        q[bad] = torch.linalg.qr(y[bad].to(hdt))[0].to(y.dtype)
    return q


def _orthonormal_columns(v):
    """``v (a, n, k)`` (float64, nearly orthonormal except possibly columns for zero Ritz
    values) made orthonormal by Householder QR, with the phases of v's columns kept."""
    with _one_thread():
        q, r = torch.linalg.qr(v)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    ph = torch.where(d.abs() > 0, d / d.abs().clamp_min(torch.finfo(q.real.dtype).tiny),
                     torch.ones_like(d))
    return q * ph[..., None, :]


def _small_on_host(device: torch.device) -> bool:
    mode = SMALL_LINALG
    if mode not in ("auto", "host", "device"):
        raise ValueError(f"tsvd._lowrank.SMALL_LINALG: expected 'auto', 'host' or 'device', "
                         f"got {mode!r}")
    return mode == "host" or (mode == "auto" and device.type == "cuda")


def _svd_wide(b, host: bool):
    """Thin SVD ``b = W diag(σ) Vᴴ`` of wide ``b (a, l, n)`` (l <= n): ``(W, σ, Vᴴ)``. host: with
    ``bᴴ = Q R`` (CholeskyQR2 on b's device, :func:`_orth`), ``b Q = Rᴴ`` is ``l x l``; its SVD
    ``W Σ Zᴴ`` runs on the CPU and ``Vᴴ = Zᴴ Qᴴ``."""
    if not host:
        with _one_thread():
            return torch.linalg.svd(b, full_matrices=False)
    q = _orth(b.mH, host=True)                                  # (a, n, l)
    rh = b @ q                                                  # (a, l, l)
    with _one_thread():
        w, sig, zh = torch.linalg.svd(rh.cpu(), full_matrices=False)
    dev = b.device
    return w.to(dev), sig.to(dev), zh.to(dev) @ q.mH


def _full(x, k, real=None):
    """Top-k of the full SVD of every matrix of ``x (a, n1, n2)``. ``real``: None or an
    ``(a,)`` bool mask of matrices of a complex x whose entries are real: those are
    decomposed in real arithmetic, so that their singular vectors are real."""
    if real is not None and x.is_complex() and bool(real.any()):
        return _by_realness(lambda xs: _full(xs, k), x, real.to(x.device))
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[..., :k], s[..., :k], vh[..., :k, :].mH


def _eigh(g, real=None):
    """``torch.linalg.eigh`` of the Hermitian ``g (a, L, L)``; ``real``: None or an ``(a,)``
    bool mask (on g's device) of matrices whose entries are real, whose eigenvectors are then
    computed in real arithmetic (exactly real, whatever the LAPACK in use does with a complex
    matrix that happens to be real)."""
    if real is None or not g.is_complex() or not bool(real.any()):
        return _split(torch.linalg.eigh, g)
    return _by_realness(lambda gs: _split(torch.linalg.eigh, gs), g, real)


def _by_realness(fn, x, real):
    """``fn`` (a batched factorisation returning a tuple) on the matrices of a complex
    ``x (a, n, m)`` in two groups: those marked in the ``(a,)`` bool ``real`` (x's device), as
    real matrices (x's real part), and the others. The outputs are joined in x's order; an
    output with x's number of dims (singular or eigen vectors) comes back in x's dtype."""
    outs = None
    for sel, xs in ((real, x[real].real), (~real, x[~real])):
        if not xs.shape[0]:
            continue
        res = fn(xs)
        if outs is None:
            outs = tuple(torch.empty(x.shape[0], *t.shape[1:], device=x.device,
                                     dtype=x.dtype if t.dim() == x.dim() else t.dtype)
                         for t in res)
        for o, t in zip(outs, res):
            o[sel] = t.to(o.dtype)
    return outs


def _rounding_floor(dt, n: int) -> float:
    """Smallest (a), (b) the block Krylov estimates report: their residuals come from the
    projected matrices, not from a fresh product with X, so they keep shrinking below the
    rounding error of the products in x's precision (measured: about eps / 4 in (a) and (b)
    on 768 x 768 float32 slices, 6 eps in (b) on 150 x 60 float64 ones). ``eps * sqrt(n)``
    stays above both; a tol below it is met only by the full SVD."""
    return torch.finfo(_real_dtype(dt)).eps * n ** 0.5


def restart_size(k: int, b: int) -> tuple[int, int]:
    """Block Krylov's thick restart: ``(lmax, kept)``. When the basis would grow beyond
    ``lmax`` columns it is cut to the top ``kept`` Ritz vectors, so that the ``L x L``
    eigenproblem of every step (``KRYLOV_EIGH * L³`` in :func:`plan`'s units) stays near the
    cost of the step's two products. ``kept = 2k + b``, ``lmax = max(kept + 4b, 128)``.
    Measured on 48x768x768 (2 cores, float32, 2026-12-04): Gaussian slices at k = 32,
    tol 1e-3 took 11 steps and 3.9 s this way, 9 steps and 5.7 s without restarts (the
    eigenproblems grew to 360 x 360), 40+ steps with ``lmax`` 160; at k = 8, tol 1e-4,
    ``(lmax, kept) = (128, 32)`` took 1.5 s, ``(96, 24)`` did not converge in 25 steps."""
    kept = 2 * k + b
    return max(kept + 4 * b, 128), kept


def _krylov(xb, k, b, tol, budget, generator, host, need_grad, extra=0, real=None):
    """Block Krylov (block Lanczos on ``X Xᴴ`` with full reorthogonalisation) on every matrix
    of ``xb (a, n1, n2)``; the basis lives on the shorter side. See the module docstring.
    Returns ``U, S, V`` (filled for the accepted matrices), the bases to differentiate
    through (or None), the indices of the matrices to give a full SVD, the number of block
    steps and the largest accepted estimates. ``extra``: block steps allowed past ``budget``
    for matrices whose best estimate's rate predicts tol within them. ``real``: None or an
    ``(a,)`` bool mask (CPU) of matrices of a complex xb whose entries are real: they start
    from a real Gaussian block and their ``L x L`` eigenproblems are solved in real
    arithmetic, so that every product, basis and Ritz vector of theirs has imaginary part 0
    (a complex product of real-valued operands adds only zeros to the imaginary part)."""
    nb, n1, n2 = xb.shape
    flip = n1 > n2
    # A = Xᴴ when flipped, else X: (a, m, n), m <= n. Its products A Z and Aᴴ Q are written
    # with X itself and small conjugate transposes (Zᴴ X, X Q, ...): a product with a
    # conjugated view of X copies X on every call (measured: a third of the time on
    # 12x3072x768 complex slices).
    xa = xb.contiguous()
    m, n = (n2, n1) if flip else (n1, n2)

    def mul(x_, z):                                    # A z
        return (z.mH @ x_).mH if flip else x_ @ z

    def rmul(x_, q_):                                  # Aᴴ q
        return x_ @ q_ if flip else (q_.mH @ x_).mH

    dt, rdt, hdt = xb.dtype, _real_dtype(xb.dtype), _hi(xb.dtype)
    dev = xb.device
    U = xb.new_empty(nb, n1, k)
    S = torch.empty(nb, k, dtype=rdt, device=dev)
    V = xb.new_empty(nb, n2, k)
    Qs = xb.new_empty(nb, n1, k) if need_grad else None
    floor = _rounding_floor(dt, n)
    lmax, kept = restart_size(k, b)
    omega = torch.randn(n, b, dtype=dt, device=dev, generator=generator)
    if real is not None and dt.is_complex and bool(real.any()):
        omega = omega.expand(nb, n, b).clone()
        omega[real.to(dev)] = omega.real[0].to(dt)     # real slices: a real start
    else:
        real = None
    q = _orth(mul(xa, omega), host)                    # Q_0 (a, m, b)
    pl = rmul(xa, q)                                   # P_0 = Aᴴ Q_0 (a, n, b)
    Q, Ph = q, pl.to(hdt)                              # the basis and Xᴴ Q (float64)
    G = Ph.mH @ Ph                                     # Qᴴ X Xᴴ Q (a, L, L)
    # host: everything of size O(a L²) after the two small Gram matrices (the eigenproblems,
    # the bounds, the per-slice decisions, the index bookkeeping) runs on the CPU, so that a
    # block step issues a few dozen device ops and its decisions need no device sync (on an
    # H200 the step was bound by the host's launches, not by the device: 2026-12-04).
    sdev = torch.device("cpu") if host else dev
    idx = torch.arange(nb, device=sdev)
    give_up, it, worst_a, worst_b = [], 0, 0.0, 0.0
    prev = None                     # (best estimate so far, rate of its last improvement)
    while idx.numel() > 0:
        it += 1
        y = mul(xa, pl)                                # A Aᴴ Q_last
        y = y - Q @ (Q.mH @ y)                         # its part outside span(Q)
        # Ritz pairs of X Xᴴ on span(Q): G = W diag(θ) Wᴴ, U = Q W, σ̂ = sqrt(θ), and
        # X Xᴴ U - U diag(θ) = Y W_last (W_last: W's rows of the last block), so σ̂_m res_m
        # = Y w_m with the Gram matrix W_lastᴴ (Yᴴ Y) W_last = Fᴴ F, F = Λ^½ Eᴴ W_last
        # (Yᴴ Y = E Λ Eᴴ): r x L with r = b, however large L grows.
        yy = y.mH.to(hdt) @ y.to(hdt)
        gh, yy = (0.5 * (G + G.mH)).to(sdev), (0.5 * (yy + yy.mH)).to(sdev)
        with _one_thread():
            th, W = _eigh(gh, None if real is None else real.to(sdev)[idx])
            lam, E = _split(torch.linalg.eigh, yy)
        th, W = th.flip(-1).clamp_min(0), W.flip(-1)                       # on sdev
        lam = lam.clamp_min(0)
        Wd = W.to(dev)                                                     # W on x's device
        sig = th.sqrt()
        F = lam.sqrt()[..., None].to(hdt) * (E.mH @ W[:, -y.shape[-1]:, :])   # (a, b, L)
        rho = torch.linalg.vector_norm(F, dim=-2)                          # ‖σ̂_m res_m‖
        rn = torch.where(sig > 0, rho / sig.clamp_min(torch.finfo(sig.dtype).tiny), rho.sqrt())
        # the cheap trace form for all; the sharp one (eigenvalues of r x r matrices per
        # split) where the cheap one is within SHARP_WITHIN of tol: the sharp form is at
        # most a few times smaller, so a slice far from tol cannot be accepted by it (the
        # UNETR stacks: the first of their three steps skips it)
        est_a, est_b = contract_bounds(sig, rn, k)
        sharp = torch.maximum(est_a, est_b) <= SHARP_WITHIN * tol
        if bool(sharp.all()):
            est_a, est_b = contract_bounds(sig, rn, k, factor=F)
        elif bool(sharp.any()):
            sa, sb = contract_bounds(sig[sharp], rn[sharp], k, factor=F[sharp])
            est_a[sharp] = torch.minimum(est_a[sharp], sa)
            est_b[sharp] = torch.minimum(est_b[sharp], sb)
        est_a, est_b = est_a.clamp_min(floor), est_b.clamp_min(floor)
        est = torch.maximum(est_a, est_b)
        ok = est <= tol
        L = Q.shape[-1]
        last = L >= m or it >= budget + extra
        # per slice: the best estimate so far and the rate of its last improvement (the
        # estimate jumps up for a step after a thick restart: the new block's Ritz pairs are
        # far from converged and enlarge the estimated norm outside the kept ones)
        tiny = torch.finfo(est.dtype).tiny
        if prev is None:
            best, rate = est, torch.ones_like(est)
        else:
            best = torch.minimum(prev[0], est)
            rate = torch.where(best < prev[0], best / prev[0].clamp_min(tiny), prev[1])
        leave = ok                                     # slices that leave the batch now
        if it >= budget and not last:
            # Past the budget, a slice goes on only while the rate of its best estimate
            # predicts tol within the extra steps left: a few more block steps of a few
            # slices cost far less than their full SVDs (about `budget` steps each).
            need = torch.log(tol / best.clamp_min(tiny)) / torch.log(rate.clamp(tiny, 0.99))
            near = ~ok & (rate < 0.9) & (need <= budget + extra - it)
            if not bool(near.any()):
                last = True
            elif not bool((ok | near).all()):
                give_up.append(idx[~(ok | near)])
                leave = ok | ~near
        if bool(ok.any()):
            sel = idx[ok]
            wk = Wd[ok][..., :k]
            uk = Q[ok] @ wk.to(dt)                                         # (s, m, k)
            sk = sig[ok][..., :k].to(dev)
            inv = torch.where(sk > 0, 1 / sk.clamp_min(torch.finfo(sk.dtype).tiny),
                              torch.zeros_like(sk))
            vk = Ph[ok] @ wk * inv[..., None, :]                          # Xᴴ U / σ̂
            vk = _orthonormal_columns(vk.to(sdev)).to(dev, dt)
            if flip:
                uk, vk = vk, uk
            U[sel], S[sel], V[sel] = uk, sk.to(rdt), vk
            if need_grad:
                Qs[sel] = uk
            worst_a = max(worst_a, float(est_a[ok].max()))
            worst_b = max(worst_b, float(est_b[ok].max()))
        keep = ~leave
        if last:
            if bool(keep.any()):
                give_up.append(idx[keep])
            break
        if not bool(keep.any()):
            break
        prev = (best[keep], rate[keep])
        if not bool(keep.all()):
            idx, xa, y, Q, Ph, G = idx[keep], xa[keep], y[keep], Q[keep], Ph[keep], G[keep]
            Wd = Wd[keep]
        if L + b > lmax and lmax < m:
            # thick restart: keep the top `kept` Ritz vectors. A Aᴴ U_kept = U_kept Θ + Y W_j
            # still holds with Y outside span(U_kept), so the next block is orth(Y) as before
            # and the projected matrix stays exact; the L x L eigenproblem stays bounded.
            wk = Wd[..., :kept]
            Q, Ph = Q @ wk.to(dt), Ph @ wk
            G = Ph.mH @ Ph
            L = kept
        # BCGS2: orthonormalise, project once more, orthonormalise (rank-deficient y:
        # _orth's completion is made orthogonal to Q by the second projection)
        if L + b > m:                                  # the last, partial block: span(Q) = C^m
            y = y[..., :m - L]
        q = _orth(y, host)
        q = _orth(q - Q @ (Q.mH @ q), host)
        pl = rmul(xa, q)
        plh = pl.to(hdt)
        gc = Ph.mH @ plh                                                   # (a, L, b)
        G = torch.cat([torch.cat([G, gc], -1),
                       torch.cat([gc.mH, plh.mH @ plh], -1)], -2)
        Q, Ph = torch.cat([Q, q], -1), torch.cat([Ph, plh], -1)
    fidx = (torch.cat(give_up) if give_up else idx[:0]).to(dev)
    return U, S, V, Qs, fidx, it, worst_a, worst_b


def topk_svd(x: torch.Tensor, k: int, *, oversample: int | None = None,
             tol: float | None = None, max_iter: int | None = None,
             generator: torch.Generator | None = None, cost_model: bool = True,
             algorithm: str | None = None, real: torch.Tensor | None = None):
    """Top-k SVD of a batch of matrices ``x (..., n1, n2)`` (real or complex) meeting the
    contract (a), (b) of the module docstring per matrix.

    Args:
        x: ``(..., n1, n2)``.
        k: ``1 <= k <= min(n1, n2)``.
        oversample: extra columns: the block size of block Krylov, the subspace size of
            subspace iteration (``l = min(k + oversample, n1, n2)``); None for
            :func:`auto_oversample`.
        tol: contract tolerance (default :data:`DEFAULT_TOL` for x's real dtype).
        max_iter: cap on the iterations (the cost model may allow fewer).
        generator: source of the Gaussian start (default: a fresh generator seeded 0, so
            the result is deterministic).
        cost_model: True: :func:`plan` decides up front between iterating and a full SVD and
            sets the iteration budget. False: iterate whenever ``l < min(n1, n2)``, with a
            budget of ``max_iter`` (default :data:`DEFAULT_MAX_ITER`) iterations.
        algorithm: ``"krylov"`` (block Krylov, a block step = two products with l columns)
            or ``"subspace"`` (subspace iteration); None for :data:`ALGORITHM`.
        real: None, or for a complex x a bool tensor of x's batch shape marking matrices
            whose entries are real: their singular vectors come out real (imaginary part
            exactly 0), as from a real SVD. Block Krylov without gradients only.
    Returns:
        ``U (..., n1, k)``, ``S (..., k)`` real descending, ``V (..., n2, k)`` in x's dtype
        with ``x ≈ U diag(S) Vᴴ``, and an info dict (``iterations``, ``fallback``, ``full``,
        ``est_a``, ``est_b``, ``l``, ``slices``). Differentiable in x (when x requires grad,
        the last Rayleigh-Ritz step is recomputed under autograd with the subspace held
        fixed: exact gradients of S, and of U, V up to the subspace's rotation).
    """
    *batch, n1, n2 = x.shape
    p = min(n1, n2)
    dt = x.dtype
    rdt = _real_dtype(dt)
    hdt = _hi(dt)
    if tol is None:
        tol = DEFAULT_TOL.get(rdt, 1e-4)
    algorithm = ALGORITHM if algorithm is None else algorithm
    if algorithm not in ("krylov", "subspace"):
        raise ValueError(f"algorithm: expected 'krylov' or 'subspace', got {algorithm!r}")
    if oversample is None:
        oversample = auto_oversample(k, algorithm)
    l = min(p, k + max(int(oversample), 1))
    xb = x.detach().reshape(-1, n1, n2)
    nb = xb.shape[0]
    host = _small_on_host(x.device)
    _host_threads()                                     # a bad HOST_THREADS fails here
    if cost_model:
        use_iter, budget = plan(n1, n2, k, l, dt.is_complex, max_iter, algorithm)
    else:
        budget = DEFAULT_MAX_ITER if max_iter is None else int(max_iter)
        use_iter = l < p and budget >= 1
    info = {"slices": nb, "iterations": 0, "fallback": 0, "full": 0, "est_a": 0.0,
            "est_b": 0.0, "l": l, "budget": budget}
    need_grad = torch.is_grad_enabled() and x.requires_grad
    if real is not None:
        if tuple(real.shape) != tuple(batch) or real.dtype != torch.bool:
            raise ValueError(f"real: expected a bool tensor of shape {tuple(batch)} (x's batch "
                             f"shape), got {real.dtype} of shape {tuple(real.shape)}")
        if algorithm != "krylov" or need_grad:
            raise ValueError("real: only for algorithm='krylov' without gradients")
        real = real.reshape(-1).cpu() if dt.is_complex else None
    if nb == 0:
        z = x.new_zeros
        return (z(*batch, n1, k), z(*batch, k, dtype=rdt), z(*batch, n2, k), info)
    if not use_iter:
        u, s, v = _full(x.reshape(-1, n1, n2), k, real)
        info["full"] = nb
        return (u.reshape(*batch, n1, k), s.reshape(*batch, k), v.reshape(*batch, n2, k), info)
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    if algorithm == "krylov":
        with torch.no_grad():
            # the cost model's budget may be overrun by half for slices about to meet tol;
            # an explicit max_iter (cost_model=False) is a hard cap
            U, S, V, Qs, fidx, it, worst_a, worst_b = _krylov(
                xb, k, l, tol, budget, generator, host, need_grad,
                extra=budget // 2 if cost_model else 0, real=real)
            info.update(iterations=it, est_a=worst_a, est_b=worst_b,
                        fallback=int(fidx.numel()))
            if fidx.numel() > 0 and not need_grad:
                U[fidx], S[fidx], V[fidx] = _full(
                    xb[fidx], k, None if real is None else real[fidx.cpu()])
        if need_grad:
            U, S, V = _differentiable(x.reshape(-1, n1, n2), Qs, fidx, k)
        return (U.reshape(*batch, n1, k), S.reshape(*batch, k), V.reshape(*batch, n2, k),
                info)
    with torch.no_grad():
        U = x.new_empty(nb, n1, k)
        S = torch.empty(nb, k, dtype=rdt, device=x.device)
        V = x.new_empty(nb, n2, k)
        Qs = x.new_empty(nb, n1, l) if need_grad else None
        omega = torch.randn(n2, l, dtype=dt, device=x.device, generator=generator)
        idx = torch.arange(nb, device=x.device)          # slices still iterating
        full_idx = []
        xa = xb
        q = _orth(xa @ omega, host)
        prev = last = None
        it = 0
        worst_a = worst_b = 0.0
        while idx.numel() > 0:
            it += 1
            b = q.mH @ xa                                             # (a, l, n2)
            # SVD of B itself in float64 (not eigh of B Bᴴ, whose rounding of σ̂² would put
            # singular values below sqrt(eps) σ_1 up to ~1e-8 σ_1 above the true ones)
            w, sig, vh_ = _svd_wide(b.to(hdt), host)
            v = vh_.mH.to(dt)                                         # (a, n2, l) = Bᴴ W / σ̂
            y = xa @ v                                                # X V  (a, n1, l)
            uu = q @ w.to(dt)                                         # (a, n1, l)
            res = (y - uu * sig[..., None, :].to(dt)).to(hdt)       # res_m = X v_m - σ̂_m u_m
            rn = torch.linalg.vector_norm(res, dim=-2)
            res = res * sig[..., None, :]                            # σ̂_m res_m
            gram = res.mH @ res
            # The trace form of the bound is cheap; the sharper one (eigenvalues of l x l
            # matrices per split) is computed for slices within reach of tol and for those
            # that the cheap bound's prediction would give up on.
            est_a, est_b = contract_bounds(sig, rn, k)
            cheap = torch.maximum(est_a, est_b)
            sharp = cheap <= SHARP_WITHIN * tol
            tiny = torch.finfo(cheap.dtype).tiny
            deciding = it >= MIN_ITERS and prev is not None and it < budget
            if deciding:
                # geometric rate of the (always computed) cheap bound over two iterations
                rate = (cheap / prev.clamp_min(tiny)).sqrt().clamp(1e-6, 0.999)

                def need(e):                  # iterations still needed at that rate
                    return torch.log(tol / e.clamp_min(tiny)).clamp_max(0) / torch.log(rate)
                sharp |= it + need(cheap) > budget
            if bool(sharp.any()):
                sa, sb = contract_bounds(sig[sharp], rn[sharp], k, gram[sharp], host=host)
                est_a[sharp] = torch.minimum(est_a[sharp], sa)
                est_b[sharp] = torch.minimum(est_b[sharp], sb)
            est = torch.maximum(est_a, est_b)
            ok = est <= tol
            give_up = torch.zeros_like(ok)
            if it >= budget:
                give_up = ~ok
            elif deciding:
                give_up = ~ok & (it + need(est) > budget)
            if bool(ok.any()):
                sel = idx[ok]
                U[sel] = uu[ok][..., :k]
                S[sel] = sig[ok][..., :k].to(rdt)
                V[sel] = _orthonormal_columns(v[ok][..., :k].to(hdt)).to(dt)
                if need_grad:
                    Qs[sel] = q[ok]
                worst_a = max(worst_a, float(est_a[ok].max()))
                worst_b = max(worst_b, float(est_b[ok].max()))
            if bool(give_up.any()):
                full_idx.append(idx[give_up])
            keep = ~(ok | give_up)
            if not bool(keep.any()):
                break
            prev = None if last is None else last[keep]          # two iterations back
            last = cheap[keep]
            idx, xa, y = idx[keep], xa[keep], y[keep]
            q = _orth(y, host)
        info["iterations"] = it
        info["est_a"], info["est_b"] = worst_a, worst_b
        fidx = torch.cat(full_idx) if full_idx else idx[:0]
        info["fallback"] = int(fidx.numel())
        if fidx.numel() > 0 and not need_grad:
            U[fidx], S[fidx], V[fidx] = _full(xb[fidx], k)
    if need_grad:
        U, S, V = _differentiable(x.reshape(-1, n1, n2), Qs, fidx, k)
    return (U.reshape(*batch, n1, k), S.reshape(*batch, k), V.reshape(*batch, n2, k), info)


def _differentiable(x, Qs, fidx, k):
    """Outputs recomputed under autograd: the final Rayleigh-Ritz step ``svd(Qᴴ X)`` with the
    (detached) subspace Q for iterated slices, a full SVD for the others."""
    nb = x.shape[0]
    is_full = torch.zeros(nb, dtype=torch.bool, device=x.device)
    is_full[fidx] = True
    it_idx = (~is_full).nonzero().flatten()
    parts = []
    if it_idx.numel() > 0:
        q = Qs[it_idx]
        ub, s, vh = torch.linalg.svd(q.mH @ x[it_idx], full_matrices=False)
        parts.append((it_idx, q @ ub[..., :k], s[..., :k], vh[..., :k, :].mH))
    if fidx.numel() > 0:
        parts.append((fidx, *_full(x[fidx], k)))
    order = torch.cat([pt[0] for pt in parts]).argsort()
    return tuple(torch.cat([pt[i] for pt in parts])[order] for i in (1, 2, 3))


def _merge_real(xh: torch.Tensor, m: int, n_real: int) -> bool:
    """Whether :func:`hat_topk_svd` decomposes the FFT's real slices in the complex batch
    (:data:`REAL_SLICES`)."""
    mode = REAL_SLICES
    if mode not in ("auto", "merged", "separate"):
        raise ValueError(f"tsvd._lowrank.REAL_SLICES: expected 'auto', 'merged' or "
                         f"'separate', got {mode!r}")
    if m == n_real or ALGORITHM != "krylov" or (torch.is_grad_enabled() and xh.requires_grad):
        return False
    return mode == "merged" or (mode == "auto" and _small_on_host(xh.device))


def hat_topk_svd(xh: torch.Tensor, k: int, tr: Transform, n3: int, *,
                 oversample: int | None = None, tol: float | None = None,
                 max_iter: int | None = None, generator: torch.Generator | None = None,
                 cost_model: bool = True):
    """Top-k SVD of every stored transform-domain slice, meeting the contract per slice.

    Args:
        xh: ``(..., m, n1, n2)`` transform-domain tensor (complex, ``m = n3 // 2 + 1``, for
            the FFT; real for the DCT and matrix transforms).
        k: number of singular triplets kept, ``1 <= k <= min(n1, n2)``.
        tr, n3: the transform and the tube length (for the FFT the DC slice and, for even
            n3 > 1, the Nyquist slice are real and their singular vectors real, as in
            ``reference.hat_svd``: a batch of their own in real arithmetic, or within the
            complex batch, see :data:`REAL_SLICES`).
        oversample, tol, max_iter, generator, cost_model: see :func:`topk_svd`.
    Returns:
        ``Uh (..., m, n1, k)``, ``Sh (..., m, k)`` real descending, ``Vh (..., m, n2, k)``
        with ``X̂_f ≈ Uh_f diag(Sh_f) Vh_fᴴ``.
    """
    global _LAST_INFO
    m = xh.shape[-3]
    if generator is None:
        generator = torch.Generator(device=xh.device).manual_seed(0)
    kw = dict(oversample=oversample, tol=tol, max_iter=max_iter, generator=generator,
              cost_model=cost_model)
    if not tr.is_complex:
        u, s, v, info = topk_svd(xh, k, **kw)
        _LAST_INFO = dict(info, parts=[info])
        return u, s, v
    nyq = n3 % 2 == 0 and n3 > 1
    ridx = [0] + ([m - 1] if nyq else [])
    lo, hi = 1, (m - 1 if nyq else m)
    if _merge_real(xh, m, len(ridx)):
        real = torch.zeros(xh.shape[:-2], dtype=torch.bool)
        real[..., ridx] = True
        u, s, v, info = topk_svd(xh, k, real=real, **kw)
        for t in (u, v):                # exactly real already; drop the zero imaginary part
            t[..., ridx, :, :] = t[..., ridx, :, :].real.to(t.dtype)
        _LAST_INFO = dict(info, parts=[info])
        return u, s, v
    parts = []
    ur, sr, vr, info = topk_svd(xh[..., ridx, :, :].real, k, **kw)    # real slices
    parts.append(info)
    cdt = xh.dtype
    ur, vr = ur.to(cdt), vr.to(cdt)
    us, ss, vs = [ur[..., :1, :, :]], [sr[..., :1, :]], [vr[..., :1, :, :]]
    if hi > lo:
        uc, sc, vc, info = topk_svd(xh[..., lo:hi, :, :], k, **kw)
        parts.append(info)
        us.append(uc); ss.append(sc); vs.append(vc)
    if nyq:
        us.append(ur[..., 1:, :, :]); ss.append(sr[..., 1:, :]); vs.append(vr[..., 1:, :, :])
    _LAST_INFO = {
        "slices": sum(p["slices"] for p in parts),
        "iterations": max(p["iterations"] for p in parts),
        "fallback": sum(p["fallback"] for p in parts),
        "full": sum(p["full"] for p in parts),
        "est_a": max(p["est_a"] for p in parts),
        "est_b": max(p["est_b"] for p in parts),
        "l": parts[-1]["l"],
        "parts": parts,
    }
    return torch.cat(us, -3), torch.cat(ss, -2), torch.cat(vs, -3)
