"""Bad input: every case raises an exception that names the argument and what was expected,
before any work is done.

"Before any work" is checked by the ``no_work`` fixture: it replaces the computational
entry points (the reference ops, the compiled ops, FFTs, SVDs, ``einsum``) with functions
that fail the test if they are reached, so a check that only fires after the computation
started (or a computation that fails on its own with an unrelated message) is caught.
"""
from __future__ import annotations

import math

import pytest
import torch

import tsvd
from conftest import rand


class WorkStarted(AssertionError):
    pass


@pytest.fixture
def no_work(monkeypatch):
    def trap(name):
        def f(*args, **kwargs):
            raise WorkStarted(f"{name} was called before the input was validated")
        return f

    import tsvd._ext as ext
    import tsvd.reference as ref
    for name in ref.__all__:
        if name not in ("fold", "unfold"):
            monkeypatch.setattr(ref, name, trap(f"reference.{name}"))
    for name in ("treconstruct", "treconstruct_backward", "tprod", "tube_rfft", "tube_irfft"):
        if hasattr(ext, name):
            monkeypatch.setattr(ext, name, trap(f"_ext.{name}"))
    monkeypatch.setattr(torch.fft, "rfft", trap("torch.fft.rfft"))
    monkeypatch.setattr(torch.fft, "irfft", trap("torch.fft.irfft"))
    monkeypatch.setattr(torch.linalg, "svd", trap("torch.linalg.svd"))
    monkeypatch.setattr(torch.linalg, "svdvals", trap("torch.linalg.svdvals"))
    monkeypatch.setattr(torch.linalg, "inv", trap("torch.linalg.inv"))
    monkeypatch.setattr(torch.linalg, "qr", trap("torch.linalg.qr"))
    monkeypatch.setattr(torch, "einsum", trap("torch.einsum"))


#: a second device: a GPU when there is one, else "meta" (no data, but a distinct device)
OTHER = "cuda" if torch.cuda.is_available() else "meta"
A = rand(4, 3, 5, seed=1)           # (n3=4, n1=3, n2=5)
B = rand(4, 5, 2, seed=2)
X = rand(4, 3, 5, seed=3)
SQ = rand(4, 3, 3, seed=4)
U, S, V = rand(4, 3, 2, seed=5), rand(4, 2, seed=6), rand(4, 5, 2, seed=7)
R = rand(4, 3, 5, seed=8)


def _case(id_, fn, exc, match):
    return pytest.param(fn, exc, match, id=id_)


