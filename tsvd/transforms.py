"""Invertible transforms along the tube axis (dim -3) that define the t-product.

A transform maps a real tensor ``X`` of shape ``(..., n3, n1, n2)`` to its
*transform domain* ``X̂`` in which the product becomes a slice-wise matrix product.

* ``"fft"``: the discrete Fourier transform (Kilmer & Martin's t-product). For real
  inputs only the ``m = n3 // 2 + 1`` Hermitian half of the spectrum is stored
  (rfft semantics); the other slices are complex conjugates of these.
* ``"dct"``: the orthonormal DCT-II along the tubes (real transform domain).
* an invertible ``(n3, n3)`` matrix ``M``: ``X̂[k] = Σ_t M[k, t] X[t]``
  (the ⋆_M product of Kernfeld, Martin & Kilmer; Lu's toolbox 2.0).

Norms in the transform domain are divided by ``ell``: ``n3`` for the FFT (Lu's
``tnn = (1/n3) Σ_k ‖X̂_k‖_*``), ``1`` for the orthonormal DCT, and
``mean(diag(Mᴴ M))`` for a matrix (exact when ``Mᴴ M = ell·I``, as Lu's toolbox 2.0
assumes).
"""
from __future__ import annotations

import math

import torch


class Transform:
    """Base class: forward/inverse along dim -3 plus spectrum weights."""

    name = "transform"
    #: whether the transform domain is complex
    is_complex = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., n3, a, b) -> (..., m, a, b)
        raise NotImplementedError

    def inverse(self, xh: torch.Tensor, n3: int) -> torch.Tensor:  # (..., m, a, b) -> (..., n3, a, b)
        raise NotImplementedError

    def weights(self, n3: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
        """Multiplicity of each stored slice in the full spectrum, shape ``(m,)``."""
        return torch.ones(n3, dtype=dtype, device=device)

    def ell(self, n3: int) -> float:
        return 1.0

    def real_slices(self, n3: int) -> list[int]:
        """Stored slices that are real for real input (all for real transforms)."""
        return list(range(n3))

    def check_n3(self, n3: int, name: str = "X") -> None:
        pass

    def __repr__(self) -> str:
        return f"Transform({self.name})"


class FFT(Transform):
    name = "fft"
    is_complex = True

    def forward(self, x):
        return torch.fft.rfft(x, dim=-3)

    def inverse(self, xh, n3):
        return torch.fft.irfft(xh, n=n3, dim=-3)

    def weights(self, n3, *, dtype=torch.float64, device=None):
        m = n3 // 2 + 1
        w = torch.full((m,), 2.0, dtype=dtype, device=device)
        w[0] = 1.0
        if n3 % 2 == 0:
            w[-1] = 1.0
        return w

    def ell(self, n3):
        return float(n3)

    def real_slices(self, n3):
        return [0] + ([n3 // 2] if n3 % 2 == 0 and n3 > 1 else [])


def dct_matrix(n3: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` with ``C[k, t] = a_k cos(pi (2t + 1) k / (2 n3))``."""
    t = torch.arange(n3, dtype=torch.float64)
    k = t[:, None]
    c = torch.cos(math.pi * (2 * t[None, :] + 1) * k / (2 * n3)) * math.sqrt(2.0 / n3)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype=dtype, device=device)


def _max_cond(dtype) -> float:
    """Largest condition number accepted for a matrix transform applied to ``dtype`` data:
    ``1 / (100 eps(dtype))`` (float32: 8.4e4, float64: 4.5e13). A round trip through M and
    M⁻¹ loses up to about ``cond(M) eps`` relative accuracy, so this bounds the loss by ~1 %.
    float16/bfloat16 data are computed in float32 and use float32's limit."""
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return 1.0 / (100.0 * torch.finfo(dtype).eps)


class MatrixTransform(Transform):
    """``X̂ = M ×₃ X`` for an invertible real ``(n3, n3)`` matrix ``M``.

    The matrix is checked when the transform is made (finite, invertible in float64:
    condition number at most ``1 / (100 eps)`` of float64) and again for each computation
    dtype it is used with (float32 data: condition number at most 8.4e4, see
    :func:`_max_cond`); a matrix on the meta device is taken as given (shapes only)."""

    name = "matrix"

    def __init__(self, m: torch.Tensor, name: str = "matrix", check: bool = True):
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != m.shape[1]:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"transform: expected a square (n3, n3) matrix, got {shape}")
        if m.is_complex() or not m.is_floating_point():
            raise TypeError(f"transform: expected a real floating matrix, got dtype {m.dtype}")
        self.name = name
        self.cond = None                  # condition number (float64), None on the meta device
        if m.device.type == "meta":       # no values to check: shapes only (torch.compile, fake)
            self.m = m.double()
            self.minv = torch.empty_like(self.m)
        else:
            if check:
                if not bool(torch.isfinite(m).all()):
                    raise ValueError("transform: matrix contains NaN or Inf")
                sv = torch.linalg.svdvals(m.double())
                self.cond = float(sv[0] / sv[-1]) if float(sv[-1]) > 0 else float("inf")
                if not self.cond <= _max_cond(torch.float64):
                    raise ValueError(
                        f"transform: matrix is not invertible in float64 (condition number "
                        f"{self.cond:.3g} > {_max_cond(torch.float64):.3g})")
            self.m = m.double()
            self.minv = torch.linalg.inv(self.m)
        self._cache: dict = {}

    def _mats(self, dtype, device):
        key = (dtype, device)
        if key not in self._cache:
            if self.cond is not None and not self.cond <= _max_cond(dtype):
                raise ValueError(
                    f"transform: matrix condition number {self.cond:.3g} is too large for "
                    f"{dtype} data (at most {_max_cond(dtype):.3g} = 1 / (100 eps)): the "
                    f"transform and its inverse would lose more than about 1 % relative "
                    f"accuracy; use float64 data or a better-conditioned matrix")
            self._cache[key] = (self.m.to(dtype=dtype, device=device),
                                self.minv.to(dtype=dtype, device=device))
        return self._cache[key]

    def check_n3(self, n3, name="X"):
        if self.m.shape[0] != n3:
            raise ValueError(
                f"transform: matrix is {tuple(self.m.shape)} but {name} has n3 = {n3} tubes; "
                f"expected an ({n3}, {n3}) matrix")

    @staticmethod
    def _apply(mat, x):
        # (m, n3) applied along dim -3 of (..., n3, a, b)
        return torch.einsum("kt,...tab->...kab", mat, x)

    def forward(self, x):
        m, _ = self._mats(x.dtype, x.device)
        return self._apply(m, x)

    def inverse(self, xh, n3):
        _, minv = self._mats(xh.dtype, xh.device)
        return self._apply(minv, xh)

    def ell(self, n3):
        return float(torch.diagonal(self.m.T @ self.m).mean())


class DCT(MatrixTransform):
    """Orthonormal DCT-II along the tubes; the matrix is built for each n3."""

    name = "dct"

    def __init__(self):
        self._by_n3: dict = {}

    def _get(self, n3):
        if n3 not in self._by_n3:
            self._by_n3[n3] = MatrixTransform(dct_matrix(n3), name="dct", check=False)
        return self._by_n3[n3]

    def check_n3(self, n3, name="X"):
        pass

    def forward(self, x):
        return self._get(x.shape[-3]).forward(x)

    def inverse(self, xh, n3):
        return self._get(n3).inverse(xh, n3)

    def ell(self, n3):
        return 1.0


_FFT = FFT()
_DCT = DCT()


def get_transform(transform) -> Transform:
    """Resolve ``"fft"``, ``"dct"``, a ``Transform`` or an ``(n3, n3)`` matrix.

    A matrix is applied in the data's dtype and on the data's device (a copy is made and
    cached per dtype/device, like a constant), so a CPU matrix works with CUDA tensors.
    """
    if isinstance(transform, Transform):
        return transform
    if isinstance(transform, str):
        key = transform.lower()
        if key == "fft":
            return _FFT
        if key == "dct":
            return _DCT
        raise ValueError(f"transform: unknown transform {transform!r}; expected 'fft', 'dct', "
                         f"or an invertible (n3, n3) tensor")
    if isinstance(transform, torch.Tensor):
        return MatrixTransform(transform)
    raise TypeError(f"transform: expected 'fft', 'dct' or an (n3, n3) tensor, got "
                    f"{type(transform).__name__}")


def is_fft(transform) -> bool:
    return isinstance(transform, FFT)
