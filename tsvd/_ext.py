"""Loader of the compiled extension ``tsvd._C`` and Python glue of its operators.

Importing ``tsvd._C`` registers the operators ``torch.ops.tsvd.*`` (schemas in
``csrc/ops.cpp``; CPU kernels in ``csrc/cpu/``, CUDA kernels in ``csrc/cuda/``). This
module adds what is best written in Python: fake (meta) kernels for ``torch.compile``
and ``torch.library.opcheck``, and the autograd formulas of the two DFT ops (those of
``treconstruct`` and ``tprod`` are C++, ``csrc/autograd.cpp``). All ops take the batch
flattened to one leading dim ``B`` (``tsvd._api`` does the flattening):

* ``treconstruct(U (B,n3,n1,r), S (B,n3,r), V (B,n3,n2,r), residual (B,n3,n1,n2) | None)``
  -> ``(B,n3,n1,n2)`` = residual + U * fdiag(S) * Vᵀ (t-products).
* ``treconstruct_backward(grad, U, S, V)`` -> ``(grad_U, grad_S, grad_V)``.
* ``tprod(A (B,n3,n1,n2), B (B,n3,n2,n4))`` -> ``(B,n3,n1,n4)``.
* ``tube_rfft(X (B,n3,n1,n2))`` -> complex ``(B,n3//2+1,n1,n2)`` (``torch.fft.rfft(X, dim=1)``).
* ``tube_irfft(Xh (B,nf,n1,n2), n3)`` -> real ``(B,n3,n1,n2)`` (``torch.fft.irfft(Xh, n=n3, dim=1)``).

Two more ops describe the build (``tsvd._C`` itself is an empty limited-API module):
``build_info() -> str`` (JSON, parsed by :func:`build_info`) and
``_set_cpu_isa(str) -> str`` (wrapped by :func:`set_cpu_isa`).

Importing this module never fails when ``_C`` is missing or broken: :func:`available`
then answers False and :func:`build_info` says why.
"""
from __future__ import annotations

import contextlib
import json

import torch

#: the ``api_version`` of ``build_info()`` this Python code needs (see csrc/ops.cpp)
API_VERSION = 2

try:
    from . import _C  # noqa: F401  (registers torch.ops.tsvd.*)
    _ERR = None
    _got = json.loads(torch.ops.tsvd.build_info()).get("api_version")
    if _got != API_VERSION:
        # e.g. an in-place build older than these Python files: its ops lack the C++ autograd
        # this module relies on, so it must not be used (the reference runs instead)
        _C = None
        _ERR = RuntimeError(
            f"tsvd._C was built from another version of tsvd (api_version {_got}, expected "
            f"{API_VERSION}); rebuild it: pip install --no-build-isolation -e .")
except Exception as e:  # not built, or built against another torch
    _C = None
    _ERR = e

__all__ = ["available", "build_info", "set_cpu_isa", "use_cpu_isa", "treconstruct", "treconstruct_backward", "tprod",
           "tube_rfft", "tube_irfft"]


def _info() -> dict:
    return json.loads(torch.ops.tsvd.build_info())


_WITH_CUDA: bool | None = None   # build_info()'s with_cuda, read once (it cannot change)


def available(device) -> bool:
    """True when ``tsvd._C`` is loaded and has kernels for ``device``."""
    global _WITH_CUDA
    if _C is None:
        return False
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        if _WITH_CUDA is None:
            _WITH_CUDA = bool(_info()["with_cuda"])
        return _WITH_CUDA and torch.cuda.is_available()
    return False


def build_info() -> dict:
    """How the extension was built and which CPU path runs.

    Keys: ``built``, ``error`` (why it did not load), ``path``, ``with_cuda``, ``openmp``,
    ``threads``, ``parallel_info``, ``compiler``; ``native`` (built with TSVD_NATIVE=1,
    i.e. ``-march=native``), ``limited_api`` (built against the stable Python API);
    ``cpu_isa`` (the instruction set of the CPU tile loops in use now: ``"baseline"``,
    ``"avx2"`` or ``"avx512"``, chosen at run time, see :func:`set_cpu_isa`),
    ``cpu_isa_error`` (a bad ``TSVD_CPU_ISA``), ``cpu_isas_supported`` (compiled in and
    runnable on this CPU), ``cpu_isas_compiled``, ``compiler_flags_isa`` (what the
    compiler flags alone allow: ``"baseline"`` unless native), and ``simd`` (= ``cpu_isa``,
    the name older versions used).
    """
    if _C is None:
        return {"built": False, "with_cuda": False,
                "error": f"{type(_ERR).__name__}: {_ERR}" if _ERR is not None else None}
    info = {"built": True, "error": None, "path": getattr(_C, "__file__", None)}
    info.update(_info())
    info["simd"] = info["cpu_isa"]
    return info


def set_cpu_isa(isa: str) -> str:
    """Choose the CPU tile loops: ``"auto"`` (the best this CPU supports, the default),
    ``"baseline"``, ``"avx2"`` or ``"avx512"``. Returns the previous choice. Raises
    RuntimeError naming the supported ones when ``isa`` is unknown or this CPU (or build)
    lacks it. The environment variable ``TSVD_CPU_ISA`` sets the initial choice."""
    if _C is None:
        raise RuntimeError(f"tsvd._C is not built: {build_info()['error']}")
    if not isinstance(isa, str):
        raise TypeError(f"isa: expected a str (auto, baseline, avx2, avx512), got {type(isa).__name__}")
    return torch.ops.tsvd._set_cpu_isa(isa)