def _nan(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


# ======================================================================================
# cases that must fail before any computation (checked with ``no_work``)
# ======================================================================================
CASES = [
    # ---- not a tensor / wrong number of dims
    _case("tprod-A-list", lambda: tsvd.tprod([[1.0]], B), TypeError, r"^A: expected a torch\.Tensor"),
    _case("tprod-A-2d", lambda: tsvd.tprod(A[0], B), ValueError,
          r"^A: expected a tensor of shape \(\.\.\., n3, n1, n2\) with at least 3 dims, got shape \(3, 5\)"),
    _case("tprod-B-1d", lambda: tsvd.tprod(A, B[0, 0]), ValueError, r"^B: .*at least 3 dims"),
    _case("ttranspose-2d", lambda: tsvd.ttranspose(A[0]), ValueError, r"^A: .*at least 3 dims"),
    _case("tinv-2d", lambda: tsvd.tinv(SQ[0]), ValueError, r"^A: .*at least 3 dims"),
    _case("tsvd-2d", lambda: tsvd.tsvd(X[0]), ValueError, r"^X: .*at least 3 dims"),
    _case("tsvd-0d", lambda: tsvd.tsvd(torch.tensor(1.0)), ValueError, r"^X: .*at least 3 dims"),
    _case("tsvdvals-2d", lambda: tsvd.tsvdvals(X[0]), ValueError, r"^X: .*at least 3 dims"),
    _case("tqr-2d", lambda: tsvd.tqr(X[0]), ValueError, r"^X: .*at least 3 dims"),
    _case("tnn-2d", lambda: tsvd.tnn(X[0]), ValueError, r"^X: .*at least 3 dims"),
    _case("tsn-2d", lambda: tsvd.tsn(X[0]), ValueError, r"^X: .*at least 3 dims"),
    _case("tubal_rank-2d", lambda: tsvd.tubal_rank(X[0]), ValueError, r"^X: .*at least 3 dims"),
    _case("prox_tnn-2d", lambda: tsvd.prox_tnn(X[0], 1.0), ValueError, r"^X: .*at least 3 dims"),
    _case("bcirc-2d", lambda: tsvd.bcirc(A[0]), ValueError, r"^A: .*at least 3 dims"),
    _case("fdiag-1d", lambda: tsvd.fdiag(S[0]), ValueError, r"^S: .*at least 2 dims"),
    _case("treconstruct-U-2d", lambda: tsvd.treconstruct(U[0], S, V), ValueError, r"^U: .*at least 3 dims"),
    _case("treconstruct-S-1d", lambda: tsvd.treconstruct(U, S[0], V), ValueError, r"^S: .*at least 2 dims"),
    _case("treconstruct-V-2d", lambda: tsvd.treconstruct(U, S, V[0]), ValueError, r"^V: .*at least 3 dims"),
    _case("treconstruct-residual-2d", lambda: tsvd.treconstruct(U, S, V, residual=R[0]), ValueError,
          r"^residual: .*at least 3 dims"),
    # ---- mismatched inner dims / tube lengths / batch dims
    _case("tprod-inner", lambda: tsvd.tprod(A, rand(4, 4, 2)), ValueError,
          r"inner dims differ: A is \(\.\.\., n3, n1, 5\), B is \(\.\.\., n3, 4, n4\)"),
    _case("tprod-tubes", lambda: tsvd.tprod(A, rand(5, 5, 2)), ValueError,
          r"tube lengths differ: A has n3 = 4, B has n3 = 5"),
    _case("tprod-batch", lambda: tsvd.tprod(rand(2, 4, 3, 5), rand(3, 4, 5, 2)), ValueError,
          r"batch dims of A \(2,\) and B \(3,\) do not broadcast"),
    _case("treconstruct-S-k", lambda: tsvd.treconstruct(U, rand(4, 3), V), ValueError,
          r"^S: expected diagonal tubes \(\.\.\., 4, 2\)"),
    _case("treconstruct-S-n3", lambda: tsvd.treconstruct(U, rand(5, 2), V), ValueError,
          r"^S: expected diagonal tubes \(\.\.\., 4, 2\)"),
    _case("treconstruct-V-k", lambda: tsvd.treconstruct(U, S, rand(4, 5, 3)), ValueError,
          r"^V: expected \(\.\.\., 4, n2, 2\)"),
    _case("treconstruct-V-n3", lambda: tsvd.treconstruct(U, S, rand(3, 5, 2)), ValueError,
          r"^V: expected \(\.\.\., 4, n2, 2\)"),
    _case("treconstruct-residual", lambda: tsvd.treconstruct(U, S, V, residual=rand(4, 5, 3)),
          ValueError, r"^residual: expected \(\.\.\., 4, 3, 5\), got \(4, 5, 3\)"),
    _case("treconstruct-batch", lambda: tsvd.treconstruct(rand(2, 4, 3, 2), S, rand(3, 4, 5, 2)),
          ValueError, r"batch dims of U/S \(2,\) and V \(3,\) do not broadcast"),
    _case("treconstruct-residual-batch",
          lambda: tsvd.treconstruct(rand(3, 4, 3, 2), S, V, residual=rand(2, 4, 3, 5)),
          ValueError, r"batch dims of U/S/V \(3,\) and residual \(2,\) do not broadcast"),
    _case("tinv-not-square", lambda: tsvd.tinv(A), ValueError,
          r"^A: expected square frontal slices \(\.\.\., n3, n, n\), got \(4, 3, 5\)"),
    _case("fdiag-n1-too-small", lambda: tsvd.fdiag(S, 1, 3), ValueError,
          r"^n1: expected an int >= k = 2 \(the number of diagonal tubes\), got 1"),
    _case("fdiag-n2-too-small", lambda: tsvd.fdiag(S, 3, 0), ValueError, r"^n2: expected an int >= k = 2"),
    _case("fdiag-n1-float", lambda: tsvd.fdiag(S, 3.0, 3), ValueError, r"^n1: expected an int >= k = 2"),
    # ---- k outside 1..min(n1, n2)
    _case("k-zero", lambda: tsvd.tsvd(X, 0), ValueError,
          r"^k: expected 1 <= k <= min\(n1, n2\) = 3, got 0"),
    _case("k-negative", lambda: tsvd.tsvd(X, -1), ValueError, r"^k: expected 1 <= k <= min\(n1, n2\) = 3"),
    _case("k-too-large", lambda: tsvd.tsvd(X, 4), ValueError,
          r"^k: expected 1 <= k <= min\(n1, n2\) = 3, got 4"),
    _case("k-too-large-randomized", lambda: tsvd.tsvd(X, 4, method="randomized"), ValueError,
          r"^k: expected 1 <= k <= min\(n1, n2\) = 3"),
    _case("k-float", lambda: tsvd.tsvd(X, 2.0),
          TypeError, r"^k: expected an int in 1\.\.min\(n1, n2\) = 1\.\.3, got 2\.0"),
    _case("k-str", lambda: tsvd.tsvd(X, "2"), TypeError, r"^k: expected an int"),
    _case("k-bool", lambda: tsvd.tsvd(X, True), TypeError, r"^k: expected an int"),
    _case("k-float-tensor", lambda: tsvd.tsvd(X, torch.tensor(2.0)), TypeError, r"^k: expected an int"),
    # ---- other scalar arguments
    _case("method", lambda: tsvd.tsvd(X, 2, method="fast"), ValueError,
          r"^method: expected 'auto', 'full' or 'randomized', got 'fast'"),
    _case("oversample-negative", lambda: tsvd.tsvd(X, 2, oversample=-1), ValueError,
          r"^oversample: expected a non-negative int or None, got -1"),
    _case("oversample-float", lambda: tsvd.tsvd(X, 2, oversample=4.0), ValueError,
          r"^oversample: expected a non-negative int or None"),
    _case("tsvd-tol-zero", lambda: tsvd.tsvd(X, 2, tol=0.0), ValueError,
          r"^tol: expected a positive number or None, got 0\.0"),
    _case("tsvd-tol-nan", lambda: tsvd.tsvd(X, 2, tol=float("nan")), ValueError,
          r"^tol: expected a positive number or None"),
    _case("tqr-mode", lambda: tsvd.tqr(X, mode="thin"),
          ValueError, r"^mode: expected 'reduced' or 'complete'"),
    _case("rho-negative", lambda: tsvd.prox_tnn(X, -0.1),
          ValueError, r"^rho: expected a non-negative number"),
    _case("rho-nan", lambda: tsvd.prox_tnn(X, float("nan")),
          ValueError, r"^rho: expected a non-negative number"),
    _case("rho-str", lambda: tsvd.prox_tnn(X, "1"), ValueError, r"^rho: expected a non-negative number"),
    _case("rho-bool", lambda: tsvd.prox_tnn(X, True), ValueError, r"^rho: expected a non-negative number"),
    _case("tol-negative", lambda: tsvd.tubal_rank(X, -1.0),
          ValueError, r"^tol: expected a non-negative number"),
    _case("tol-nan", lambda: tsvd.tubal_rank(X, float("nan")),
          ValueError, r"^tol: expected a non-negative number"),
    _case("teye-n-zero", lambda: tsvd.teye(0, 3), ValueError, r"^n: expected a positive int, got 0"),
    _case("teye-n-float", lambda: tsvd.teye(2.0, 3), ValueError, r"^n: expected a positive int, got 2\.0"),
    _case("teye-n3-zero", lambda: tsvd.teye(2, 0), ValueError, r"^n3: expected a positive int, got 0"),
    _case("teye-dtype-int", lambda: tsvd.teye(2, 3, dtype=torch.int64), TypeError,
          r"^dtype: expected a real floating dtype, got torch\.int64"),
    _case("teye-dtype-complex", lambda: tsvd.teye(2, 3, dtype=torch.complex64), TypeError, r"^dtype:"),
    _case("use_backend", lambda: tsvd.use_backend("gpu").__enter__(), ValueError, r"^mode: expected one of"),
    # ---- NaN / Inf for decompositions
    *[_case(f"{op}-{kind}", (lambda op=op, v=v, extra=extra: getattr(tsvd, op)(_nan(X, v), *extra)),
            ValueError, r"^X: contains NaN or Inf")
      for op, extra in (("tsvd", ()), ("tsvd", (2,)), ("tsvdvals", ()), ("tqr", ()), ("tnn", ()),
                        ("tsn", ()), ("tubal_rank", ()), ("prox_tnn", (0.5,)))
      for kind, v in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf")))],
    _case("tsvd-nan-float16", lambda: tsvd.tsvd(_nan(X).half()), ValueError, r"^X: contains NaN or Inf"),
    _case("tsvd-inf-randomized", lambda: tsvd.tsvd(_nan(X, float("inf")), 1, method="randomized"),
          ValueError, r"^X: contains NaN or Inf"),
    _case("tinv-nan", lambda: tsvd.tinv(_nan(SQ)), ValueError, r"^A: contains NaN or Inf"),
    # ---- unknown transform
    *[_case(f"transform-unknown-{op}", fn, ValueError,
            r"^transform: unknown transform 'fourier'; expected 'fft', 'dct', or an invertible")
      for op, fn in (("tprod", lambda: tsvd.tprod(A, B, transform="fourier")),
                     ("ttranspose", lambda: tsvd.ttranspose(A, transform="fourier")),
                     ("teye", lambda: tsvd.teye(2, 3, transform="fourier")),
                     ("tinv", lambda: tsvd.tinv(SQ, transform="fourier")),
                     ("tsvd", lambda: tsvd.tsvd(X, transform="fourier")),
                     ("tsvdvals", lambda: tsvd.tsvdvals(X, transform="fourier")),
                     ("treconstruct", lambda: tsvd.treconstruct(U, S, V, transform="fourier")),
                     ("tqr", lambda: tsvd.tqr(X, transform="fourier")),
                     ("tnn", lambda: tsvd.tnn(X, transform="fourier")),
                     ("tsn", lambda: tsvd.tsn(X, transform="fourier")),
                     ("tubal_rank", lambda: tsvd.tubal_rank(X, transform="fourier")),
                     ("prox_tnn", lambda: tsvd.prox_tnn(X, 1.0, transform="fourier")))],
    _case("transform-type", lambda: tsvd.tprod(A, B, transform=3), TypeError,
          r"^transform: expected 'fft', 'dct' or an \(n3, n3\) tensor, got int"),
    _case("transform-none", lambda: tsvd.tsvd(X, transform=None), TypeError, r"^transform: expected"),
    # ---- dtypes
    _case("tprod-A-int", lambda: tsvd.tprod(A.long(), B), TypeError,
          r"^A: expected a real floating tensor \(float32, float64, float16 or bfloat16\), "
          r"got dtype torch\.int64"),
    _case("tprod-B-int", lambda: tsvd.tprod(A, B.int()),
          TypeError, r"^B: expected a real floating tensor.*torch\.int32"),
    _case("tprod-A-complex", lambda: tsvd.tprod(A.to(torch.complex64), B), TypeError,
          r"^A: expected a real floating tensor.*complex64 \(complex\)"),
    _case("tprod-A-bool", lambda: tsvd.tprod(A > 0, B),
          TypeError, r"^A: expected a real floating tensor.*torch\.bool"),
    _case("tsvd-int", lambda: tsvd.tsvd(X.long()), TypeError, r"^X: expected a real floating tensor"),
    _case("tsvd-complex", lambda: tsvd.tsvd(X.to(torch.complex128)),
          TypeError, r"^X: expected a real floating tensor"),
    _case("tinv-int", lambda: tsvd.tinv(SQ.long()), TypeError, r"^A: expected a real floating tensor"),
    _case("tnn-uint8", lambda: tsvd.tnn(X.to(torch.uint8)),
          TypeError, r"^X: expected a real floating tensor"),
    _case("treconstruct-S-int", lambda: tsvd.treconstruct(U, S.long(), V),
          TypeError, r"^S: expected a real floating tensor"),
    _case("treconstruct-residual-complex",
          lambda: tsvd.treconstruct(U, S, V, residual=R.to(torch.complex64)), TypeError,
          r"^residual: expected a real floating tensor"),
    _case("ttranspose-int", lambda: tsvd.ttranspose(A.long()),
          TypeError, r"^A: expected a real floating tensor"),
    _case("bcirc-complex", lambda: tsvd.bcirc(A.to(torch.complex64)),
          TypeError, r"^A: expected a real floating tensor"),
    # ---- empty tensors
    _case("tprod-empty-n1", lambda: tsvd.tprod(rand(4, 0, 5), B), ValueError,
          r"^A: expected a non-empty tensor, got shape \(4, 0, 5\)"),
    _case("tprod-empty-n4", lambda: tsvd.tprod(A, rand(4, 5, 0)),
          ValueError, r"^B: expected a non-empty tensor"),
    _case("tprod-empty-batch", lambda: tsvd.tprod(rand(0, 4, 3, 5), B),
          ValueError, r"^A: expected a non-empty tensor"),
    _case("tsvd-empty-n3", lambda: tsvd.tsvd(rand(0, 3, 5)), ValueError, r"^X: expected a non-empty tensor"),
    _case("tsvd-empty-n2", lambda: tsvd.tsvd(rand(4, 3, 0)), ValueError, r"^X: expected a non-empty tensor"),
    _case("tinv-empty", lambda: tsvd.tinv(rand(4, 0, 0)), ValueError, r"^A: expected a non-empty tensor"),
    _case("treconstruct-empty-k", lambda: tsvd.treconstruct(rand(4, 3, 0), rand(4, 0), rand(4, 5, 0)),
          ValueError, r"^U: expected a non-empty tensor"),
    _case("tnn-empty", lambda: tsvd.tnn(rand(2, 0, 3)), ValueError, r"^X: expected a non-empty tensor"),
    _case("tqr-empty", lambda: tsvd.tqr(rand(2, 3, 0)), ValueError, r"^X: expected a non-empty tensor"),
    _case("fdiag-empty", lambda: tsvd.fdiag(rand(4, 0)), ValueError, r"^S: expected a non-empty tensor"),
    # ---- tensors on different devices
    _case("tprod-device", lambda: tsvd.tprod(A, B.to(OTHER)), ValueError,
          r"all tensors must be on the same device, got A on cpu, B on (meta|cuda:0)"),
    _case("tprod-device-A", lambda: tsvd.tprod(A.to(OTHER), B), ValueError,
          r"all tensors must be on the same device, got A on (meta|cuda:0), B on cpu"),
    _case("treconstruct-device-S", lambda: tsvd.treconstruct(U, S.to(OTHER), V), ValueError,
          r"same device, got U on cpu, S on (meta|cuda:0), V on cpu"),
    _case("treconstruct-device-residual",
          lambda: tsvd.treconstruct(U, S, V, residual=R.to(OTHER)), ValueError,
          r"same device, got U on cpu, S on cpu, V on cpu, residual on (meta|cuda:0)"),
]


@pytest.mark.parametrize("fn,exc,match", CASES)
def test_bad_input_raises_before_work(no_work, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


# ======================================================================================
# cases whose check is itself a computation (invertibility): no ``no_work`` trap
# ======================================================================================
def test_tinv_singular_tensors():
    with pytest.raises(ValueError, match=r"^A: the tensor is singular"):
        tsvd.tinv(torch.zeros(3, 2, 2, dtype=torch.float64))
    # every frontal slice is invertible, but the DC Fourier slice A0 + A1 is zero
    m = rand(3, 3, seed=9)
    a = torch.stack([m, -m])
    assert torch.linalg.matrix_rank(a).tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"^A: the tensor is singular"):
        tsvd.tinv(a)
    # only one Fourier slice of n3 = 5 singular (a rank-2 slice), in a batch of good ones
    g = torch.Generator().manual_seed(0)
    ah = torch.fft.rfft(torch.randn(5, 3, 3, generator=g, dtype=torch.float64), dim=0)
    ah[2] = ah[2] @ torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=ah.dtype))
    bad = torch.fft.irfft(ah, n=5, dim=0)
    good = rand(5, 3, 3, seed=10)
    with pytest.raises(ValueError, match=r"^A: the tensor is singular"):
        tsvd.tinv(torch.stack([good, bad, good]))
    tsvd.tinv(torch.stack([good, good]))          # and the good ones alone are fine


