"""LoRA (Hu et al. 2021) and PiSSA (Meng et al. 2024) on the same matrices as LoRA-PT.

A layer whose weight fuses ``n`` matrices along its rows (``qkv``: q, k, v) gets one
low-rank pair per matrix, exactly the matrices that LoRA-PT stacks as slices:
``W_j (n1, n2)`` for ``j < n``, ``A (n, r, n2)``, ``B (n, n1, r)``.

- LoRA: ``W`` frozen, ``A`` Kaiming-uniform (as Hu et al.'s reference code), ``B = 0`` so the
  output is unchanged at start, ``y = x Wᵀ + scaling * [x A_jᵀ B_jᵀ]_j``, ``scaling = alpha / r``.
- PiSSA: per matrix ``W_j = P Σ Qᵀ`` (SVD, float64), ``B_j = P_r Σ_r^½``, ``A_j = Σ_r^½ Q_rᵀ``,
  the residual ``W_j - B_j A_j`` frozen in ``weight``; ``scaling = 1``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankLinear"]


class LowRankLinear(nn.Module):
    """``y = x Wᵀ + b + scaling * concat_j(x A_jᵀ B_jᵀ)``.

    Shapes: ``weight (n*n1, n2)`` frozen, ``lora_A (n, r, n2)``, ``lora_B (n, n1, r)``,
    ``x (..., n2) -> (..., n*n1)``.
    """

    def __init__(self, weight: nn.Parameter, bias, lora_A, lora_B, scaling: float):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)
        self.scaling = float(scaling)
        self.n, self.rank, self.in_features = lora_A.shape
        self.out_features = weight.shape[0]

    @classmethod
    def lora(cls, layer: nn.Linear, n: int, rank: int, alpha: float, generator=None):
        out_f, in_f = layer.weight.shape
        A = torch.empty(n, rank, in_f, dtype=layer.weight.dtype, device=layer.weight.device)
        bound = 1.0 / math.sqrt(in_f)      # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
        with torch.no_grad():
            A.uniform_(-bound, bound, generator=generator)
        B = torch.zeros(n, out_f // n, rank, dtype=A.dtype, device=A.device)
        return cls(layer.weight, layer.bias, A, B, alpha / rank)

    @classmethod
    def pissa(cls, layer: nn.Linear, n: int, rank: int):
        W = layer.weight.detach()
        out_f, in_f = W.shape
        Wd = W.to(torch.float64).reshape(n, out_f // n, in_f)
        P, sig, Qh = torch.linalg.svd(Wd, full_matrices=False)
        sq = sig[:, :rank].sqrt()
        B = P[:, :, :rank] * sq[:, None, :]                     # (n, n1, r)
        A = sq[:, :, None] * Qh[:, :rank, :]                    # (n, r, n2)
        B32, A32 = B.to(W.dtype), A.to(W.dtype)
        res = (Wd - (B32.to(torch.float64) @ A32.to(torch.float64))).reshape(out_f, in_f)
        weight = nn.Parameter(res.to(W.dtype), requires_grad=False)
        return cls(weight, layer.bias, A32.contiguous(), B32.contiguous(), 1.0)

    def delta(self) -> torch.Tensor:
        """``scaling * B A`` as an ``(out_features, in_features)`` matrix."""
        return (self.scaling * (self.lora_B @ self.lora_A)).reshape(self.out_features,
                                                                    self.in_features)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        h = F.linear(x, self.lora_A.reshape(self.n * self.rank, self.in_features))
        if self.n == 1:
            d = F.linear(h, self.lora_B[0])
        else:
            h = h.unflatten(-1, (self.n, self.rank))                       # (..., n, r)
            d = torch.einsum("...jr,jor->...jo", h, self.lora_B).flatten(-2)
        return y + self.scaling * d if self.scaling != 1.0 else y + d

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"n={self.n}, rank={self.rank}, scaling={self.scaling:g}")
