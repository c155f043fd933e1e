"""Hostile inputs to the algebra API (issue 16): hypothesis draws an op and arguments that are
often wrong (shapes of any rank including empty dims, integer/bool/complex dtypes, NaN/Inf
values, ranks, thresholds and transforms of every kind). Every call must either return the
right result (checked against the block-circulant / numpy oracles of ``conftest``) or raise a
``ValueError``/``TypeError``/``OverflowError`` whose message names an argument
(``"A: ..."``, ``"k: ..."``, ``"A has n3 = 1, B has ..."``): never a crash from deep inside
torch, never a silently wrong answer.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tsvd
from conftest import np64, np_tprod, np_ttranspose

SETTINGS = settings(deadline=None, print_blob=True, derandomize=True,
                    max_examples=int(os.environ.get("TSVD_HYPOTHESIS_EXAMPLES", "120")),
                    suppress_health_check=[HealthCheck.too_slow])

#: argument names the API uses in its messages
ARGS = ("A", "B", "X", "U", "S", "V", "residual", "k", "rho", "tol", "transform", "method",
        "mode", "oversample", "n", "n3", "result", "all tensors", "batch dims")
_NAMED = re.compile(r"(^|\W)(" + "|".join(re.escape(a) for a in ARGS) + r")(:| is | has | =)")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.int64, torch.bool,
          torch.complex64]


@st.composite
def tensors(draw, min_rank=0, max_rank=5):
    rank = draw(st.integers(min_rank, max_rank))
    shape = tuple(draw(st.integers(0, 4)) for _ in range(rank))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    poison = draw(st.sampled_from([None, None, None, math.nan, math.inf]))
    if poison is not None and x.numel():
        x.view(-1)[0] = poison
    if dtype == torch.bool:
        return x > 0
    if dtype == torch.complex64:
        return x.to(torch.complex64)
    return x.to(dtype)


def _float(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def tprod_pairs(draw):
    """Half the time a valid (A, B) of a float dtype (the oracle judges the result), else two
    independent hostile tensors."""
    if draw(st.booleans()):
        return draw(tensors()), draw(tensors())
    n3, n1, n2, n4 = (draw(st.integers(1, 4)) for _ in range(4))
    dt = draw(st.sampled_from([torch.float64, torch.float32]))
    s = draw(st.integers(0, 2 ** 16))
    return _float((n3, n1, n2), s, dt), _float((n3, n2, n4), s + 1, dt)


@st.composite
def usv_triples(draw):
    if draw(st.booleans()):
        return draw(tensors()), draw(tensors()), draw(tensors())
    n3, n1, n2, k = (draw(st.integers(1, 4)) for _ in range(4))
    s = draw(st.integers(0, 2 ** 16))
    return _float((n3, n1, k), s), _float((n3, k), s + 1), _float((n3, n2, k), s + 2)


@st.composite
def maybe_valid(draw):
    if draw(st.booleans()):
        return draw(tensors())
    shape = tuple(draw(st.integers(1, 4)) for _ in range(3))
    return _float(shape, draw(st.integers(0, 2 ** 16)))


scalars = st.one_of(st.integers(-3, 6), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.none(), st.just("2"))
transforms = st.one_of(st.just("fft"), st.just("dct"), st.just("wavelet"), st.just(None),
                       st.integers(2, 4).map(lambda n: torch.eye(n, dtype=torch.float64)),
                       st.just(torch.zeros(3, 3)), st.just(torch.ones(2, 3)))


def _named(e: Exception) -> bool:
    return bool(_NAMED.search(str(e)))


def _usable(*xs) -> bool:
    """Inputs the oracle can judge: real float, >= 3 dims, non-empty, finite."""
    return all(x.is_floating_point() and x.dim() >= 3 and x.numel() > 0
               and bool(torch.isfinite(x).all()) for x in xs)


def _tol(*xs) -> float:
    return 2e-2 if any(x.dtype == torch.float16 for x in xs) else 1e-4


def _check(call, oracle=None):
    try:
        out = call()
    except (ValueError, TypeError, OverflowError) as e:
        assert _named(e), f"error does not name an argument: {type(e).__name__}: {e}"
        return
    if oracle is not None:
        oracle(out)


@SETTINGS
@given(AB=tprod_pairs(), transform=st.one_of(st.just("fft"), transforms))
def test_tprod_bad_inputs(AB, transform):
    A, B = AB

    def oracle(C):
        if transform == "fft" and _usable(A, B) and A.dim() == 3 and B.dim() == 3:
            want = np_tprod(np64(A), np64(B))
            assert np.allclose(np64(C), want, atol=_tol(A, B) * (1 + np.abs(want).max()))
    _check(lambda: tsvd.tprod(A, B, transform=transform), oracle)


@SETTINGS
@given(A=maybe_valid(), transform=st.one_of(st.just("fft"), transforms))
def test_ttranspose_and_tinv_bad_inputs(A, transform):
    def oracle_t(At):
        if transform == "fft" and _usable(A) and A.dim() == 3:
            assert np.allclose(np64(At), np_ttranspose(np64(A)), atol=1e-6)
    _check(lambda: tsvd.ttranspose(A, transform=transform), oracle_t)

    def oracle_inv(Ai):
        if transform == "fft" and _usable(A) and A.dim() == 3 and A.dtype == torch.float64:
            n3, n = A.shape[0], A.shape[1]
            eye = np.zeros((n3, n, n))
            eye[0] = np.eye(n)
            prod = np_tprod(np64(A), np64(Ai))
            assert np.allclose(prod, eye, atol=1e-6 * (1 + np.abs(np64(Ai)).max()))
    _check(lambda: tsvd.tinv(A, transform=transform), oracle_inv)


@SETTINGS
@given(X=maybe_valid(), k=st.one_of(st.none(), scalars), method=st.sampled_from(["auto", "full", "randomized", "fast"]))
def test_tsvd_bad_inputs(X, k, method):
    def oracle(usv):
        U, S, V = usv
        if _usable(X) and X.dim() == 3 and X.dtype == torch.float64 and k is None:
            rebuilt = tsvd.treconstruct(U, S, V)
            assert torch.allclose(rebuilt, X, atol=1e-8 * (1 + float(X.abs().max())))
    _check(lambda: tsvd.tsvd(X, k, method=method), oracle)


@SETTINGS
@given(USV=usv_triples(), residual=st.one_of(st.none(), st.none(), tensors()))
def test_treconstruct_bad_inputs(USV, residual):
    U, S, V = USV

    def oracle(W):
        if _usable(U, V) and U.dim() == 3 and S.is_floating_point() and S.dim() == 2 \
                and bool(torch.isfinite(S).all()) and residual is None:
            n3, n1, k = U.shape
            Sd = torch.zeros(n3, k, k, dtype=torch.float64)
            Sd[:, range(k), range(k)] = S.double()
            want = np_tprod(np_tprod(np64(U), Sd.numpy()), np_ttranspose(np64(V)))
            assert np.allclose(np64(W), want, atol=_tol(U, S, V) * (1 + np.abs(want).max()))
    _check(lambda: tsvd.treconstruct(U, S, V, residual=residual), oracle)


@SETTINGS
@given(X=maybe_valid(), rho=scalars, tol=scalars)
def test_norms_and_prox_bad_inputs(X, rho, tol):
    _check(lambda: tsvd.tnn(X))
    _check(lambda: tsvd.tsn(X))
    _check(lambda: tsvd.tubal_rank(X, tol))
    _check(lambda: tsvd.prox_tnn(X, rho))
    _check(lambda: tsvd.tqr(X))
    _check(lambda: tsvd.tsvdvals(X))