def test_tinv_singular_under_dct_and_matrix():
    from conftest import np_idct
    xh = rand(4, 3, 3, seed=11).numpy()
    xh[1, 2] = xh[1, 0]                            # DCT slice 1 has two equal rows
    a = torch.from_numpy(np_idct(xh))
    with pytest.raises(ValueError, match=r"^A: the tensor is singular"):
        tsvd.tinv(a, transform="dct")
    tsvd.tinv(a)                                   # its FFT slices are invertible
    m = torch.eye(4, dtype=torch.float64)          # identity transform: slices themselves
    b = rand(4, 3, 3, seed=12)
    b[3, :, 0] = 0
    with pytest.raises(ValueError, match=r"^A: the tensor is singular"):
        tsvd.tinv(b, transform=m)


BAD_MATRICES = [
    pytest.param(torch.eye(5, dtype=torch.float64), ValueError,
                 r"^transform: matrix is \(5, 5\) but A has n3 = 4 tubes; expected an \(4, 4\) matrix",
                 id="wrong-size"),
    pytest.param(torch.ones(4, 3, dtype=torch.float64), ValueError,
                 r"^transform: expected a square \(n3, n3\) matrix, got \(4, 3\)", id="not-square"),
    pytest.param(torch.ones(4, dtype=torch.float64), ValueError,
                 r"^transform: expected a square \(n3, n3\) matrix, got \(4,\)", id="1d"),
    pytest.param(torch.ones(4, 4, dtype=torch.float64), ValueError,
                 r"^transform: matrix is not invertible", id="rank-1"),
    pytest.param(torch.zeros(4, 4, dtype=torch.float64), ValueError,
                 r"^transform: matrix is not invertible", id="zero"),
    pytest.param(torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-18], dtype=torch.float64)), ValueError,
                 r"^transform: matrix is not invertible", id="ill-conditioned"),
    pytest.param(_nan(torch.eye(4, dtype=torch.float64)), ValueError,
                 r"^transform: matrix contains NaN or Inf", id="nan"),
    pytest.param(torch.eye(4, dtype=torch.int64), TypeError,
                 r"^transform: expected a real floating matrix, got dtype torch\.int64", id="int"),
    pytest.param(torch.eye(4, dtype=torch.complex64), TypeError,
                 r"^transform: expected a real floating matrix", id="complex"),
]