@contextlib.contextmanager
def use_cpu_isa(isa: str):
    """``with use_cpu_isa("baseline"):`` runs the CPU kernels on that path, then restores."""
    old = set_cpu_isa(isa)
    try:
        yield
    finally:
        set_cpu_isa(old)


# --------------------------------------------------------------------------------------
# Python entry points used by tsvd._api
# --------------------------------------------------------------------------------------
# The ops' OpOverloads, resolved once: calling an OpOverloadPacket (torch.ops.tsvd.name)
# picks the overload in Python on every call, about 10 us (issue 13: host overhead).
_OPS: dict = {}
if _C is not None:
    _OPS = {n: getattr(torch.ops.tsvd, n).default for n in
            ("treconstruct", "treconstruct_backward", "tprod", "tube_rfft", "tube_irfft")}


def treconstruct(U, S, V, residual=None):
    """``residual + U * fdiag(S) * Vᵀ``; U ``(B,n3,n1,r)``, S ``(B,n3,r)``, V ``(B,n3,n2,r)``."""
    return _OPS["treconstruct"](U, S, V, residual)


def treconstruct_backward(grad, U, S, V):
    return _OPS["treconstruct_backward"](grad, U, S, V)


def tprod(A, B):
    """t-product ``(B,n3,n1,n2) x (B,n3,n2,n4) -> (B,n3,n1,n4)``."""
    return _OPS["tprod"](A, B)


def tube_rfft(X):
    """``torch.fft.rfft(X, dim=1)`` for ``X (B,n3,n1,n2)``."""
    return _OPS["tube_rfft"](X)


def tube_irfft(Xh, n3: int):
    """``torch.fft.irfft(Xh, n=n3, dim=1)`` for ``Xh (B,n3//2+1,n1,n2)``."""
    return _OPS["tube_irfft"](Xh, n3)


# --------------------------------------------------------------------------------------
# fake kernels and autograd (registered once, only when _C loaded)
# --------------------------------------------------------------------------------------
def _complex_of(dt):
    return torch.complex128 if dt == torch.float64 else torch.complex64


def _real_of(dt):
    return torch.float64 if dt == torch.complex128 else torch.float32


def _half_weights(n3: int, nf: int, dtype, device):
    """Multiplicity of each stored frequency in the full spectrum, ``(nf,)``."""
    w = torch.full((nf,), 2.0, dtype=dtype, device=device)
    w[0] = 1.0
    if n3 % 2 == 0:
        w[-1] = 1.0
    return w


def _register():
    lib = torch.library

    @lib.register_fake("tsvd::treconstruct")
    def _(U, S, V, residual):
        torch._check(U.dim() == 4 and S.dim() == 3 and V.dim() == 4,
                     lambda: "tsvd::treconstruct: U, S, V must be 4-d, 3-d, 4-d")
        B, n3, n1, _r = U.shape
        return U.new_empty((B, n3, n1, V.shape[2]))

    @lib.register_fake("tsvd::treconstruct_backward")
    def _(grad, U, S, V):
        return torch.empty_like(U, memory_format=torch.contiguous_format), \
            torch.empty_like(S, memory_format=torch.contiguous_format), \
            torch.empty_like(V, memory_format=torch.contiguous_format)

    @lib.register_fake("tsvd::tprod")
    def _(A, B):
        return A.new_empty((A.shape[0], A.shape[1], A.shape[2], B.shape[3]))

    @lib.register_fake("tsvd::tube_rfft")
    def _(X):
        return X.new_empty((X.shape[0], X.shape[1] // 2 + 1, X.shape[2], X.shape[3]),
                           dtype=_complex_of(X.dtype))

    @lib.register_fake("tsvd::tube_irfft")
    def _(Xh, n3):
        return Xh.new_empty((Xh.shape[0], n3, Xh.shape[2], Xh.shape[3]),
                            dtype=_real_of(Xh.dtype))

    # treconstruct and tprod: autograd in C++ (csrc/autograd.cpp), no Python on the hot path

    # tube_rfft: adjoint of rfft is Re(sum_f g_f e^{+i th}) = irfft(g * n3 / w_f)
    def rfft_setup(ctx, inputs, output):
        ctx.n3 = inputs[0].shape[1]

    def rfft_backward(ctx, grad):
        n3 = ctx.n3
        w = _half_weights(n3, grad.shape[1], _real_of(grad.dtype), grad.device)
        return torch.ops.tsvd.tube_irfft(grad * (n3 / w).view(1, -1, 1, 1), n3)

    lib.register_autograd("tsvd::tube_rfft", rfft_backward, setup_context=rfft_setup)

    # tube_irfft: adjoint of irfft is rfft(g) * w_f / n3
    def irfft_setup(ctx, inputs, output):
        ctx.n3 = inputs[1]

    def irfft_backward(ctx, grad):
        n3 = ctx.n3
        gh = torch.ops.tsvd.tube_rfft(grad)
        w = _half_weights(n3, gh.shape[1], grad.dtype, grad.device)
        return gh * (w / n3).view(1, -1, 1, 1), None

    lib.register_autograd("tsvd::tube_irfft", irfft_backward, setup_context=irfft_setup)


if _C is not None:
    _register()
