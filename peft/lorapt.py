"""LoRA-PT: principal tensor singular values and vectors of stacked transformer weights.

For a group of ``n3`` equally-shaped weight matrices (frontal slices) stacked into
``X (n3, n1, n2)``, the truncated t-SVD ``U (n3, n1, r)``, ``S (n3, r)``, ``V (n3, n2, r)``
(:func:`tsvd.tsvd`) splits ``X = R + U * fdiag(S) * Vᵀ``. ``R`` is kept frozen (a buffer);
``U``, ``S`` (optional) and ``V`` are trained. In every forward pass the weights are rebuilt
by **one** :func:`tsvd.treconstruct` per group, ``W = R + U * fdiag(S) * Vᵀ``, and each adapted
layer uses a view of that one buffer (the fused ``qkv`` is three consecutive slices viewed
as ``(3*n1, n2)``), so autograd carries every layer's weight gradient back to U, S, V through
one ``split`` node (whose backward concatenates the layers' gradients) and the fused op.

When the weights are rebuilt: a forward pre-hook on the adapted model drops the cached
buffers at the start of each forward pass run with gradients enabled, and the first adapted
layer reached rebuilds them. Under ``torch.no_grad()`` the buffers are reused for as long
as U, S, V and R are unchanged (same storage and version counter), so inference does not
pay for the rebuild on every call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tsvd

__all__ = ["TSVDGroup", "TSVDLinear", "LoRAPTContainer"]


class TSVDGroup(nn.Module):
    """One stacked tensor's trainable principal part and frozen residual.

    Attributes:
        U: ``(n3, n1, r)`` parameter.
        S: ``(n3, r)`` diagonal tubes, a parameter (``train_s``) or a buffer.
        V: ``(n3, n2, r)`` parameter.
        residual: ``(n3, n1, n2)`` frozen buffer.
        splits: number of consecutive slices of each adapted layer, in slice order.
    """

    def __init__(self, U, S, V, residual, splits, *, transform="fft", train_s=True):
        super().__init__()
        self.U = nn.Parameter(U)
        self.V = nn.Parameter(V)
        if train_s:
            self.S = nn.Parameter(S)
        else:
            self.register_buffer("S", S)
        self.register_buffer("residual", residual)
        self.splits = [int(s) for s in splits]
        if sum(self.splits) != residual.shape[0]:
            raise ValueError(f"splits: they sum to {sum(self.splits)}, expected n3 = "
                             f"{residual.shape[0]}")
        self.transform = transform
        self._cache = None
        self._key = None
        self.rebuilds = 0            # number of treconstruct calls (for tests and benchmarks)

    def _state_key(self):
        return (torch.is_grad_enabled(),) + tuple(
            (t.device, t.data_ptr(), t._version) for t in (self.U, self.S, self.V, self.residual))

    def invalidate(self):
        self._cache = None
        self._key = None

    def full_weight(self) -> torch.Tensor:
        """``R + U * fdiag(S) * Vᵀ``: ``(n3, n1, n2)``, one fused call."""
        return tsvd.treconstruct(self.U, self.S, self.V, residual=self.residual,
                                 transform=self.transform)

    def weights(self) -> tuple:
        """The per-layer weight views ``(k_i * n1, n2)`` of the current rebuilt buffer."""
        key = self._state_key()
        if self._cache is None or key != self._key:
            W = self.full_weight()
            if not W.is_contiguous():
                W = W.contiguous()
            self.rebuilds += 1
            n1, n2 = W.shape[-2:]
            self._cache = tuple(p.view(p.shape[0] * n1, n2)
                                for p in torch.split(W, self.splits, dim=0))
            self._key = key
        return self._cache

    def extra_repr(self) -> str:
        n3, n1, r = self.U.shape
        return f"n3={n3}, n1={n1}, n2={self.V.shape[1]}, rank={r}, transform={self.transform!r}"


class LoRAPTContainer(nn.ModuleDict):
    """The groups of one adapted model (registered on it as ``tsvd_lorapt``)."""

    def pre_forward(self, module, args):
        if torch.is_grad_enabled():
            for g in self.values():
                g.invalidate()


class TSVDLinear(nn.Module):
    """A linear layer whose weight is slice run ``index`` of a :class:`TSVDGroup`'s rebuilt
    buffer. ``x (..., in_features) -> (..., out_features)``; the bias is the original
    layer's parameter."""

    def __init__(self, group: TSVDGroup, index: int, in_features: int, out_features: int,
                 bias: nn.Parameter | None):
        super().__init__()
        object.__setattr__(self, "_group", group)   # not a submodule: owned by the container
        self.index = index
        self.in_features = in_features
        self.out_features = out_features
        if bias is not None:
            self.bias = bias
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        """The current weight ``(out_features, in_features)`` (a view of the group's buffer)."""
        return self._group.weights()[self.index]

    def forward(self, x):
        return F.linear(x, self._group.weights()[self.index], self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, slices={self._group.splits[self.index]}")