@pytest.mark.parametrize("op", ["tprod", "ttranspose", "tinv", "tsvd", "treconstruct", "tnn",
                                "tqr", "prox_tnn", "teye"])
@pytest.mark.parametrize("mat,exc,match", BAD_MATRICES)
def test_bad_transform_matrix(op, mat, exc, match):
    calls = {
        "tprod": lambda: tsvd.tprod(A, B, transform=mat),
        "ttranspose": lambda: tsvd.ttranspose(A, transform=mat),
        "tinv": lambda: tsvd.tinv(SQ, transform=mat),
        "tsvd": lambda: tsvd.tsvd(X, transform=mat),
        "treconstruct": lambda: tsvd.treconstruct(U, S, V, transform=mat),
        "tnn": lambda: tsvd.tnn(X, transform=mat),
        "tqr": lambda: tsvd.tqr(X, transform=mat),
        "prox_tnn": lambda: tsvd.prox_tnn(X, 0.5, transform=mat),
        "teye": lambda: tsvd.teye(3, 4, transform=mat),
    }
    if op != "tprod" and "A has" in match:
        match = match.replace("A has", r"\w[\w ]* has")     # names the op's own argument
    with pytest.raises(exc, match=match):
        calls[op]()


def test_valid_inputs_still_work_next_to_the_bad_ones():
    """The checks do not reject what is valid: the boundaries of each bad-input case."""
    assert tsvd.tsvd(X, 1)[0].shape == (4, 3, 1)
    assert tsvd.tsvd(X, 3)[0].shape == (4, 3, 3)                 # k = min(n1, n2)
    import numpy as np
    assert tsvd.tsvd(X, np.int64(2))[1].shape == (4, 2)          # numpy ints are ints
    assert tsvd.prox_tnn(X, 0).shape == X.shape                   # rho = 0 (int)
    assert int(tsvd.tubal_rank(X, 0)) == 3                        # tol = 0
    assert tsvd.tprod(A.float(), B).dtype == torch.float64        # mixed floats promote
    assert tsvd.tprod(A.half(), B.bfloat16()).dtype == torch.float32
    assert tsvd.tprod(A, B, transform="FFT").shape == (4, 3, 2)   # case-insensitive name
    assert tsvd.tinv(SQ + 5 * tsvd.teye(3, 4, dtype=torch.float64)).shape == SQ.shape
    with tsvd.use_backend("reference"):                           # same device: ok
        assert tsvd.tprod(A.to("meta"), B.to("meta")).device.type == "meta"


