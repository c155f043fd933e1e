"""The truncated SVD's accuracy contract (issue 14) against independent float64 oracles.

For every matrix (transform-domain slice) X with singular values σ_1 >= σ_2 >= ... and the
returned ``X̃ = U diag(S) Vᴴ``:

    (a)  ‖X - X̃‖_F² - Σ_{i>k} σ_i²  <=  tol · Σ_{i<=k} σ_i²
    (b)  max_i |S_i - σ_i|           <=  tol · σ_1

The oracle is LAPACK's float64/complex128 SVD of the very input the code saw (cast up), and
for the public API numpy's FFT along the tubes; nothing of the code under test is reused.
Spectra: gapped, slowly decaying (i^-0.7 plus noise), repeated singular values straddling k
(no gap at all), and Gaussian matrices (flat, tiny gaps).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tsvd
from tsvd import _lowrank

CDT = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def spectrum(kind, p, k):
    """Singular values (p,) of the given kind (float64, σ_1 = 1-ish)."""
    i = torch.arange(1, p + 1, dtype=torch.float64)
    if kind == "gapped":                      # a 5x drop right after k
        return torch.where(i <= k, 2.0 - i / p, 0.2 * (1.0 - i / (2 * p)))
    if kind == "decay":                       # σ_i = i^-0.7: flat, σ_k/σ_{k+1} ~ 1.02-1.1
        return i ** -0.7
    if kind == "repeated":                    # clusters of 3 equal values, k cuts a cluster
        return 1.0 / (1.0 + torch.div(i - 1 + (3 - k % 3) % 3 + 1, 3, rounding_mode="floor"))
    raise ValueError(kind)


def matrices(kind, b, n1, n2, k, *, cplx, dtype, seed):
    """``(b, n1, n2)`` in dtype (complex when cplx) with the requested spectrum:
    ``Q1 diag(s) Q2ᴴ`` (plus 1e-4 relative noise for "decay"), or Gaussian for "gauss"."""
    g = torch.Generator().manual_seed(seed)
    hdt = torch.complex128 if cplx else torch.float64

    def gauss(*shape):
        a = torch.randn(*shape, dtype=torch.float64, generator=g)
        if cplx:
            a = torch.complex(a, torch.randn(*shape, dtype=torch.float64, generator=g))
        return a

    if kind == "gauss":
        x = gauss(b, n1, n2)
    else:
        p = min(n1, n2)
        s = spectrum(kind, p, k).to(hdt)
        q1, q2 = torch.linalg.qr(gauss(b, n1, p)).Q, torch.linalg.qr(gauss(b, n2, p)).Q
        x = (q1 * s) @ q2.mH
        if kind == "decay":
            x = x + 1e-4 / (n1 ** 0.5 + n2 ** 0.5) * gauss(b, n1, n2)
    return x.to(CDT[dtype] if cplx else dtype)


def contract(x, u, s, v, k):
    """Measured (a) / Σ_{i<=k} σ_i² and (b) / σ_1 per matrix, float64 oracle (numpy arrays)."""
    hdt = torch.complex128 if x.is_complex() else torch.float64
    xx = x.detach().to(hdt)
    sv = torch.linalg.svdvals(xx)                                # float64 LAPACK oracle
    xt = (u.detach().to(hdt) * s.detach().to(hdt)[..., None, :]) @ v.detach().to(hdt).mH
    err2 = torch.linalg.matrix_norm(xx - xt) ** 2
    a = (err2 - (sv[..., k:] ** 2).sum(-1)) / (sv[..., :k] ** 2).sum(-1)
    b = (s.detach().double() - sv[..., :k]).abs().amax(-1) / sv[..., 0]
    return a.numpy(), b.numpy(), sv.numpy()


def sin_theta2(a, b):
    """‖sin Θ(span a, span b)‖_F² for orthonormal a, b (..., n, k), float64."""
    k = a.shape[-1]
    return k - (torch.linalg.matrix_norm(a.mH @ b) ** 2).numpy()


@pytest.mark.parametrize("algorithm", ["krylov", "subspace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cplx", [False, True])
@pytest.mark.parametrize("kind", ["gapped", "decay", "repeated", "gauss"])
def test_contract_holds(kind, cplx, dtype, algorithm):
    k, (n1, n2) = 5, ((90, 60) if cplx else (60, 90))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    x = matrices(kind, 3, n1, n2, k, cplx=cplx, dtype=dtype, seed=len(kind) + 7 * cplx)
    u, s, v, info = _lowrank.topk_svd(x, k, tol=tol, cost_model=False, algorithm=algorithm)
    assert u.shape == (3, n1, k) and s.shape == (3, k) and v.shape == (3, n2, k)
    assert u.dtype == x.dtype and v.dtype == x.dtype and s.dtype == torch.empty(0, dtype=x.dtype).real.dtype
    a, b, sv = contract(x, u, s, v, k)
    assert (a <= tol).all(), (a, info)
    assert (b <= tol).all(), (b, info)
    assert (a >= -1e-6 if dtype == torch.float32 else a >= -1e-12).all()   # oracle sanity
    assert bool((s[..., :-1] >= s[..., 1:]).all())
    # the iteration did the work (no full-SVD fallback) except possibly on Gaussian matrices
    if kind != "gauss":
        assert info["fallback"] == 0 and info["full"] == 0 and info["iterations"] >= 1, info
    # U and V orthonormal to working precision
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    for m in (u, v):
        mm = m.to(torch.complex128 if cplx else torch.float64)
        assert float((mm.mH @ mm - torch.eye(k, dtype=mm.dtype)).abs().max()) < eps
    if kind == "gapped":
        # with a gap, (a) pins the singular subspaces: ‖sin Θ‖_F² <= tol Σσ_i² / (σ_k² - σ_{k+1}²)
        hdt = torch.complex128 if cplx else torch.float64
        uo, _, vho = torch.linalg.svd(x.to(hdt), full_matrices=False)
        bound = tol * (sv[:, :k] ** 2).sum(-1) / (sv[:, k - 1] ** 2 - sv[:, k] ** 2)
        assert (sin_theta2(u.to(hdt), uo[..., :k]) <= bound * 1.01 + 1e-6).all()
        assert (sin_theta2(v.to(hdt), vho[..., :k, :].mH) <= bound * 1.01 + 1e-6).all()


def test_a_posteriori_estimate_bounds_the_error():
    """The accepted estimates (info est_a, est_b) are at least the measured errors, and a
    looser tol stops earlier with a larger (but still contracted) error."""
    k = 6
    x = matrices("decay", 4, 120, 100, k, cplx=True, dtype=torch.float64, seed=3)
    res = {}
    for tol in (1e-3, 1e-9):
        u, s, v, info = _lowrank.topk_svd(x, k, tol=tol, oversample=8, cost_model=False)
        a, b, _ = contract(x, u, s, v, k)
        assert info["fallback"] == 0
        assert (a <= tol).all() and (b <= tol).all()
        assert a.max() <= info["est_a"] * 1.001 + 1e-15 and b.max() <= info["est_b"] * 1.001 + 1e-15
        res[tol] = (info["iterations"], a.max())
    assert res[1e-3][0] < res[1e-9][0] and res[1e-9][1] < res[1e-3][1]


def test_budget_exhausted_falls_back_to_exact():
    """A tol that the iteration cannot reach in max_iter sends those slices to the full SVD:
    the result is then the float64-exact truncation (to float32 rounding)."""
    k = 4
    x = matrices("gauss", 3, 80, 70, k, cplx=False, dtype=torch.float32, seed=5)
    u, s, v, info = _lowrank.topk_svd(x, k, tol=1e-7, max_iter=3, cost_model=False)
    assert info["fallback"] == 3
    a, b, _ = contract(x, u, s, v, k)
    assert (np.abs(a) < 1e-5).all() and (b < 1e-6).all()


def test_deterministic_with_generator():
    k = 3
    x = matrices("decay", 2, 70, 50, k, cplx=True, dtype=torch.float32, seed=2)
    out = [_lowrank.topk_svd(x, k, cost_model=False, generator=torch.Generator().manual_seed(s))
           for s in (1, 1, 2)]
    assert all(torch.equal(p, q) for p, q in zip(out[0][:3], out[1][:3]))
    assert not torch.equal(out[0][0], out[2][0])            # another seed: another start
    t1 = tsvd.tsvd(torch.randn(4, 150, 130, generator=torch.Generator().manual_seed(0)), 3,
                   method="randomized", generator=torch.Generator().manual_seed(9))
    t2 = tsvd.tsvd(torch.randn(4, 150, 130, generator=torch.Generator().manual_seed(0)), 3,
                   method="randomized", generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(p, q) for p, q in zip(t1, t2))


@pytest.mark.parametrize("n3", [5, 6])
@pytest.mark.parametrize("kind", ["decay", "gauss"])
def test_public_contract_per_fourier_slice(n3, kind):
    """tsvd.tsvd(X, k, tol=...) in float32 meets (a), (b) in every Fourier slice, against
    numpy's FFT of X and a float64 SVD; and (a) for the tensor as a whole."""
    k, n1, n2, tol = 4, 100, 70, 1e-4
    g = torch.Generator().manual_seed(n3)
    if kind == "gauss":
        x = torch.randn(2, n3, n1, n2, generator=g)
    else:
        x = matrices("decay", 2 * n3, n1, n2, k, cplx=False, dtype=torch.float32,
                     seed=n3).reshape(2, n3, n1, n2)
    u, s, v = tsvd.tsvd(x, k, tol=tol, method="randomized")
    assert u.shape == (2, n3, n1, k) and s.shape == (2, n3, k) and v.shape == (2, n3, n2, k)
    assert u.dtype == torch.float32 and not u.is_complex()
    xf = np.fft.fft(x.double().numpy(), axis=-3)                  # independent transform
    uf, vf = np.fft.fft(u.double().numpy(), axis=-3), np.fft.fft(v.double().numpy(), axis=-3)
    sf = np.fft.fft(s.double().numpy(), axis=-2)
    assert np.abs(sf.imag).max() < 1e-5 * np.abs(sf).max()       # real spectra of S
    a, b, sv = contract(torch.from_numpy(xf), torch.from_numpy(uf),
                        torch.from_numpy(sf.real), torch.from_numpy(vf), k)
    assert (a <= tol).all() and (b <= tol).all(), (a.max(), b.max())
    # Parseval: the tensor's excess over the best tubal-rank-k approximation
    rec = tsvd.treconstruct(u, s, v).double().numpy()
    err2 = ((x.double().numpy() - rec) ** 2).sum((-3, -2, -1))
    opt2 = (sv[..., k:] ** 2).sum((-2, -1)) / n3
    head = (sv[..., :k] ** 2).sum((-2, -1)) / n3
    assert ((err2 - opt2) <= tol * head).all()


