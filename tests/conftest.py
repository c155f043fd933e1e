"""Shared test helpers: numpy oracles written from the definitions (Lu et al., TPAMI 2019;
Kernfeld, Martin & Kilmer 2015), independent of the tsvd implementation.

Layout everywhere: a third-order tensor is ``(..., n3, n1, n2)``; dim -3 is the tube axis.
The oracles work on plain float64/complex128 numpy arrays; batch dims are handled by an
explicit loop over ``np.ndindex`` so that no broadcasting logic is shared with the code
under test.

Import the helpers with ``from conftest import ...`` (pytest puts ``tests/`` on sys.path).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

import tsvd

# --------------------------------------------------------------------------------------
# backends: every oracle test runs on the reference and, once tsvd._C is built, on the
# compiled kernels too (the public API dispatches treconstruct/tprod/tsvd to them).
# --------------------------------------------------------------------------------------
BACKENDS = ["reference"] + (["compiled"] if tsvd.compiled_available("cpu") else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test body inside ``tsvd.use_backend(mode)`` for every available backend."""
    with tsvd.use_backend(request.param):
        yield request.param


# --------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------
def np64(t) -> np.ndarray:
    """torch tensor (any float dtype, any strides) -> float64 numpy array."""
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64).cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def rand(*shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def batch_loop(fn, *arrays, core_dims):
    """Apply ``fn`` to the core blocks of ``arrays`` over their broadcast batch dims.

    ``core_dims[i]`` is the number of trailing core dims of ``arrays[i]``.
    """
    batches = [a.shape[: a.ndim - c] for a, c in zip(arrays, core_dims)]
    batch = np.broadcast_shapes(*batches)
    out = None
    for idx in np.ndindex(*batch) if batch else [()]:
        blocks = []
        for a, b in zip(arrays, batches):
            sub = idx[len(idx) - len(b):] if b else ()
            sub = tuple(0 if s == 1 else i for i, s in zip(sub, b))
            blocks.append(a[sub])
        r = np.asarray(fn(*blocks))
        if out is None:
            out = np.empty(batch + r.shape, dtype=r.dtype)
        out[idx] = r
    return out


# --------------------------------------------------------------------------------------
# block-circulant (FFT t-product) oracles
# --------------------------------------------------------------------------------------
def np_bcirc(a: np.ndarray) -> np.ndarray:
    """bcirc of one (n3, n1, n2) tensor by an explicit loop: block (i, j) = A[(i - j) mod n3]."""
    n3, n1, n2 = a.shape
    out = np.zeros((n3 * n1, n3 * n2), dtype=a.dtype)
    for i in range(n3):
        for j in range(n3):
            out[i * n1:(i + 1) * n1, j * n2:(j + 1) * n2] = a[(i - j) % n3]
    return out


def np_unfold(b: np.ndarray) -> np.ndarray:
    """(n3, n2, n4) -> (n3*n2, n4): frontal slices stacked vertically."""
    return np.concatenate(list(b), axis=0)


def np_fold(m: np.ndarray, n3: int) -> np.ndarray:
    return np.stack(np.split(m, n3, axis=0))


def np_tprod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """t-product by its definition fold(bcirc(A) @ unfold(B)), looping over batch dims."""
    def one(x, y):
        return np_fold(np_bcirc(x) @ np_unfold(y), x.shape[0])
    return batch_loop(one, a, b, core_dims=(3, 3))


def np_ttranspose(a: np.ndarray) -> np.ndarray:
    """t-transpose by definition: slice 0 transposed, slices 1..n3-1 transposed and reversed."""
    def one(x):
        n3 = x.shape[0]
        return np.stack([x[0].T] + [x[n3 - t].T for t in range(1, n3)])
    return batch_loop(one, a, core_dims=(3,))


def np_fdiag(s: np.ndarray, n1=None, n2=None) -> np.ndarray:
    """(..., n3, k) diagonal tubes -> (..., n3, n1, n2) f-diagonal tensor (explicit loop)."""
    k = s.shape[-1]
    n1 = k if n1 is None else n1
    n2 = k if n2 is None else n2
    out = np.zeros(s.shape[:-1] + (n1, n2), dtype=s.dtype)
    for i in range(k):
        out[..., i, i] = s[..., i]
    return out


def np_teye(n: int, n3: int) -> np.ndarray:
    out = np.zeros((n3, n, n))
    out[0] = np.eye(n)
    return out


def np_fft_slices(x: np.ndarray) -> np.ndarray:
    """Full complex spectrum along the tube axis (all n3 slices)."""
    return np.fft.fft(x, axis=-3)


def np_fft_svals(x: np.ndarray) -> np.ndarray:
    """(..., n3, p) singular values of every one of the n3 FFT slices, float64 numpy."""
    return np.linalg.svd(np_fft_slices(x), compute_uv=False)


def np_tnn(x: np.ndarray) -> np.ndarray:
    """tnn = (1/n3) sum_k ||X̂_k||_* over all n3 FFT slices."""
    return np_fft_svals(x).sum(axis=(-1, -2)) / x.shape[-3]


def np_tsn(x: np.ndarray) -> np.ndarray:
    return np_fft_svals(x)[..., 0].max(axis=-1)


# --------------------------------------------------------------------------------------
# transform-domain (⋆_M) oracles: a real invertible matrix M or the orthonormal DCT-II
# --------------------------------------------------------------------------------------
def np_mode3(mat: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Apply a (n3, n3) matrix along the tube axis of (..., n3, a, b) by an explicit loop."""
    out = np.zeros(x.shape, dtype=np.result_type(mat, x))
    n3 = x.shape[-3]
    for k in range(n3):
        for t in range(n3):
            out[..., k, :, :] += mat[k, t] * x[..., t, :, :]
    return out


def np_dct(x: np.ndarray) -> np.ndarray:
    return scipy.fft.dct(x, type=2, norm="ortho", axis=-3)


def np_idct(x: np.ndarray) -> np.ndarray:
    return scipy.fft.idct(x, type=2, norm="ortho", axis=-3)


def np_transform_pair(transform, n3):
    """(forward, inverse) numpy callables along the tube axis for "dct" or a matrix."""
    if isinstance(transform, str):
        assert transform == "dct"
        return np_dct, np_idct
    m = np64(transform)
    minv = np.linalg.inv(m)
    return (lambda x: np_mode3(m, x)), (lambda x: np_mode3(minv, x))


def np_mprod(a: np.ndarray, b: np.ndarray, transform) -> np.ndarray:
    """⋆_M product by definition: transform the tubes, multiply slices, transform back."""
    fwd, inv = np_transform_pair(transform, a.shape[-3])
    return inv(fwd(a) @ fwd(b))


def np_meye(n: int, n3: int, transform) -> np.ndarray:
    """Identity under ⋆_M: the identity in every transform-domain slice."""
    _, inv = np_transform_pair(transform, n3)
    return inv(np.broadcast_to(np.eye(n), (n3, n, n)).copy())


def random_invertible(n3: int, seed: int = 0) -> torch.Tensor:
    """A random, well-conditioned but non-orthogonal, real (n3, n3) matrix."""
    g = np.random.default_rng(seed)
    m = g.standard_normal((n3, n3)) + 2.0 * np.eye(n3)
    assert np.linalg.cond(m) < 1e3
    return torch.from_numpy(m)


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    q, r = np.linalg.qr(g.standard_normal((n, n)))
    return q * np.sign(np.diag(r))