def _matrix_with_condition(n: int, cond: float) -> torch.Tensor:
    """Q1 diag(1 .. 1/cond) Q2ᵀ: a matrix whose 2-norm condition number is ``cond``."""
    g = torch.Generator().manual_seed(3)
    q1 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return q1 @ torch.diag(s) @ q2.T


@pytest.mark.parametrize("cond, ok32", [(1e3, True), (5e4, True), (4e7, False), (1e12, False)])
def test_matrix_transform_conditioning_follows_the_dtype(cond, ok32):
    """A matrix whose condition number makes float32 results meaningless is refused for
    float32 data (naming the limit) and accepted for float64 data; where accepted in float32,
    the product is within 1e-2 of the float64 one (the documented bound)."""
    M = _matrix_with_condition(4, cond)
    A64, B64 = rand(4, 3, 3, dtype=torch.float64), rand(4, 3, 2, dtype=torch.float64)
    ref = tsvd.tprod(A64, B64, transform=M)                     # float64: always accepted
    if ok32:
        out = tsvd.tprod(A64.float(), B64.float(), transform=M)
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
    else:
        with pytest.raises(ValueError, match=r"transform: .*condition number .* too large for "
                                             r"torch.float32"):
            tsvd.tprod(A64.float(), B64.float(), transform=M)