def test_auto_cost_model_choice_up_front():
    """method="auto": small slices (a full SVD is cheap) never iterate; large ones with small
    k do; gradients always take the exact full path."""
    x = torch.randn(3, 60, 50)
    assert all(torch.equal(p, q) for p, q in zip(tsvd.tsvd(x, 4), tsvd.tsvd(x, 4, method="full")))
    use, budget = _lowrank.plan(60, 50, 4, 40, True)
    assert not use
    use, budget = _lowrank.plan(768, 768, 8, 48, True)
    assert use and budget >= _lowrank.MIN_ITERS + 1
    xg = torch.randn(3, 30, 20, dtype=torch.float64, requires_grad=True)
    u, s, v = tsvd.tsvd(xg, 2)
    s.sum().backward()
    xs = xg.detach().clone().requires_grad_(True)
    s2 = tsvd.tsvd(xs, 2, method="full")[1]
    s2.sum().backward()
    assert torch.allclose(xg.grad, xs.grad)


@pytest.mark.parametrize("bad,exc,name", [
    (dict(tol=0.0), ValueError, "tol"), (dict(tol=float("nan")), ValueError, "tol"),
    (dict(tol="1e-4"), ValueError, "tol"), (dict(oversample=-1), ValueError, "oversample"),
    (dict(generator=3), TypeError, "generator"), (dict(method="lanczos"), ValueError, "method"),
])
def test_bad_arguments_name_the_argument(bad, exc, name):
    with pytest.raises(exc, match=name):
        tsvd.tsvd(torch.randn(3, 20, 10), 2, **bad)


