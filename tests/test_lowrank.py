"""Randomized truncated SVD (tsvd/_lowrank.py) against float64 numpy oracles.

Oracles: numpy's float64/complex128 LAPACK SVD of each slice (computed here, independently of
the code under test), the Eckart-Young optimum ``sqrt(Σ_{i>k} σ_i²)``, and the public
``tsvd(X, k, method="full")`` path for the transform handling.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tsvd
from tsvd import _lowrank
from tsvd.transforms import get_transform
from scipy.fft import dct, idct


def _orth(b, n, p, cplx, g):
    a = torch.randn(b, n, p, dtype=torch.float64, generator=g)
    if cplx:
        a = torch.complex(a, torch.randn(b, n, p, dtype=torch.float64, generator=g))
    return torch.linalg.qr(a).Q


def decaying(batch, n1, n2, *, cplx, noise=1e-7, seed=0, flat=False):
    """Matrices ``(*batch, n1, n2)`` = Q1 diag(s) Q2ᴴ + noise with s_i = 1/i (or s_i = 1)."""
    g = torch.Generator().manual_seed(seed)
    b = int(np.prod(batch)) if batch else 1
    p = min(n1, n2)
    s = torch.ones(p, dtype=torch.float64) if flat else \
        1.0 / torch.arange(1, p + 1, dtype=torch.float64)
    s = s * (1 + 0.5 * torch.rand(b, 1, dtype=torch.float64, generator=g))
    q1, q2 = _orth(b, n1, p, cplx, g), _orth(b, n2, p, cplx, g)
    x = (q1 * s[:, None, :].to(q1.dtype)) @ q2.mH
    x = x + noise * torch.randn(x.shape, dtype=x.dtype, generator=g)
    return x.reshape(*batch, n1, n2)


def np_svd(x):
    """float64/complex128 full SVD of every slice (the oracle; LAPACK through
    torch.linalg, as numpy arrays; numpy's own SVD is far slower on this machine)."""
    a = x.detach().cpu().to(torch.complex128 if x.is_complex() else torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u.numpy(), s.numpy(), vh.mH.resolve_conj().numpy()


def principal_np(u, s, v, k):
    return (u[..., :k] * s[..., None, :k]) @ np.conj(np.swapaxes(v[..., :k], -1, -2))


def rel_err_principal(u, s, v, x, k):
    """max over slices of ‖U_k S_k V_kᴴ - (float64 optimum)‖_F / ‖optimum‖_F."""
    uo, so, vo = np_svd(x)
    ref = principal_np(uo, so, vo, k)
    got = principal_np(*(t.detach().numpy().astype(ref.dtype) for t in (u, s, v)), k)
    num = np.linalg.norm(got - ref, axis=(-2, -1))
    return float((num / np.linalg.norm(ref, axis=(-2, -1))).max()), so


def orth_err(u):
    a = u.detach().to(torch.complex128 if u.is_complex() else torch.float64)
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    return float((a.mH @ a - eye).abs().max())


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cplx", [False, True])
@pytest.mark.parametrize("n1,n2", [(150, 60), (60, 150)])
def test_topk_matches_float64_svd(dtype, cplx, n1, n2):
    k = 5
    x = decaying((2, 3), n1, n2, cplx=cplx, seed=n1)
    x = x.to({(torch.float32, True): torch.complex64, (torch.float64, True): torch.complex128}
             .get((dtype, cplx), dtype))
    u, s, v, info = _lowrank.topk_svd(x, k, cost_model=False)
    assert u.shape == (2, 3, n1, k) and s.shape == (2, 3, k) and v.shape == (2, 3, n2, k)
    assert u.dtype == x.dtype and v.dtype == x.dtype and not s.is_complex()
    assert info["fallback"] == 0 and info["iterations"] >= 1 and info["slices"] == 6
    err, so = rel_err_principal(u, s, v, x, k)
    tol = 1e-4 if dtype == torch.float32 else 1e-10             # the default tol
    # contract (a) on the principal part: with the 1/i gap at k its squared relative error
    # is at most tol ‖X_k‖² / (σ_k² - σ_{k+1}²) times a small factor (here about 4 tol)
    gap = ((so[..., :k] ** 2).sum(-1) / (so[..., k - 1] ** 2 - so[..., k] ** 2)).max()
    assert err ** 2 <= 2 * tol * gap
    assert np.abs(s.double().numpy() - so[..., :k]).max() <= tol * so[..., 0].min()
    assert bool((s[..., :-1] >= s[..., 1:]).all())
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    assert orth_err(u) < eps and orth_err(v) < eps
    # the accepted bound of (b) is at least the real singular-value error
    assert info["est_b"] * so[..., 0].min() >= np.abs(s.double().numpy() - so[..., :k]).max()


def test_tolerance_controls_accuracy():
    """A looser tol stops earlier and is less accurate; the result honours each tol (the
    principal part's squared relative error is at most (a) times ‖X_k‖²/(σ_k² - σ_{k+1}²),
    about 1.3 here: a gapped 1/i spectrum)."""
    x = decaying((3,), 120, 80, cplx=True, noise=0.0, seed=3)
    errs, its = [], []
    for tol in (1e-3, 1e-9):
        u, s, v, info = _lowrank.topk_svd(x, 6, oversample=4, tol=tol, max_iter=40,
                                          cost_model=False)
        err, so = rel_err_principal(u, s, v, x, 6)
        gap = (so[..., :6] ** 2).sum(-1) / (so[..., 5] ** 2 - so[..., 6] ** 2)
        assert info["fallback"] == 0 and (err ** 2 <= 2 * tol * gap).all()
        errs.append(err); its.append(info["iterations"])
    assert its[0] < its[1] and errs[1] < errs[0]


def test_flat_spectrum_falls_back_and_is_correct():
    """No gap at k and a tol out of reach in 4 iterations: the full SVD takes over."""
    k = 4
    x = decaying((3,), 80, 70, cplx=False, flat=True, noise=1e-3, seed=5).float()
    u, s, v, info = _lowrank.topk_svd(x, k, max_iter=4, tol=1e-8, cost_model=False)
    assert info["fallback"] == 3
    _, so, _ = np_svd(x)
    assert np.abs(s.double().numpy() - so[..., :k]).max() < 1e-5
    opt = np.sqrt((so[..., k:] ** 2).sum(-1))
    got = np.linalg.norm(x.double().numpy()
                         - principal_np(*(t.double().numpy() for t in (u, s, v)), k), axis=(-2, -1))
    assert np.allclose(got, opt, rtol=1e-5)
    assert orth_err(u) < 1e-5 and orth_err(v) < 1e-5


def test_mixed_batch_only_bad_slices_fall_back():
    k = 3
    good = decaying((2,), 90, 70, cplx=True, seed=1)
    bad = decaying((1,), 90, 70, cplx=True, flat=True, noise=1e-3, seed=2)
    x = torch.cat([good[:1], bad, good[1:]]).to(torch.complex64)
    # block Krylov: two block steps (a 32-column space) meet 1e-5 on the 1/i slices, not on
    # the flat one (with more steps the space would cover all 70 columns: exact)
    u, s, v, info = _lowrank.topk_svd(x, k, max_iter=2, tol=1e-5, cost_model=False)
    assert info["fallback"] == 1
    err, so = rel_err_principal(u[[0, 2]], s[[0, 2]], v[[0, 2]], x[[0, 2]], k)
    gap = ((so[..., :k] ** 2).sum(-1) / (so[..., k - 1] ** 2 - so[..., k] ** 2)).max()
    assert err ** 2 <= 2 * 1e-5 * gap
    _, so, _ = np_svd(x)
    assert np.abs(s.double().numpy() - so[..., :k]).max() < 1e-5


@pytest.mark.parametrize("small_linalg", ["device", "host"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_and_rank_deficient_slices(seed, small_linalg, monkeypatch):
    """Zero singular values stay zero to float64 precision (Ritz values from the Gram matrix
    B Bᴴ can put them near sqrt(eps) σ_1: seen once, with an unseeded rank-2 slice, as
    |S_3 - σ_3| = 1.8e-7 against σ_1 = 38, which breaks (b) at tol 1e-10). Both places for the
    small factorisations (SMALL_LINALG; "host" is what CUDA tensors use: CholeskyQR2 of a
    rank-deficient Bᴴ falls back to Householder QR)."""
    monkeypatch.setattr(_lowrank, "SMALL_LINALG", small_linalg)
    k = 5
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(3, 40, 30, dtype=torch.float64)
    x[1] = decaying((), 40, 30, cplx=False, noise=0.0, seed=7)
    x[2] = (torch.randn(40, 2, dtype=torch.float64, generator=g)
            @ torch.randn(2, 30, dtype=torch.float64, generator=g))
    u, s, v, info = _lowrank.topk_svd(x, k, oversample=4, cost_model=False)
    _, so, _ = np_svd(x)
    assert np.abs(s.numpy() - so[..., :k]).max() < 1e-9 * so.max()
    xk = (u * s[..., None, :]) @ v.mT
    assert torch.allclose(xk[0], torch.zeros(40, 30, dtype=torch.float64))
    assert torch.allclose(xk[2], x[2], atol=1e-10)


@pytest.fixture
def small_linalg_on_host(monkeypatch):
    """The path CUDA tensors take by default (SMALL_LINALG "auto"): Rayleigh-Ritz SVD through
    CholeskyQR2 of Bᴴ and an l x l SVD, bounds' eigenvalues on the CPU; forced on CPU tensors."""
    monkeypatch.setattr(_lowrank, "SMALL_LINALG", "host")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cplx", [False, True])
def test_host_small_linalg_matches_float64_svd(small_linalg_on_host, dtype, cplx):
    """Same contract as test_topk_matches_float64_svd with the host path of the small
    factorisations, and the same result as the device path up to rounding."""
    k, n1, n2 = 5, 150, 60
    x = decaying((2, 3), n1, n2, cplx=cplx, seed=n1)
    x = x.to({(torch.float32, True): torch.complex64, (torch.float64, True): torch.complex128}
             .get((dtype, cplx), dtype))
    u, s, v, info = _lowrank.topk_svd(x, k, cost_model=False)
    assert info["fallback"] == 0 and info["iterations"] >= 1
    err, so = rel_err_principal(u, s, v, x, k)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    gap = ((so[..., :k] ** 2).sum(-1) / (so[..., k - 1] ** 2 - so[..., k] ** 2)).max()
    assert err ** 2 <= 2 * tol * gap
    assert np.abs(s.double().numpy() - so[..., :k]).max() <= tol * so[..., 0].min()
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    assert orth_err(u) < eps and orth_err(v) < eps
    assert info["est_b"] * so[..., 0].min() >= np.abs(s.double().numpy() - so[..., :k]).max()
    _lowrank.SMALL_LINALG = "device"
    u2, s2, v2, info2 = _lowrank.topk_svd(x, k, cost_model=False)
    assert info2["iterations"] == info["iterations"]
    assert np.abs(s.double().numpy() - s2.double().numpy()).max() <= 10 * tol * so[..., 0].min()


def test_small_linalg_bad_value_names_the_setting(monkeypatch):
    monkeypatch.setattr(_lowrank, "SMALL_LINALG", "gpu")
    with pytest.raises(ValueError, match="SMALL_LINALG"):
        _lowrank.topk_svd(decaying((1,), 30, 20, cplx=False), 3, cost_model=False)


# --------------------------------------------------------------------------------------
# through the public API: transforms, real DC/Nyquist slices
# --------------------------------------------------------------------------------------
def tensor_decaying(n3, n1, n2, batch=(), seed=0, transform="fft"):
    """Real ``(*batch, n3, n1, n2)`` whose every transform-domain slice has a decaying
    spectrum (s_i ~ 1/i plus noise): the slices are built in the transform domain (real DC
    and Nyquist slices for the FFT) and transformed back."""
    if transform == "dct":
        xh = decaying((*batch, n3), n1, n2, cplx=False, noise=1e-4, seed=seed)
        return torch.from_numpy(idct(xh.numpy(), type=2, norm="ortho", axis=-3))
    m = n3 // 2 + 1
    xh = decaying((*batch, m), n1, n2, cplx=True, noise=1e-4, seed=seed)
    xr = decaying((*batch, m), n1, n2, cplx=False, noise=1e-4, seed=seed + 1)
    xh[..., 0, :, :] = xr[..., 0, :, :]
    if n3 % 2 == 0 and n3 > 1:
        xh[..., m - 1, :, :] = xr[..., m - 1, :, :]
    return torch.from_numpy(np.fft.irfft(xh.numpy(), n=n3, axis=-3))


@pytest.mark.parametrize("n3", [1, 2, 5, 6])
def test_public_fft_randomized_equals_full(n3):
    k = 4
    x = tensor_decaying(n3, 70, 50, seed=n3).float()
    tr = get_transform("fft")
    xh = tr.forward(x)
    uh, sh, vh = _lowrank.hat_topk_svd(xh, k, tr, n3)
    assert _lowrank.last_info()["fallback"] == 0
    # DC (and Nyquist for even n3) decomposed in real arithmetic: real vectors
    real = [0] + ([n3 // 2] if n3 % 2 == 0 and n3 > 1 else [])
    for i in real:
        assert float(uh[i].imag.abs().max()) == 0.0 and float(vh[i].imag.abs().max()) == 0.0
    u, s, v = tsvd.tsvd(x, k, method="randomized")
    uf, sf, vf = tsvd.tsvd(x, k, method="full")
    assert u.shape == uf.shape and s.shape == sf.shape and v.shape == vf.shape
    assert not u.is_complex()
    rec, recf = tsvd.treconstruct(u, s, v).double(), tsvd.treconstruct(uf, sf, vf).double()
    # contract (a) summed over the slices (Parseval), against the full path's optimum
    excess = float((x.double() - rec).norm() ** 2 - (x.double() - recf).norm() ** 2)
    assert excess <= 1e-4 * float(recf.norm() ** 2)
    assert float((s - sf).abs().max()) < 1e-4 * float(sf.abs().max())
    # t-orthogonality of U: Uᵀ * U = I
    utu = tsvd.tprod(tsvd.ttranspose(u), u)
    assert float((utu - tsvd.teye(k, n3)).abs().max()) < 1e-4


def _contract(u, s, v, x, k):
    """Per matrix of ``x (a, n1, n2)``: contract (a) / ‖X_k‖_F² and (b) / σ_1 of the returned
    triplets against the float64 SVD of x (the oracle)."""
    hi = torch.complex128 if x.is_complex() else torch.float64
    x = x.to(hi)
    sv = torch.linalg.svdvals(x)
    xt = (u.to(hi) * s.double()[..., None, :].to(hi)) @ v.to(hi).mH
    err2 = torch.linalg.matrix_norm(x - xt) ** 2
    a = (err2 - (sv[..., k:] ** 2).sum(-1)) / (sv[..., :k] ** 2).sum(-1)
    b = (s.double() - sv[..., :k]).abs().amax(-1) / sv[..., 0]
    return a, b


@pytest.mark.parametrize("small_linalg", ["device", "host"])
@pytest.mark.parametrize("n3,n1,n2,batch", [(6, 90, 60, ()), (5, 60, 90, ()),
                                             (12, 120, 80, ()), (6, 70, 50, (2,))])
def test_real_slices_merged_into_the_complex_batch(n3, n1, n2, batch, small_linalg,
                                                   monkeypatch):
    """REAL_SLICES "merged" (what CUDA tensors use): the FFT's DC (and Nyquist) slices
    iterate in the complex slices' batch from a real start with real eigenproblems. Their
    triplets come out of ``topk_svd(real=...)`` with imaginary part exactly 0, one block
    Krylov run does all slices, and every slice meets the contract against float64 LAPACK."""
    monkeypatch.setattr(_lowrank, "SMALL_LINALG", small_linalg)
    k, tol = 4, 1e-4
    tr = get_transform("fft")
    xh = tr.forward(tensor_decaying(n3, n1, n2, batch=batch, seed=n3).float())
    m = xh.shape[-3]
    real = torch.zeros(xh.shape[:-2], dtype=torch.bool)
    real[..., 0] = True
    real[..., m - 1] |= n3 % 2 == 0
    u, s, v, info = _lowrank.topk_svd(xh, k, tol=tol, cost_model=False, real=real)
    assert info["iterations"] > 0 and info["fallback"] == 0
    assert float(u[real].imag.abs().max()) == 0.0 and float(v[real].imag.abs().max()) == 0.0
    flat = (lambda t: t.reshape(-1, *t.shape[len(batch) + 1:]))
    a, b = _contract(*map(flat, (u, s, v, xh)), k)
    assert (a <= tol).all() and (b <= tol).all(), (a, b)

    monkeypatch.setattr(_lowrank, "REAL_SLICES", "merged")
    uh, sh, vh = _lowrank.hat_topk_svd(xh, k, tr, n3, tol=tol, cost_model=False)
    assert len(_lowrank.last_info()["parts"]) == 1
    monkeypatch.setattr(_lowrank, "REAL_SLICES", "separate")
    _lowrank.hat_topk_svd(xh, k, tr, n3, tol=tol, cost_model=False)
    assert len(_lowrank.last_info()["parts"]) == 2
    assert float(uh[real].imag.abs().max()) == 0.0 and float(vh[real].imag.abs().max()) == 0.0
    a, b = _contract(*map(flat, (uh, sh, vh, xh)), k)
    assert (a <= tol).all() and (b <= tol).all(), (a, b)


def test_real_slices_merged_fallback_and_bad_input(monkeypatch):
    """A budget too short sends slices to the full SVD, the real ones in real arithmetic
    (real vectors, float64 optimum); a bad ``real`` mask is refused before any work."""
    k = 3
    x = decaying((5,), 70, 50, cplx=True, flat=True, noise=1e-3, seed=4).to(torch.complex64)
    x[0] = x[0].real.to(x.dtype)
    x[4] = x[4].real.to(x.dtype)
    real = torch.tensor([True, False, False, False, True])
    u, s, v, info = _lowrank.topk_svd(x, k, tol=1e-7, max_iter=2, cost_model=False, real=real)
    assert info["fallback"] == 5
    assert float(u[real].imag.abs().max()) == 0.0 and float(v[real].imag.abs().max()) == 0.0
    a, b = _contract(u, s, v, x, k)
    assert (a <= 1e-5).all() and (b <= 1e-5).all(), (a, b)
    with pytest.raises(ValueError, match="real: expected a bool tensor of shape"):
        _lowrank.topk_svd(x, k, real=real[:4])
    with pytest.raises(ValueError, match="real: only for algorithm='krylov'"):
        _lowrank.topk_svd(x, k, real=real, algorithm="subspace")
    monkeypatch.setattr(_lowrank, "REAL_SLICES", "both")
    with pytest.raises(ValueError, match="REAL_SLICES"):
        _lowrank.hat_topk_svd(x, k, get_transform("fft"), 8)


@pytest.mark.parametrize("small_linalg", ["device", "host"])
def test_host_threads_give_identical_results(small_linalg, monkeypatch):
    """HOST_THREADS > 1 splits the small eigenproblems over a thread pool: the same LAPACK
    call per matrix, so the same triplets bit for bit; a bad setting is refused up front."""
    monkeypatch.setattr(_lowrank, "SMALL_LINALG", small_linalg)
    x = decaying((7,), 120, 80, cplx=True, seed=2).to(torch.complex64)
    monkeypatch.setattr(_lowrank, "HOST_THREADS", "1")
    one = _lowrank.topk_svd(x, 4, tol=1e-5, cost_model=False)
    monkeypatch.setattr(_lowrank, "_POOL", None)
    assert _lowrank._POOL is None
    monkeypatch.setattr(_lowrank, "HOST_THREADS", "3")
    three = _lowrank.topk_svd(x, 4, tol=1e-5, cost_model=False)
    assert _lowrank._POOL is not None and _lowrank._POOL._max_workers == 3     # it did split
    assert one[3]["iterations"] > 1
    for a, b in zip(one[:3], three[:3]):
        assert torch.equal(a, b)
    for bad in ("0", "two", True):
        monkeypatch.setattr(_lowrank, "HOST_THREADS", bad)
        with pytest.raises(ValueError, match="HOST_THREADS"):
            _lowrank.topk_svd(x, 4, cost_model=False)


def test_public_eckart_young_fft_float64_optimum():
    """‖X - X_k‖_F equals the float64 optimum sqrt((1/n3) Σ_f Σ_{i>k} σ_i(X̂_f)²)."""
    n3, k = 6, 5
    x = tensor_decaying(n3, 64, 90, batch=(2,), seed=11).float()
    u, s, v = tsvd.tsvd(x, k, method="randomized")
    err = np.sqrt((((x - tsvd.treconstruct(u, s, v)).double().numpy()) ** 2).sum((-3, -2, -1)))
    xf = np.fft.fft(x.double().numpy(), axis=-3)              # full spectrum, numpy oracle
    sv = np_svd(torch.from_numpy(xf))[1]
    opt = np.sqrt((sv[..., k:] ** 2).sum((-2, -1)) / n3)
    assert np.allclose(err, opt, rtol=1e-4)
    assert _lowrank.last_info()["fallback"] == 0


@pytest.mark.parametrize("n1,n2", [(80, 40), (40, 80)])
def test_public_dct_and_batch(n1, n2):
    k = 3
    x = tensor_decaying(5, n1, n2, batch=(2,), seed=n1, transform="dct").double()
    u, s, v = tsvd.tsvd(x, k, transform="dct", method="randomized")
    assert u.shape == (2, 5, n1, k) and s.shape == (2, 5, k) and v.shape == (2, 5, n2, k)
    assert _lowrank.last_info()["fallback"] == 0
    uf, sf, vf = tsvd.tsvd(x, k, transform="dct", method="full")
    rec = tsvd.treconstruct(u, s, v, transform="dct")
    recf = tsvd.treconstruct(uf, sf, vf, transform="dct")
    excess = float((x - rec).norm() ** 2 - (x - recf).norm() ** 2)
    assert excess <= 1e-10 * float(recf.norm() ** 2)               # float64 default tol
    # Eckart-Young against numpy's SVD of the DCT-domain slices
    xh = dct(x.numpy(), type=2, norm="ortho", axis=-3)
    sv = np_svd(torch.from_numpy(xh))[1]
    opt = np.sqrt((sv[..., k:] ** 2).sum((-2, -1)))
    got = np.sqrt(((x - rec).numpy() ** 2).sum((-3, -2, -1)))
    assert np.allclose(got, opt, rtol=1e-8)


def test_public_flat_spectrum_fft_still_correct():
    n3, k = 4, 3
    x = decaying((n3,), 50, 40, cplx=False, flat=True, noise=1e-3, seed=9).float()
    u, s, v = tsvd.tsvd(x, k, method="randomized", tol=1e-7)
    xf = np.fft.fft(x.double().numpy(), axis=-3)
    sv = np_svd(torch.from_numpy(xf))[1]
    opt = np.sqrt((sv[..., k:] ** 2).sum() / n3)
    got = float((x - tsvd.treconstruct(u, s, v)).double().norm())
    assert abs(got - opt) <= 1e-5 * opt