def test_matrix_transform_on_the_meta_device():
    mat = torch.eye(4, device="meta")
    out = tsvd.tprod(A.to("meta"), B.to("meta"), transform=mat)
    assert out.device.type == "meta" and out.shape == (4, 3, 2)


def test_low_precision_overflow_is_an_error_not_inf():
    """Singular values above float16's range: an OverflowError naming the dtype, never Inf;
    the same input in float32 gives the float64 singular values."""
    X16 = (rand(3, 4, 4, dtype=torch.float32).clamp(-2, 2) * 3e4).half()
    assert bool(torch.isfinite(X16).all())
    with pytest.raises(OverflowError, match="float16"):
        tsvd.tsvd(X16, 2)
    S32 = tsvd.tsvd(X16.float(), 2)[1]
    S64 = tsvd.tsvd(X16.double(), 2)[1]
    assert torch.allclose(S32.double(), S64, rtol=1e-4)
    small = tsvd.tsvd((X16.float() / 1e3).half(), 2)[1]           # fits: float16 as given
    assert small.dtype == torch.float16 and bool(torch.isfinite(small).all())


def test_check_broadcast_fast_paths_agree_with_torch():
    """check_broadcast short-cuts equal and empty batch shapes; every answer is
    torch.broadcast_shapes' (the oracle), and a mismatch names both arguments."""
    from tsvd._validate import check_broadcast
    for a, b in [((), ()), ((3,), ()), ((), (2, 3)), ((2, 3), (2, 3)), ((1, 3), (4, 1)),
                 ((5,), (2, 1))]:
        assert check_broadcast("A", a, "B", b) == tuple(torch.broadcast_shapes(a, b))
    with pytest.raises(ValueError, match=r"batch dims of A \(2,\) and B \(3,\)"):
        check_broadcast("A", (2,), "B", (3,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.complex64])