@pytest.mark.parametrize("cplx", [False, True])
def test_low_rank_factor_form_of_the_bound_equals_the_gram_form(cplx):
    """contract_bounds with ``factor=F`` (block Krylov's residuals span r directions) gives
    the bounds of the Gram matrix ``Fᴴ F`` passed whole: the eigenvalues of each leading block
    ``G_j`` are those of the r x r ``F_j F_jᴴ`` (the definition, checked here numerically)."""
    g = torch.Generator().manual_seed(4)
    a, r, l, k = 3, 4, 20, 5
    sig = torch.sort(torch.rand(a, l, dtype=torch.float64, generator=g) + 0.1, -1,
                     descending=True).values
    f = 1e-3 * torch.randn(a, r, l, dtype=torch.float64, generator=g)
    if cplx:
        f = torch.complex(f, 1e-3 * torch.randn(a, r, l, dtype=torch.float64, generator=g))
    gram = f.mH @ f
    rho = torch.linalg.vector_norm(f, dim=-2)
    rn = rho / sig
    got = _lowrank.contract_bounds(sig, rn, k, factor=f)
    ref = _lowrank.contract_bounds(sig, rn, k, gram=gram)
    for x_, y_ in zip(got, ref):
        assert torch.allclose(x_, y_, rtol=1e-9, atol=1e-15), (x_, y_)
    # and it is a real bound: at most the trace form's
    cheap = _lowrank.contract_bounds(sig, rn, k)
    assert all(bool((x_ <= c * (1 + 1e-12)).all()) for x_, c in zip(got, cheap))


