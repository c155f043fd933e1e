"""Hypothesis property tests over shapes, layouts and dtypes, against the numpy oracles.

Shapes: odd and even n3, n3 = 1, n1 != n2; batch dims that broadcast
(A ``(2, 1, n3, n1, n2)`` with B ``(3, n3, n2, n4)``); non-contiguous inputs (transposed
slices, strided views, and MATLAB's ``n1 x n2 x n3`` layout permuted to ``(n3, n1, n2)``);
float32/float64 computed as given, float16/bfloat16 computed in float32 and returned in
the input dtype. Hypothesis draws the shapes and a seed; the values come from a seeded
torch generator (well-scaled Gaussians), so failures replay exactly.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tsvd
from conftest import (BACKENDS, np64, np_fdiag, np_fft_svals, np_mprod, np_teye,
                      np_tnn, np_tprod, np_tsn, np_ttranspose)

#: TSVD_HYPOTHESIS_EXAMPLES=1000 for a deeper search than the default CI run
SETTINGS = settings(deadline=None, print_blob=True,
                    max_examples=int(os.environ.get("TSVD_HYPOTHESIS_EXAMPLES", "50")),
                    suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "strided", "matlab"]
#: max |error| allowed, relative to the scale of the result (see _close)
RTOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

dims = st.integers(1, 5)
n3s = st.integers(1, 6)
seeds = st.integers(0, 2**31 - 1)


def make(shape, layout, dtype, seed):
    """A tensor of ``shape`` and ``dtype`` whose memory layout is ``layout``."""
    g = torch.Generator().manual_seed(seed)
    *batch, n3, n1, n2 = shape
    if layout == "contiguous":
        x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    elif layout == "transposed":            # every frontal slice stored transposed
        x = torch.randn(*batch, n3, n2, n1, generator=g, dtype=torch.float64).to(dtype).mT
    elif layout == "strided":               # every other column of a wider buffer
        x = torch.randn(*batch, n3, n1, 2 * n2, generator=g, dtype=torch.float64).to(dtype)
        x = x[..., ::2]
    else:                                   # MATLAB n1 x n2 x n3 permuted to (n3, n1, n2)
        nb = len(batch)
        x = torch.randn(*batch, n1, n2, n3, generator=g, dtype=torch.float64).to(dtype)
        x = x.permute(*range(nb), nb + 2, nb, nb + 1)
    assert x.shape == tuple(shape) and x.dtype == dtype
    if layout in ("transposed", "strided") and min(n1, n2) > 1 or \
            layout == "matlab" and n3 > 1 and n1 * n2 > 1:
        assert not x.is_contiguous()
    return x


def _close(got: torch.Tensor, want: np.ndarray, dtype, scale=None, factor=1.0):
    """max |got - want| <= RTOL[dtype] * factor * scale (default: max |want|, at least 1)."""
    assert got.dtype == dtype
    g = np64(got)
    assert g.shape == want.shape
    scale = max(float(np.abs(want).max(initial=0.0)), 1.0) if scale is None else scale
    err = float(np.abs(g - want).max(initial=0.0))
    assert err <= RTOL[dtype] * factor * scale, (err, scale, dtype)


batch_modes = st.sampled_from(["none", "A", "B", "broadcast"])


def _batches(mode):
    return {"none": ((), ()), "A": ((2,), ()), "B": ((), (3,)),
            "broadcast": ((2, 1), (3,))}[mode]


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", BACKENDS)
@SETTINGS
@given(n3=n3s, n1=dims, n2=dims, n4=dims, batch=batch_modes, la=st.sampled_from(LAYOUTS),
       lb=st.sampled_from(LAYOUTS), dtype=st.sampled_from(DTYPES), seed=seeds)
def test_tprod_property(mode, n3, n1, n2, n4, batch, la, lb, dtype, seed):
    ba, bb = _batches(batch)
    a = make((*ba, n3, n1, n2), la, dtype, seed)
    b = make((*bb, n3, n2, n4), lb, dtype, seed + 1)
    with tsvd.use_backend(mode):
        c = tsvd.tprod(a, b)
    want = np_tprod(np64(a), np64(b))                 # oracle on the (rounded) inputs
    bound = np_tprod(np.abs(np64(a)), np.abs(np64(b))).max()
    _close(c, want, dtype, scale=max(bound, 1.0))
    assert c.shape == torch.broadcast_shapes(ba, bb) + (n3, n1, n4)


@SETTINGS
@given(n3=n3s, n1=dims, n2=dims, n4=dims, layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from(DTYPES), seed=seeds)
def test_ttranspose_property(n3, n1, n2, n4, layout, dtype, seed):
    a = make((n3, n1, n2), layout, dtype, seed)
    at = tsvd.ttranspose(a)
    assert at.dtype == dtype
    np.testing.assert_array_equal(np64(at), np_ttranspose(np64(a)))
    np.testing.assert_array_equal(np64(tsvd.ttranspose(at)), np64(a))
    if dtype == torch.float64:                        # (A * B)ᵀ = Bᵀ * Aᵀ
        b = make((n3, n2, n4), "contiguous", dtype, seed + 1)
        lhs = tsvd.ttranspose(tsvd.tprod(a, b))
        rhs = tsvd.tprod(tsvd.ttranspose(b), tsvd.ttranspose(a))
        np.testing.assert_allclose(np64(lhs), np64(rhs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", BACKENDS)
@SETTINGS
@given(n3=n3s, n1=dims, n2=dims, batch=st.booleans(), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from(DTYPES), seed=seeds, data=st.data())
def test_tsvd_property(mode, n3, n1, n2, batch, layout, dtype, seed, data):
    p = min(n1, n2)
    k = data.draw(st.one_of(st.none(), st.integers(1, p)), label="k")
    shape = ((2,) if batch else ()) + (n3, n1, n2)
    x = make(shape, layout, dtype, seed)
    with tsvd.use_backend(mode):
        u, s, v = tsvd.tsvd(x, k)
    kk = p if k is None else k
    assert u.shape == shape[:-2] + (n1, kk) and v.shape == shape[:-2] + (n2, kk)
    assert s.shape == shape[:-2] + (kk,)
    assert u.dtype == s.dtype == v.dtype == dtype
    xn = np64(x)
    svals = np_fft_svals(xn)                                      # (..., n3, p) numpy
    scale = max(float(svals.max(initial=0.0)), 1.0)
    # singular values in every Fourier slice (S is stored in the working precision,
    # then rounded to the input dtype)
    _close(s, np.fft.ifft(svals[..., :kk], axis=-2).real, dtype, scale=scale, factor=4)
    un, sn, vn = np64(u), np64(s), np64(v)
    eye = np_teye(kk, n3)
    _close(u, un, dtype)                                          # (dtype check only)
    err_u = np.abs(np_tprod(np_ttranspose(un), un) - eye).max()
    err_v = np.abs(np_tprod(np_ttranspose(vn), vn) - eye).max()
    assert max(err_u, err_v) <= RTOL[dtype] * 20 * n3 * max(n1, n2)
    # Eckart-Young: the residual is the optimum (1/n3) Σ_f Σ_{i>k} σ_i²
    xk = np_tprod(np_tprod(un, np_fdiag(sn)), np_ttranspose(vn))
    err = ((xn - xk) ** 2).sum(axis=(-3, -2, -1))
    opt = (svals[..., kk:] ** 2).sum(axis=(-2, -1)) / n3
    total = (xn ** 2).sum(axis=(-3, -2, -1))
    assert np.all(np.abs(err - opt) <= RTOL[dtype] * 40 * n3 * max(n1, n2) * total + 1e-12)


@pytest.mark.parametrize("mode", BACKENDS)
@SETTINGS
@given(n3=n3s, n1=dims, n2=dims, k=dims, residual=st.booleans(), batch=batch_modes,
       layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from(DTYPES), seed=seeds)
def test_treconstruct_property(mode, n3, n1, n2, k, residual, batch, layout, dtype, seed):
    bu, bv = _batches(batch)
    u = make((*bu, n3, n1, k), layout, dtype, seed)
    s = make((n3, 1, k), "contiguous", dtype, seed + 1)[..., 0, :]
    v = make((*bv, n3, n2, k), layout, dtype, seed + 2)
    r = make((n3, n1, n2), layout, dtype, seed + 3) if residual else None
    with tsvd.use_backend(mode):
        out = tsvd.treconstruct(u, s, v, residual=r)
    us = np_tprod(np64(u), np_fdiag(np64(s)))
    want = np_tprod(us, np_ttranspose(np64(v)))
    bound = np_tprod(np_tprod(np.abs(np64(u)), np_fdiag(np.abs(np64(s)))),
                     np_ttranspose(np.abs(np64(v)))).max()
    if residual:
        want = want + np64(r)
        bound = bound + np.abs(np64(r)).max()
    _close(out, want, dtype, scale=max(bound, 1.0))


@SETTINGS
@given(n3=n3s, n1=dims, n2=dims, batch=st.booleans(), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from(DTYPES), seed=seeds)
def test_norms_property(n3, n1, n2, batch, layout, dtype, seed):
    shape = ((3,) if batch else ()) + (n3, n1, n2)
    x = make(shape, layout, dtype, seed)
    xn = np64(x)
    tn, ts = tsvd.tnn(x), tsvd.tsn(x)
    assert tn.shape == ts.shape == shape[:-3]
    _close(tn, np_tnn(xn), dtype, factor=4)
    _close(ts, np_tsn(xn), dtype, factor=4)
    _close(tsvd.tsvdvals(x), np_fft_svals(xn), dtype, factor=4)
    # Parseval: ||X||_F^2 = (1/n3) Σ_f ||X̂_f||_F^2, hence tsn <= sqrt(n3) ||X||_F,
    # ||X||_F <= sqrt(p) tsn and ||X||_F^2 <= tnn * tsn (duality of the two norms)
    if dtype in (torch.float64, torch.float32):
        fro = np.sqrt((xn ** 2).sum(axis=(-3, -2, -1)))
        t, nn = np64(ts), np64(tn)
        slack = 1 + 1e-5
        assert np.all(t <= np.sqrt(n3) * fro * slack)
        assert np.all(fro <= np.sqrt(min(n1, n2)) * t * slack)
        assert np.all(fro ** 2 <= nn * t * slack)


@SETTINGS
@given(n3=n3s, n=st.integers(1, 4), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from(DTYPES), seed=seeds)
def test_tinv_property(n3, n, layout, dtype, seed):
    a = make((n3, n, n), layout, dtype, seed)
    # diagonally dominant slice 0: every Fourier slice is within ||·|| of 3*n3*I
    shift = torch.zeros(n3, n, n, dtype=dtype)
    shift[0] = 3 * n3 * (n ** 0.5 + 1) * torch.eye(n, dtype=dtype)
    a = a + shift
    ai = tsvd.tinv(a)
    ai_t = tsvd.tinv(a.mT.contiguous().mT)              # same values, transposed storage
    np.testing.assert_allclose(np64(ai_t), np64(ai), rtol=0, atol=RTOL[dtype])
    assert ai.dtype == dtype
    eye = np_teye(n, n3)
    assert np.abs(np_tprod(np64(a), np64(ai)) - eye).max() <= RTOL[dtype] * 10 * n3 * n
    assert np.abs(np_tprod(np64(ai), np64(a)) - eye).max() <= RTOL[dtype] * 10 * n3 * n


@SETTINGS
@given(n3=n3s, n1=dims, n2=dims, n4=dims, seed=seeds)
def test_identity_and_associativity_property(n3, n1, n2, n4, seed):
    a = make((2, 1, n3, n1, n2), "transposed", torch.float64, seed)
    b = make((3, n3, n2, n4), "matlab", torch.float64, seed + 1)
    c = make((n3, n4, 2), "strided", torch.float64, seed + 2)
    lhs = tsvd.tprod(tsvd.tprod(a, b), c)
    rhs = tsvd.tprod(a, tsvd.tprod(b, c))
    np.testing.assert_allclose(np64(lhs), np64(rhs), rtol=1e-10, atol=1e-10)
    eye = tsvd.teye(n1, n3, dtype=torch.float64)
    np.testing.assert_allclose(np64(tsvd.tprod(eye, a)), np64(a),
                               rtol=1e-12, atol=1e-12)


@SETTINGS
@given(n3=n3s, n1=dims, n2=dims, n4=dims, which=st.sampled_from(["dct", "matrix"]),
       layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from(DTYPES), seed=seeds)
def test_mprod_property(n3, n1, n2, n4, which, layout, dtype, seed):
    if which == "dct":
        tr = "dct"
    else:
        g = torch.Generator().manual_seed(seed)
        tr = torch.randn(n3, n3, generator=g, dtype=torch.float64) + 3 * torch.eye(n3,
                                                                             dtype=torch.float64)
    a = make((2, 1, n3, n1, n2), layout, dtype, seed)
    b = make((3, n3, n2, n4), "contiguous", dtype, seed + 1)
    c = tsvd.tprod(a, b, transform=tr)
    want = np_mprod(np64(a), np64(b), tr)
    cond = 1.0 if which == "dct" else float(np.linalg.cond(np64(tr)))
    bound = (np.abs(np64(a)).max() * np.abs(np64(b)).max() * n2 * n3 * cond)
    _close(c, want, dtype, scale=max(bound, 1.0))
    # t-SVD under the same transform reconstructs X
    x = make((n3, n1, n2), layout, dtype, seed + 2)
    u, s, v = tsvd.tsvd(x, transform=tr)
    xr = tsvd.treconstruct(u, s, v, transform=tr)
    _close(xr, np64(x), dtype, scale=max(float(np.abs(np64(x)).max()), 1.0) * cond * n3,
           factor=10)
