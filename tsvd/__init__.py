"""tsvd: the tensor-tensor product (t-product), t-SVD and friends for PyTorch.

Third-order tensors have shape ``(..., n3, n1, n2)``: dim -3 is the tube axis,
every frontal slice is an ``n1 x n2`` matrix, leading dims are batch dims.
MATLAB's ``n1 x n2 x n3`` array ``A`` is ``A.permute(2, 0, 1)`` here.

    >>> import torch, tsvd
    >>> X = torch.randn(12, 64, 32)
    >>> U, S, V = tsvd.tsvd(X, 8)          # U (12, 64, 8), S (12, 8), V (12, 32, 8)
    >>> Xk = tsvd.treconstruct(U, S, V)    # best tubal-rank-8 approximation of X
"""
from . import reference, transforms
from ._api import (bcirc, fdiag, prox_tnn, tinv, teye, tnn, tprod, tqr, treconstruct, tsn,
                   tsvd, tsvdvals, ttranspose, tubal_rank)
from ._backend import backend, build_info, compiled_available, last_backend, use_backend
from .reference import fold, unfold
from .transforms import dct_matrix

__version__ = "0.1.0"

__all__ = [
    "tprod", "ttranspose", "teye", "tinv", "tsvd", "tsvdvals", "treconstruct", "tqr", "tnn",
    "tsn", "tubal_rank", "prox_tnn", "bcirc", "fdiag", "fold", "unfold", "dct_matrix",
    "backend", "last_backend", "use_backend", "compiled_available", "build_info",
    "reference", "transforms",
]