def test_block_krylov_uses_fewer_products_than_subspace_iteration():
    """On a flat spectrum (Gaussian), block Krylov meets the contract in fewer products with X
    than subspace iteration: its convergence depends on sqrt of the relative gap, subspace
    iteration's on the gap itself. Products counted: Krylov 2 b per block step plus the
    start, subspace iteration 2 l per iteration plus the start."""
    k, tol = 4, 1e-3
    x = matrices("gauss", 2, 300, 240, k, cplx=True, dtype=torch.float32, seed=11)
    _, _, _, ik = _lowrank.topk_svd(x, k, tol=tol, cost_model=False, algorithm="krylov")
    _, _, _, isub = _lowrank.topk_svd(x, k, tol=tol, cost_model=False, algorithm="subspace")
    assert ik["fallback"] == 0 and isub["fallback"] == 0, (ik, isub)
    cols_k = 2 * ik["l"] * (ik["iterations"] + 1)
    cols_s = isub["l"] * (2 * isub["iterations"] + 1)
    assert cols_k < 0.6 * cols_s, (ik, isub)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thick_restart_keeps_the_contract(dtype, monkeypatch):
    """With the basis capped at 48 columns (cut back to the top 16 Ritz vectors whenever
    another block of 16 would not fit), block Krylov still meets (a) and (b) against the
    float64 SVD; the Gaussian matrices need several restarts (more steps than 48 columns
    hold), the decaying ones none."""
    monkeypatch.setattr(_lowrank, "restart_size", lambda k, b: (48, 2 * k + 8))
    k = 4
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for kind in ("decay", "gauss"):
        x = matrices(kind, 2, 200, 150, k, cplx=True, dtype=dtype, seed=21)
        u, s, v, info = _lowrank.topk_svd(x, k, tol=tol, cost_model=False, algorithm="krylov")
        assert info["fallback"] == 0, info
        if kind == "gauss":
            assert info["iterations"] >= 6, info
        a, b, _ = contract(x, u, s, v, k)
        assert (a <= tol).all() and (b <= tol).all(), (kind, a, b, info)


@pytest.mark.parametrize("algorithm", ["krylov", "subspace"])
@pytest.mark.parametrize("n1,n2", [(70, 50), (50, 70)])
def test_randomized_gradient_of_singular_values(algorithm, n1, n2):
    """Through the iterated path (X requires grad), d(Σ S_i)/dX = Σ_{i<=k} u_i v_iᵀ, the
    derivative of the top-k singular values, with u, v from a float64 LAPACK SVD (the
    oracle); a gapped spectrum, so the top-k vectors are well defined."""
    k = 4
    x = matrices("gapped", 2, n1, n2, k, cplx=False, dtype=torch.float64, seed=5)
    x.requires_grad_(True)
    u, s, v, info = _lowrank.topk_svd(x, k, tol=1e-12, cost_model=False, algorithm=algorithm)
    assert info["fallback"] == 0 and info["iterations"] >= 1
    s.sum().backward()
    uo, _, vho = torch.linalg.svd(x.detach(), full_matrices=False)
    want = uo[..., :k] @ vho[..., :k, :]
    # the subspace is held fixed: exact up to its accuracy (sin Θ <= sqrt(tol ‖X_k‖² / gap))
    assert torch.allclose(x.grad, want, atol=1e-5), float((x.grad - want).abs().max())


def test_budget_overrun_only_for_slices_about_to_converge(monkeypatch):
    """With the cost model's budget one or two block steps short, the slices whose estimate
    is falling fast enough finish within the half-budget overrun (no full SVD); with a budget
    far short they are sent to the full SVD at the budget. The contract holds either way."""
    k, tol = 4, 1e-4
    x = matrices("gauss", 3, 300, 200, k, cplx=True, dtype=torch.float32, seed=3)
    needed = _lowrank.topk_svd(x, k, tol=tol, cost_model=False)[3]["iterations"]
    assert needed >= 6
    for budget, fallback, steps in ((needed - 2, 0, needed), (needed - 4, 3, needed - 4)):
        monkeypatch.setattr(_lowrank, "plan", lambda *a, b=budget, **kw: (True, b))
        u, s, v, info = _lowrank.topk_svd(x, k, tol=tol, cost_model=True)
        assert (info["fallback"], info["iterations"]) == (fallback, steps), (budget, info)
        a, b, _ = contract(x, u, s, v, k)
        assert (a <= tol).all() and (b <= tol).all()
