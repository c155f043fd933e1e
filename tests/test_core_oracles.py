"""Every public op against an independent numpy oracle written from its definition.

FFT t-product: ``A * B = fold(bcirc(A) @ unfold(B))`` with bcirc built by an explicit loop;
t-transpose by its definition; norms and singular values from ``numpy.linalg.svd`` of the
full ``numpy.fft.fft`` spectrum (all n3 slices, float64); Eckart-Young for truncations.
DCT and matrix transforms (⋆_M): tubes transformed with scipy / an explicit matrix loop,
slices multiplied, transformed back.

Tests that touch the ops with compiled kernels (tprod, treconstruct, tsvd) run once per
available backend (``backend`` fixture, conftest.py) and check that backend really ran.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tsvd
from conftest import (np64, np_bcirc, np_dct, np_fdiag, np_fft_slices, np_fft_svals, np_fold,
                      np_idct, np_meye, np_mode3, np_mprod, np_teye, np_tnn, np_tprod, np_tsn,
                      np_ttranspose,
                      np_transform_pair, np_unfold, rand, random_invertible, random_orthogonal)

TOL = dict(rtol=1e-10, atol=1e-10)
# (n3, n1, n2): odd and even n3, n3 = 1, n1 != n2 both ways
SHAPES = [(1, 3, 2), (2, 2, 3), (3, 4, 4), (4, 3, 5), (5, 5, 3), (6, 2, 4)]


def _ids(shapes):
    return ["x".join(map(str, s)) for s in shapes]


# ======================================================================================
# structural helpers: bcirc, unfold/fold, fdiag
# ======================================================================================
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_bcirc_matches_explicit_loop(shape):
    a = rand(2, *shape, seed=1)
    got = tsvd.bcirc(a)
    n3, n1, n2 = shape
    assert got.shape == (2, n3 * n1, n3 * n2)
    for b in range(2):
        np.testing.assert_array_equal(np64(got[b]), np_bcirc(np64(a[b])))


def test_unfold_fold_match_definition():
    b = rand(3, 4, 5, seed=2)
    u = tsvd.unfold(b)
    np.testing.assert_array_equal(np64(u), np_unfold(np64(b)))
    np.testing.assert_array_equal(np64(tsvd.fold(u, 3)), np64(b))
    np.testing.assert_array_equal(np_fold(np_unfold(np64(b)), 3), np64(b))


@pytest.mark.parametrize("n1,n2", [(None, None), (4, 3), (3, 5)])
def test_fdiag_matches_definition(n1, n2):
    s = rand(2, 4, 3, seed=3)
    got = tsvd.fdiag(s, n1, n2)
    np.testing.assert_array_equal(np64(got), np_fdiag(np64(s), n1, n2))


# ======================================================================================
# FFT t-product family
# ======================================================================================
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_tprod_fft_matches_block_circulant(backend, shape):
    n3, n1, n2 = shape
    a, b = rand(n3, n1, n2, seed=4), rand(n3, n2, 3, seed=5)
    c = tsvd.tprod(a, b)
    assert tsvd.last_backend("tprod") == backend
    assert c.shape == (n3, n1, 3) and c.dtype == torch.float64
    want = np_fold(np_bcirc(np64(a)) @ np_unfold(np64(b)), n3)
    np.testing.assert_allclose(np64(c), want, **TOL)
    # the defining identity of the algebra: bcirc(A * B) = bcirc(A) bcirc(B)
    np.testing.assert_allclose(np_bcirc(np64(c)), np_bcirc(np64(a)) @ np_bcirc(np64(b)), **TOL)


def test_tprod_fft_broadcasts_batch_dims(backend):
    a, b = rand(2, 1, 4, 3, 2, seed=6), rand(3, 4, 2, 5, seed=7)
    c = tsvd.tprod(a, b)
    assert tsvd.last_backend("tprod") == backend
    assert c.shape == (2, 3, 4, 3, 5)
    np.testing.assert_allclose(np64(c), np_tprod(np64(a), np64(b)), **TOL)


def test_tprod_float32_against_float64_oracle(backend):
    a, b = rand(5, 6, 4, seed=8, dtype=torch.float32), rand(5, 4, 3, seed=9, dtype=torch.float32)
    c = tsvd.tprod(a, b)
    assert c.dtype == torch.float32
    np.testing.assert_allclose(np64(c), np_tprod(np64(a), np64(b)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_ttranspose_fft_definition(shape):
    a = rand(*shape, seed=10)
    at = tsvd.ttranspose(a)
    np.testing.assert_array_equal(np64(at), np_ttranspose(np64(a)))
    np.testing.assert_allclose(np_bcirc(np64(at)), np_bcirc(np64(a)).T, **TOL)
    np.testing.assert_array_equal(np64(tsvd.ttranspose(at)), np64(a))


def test_ttranspose_reverses_products(backend):
    a, b = rand(5, 3, 4, seed=11), rand(5, 4, 2, seed=12)
    lhs = np64(tsvd.ttranspose(tsvd.tprod(a, b)))
    rhs = np_tprod(np_ttranspose(np64(b)), np_ttranspose(np64(a)))
    np.testing.assert_allclose(lhs, rhs, **TOL)


@pytest.mark.parametrize("n3", [1, 2, 5])
def test_teye_fft_is_identity(backend, n3):
    eye = tsvd.teye(3, n3, dtype=torch.float64)
    assert eye.dtype == torch.float64
    np.testing.assert_array_equal(np64(eye), np_teye(3, n3))
    np.testing.assert_array_equal(np_bcirc(np64(eye)), np.eye(3 * n3))
    a = rand(n3, 3, 2, seed=13)
    np.testing.assert_allclose(np64(tsvd.tprod(eye, a)), np64(a), **TOL)


def test_teye_default_dtype():
    assert tsvd.teye(2, 3).dtype == torch.get_default_dtype()
    assert tsvd.teye(2, 3, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("n3", [1, 2, 3, 4])
def test_tinv_fft_inverts_block_circulant(n3):
    a = rand(n3, 4, 4, seed=14)
    ai = tsvd.tinv(a)
    np.testing.assert_allclose(np_bcirc(np64(ai)), np.linalg.inv(np_bcirc(np64(a))),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np_tprod(np64(a), np64(ai)), np_teye(4, n3), atol=1e-10)
    np.testing.assert_allclose(np_tprod(np64(ai), np64(a)), np_teye(4, n3), atol=1e-10)


# ======================================================================================
# t-SVD (FFT)
# ======================================================================================
def _check_orthogonal_fft(u: np.ndarray, k: int):
    n3 = u.shape[-3]
    np.testing.assert_allclose(np_tprod(np_ttranspose(u), u), np_teye(k, n3), atol=1e-10)


def _np_reconstruct(u, s, v):
    return np_tprod(np_tprod(u, np_fdiag(s)), np_ttranspose(v))


SVD_CASES = [(s, k) for s in SHAPES for k in (None, 1, 2) if k is None or k <= min(s[1:])]


@pytest.mark.parametrize("shape,k", SVD_CASES, ids=[f"{'x'.join(map(str, s))}-k{k}"
                                                    for s, k in SVD_CASES])
def test_tsvd_fft_against_numpy(backend, shape, k):
    n3, n1, n2 = shape
    p = min(n1, n2)
    x = rand(*shape, seed=15)
    u, s, v = tsvd.tsvd(x, k)
    assert tsvd.last_backend("tsvd") == backend
    kk = p if k is None else k
    assert u.shape == (n3, n1, kk) and s.shape == (n3, kk) and v.shape == (n3, n2, kk)
    u, s, v = np64(u), np64(s), np64(v)
    # U and V orthogonal in the t-product sense
    _check_orthogonal_fft(u, kk)
    _check_orthogonal_fft(v, kk)
    # S f-diagonal with, in every one of the n3 Fourier slices, the top-kk singular values
    sh = np.fft.fft(s, axis=-2)                            # (n3, kk) complex
    want = np_fft_svals(np64(x))[:, :kk]                   # (n3, kk) from numpy, full spectrum
    np.testing.assert_allclose(sh.imag, 0, atol=1e-10)
    np.testing.assert_allclose(sh.real, want, rtol=1e-10, atol=1e-10)
    # reconstruction: exact for the economy t-SVD, the principal part otherwise
    xk = _np_reconstruct(u, s, v)
    if k is None:
        np.testing.assert_allclose(xk, np64(x), **TOL)
    else:
        # per Fourier slice, X̂_k is X̂ projected on its top-k singular subspace
        xh, xkh = np_fft_slices(np64(x)), np_fft_slices(xk)
        for f in range(n3):
            uu, ss, vvh = np.linalg.svd(xh[f])
            best = (uu[:, :k] * ss[:k]) @ vvh[:k]
            np.testing.assert_allclose(xkh[f], best, rtol=1e-9, atol=1e-9)


def test_tsvd_batched_matches_per_item(backend):
    x = rand(2, 3, 4, 5, 3, seed=16)
    u, s, v = tsvd.tsvd(x, 2)
    for idx in np.ndindex(2, 3):
        xi = np64(x[idx])
        np.testing.assert_allclose(np.fft.fft(np64(s[idx]), axis=-2).real,
                                   np_fft_svals(xi)[:, :2], rtol=1e-10, atol=1e-10)
        xk = _np_reconstruct(np64(u[idx]), np64(s[idx]), np64(v[idx]))
        resid = np.sum((xi - xk) ** 2)
        assert np.isclose(resid, np.sum(np_fft_svals(xi)[:, 2:] ** 2) / 4, rtol=1e-9)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_tsvdvals_fft_full_spectrum(shape):
    x = rand(2, *shape, seed=17)
    sv = tsvd.tsvdvals(x)
    np.testing.assert_allclose(np64(sv), np_fft_svals(np64(x)), **TOL)


@pytest.mark.parametrize("shape,k", [((4, 6, 5), 2), ((5, 4, 7), 1), ((3, 6, 6), 3),
                                     ((6, 5, 4), 3)])
def test_eckart_young_fft(backend, shape, k):
    """The truncated t-SVD is the best tubal-rank-k approximation in Frobenius norm."""
    n3, n1, n2 = shape
    x = np64(rand(*shape, seed=18))
    u, s, v = (np64(t) for t in tsvd.tsvd(torch.from_numpy(x), k))
    xk = _np_reconstruct(u, s, v)
    err = np.sum((x - xk) ** 2)
    optimum = np.sum(np_fft_svals(x)[:, k:] ** 2) / n3
    assert np.isclose(err, optimum, rtol=1e-10, atol=1e-12)
    # the same through the public treconstruct (the LoRA-PT hot path)
    xk2 = np64(tsvd.treconstruct(*(torch.from_numpy(t) for t in (u, s, v))))
    np.testing.assert_allclose(xk2, xk, **TOL)

    def best_fit(p):
        """Best Q for a given tubal-rank-k left factor P: per-slice least squares."""
        ph, xh = np_fft_slices(p), np_fft_slices(x)
        q = np.fft.ifft(np.linalg.pinv(ph) @ xh, axis=0)
        assert np.abs(q.imag).max() < 1e-9
        return np_tprod(p, q.real)

    g = np.random.default_rng(0)
    competitors = [np_tprod(g.standard_normal((n3, n1, k)), g.standard_normal((n3, k, n2)))]
    competitors.append(best_fit(g.standard_normal((n3, n1, k))))
    for eps in (1e-1, 1e-3):              # the optimum's own column space, perturbed
        competitors.append(best_fit(u + eps * g.standard_normal(u.shape)))
    for y in competitors:
        assert np.sum((x - y) ** 2) > err * (1 + 1e-9)


# ======================================================================================
# treconstruct (FFT)
# ======================================================================================
@pytest.mark.parametrize("with_residual", [False, True])
def test_treconstruct_fft_against_definition(backend, with_residual):
    n3, n1, n2, k = 5, 4, 6, 3
    u, s, v = rand(2, n3, n1, k, seed=19), rand(n3, k, seed=20), rand(3, 1, n3, n2, k, seed=21)
    r = rand(n3, n1, n2, seed=22) if with_residual else None
    out = tsvd.treconstruct(u, s, v, residual=r)
    assert tsvd.last_backend("treconstruct") == backend
    assert out.shape == (3, 2, n3, n1, n2)
    want = np_tprod(np_tprod(np64(u), np_fdiag(np64(s))), np_ttranspose(np64(v)))
    if with_residual:
        want = want + np64(r)
    np.testing.assert_allclose(np64(out), want, **TOL)


def test_treconstruct_with_residual_recovers_x(backend):
    x = rand(4, 6, 5, seed=23)
    u, s, v = tsvd.tsvd(x, 2)
    xk = tsvd.treconstruct(u, s, v)
    w = tsvd.treconstruct(u, s, v, residual=x - xk)
    np.testing.assert_allclose(np64(w), np64(x), **TOL)
    assert np.sum((np64(x) - np64(xk)) ** 2) < np.sum(np64(x) ** 2)


# ======================================================================================
# norms, tubal rank, prox
# ======================================================================================
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_tnn_tsn_definitions_and_bcirc_identities(shape):
    n3 = shape[0]
    x = rand(2, *shape, seed=24)
    tn, ts = np64(tsvd.tnn(x)), np64(tsvd.tsn(x))
    assert tn.shape == (2,) and ts.shape == (2,)
    np.testing.assert_allclose(tn, np_tnn(np64(x)), **TOL)
    np.testing.assert_allclose(ts, np_tsn(np64(x)), **TOL)
    for b in range(2):
        sv = np.linalg.svd(np_bcirc(np64(x[b])), compute_uv=False)
        assert np.isclose(tn[b], sv.sum() / n3, rtol=1e-10)
        assert np.isclose(ts[b], sv[0], rtol=1e-10)


@pytest.mark.parametrize("n3,n1,n2", [(1, 5, 4), (4, 5, 6), (5, 6, 4)])
def test_tubal_rank_of_products_with_known_rank(n3, n1, n2):
    g = np.random.default_rng(1)
    for r in range(1, min(n1, n2) + 1):
        x = np_tprod(g.standard_normal((n3, n1, r)), g.standard_normal((n3, r, n2)))
        assert int(tsvd.tubal_rank(torch.from_numpy(x))) == r
        assert int(tsvd.tubal_rank(torch.from_numpy(x).float())) == r
    assert int(tsvd.tubal_rank(torch.zeros(n3, n1, n2, dtype=torch.float64))) == 0


def test_tubal_rank_is_max_over_fourier_slices():
    """n3 = 2: DC slice A0 + A1 has rank 1, Nyquist slice A0 - A1 has rank 3."""
    g = np.random.default_rng(2)
    p = g.standard_normal((5, 1)) @ g.standard_normal((1, 4))
    q = g.standard_normal((5, 3)) @ g.standard_normal((3, 4))
    x = torch.from_numpy(np.stack([(p + q) / 2, (p - q) / 2]))
    assert np.linalg.matrix_rank(np64(x[0])) == 4 and np.linalg.matrix_rank(np64(x[1])) == 4
    assert int(tsvd.tubal_rank(x)) == 3
    x1 = torch.from_numpy(np.stack([p, 0.5 * p]))
    batch = torch.stack([x, torch.zeros_like(x), x1])
    assert tsvd.tubal_rank(batch).tolist() == [3, 0, 1]


def test_tubal_rank_tol():
    # singular tube entries (first entries of the spatial singular tubes) are diag(d) here
    d = np.array([3.0, 1e-3, 1e-9])
    u, w = random_orthogonal(3, 3), random_orthogonal(3, 4)
    x = np.zeros((4, 3, 3))
    x[0] = (u * d) @ w.T                     # only slice 0: every Fourier slice equals it
    xt = torch.from_numpy(x)
    assert int(tsvd.tubal_rank(xt)) == 3
    assert int(tsvd.tubal_rank(xt, tol=1e-6)) == 2
    assert int(tsvd.tubal_rank(xt, tol=1e-2)) == 1
    assert int(tsvd.tubal_rank(xt, tol=10.0)) == 0


def _np_svt(x: np.ndarray, rho: float) -> np.ndarray:
    xh = np_fft_slices(x)
    u, s, vh = np.linalg.svd(xh, full_matrices=False)
    yh = (u * np.maximum(s - rho, 0)[..., None, :]) @ vh
    y = np.fft.ifft(yh, axis=-3)
    assert np.abs(y.imag).max() < 1e-10
    return y.real


PROX_SHAPES = [(1, 4, 3), (4, 4, 5), (5, 3, 3)]


@pytest.mark.parametrize("shape", PROX_SHAPES, ids=_ids(PROX_SHAPES))
def test_prox_tnn_against_numpy_svt_and_objective(shape):
    x = np64(rand(*shape, seed=25))
    rho = float(np.median(np_fft_svals(x)))              # some values shrunk to 0, some not
    y = np64(tsvd.prox_tnn(torch.from_numpy(x), rho))
    np.testing.assert_allclose(y, _np_svt(x, rho), **TOL)

    def objective(z):
        return rho * np_tnn(z) + 0.5 * np.sum((z - x) ** 2)

    fy = objective(y)
    g = np.random.default_rng(3)
    for eps in (1e-1, 1e-2, 1e-4):
        for _ in range(5):
            assert objective(y + eps * g.standard_normal(y.shape)) > fy
    assert objective(x) > fy and objective(np.zeros_like(x)) > fy


def test_prox_tnn_limits():
    x = rand(4, 3, 5, seed=26)
    np.testing.assert_allclose(np64(tsvd.prox_tnn(x, 0.0)), np64(x), **TOL)
    big = float(np_tsn(np64(x))) * 1.01
    np.testing.assert_allclose(np64(tsvd.prox_tnn(x, big)), 0, atol=1e-12)


# ======================================================================================
# t-QR (FFT)
# ======================================================================================
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("mode", ["reduced", "complete"])
def test_tqr_fft(shape, mode):
    n3, n1, n2 = shape
    x = rand(*shape, seed=27)
    q, r = tsvd.tqr(x, mode=mode)
    p = min(n1, n2) if mode == "reduced" else n1
    assert q.shape == (n3, n1, p) and r.shape == (n3, p, n2)
    q, r = np64(q), np64(r)
    np.testing.assert_allclose(np_tprod(q, r), np64(x), **TOL)
    np.testing.assert_allclose(np_tprod(np_ttranspose(q), q), np_teye(p, n3), atol=1e-10)
    if mode == "complete":
        np.testing.assert_allclose(np_tprod(q, np_ttranspose(q)), np_teye(n1, n3), atol=1e-10)
    rh = np_fft_slices(r)
    np.testing.assert_allclose(np.tril(rh, -1), 0, atol=1e-10)


# ======================================================================================
# DCT and a random invertible matrix (⋆_M products)
# ======================================================================================
TRANSFORMS = ["dct", "matrix"]


def _transform(name, n3):
    return "dct" if name == "dct" else random_invertible(n3, seed=n3)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("n3", [1, 4, 5])
def test_mprod_against_definition(backend, name, n3):
    tr = _transform(name, n3)
    a, b = rand(2, 1, n3, 3, 4, seed=28), rand(3, n3, 4, 2, seed=29)
    c = tsvd.tprod(a, b, transform=tr)
    assert tsvd.last_backend("tprod") == "reference"   # kernels cover the FFT only
    np.testing.assert_allclose(np64(c), np_mprod(np64(a), np64(b), tr), **TOL)


def test_dct_string_equals_dct_matrix():
    a, b = rand(6, 3, 4, seed=30), rand(6, 4, 2, seed=31)
    c1 = tsvd.tprod(a, b, transform="dct")
    c2 = tsvd.tprod(a, b, transform=tsvd.dct_matrix(6))
    np.testing.assert_allclose(np64(c1), np64(c2), **TOL)
    # and the DCT matrix is scipy's orthonormal DCT-II
    np.testing.assert_allclose(np64(tsvd.dct_matrix(6)), np_dct(np.eye(6)[:, :, None])[..., 0],
                               **TOL)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_mtranspose_teye_tinv(name):
    n3 = 4
    tr = _transform(name, n3)
    a, b = rand(n3, 3, 3, seed=32), rand(n3, 3, 2, seed=33)
    at = tsvd.ttranspose(a, transform=tr)
    np.testing.assert_array_equal(np64(at), np64(a).transpose(0, 2, 1))
    lhs = np64(tsvd.ttranspose(tsvd.tprod(a, b, transform=tr), transform=tr))
    rhs = np_mprod(np64(b).transpose(0, 2, 1), np64(a).transpose(0, 2, 1), tr)
    np.testing.assert_allclose(lhs, rhs, **TOL)
    eye = tsvd.teye(3, n3, transform=tr, dtype=torch.float64)
    np.testing.assert_allclose(np64(eye), np_meye(3, n3, tr), **TOL)
    np.testing.assert_allclose(np_mprod(np64(eye), np64(b), tr), np64(b), **TOL)
    ai = tsvd.tinv(a, transform=tr)
    np.testing.assert_allclose(np_mprod(np64(a), np64(ai), tr), np_meye(3, n3, tr), atol=1e-9)
    np.testing.assert_allclose(np_mprod(np64(ai), np64(a), tr), np_meye(3, n3, tr), atol=1e-9)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("k", [None, 2])
def test_msvd_against_definition(backend, name, k):
    n3, n1, n2 = 5, 4, 6
    tr = _transform(name, n3)
    fwd, _ = np_transform_pair(tr, n3)
    x = rand(n3, n1, n2, seed=34)
    u, s, v = (np64(t) for t in tsvd.tsvd(x, k, transform=tr))
    kk = min(n1, n2) if k is None else k
    assert u.shape == (n3, n1, kk) and s.shape == (n3, kk) and v.shape == (n3, n2, kk)
    eye = np_meye(kk, n3, tr)
    np.testing.assert_allclose(np_mprod(u.transpose(0, 2, 1), u, tr), eye, atol=1e-10)
    np.testing.assert_allclose(np_mprod(v.transpose(0, 2, 1), v, tr), eye, atol=1e-10)
    xh = fwd(np64(x))
    svals = np.linalg.svd(xh, compute_uv=False)
    np.testing.assert_allclose(fwd(s[..., None])[..., 0], svals[:, :kk], **TOL)
    np.testing.assert_allclose(np64(tsvd.tsvdvals(x, transform=tr)), svals, **TOL)
    xk = np_mprod(np_mprod(u, np_fdiag(s), tr), v.transpose(0, 2, 1), tr)
    # the same through treconstruct under the same transform
    xk2 = tsvd.treconstruct(*(torch.from_numpy(t) for t in (u, s, v)), transform=tr)
    np.testing.assert_allclose(np64(xk2), xk, **TOL)
    if k is None:
        np.testing.assert_allclose(xk, np64(x), **TOL)
    else:
        uu, ss, vvh = np.linalg.svd(xh, full_matrices=False)
        best = (uu[..., :k] * ss[:, None, :k]) @ vvh[:, :k]
        np.testing.assert_allclose(fwd(xk), best, rtol=1e-9, atol=1e-9)


def test_dct_norms_and_prox():
    n3 = 5
    x = np64(rand(n3, 4, 3, seed=35))
    sv = np.linalg.svd(np_dct(x), compute_uv=False)                 # (n3, 3)
    xt = torch.from_numpy(x)
    assert np.isclose(float(tsvd.tnn(xt, transform="dct")), sv.sum(), rtol=1e-12)
    assert np.isclose(float(tsvd.tsn(xt, transform="dct")), sv[:, 0].max(), rtol=1e-12)
    rho = float(np.median(sv))
    u, s, vh = np.linalg.svd(np_dct(x), full_matrices=False)
    want = np_idct((u * np.maximum(s - rho, 0)[:, None, :]) @ vh)
    np.testing.assert_allclose(np64(tsvd.prox_tnn(xt, rho, transform="dct")), want, **TOL)


def test_scaled_orthogonal_matrix_norms():
    """For M = c·Q (Q orthogonal), tnn = (1/c²) Σ_k ‖X̂_k‖_* (ell = mean diag(MᵀM) = c²)."""
    n3, c = 4, 2.0
    m = c * random_orthogonal(n3, 5)
    x = np64(rand(n3, 3, 4, seed=36))
    sv = np.linalg.svd(np_mode3(m, x), compute_uv=False)
    xt, mt = torch.from_numpy(x), torch.from_numpy(m)
    assert np.isclose(float(tsvd.tnn(xt, transform=mt)), sv.sum() / c**2, rtol=1e-12)
    assert np.isclose(float(tsvd.tsn(xt, transform=mt)), sv[:, 0].max(), rtol=1e-12)
    # the matrix-defined DCT and the "dct" string agree on every norm
    d = tsvd.dct_matrix(n3)
    assert np.isclose(float(tsvd.tnn(xt, transform=d)), float(tsvd.tnn(xt, transform="dct")))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_mqr_and_tubal_rank(name):
    n3, n1, n2 = 4, 5, 3
    tr = _transform(name, n3)
    fwd, _ = np_transform_pair(tr, n3)
    x = rand(n3, n1, n2, seed=37)
    q, r = (np64(t) for t in tsvd.tqr(x, transform=tr))
    np.testing.assert_allclose(np_mprod(q, r, tr), np64(x), **TOL)
    np.testing.assert_allclose(np_mprod(q.transpose(0, 2, 1), q, tr), np_meye(n2, n3, tr),
                               atol=1e-10)
    np.testing.assert_allclose(np.tril(fwd(r), -1), 0, atol=1e-10)
    g = np.random.default_rng(4)
    for rk in (1, 2, 3):
        y = np_mprod(g.standard_normal((n3, n1, rk)), g.standard_normal((n3, rk, n2)), tr)
        assert int(tsvd.tubal_rank(torch.from_numpy(y), transform=tr)) == rk


# ======================================================================================
# reference module: importable and correct on its own
# ======================================================================================
def test_reference_module_against_oracle():
    from tsvd.reference import tprod, treconstruct
    u, s, v = rand(3, 4, 2, seed=38), rand(3, 2, seed=39), rand(3, 5, 2, seed=40)
    want = np_tprod(np_tprod(np64(u), np_fdiag(np64(s))), np_ttranspose(np64(v)))
    np.testing.assert_allclose(np64(treconstruct(u, s, v)), want, **TOL)
    a, b = rand(3, 4, 2, seed=41), rand(3, 2, 5, seed=42)
    np.testing.assert_allclose(np64(tprod(a, b)), np_tprod(np64(a), np64(b)), **TOL)