def test_finite_check_agrees_with_isfinite(dtype):
    """The finiteness check (a finite sum proves it; otherwise the entrywise test) accepts
    finite tensors whose sum overflows and rejects any NaN, +Inf, -Inf or +Inf/-Inf pair,
    wherever it sits; the oracle is ``torch.isfinite`` entry by entry."""
    from tsvd._validate import _all_finite
    big = torch.finfo(dtype if not dtype.is_complex else torch.float32).max
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 4, 5, generator=g).to(dtype)
    real = dtype if not dtype.is_complex else torch.float32
    cases = [base, torch.full((3, 4, 5), big, dtype=real).to(dtype), torch.zeros(0, 3, 4, dtype=dtype)]
    for poison in ([math.nan], [math.inf], [-math.inf], [math.inf, -math.inf]):
        x = base.clone()
        for i, v in enumerate(poison):
            x.view(-1)[7 * i + 3] = v
        cases.append(x)
    if dtype.is_complex:
        x = base.clone()
        x.view(-1)[5] = complex(0.0, math.inf)
        cases.append(x)
    for x in cases:
        assert _all_finite(x) == bool(torch.isfinite(x).all()), x.flatten()[:8]
    with pytest.raises(ValueError, match="X: contains NaN or Inf"):
        tsvd.tsvd(cases[3].real if dtype.is_complex else cases[3])
