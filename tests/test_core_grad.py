"""gradcheck / gradgradcheck in float64 of every differentiable public op (reference backend).

Inputs are small; the ones that go through SVDs are checked to have distinct singular
values with a gap (the derivatives of an SVD exist only there), so these tests cannot
pass or fail by the luck of a degenerate draw. The compiled kernels' own autograd is
checked in tests/test_ext.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import tsvd
from conftest import np64, np_fft_svals, rand, random_invertible

TRANSFORMS = ["fft", "dct", "matrix"]


@pytest.fixture(autouse=True)
def _reference_backend():
    with tsvd.use_backend("reference"):
        yield


def _tr(name, n3):
    return random_invertible(n3, seed=7) if name == "matrix" else name


def _leaf(*shape, seed):
    return rand(*shape, seed=seed).requires_grad_(True)


def check(f, inputs, *, full=False, second=True):
    """gradcheck (full Jacobian when ``full``, else a random projection of it, which
    catches any wrong entry with probability 1) and gradgradcheck (projected)."""
    assert gradcheck(f, inputs, fast_mode=not full)
    if second:
        assert gradgradcheck(f, inputs, fast_mode=True)


def _min_gap(sv: np.ndarray) -> float:
    """Smallest distance between singular values of one slice, and from them to zero."""
    s = np.sort(sv, axis=-1)
    gaps = np.diff(s, axis=-1)
    return float(min(gaps.min() if gaps.size else np.inf, s[..., 0].min()))


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("n3", [3, 4])
def test_tprod_grad(name, n3):
    tr = _tr(name, n3)
    f = lambda x, y: tsvd.tprod(x, y, transform=tr)                # noqa: E731
    check(f, (_leaf(n3, 2, 2, seed=1), _leaf(n3, 2, 1, seed=2)), full=True, second=False)
    check(f, (_leaf(2, n3, 2, 3, seed=1), _leaf(n3, 3, 2, seed=2)))     # batch broadcast


@pytest.mark.parametrize("name", ["fft", "dct"])
def test_ttranspose_grad(name):
    a = _leaf(4, 2, 3, seed=3)
    w = torch.arange(1.0, 4.0, dtype=a.dtype)[:, None]        # breaks the symmetry of sum()
    f = lambda x: tsvd.ttranspose(x, transform=name) * w          # noqa: E731
    check(f, (a,), full=True)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_tinv_grad(name):
    n3 = 3
    a = rand(n3, 3, 3, seed=4)
    a[0] += 4 * torch.eye(3, dtype=a.dtype)           # well conditioned in every transform slice
    a.requires_grad_(True)
    tr = _tr(name, n3)
    check(lambda x: tsvd.tinv(x, transform=tr), (a,), full=True)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("n3", [3, 4])
def test_treconstruct_grad(name, n3):
    tr = _tr(name, n3)
    u, s, v = _leaf(n3, 3, 2, seed=5), _leaf(n3, 2, seed=6), _leaf(n3, 2, 2, seed=7)
    r = _leaf(2, n3, 3, 2, seed=8)
    f = lambda u, s, v, r: tsvd.treconstruct(u, s, v, residual=r, transform=tr)  # noqa: E731
    check(f, (u, s, v, r))
    g = lambda u, s, v: tsvd.treconstruct(u, s, v, transform=tr)  # noqa: E731
    check(g, (u, s, v), full=True, second=False)


@pytest.mark.parametrize("n3,n1,n2", [(3, 3, 4), (4, 4, 3), (1, 3, 2)])
def test_tnn_tsn_grad(n3, n1, n2):
    x = rand(n3, n1, n2, seed=9)
    sv = np_fft_svals(np64(x))
    assert _min_gap(sv) > 0.05                        # distinct, nonzero: tnn is smooth here
    # tsn is smooth where the largest singular value is attained by one slice pair only
    top = np.sort(np.unique(np.round(sv[:, 0], 12)))
    assert top.size == 1 or top[-1] - top[-2] > 0.05
    x.requires_grad_(True)
    check(tsvd.tnn, (x,))
    check(tsvd.tsn, (x,), second=False)


@pytest.mark.parametrize("name", ["fft", "dct"])
def test_prox_tnn_grad(name):
    n3, n1, n2 = 3, 3, 4
    x = rand(n3, n1, n2, seed=10)
    if name == "fft":
        sv = np_fft_svals(np64(x))
    else:
        from conftest import np_dct
        sv = np.linalg.svd(np_dct(np64(x)), compute_uv=False)
    assert _min_gap(sv) > 0.05
    vals = np.unique(np.round(sv, 10))
    mid = len(vals) // 2
    rho = float(vals[mid - 1] + vals[mid]) / 2               # half-way between two σ's
    assert np.abs(sv - rho).min() > 0.02
    x.requires_grad_(True)
    f = lambda x: tsvd.prox_tnn(x, rho, transform=name)  # noqa: E731
    check(f, (x,))


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("n3", [3, 4])
def test_tsvd_grad_through_gauge_invariant_functions(name, n3):
    """The principal part U_k * S_k * V_kᵀ and the singular tubes S are gauge invariant."""
    n1, n2, k = 4, 3, 2
    tr = _tr(name, n3)
    x = rand(n3, n1, n2, seed=11)
    if name == "fft":
        sv = np_fft_svals(np64(x))
    else:
        from conftest import np_transform_pair
        fwd, _ = np_transform_pair(tr, n3)
        sv = np.linalg.svd(fwd(np64(x)), compute_uv=False)
    assert _min_gap(sv) > 0.05
    x.requires_grad_(True)

    def principal(x):
        return tsvd.treconstruct(*tsvd.tsvd(x, k, transform=tr), transform=tr)

    def tubes(x):
        return tsvd.tsvd(x, k, transform=tr)[1]

    check(principal, (x,))
    check(tubes, (x,), second=False)
