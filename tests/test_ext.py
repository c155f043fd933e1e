"""The compiled extension tsvd._C against the plain-PyTorch reference and the definitions.

Every registered op (torch.ops.tsvd.*) is compared with tsvd.reference / torch.fft in
float64 (tight) and float32 (loose) over odd and even n3, n3 = 1 and 2, n1 != n2,
rank 1, batches, non-contiguous inputs and a missing residual; gradients are checked
with gradcheck in float64 through the public API; opcheck covers the registration
(schema, fake kernels, autograd) and one test runs the hot path under torch.compile.

The CPU tile loops exist once per instruction set (baseline, AVX2, AVX-512; chosen at
run time, csrc/cpu/isa.h): the comparisons with the reference run on every path this
CPU supports, and the built library is checked for AVX instructions outside those paths
(a portable build must not die with an illegal instruction on an older CPU).
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import tsvd
from tsvd import _ext, reference as ref

if not _ext.available("cpu"):
    pytest.skip(f"tsvd._C is not built: {_ext.build_info().get('error')}", allow_module_level=True)

OPS = torch.ops.tsvd
INFO = _ext.build_info()
ISAS = INFO["cpu_isas_supported"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test body on one CPU path (``tsvd._ext.use_cpu_isa``)."""
    with _ext.use_cpu_isa(request.param):
        assert _ext.build_info()["cpu_isa"] == request.param
        yield request.param

# (B, n3, n1, n2, r)
SHAPES = [
    (1, 12, 30, 20, 3),
    (2, 7, 17, 33, 8),     # odd n3, n2 not a multiple of the tile width
    (1, 1, 5, 6, 1),       # n3 = 1, r = 1
    (1, 2, 5, 19, 2),      # n3 = 2
    (3, 48, 9, 40, 8),     # the LoRA-PT tube length, batch
    (1, 16, 9, 5, 16),     # n2 < tile width, r = 16
    (1, 5, 3, 4, 5),       # odd rank (padded internally)
    (1, 12, 6, 200, 9),    # several column chunks
    (1, 65, 4, 70, 3),     # long tube: pocketfft path of tube_rfft/irfft
    (1, 48, 5, 700, 3),    # several column chunks (kChunkBytes) on every ISA and dtype
]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture
def one_thread():
    """gradcheck/opcheck make thousands of tiny calls: on a loaded 2-core machine the
    thread hand-offs of each call dominate, so run them on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def factors(B, n3, n1, n2, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, n3, n1, r), mk(B, n3, r), mk(B, n3, n2, r), mk(B, n3, n1, n2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_treconstruct_forward(shape, dtype, isa):
    U, S, V, R = factors(*shape, dtype)
    d = lambda t: t.double()  # noqa: E731
    want = ref.treconstruct(d(U), d(S), d(V), d(R))
    assert rel(OPS.treconstruct(U, S, V, R), want) < TOL[dtype]
    want0 = ref.treconstruct(d(U), d(S), d(V))
    got0 = OPS.treconstruct(U, S, V, None)
    assert got0.is_contiguous() and got0.dtype == dtype
    assert rel(got0, want0) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_treconstruct_backward(shape, dtype, isa):
    U, S, V, R = factors(*shape, dtype, seed=1)
    G = torch.randn_like(R)
    Ud, Sd, Vd = (t.double().requires_grad_() for t in (U, S, V))
    ref.treconstruct(Ud, Sd, Vd).backward(G.double())
    gU, gS, gV = OPS.treconstruct_backward(G, U, S, V)
    assert rel(gU, Ud.grad) < TOL[dtype]
    assert rel(gS, Sd.grad) < TOL[dtype]
    assert rel(gV, Vd.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tube_dft_and_tprod(shape, dtype, isa):
    B, n3, n1, n2, r = shape
    X = torch.randn(B, n3, n1, n2, dtype=torch.float64).to(dtype)
    Xh = OPS.tube_rfft(X)
    assert Xh.dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
    assert rel(torch.view_as_real(Xh), torch.view_as_real(torch.fft.rfft(X.double(), dim=1))) < TOL[dtype]
    Yh = torch.randn(B, n3 // 2 + 1, n1, n2, dtype=torch.complex128).to(Xh.dtype)
    assert rel(OPS.tube_irfft(Yh, n3), torch.fft.irfft(Yh.to(torch.complex128), n=n3, dim=1)) < TOL[dtype]
    Bm = torch.randn(B, n3, n2, r, dtype=torch.float64).to(dtype)
    got = OPS.tprod(X, Bm)
    # independent oracle: block-circulant definition fold(bcirc(A) @ unfold(B))
    want = torch.stack([ref.fold(ref.bcirc(X[b].double()) @ ref.unfold(Bm[b].double()), n3)
                        for b in range(B)])
    assert rel(got, want) < TOL[dtype]


def test_non_contiguous_inputs(isa):
    B, n3, n1, n2, r = 2, 10, 13, 21, 4
    U = torch.randn(B, n3, r, n1, dtype=torch.float64).transpose(-1, -2)
    S = torch.randn(B, r, n3, dtype=torch.float64).transpose(-1, -2)
    V = torch.randn(B, n3, n2, 2 * r, dtype=torch.float64)[..., ::2]
    R = torch.randn(B, n3, n2, n1, dtype=torch.float64).transpose(-1, -2)
    assert not (U.is_contiguous() or S.is_contiguous() or V.is_contiguous() or R.is_contiguous())
    want = ref.treconstruct(U, S, V, R)
    assert rel(OPS.treconstruct(U, S, V, R), want) < 1e-12
    G = torch.randn(B, n3, n2, n1, dtype=torch.float64).transpose(-1, -2)
    Ud, Sd, Vd = (t.detach().clone().requires_grad_() for t in (U, S, V))
    ref.treconstruct(Ud, Sd, Vd).backward(G)
    for got, want in zip(OPS.treconstruct_backward(G, U, S, V), (Ud.grad, Sd.grad, Vd.grad)):
        assert rel(got, want) < 1e-12
    X = torch.randn(B, n3, n2, n1, dtype=torch.float64).transpose(-1, -2)
    assert rel(torch.view_as_real(OPS.tube_rfft(X)), torch.view_as_real(torch.fft.rfft(X, dim=1))) < 1e-12
    Xh = torch.fft.rfft(X, dim=1)[..., ::2]
    assert rel(OPS.tube_irfft(Xh, n3), torch.fft.irfft(Xh, n=n3, dim=1)) < 1e-12
    assert rel(OPS.tprod(X, R.transpose(-1, -2)), ref.tprod(X, R.transpose(-1, -2))) < 1e-12


def test_public_api_uses_compiled_backend_with_broadcasting():
    U = torch.randn(3, 1, 8, 6, 2, dtype=torch.float64)
    S = torch.randn(8, 2, dtype=torch.float64)
    V = torch.randn(1, 4, 8, 5, 2, dtype=torch.float64)
    R = torch.randn(3, 4, 8, 6, 5, dtype=torch.float64)
    with tsvd.use_backend("compiled"):
        got = tsvd.treconstruct(U, S, V, residual=R)
    assert tsvd.last_backend("treconstruct") == "compiled"
    assert rel(got, ref.treconstruct(U, S, V, R)) < 1e-12
    A = torch.randn(2, 7, 4, 3, dtype=torch.float64)
    Bm = torch.randn(7, 3, 5, dtype=torch.float64)
    with tsvd.use_backend("compiled"):
        got = tsvd.tprod(A, Bm)
    assert tsvd.last_backend("tprod") == "compiled"
    assert rel(got, ref.tprod(A, Bm)) < 1e-12


@pytest.mark.parametrize("n3", [1, 2, 5, 6])
def test_gradcheck_treconstruct(n3, one_thread):
    g = torch.Generator().manual_seed(n3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    U, S, V, R = mk(2, n3, 4, 3), mk(2, n3, 3), mk(2, n3, 5, 3), mk(2, n3, 4, 5)
    with tsvd.use_backend("compiled"):
        assert torch.autograd.gradcheck(lambda *a: tsvd.treconstruct(*a[:3], residual=a[3]),
                                        (U, S, V, R))
        assert torch.autograd.gradcheck(lambda *a: tsvd.treconstruct(*a), (U, S, V))
    assert tsvd.last_backend("treconstruct") == "compiled"


@pytest.mark.parametrize("n3", [1, 4, 5])
def test_gradcheck_tprod_and_tube_dft(n3, one_thread):
    g = torch.Generator().manual_seed(10 + n3)
    A = torch.randn(2, n3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, n3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    with tsvd.use_backend("compiled"):
        assert torch.autograd.gradcheck(lambda a, b: tsvd.tprod(a, b), (A, B))
    assert tsvd.last_backend("tprod") == "compiled"
    assert torch.autograd.gradcheck(OPS.tube_rfft, (A,))
    Xh = torch.randn(2, n3 // 2 + 1, 3, 4, generator=g, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: OPS.tube_irfft(x, n3), (Xh,))


def test_opcheck_every_op(one_thread):
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    for n3 in (4, 5):
        U, S, V, R = mk(2, n3, 6, 2), mk(2, n3, 2), mk(2, n3, 7, 2), mk(2, n3, 6, 7)
        grads = [t.requires_grad_() for t in (U.clone(), S.clone(), V.clone())]
        torch.library.opcheck(OPS.treconstruct, (U, S, V, R))
        torch.library.opcheck(OPS.treconstruct, (*grads, R.clone().requires_grad_()))
        torch.library.opcheck(OPS.treconstruct, (U, S, V, None))
        torch.library.opcheck(OPS.treconstruct_backward, (R, U, S, V))
        torch.library.opcheck(OPS.tprod, (mk(2, n3, 3, 4).requires_grad_(), mk(2, n3, 4, 5).requires_grad_()))
        torch.library.opcheck(OPS.tube_rfft, (mk(2, n3, 3, 4).requires_grad_(),))
        Xh = torch.randn(2, n3 // 2 + 1, 3, 4, generator=g, dtype=torch.complex128)
        torch.library.opcheck(OPS.tube_irfft, (Xh.requires_grad_(), n3))
        torch.library.opcheck(OPS.tube_rfft, (mk(1, n3, 2, 3).float(),))


def test_torch_compile_hot_path(one_thread):
    U = torch.randn(12, 16, 4, requires_grad=True)
    S = torch.randn(12, 4, requires_grad=True)
    V = torch.randn(12, 24, 4, requires_grad=True)
    W = torch.randn(12, 16, 24)

    def f(u, s, v, w):
        return tsvd.treconstruct(u, s, v, residual=w) * 2.0

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=False)
    with tsvd.use_backend("compiled"):
        out = cf(U, S, V, W)
        out.square().sum().backward()
    assert tsvd.last_backend("treconstruct") == "compiled"
    assert rel(out.detach(), ref.treconstruct(U.detach().double(), S.detach().double(),
                                              V.detach().double(), W.double()) * 2.0) < 1e-5
    Ud, Sd, Vd = (t.detach().double().requires_grad_() for t in (U, S, V))
    (ref.treconstruct(Ud, Sd, Vd, W.double()) * 2.0).square().sum().backward()
    assert rel(U.grad, Ud.grad) < 1e-5 and rel(S.grad, Sd.grad) < 1e-5 and rel(V.grad, Vd.grad) < 1e-5


def test_build_info_and_availability():
    info = _ext.build_info()
    assert info["built"] is True and info["error"] is None
    assert info["cpu_isa_error"] is None
    assert _ext.available("cpu")
    assert _ext.available("cuda") == (info["with_cuda"] and torch.cuda.is_available())
    assert not _ext.available("meta")
    assert "baseline" in info["cpu_isas_supported"]
    assert set(info["cpu_isas_supported"]) <= set(info["cpu_isas_compiled"])
    if platform.machine() in ("x86_64", "AMD64"):
        assert info["cpu_isas_compiled"] == ["baseline", "avx2", "avx512"]
        # the default is the best path this CPU has (unless TSVD_CPU_ISA says otherwise)
        if os.environ.get("TSVD_CPU_ISA", "auto") == "auto":
            assert info["cpu_isa"] == info["cpu_isas_supported"][-1]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None
    if flags is not None and "avx512" in info["cpu_isas_compiled"]:
        has512 = all(re.search(rf"\b{f}\b", flags) for f in ("avx512f", "avx512vl", "avx512dq", "avx512bw"))
        assert ("avx512" in info["cpu_isas_supported"]) == has512
        has2 = bool(re.search(r"\bavx2\b", flags) and re.search(r"\bfma\b", flags))
        assert ("avx2" in info["cpu_isas_supported"]) == has2


def test_cpu_isa_choice_errors_and_restore():
    before = _ext.build_info()["cpu_isa"]
    with pytest.raises(RuntimeError, match="expected one of auto, baseline, avx2, avx512, got 'sse9'"):
        _ext.set_cpu_isa("sse9")
    with pytest.raises(TypeError, match="isa"):
        _ext.set_cpu_isa(2)
    assert _ext.build_info()["cpu_isa"] == before
    with _ext.use_cpu_isa("baseline"):
        assert _ext.build_info()["cpu_isa"] == "baseline"
    assert _ext.build_info()["cpu_isa"] == before
    for name in ("avx2", "avx512"):
        if name not in ISAS:
            with pytest.raises(RuntimeError, match=name):
                _ext.set_cpu_isa(name)


def test_cpu_isa_environment_variable(tmp_path):
    """TSVD_CPU_ISA chooses the path at start-up; a bad value is reported, not ignored."""
    code = ("import json, torch, tsvd, tsvd._ext; x = torch.randn(1, 6, 3, 17, dtype=torch.float64); "
            "d = (torch.ops.tsvd.tube_rfft(x) - torch.fft.rfft(x, dim=1)).abs().max().item(); "
            "print(json.dumps([tsvd.build_info()['cpu_isa'], d]))")
    env = dict(os.environ, TSVD_CPU_ISA="baseline")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    isa, err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isa == "baseline" and err < 1e-12
    env["TSVD_CPU_ISA"] = "sse9"
    code = ("import torch, tsvd, tsvd._ext; print(tsvd.build_info()['cpu_isa_error']); "
            "torch.ops.tsvd.tube_rfft(torch.randn(1, 4, 2, 2))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "TSVD_CPU_ISA: expected one of auto, baseline, avx2, avx512, got 'sse9'" in proc.stdout
    assert "TSVD_CPU_ISA" in proc.stderr


def test_limited_api_module_without_pybind11():
    """tsvd._C is an empty module of the stable Python API (named _C.abi3.so) that does not
    link libtorch_python: the build queries are operators."""
    path = _ext._C.__file__
    assert INFO["limited_api"] is True
    assert path.endswith(".abi3.so") or path.endswith(".pyd"), path
    assert [n for n in dir(_ext._C) if not n.startswith("__")] == []
    assert json.loads(OPS.build_info()) == {k: v for k, v in _ext.build_info().items()
                                            if k not in ("built", "error", "path", "simd")}
    if shutil.which("readelf") and path.endswith(".so"):
        dyn = subprocess.run(["readelf", "-d", "-W", path], capture_output=True, text=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)
        assert needed and not [n for n in needed if "torch_python" in n or "python3" in n], needed
        syms = subprocess.run(["nm", "-D", "-C", path], capture_output=True, text=True).stdout
        assert "pybind11" not in syms


_AVX = re.compile(r"%[yz]mm\d|%k[0-7]\b")


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="x86-64 with binutils' objdump only")
def test_no_avx_outside_the_dispatched_paths():
    """Every function of tsvd._C that uses AVX/AVX-512 instructions (VEX/EVEX mnemonics,
    ymm/zmm/mask registers) belongs to the AVX2 or AVX-512 tile loops: their own namespace
    or a kernel template instantiated with their vector type. (With TSVD_NATIVE=1 the whole
    library is built for this CPU, so the check does not apply.)"""
    if INFO["native"]:
        pytest.skip("built with TSVD_NATIVE=1 (-march=native)")
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _ext._C.__file__],
                         capture_output=True, text=True, check=True).stdout
    avx_types = ("float __vector(8)", "float __vector(16)", "double __vector(4)", "double __vector(8)")
    fn, seen, bad = None, set(), set()
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        parts = line.split("\t")
        if fn is None or len(parts) < 2:
            continue
        ins = parts[1].strip()
        mnem = ins.split(" ")[0]
        if _AVX.search(ins) or (mnem.startswith("v") and mnem not in ("verr", "verw")):
            seen.add(fn)
            if not ("::avx2::" in fn or "::avx512::" in fn or any(t in fn for t in avx_types)):
                bad.add(fn)
    assert not bad, sorted(bad)[:10]
    # the dispatched paths really are in the library (else the check above proves nothing)
    assert any("::avx512::trec_forward<float>" in f for f in seen)
    assert any("::avx2::trec_forward<float>" in f for f in seen)


def test_bad_input_is_rejected():
    U, S, V, R = factors(1, 4, 3, 5, 2, torch.float64)
    with pytest.raises(RuntimeError, match="residual"):
        OPS.treconstruct(U, S, V, R[..., :4])
    with pytest.raises(RuntimeError, match="S must be"):
        OPS.treconstruct(U, S[..., :1], V, None)
    with pytest.raises(RuntimeError, match="frequencies"):
        OPS.tube_irfft(torch.zeros(1, 3, 2, 2, dtype=torch.complex128), 7)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        OPS.tube_rfft(torch.zeros(1, 3, 2, 2, dtype=torch.int64))


# ------------------------------------------------------------------------------------------
# autograd in C++ (issue 13: no Python on the differentiable hot path)
# ------------------------------------------------------------------------------------------
def test_treconstruct_and_tprod_backward_nodes_are_cpp():
    """The graph node of a differentiable call is the C++ Function of csrc/autograd.cpp (a
    Python formula would show up as a Python backward node); gradients flow only to the inputs
    that need them."""
    g = torch.Generator().manual_seed(0)
    U, S, V, R = (torch.randn(*s, generator=g, dtype=torch.float64)
                  for s in ((2, 5, 4, 2), (2, 5, 2), (2, 5, 3, 2), (2, 5, 4, 3)))
    U.requires_grad_()
    y = torch.ops.tsvd.treconstruct(U, S, V, R)
    assert "TReconstruct" in y.grad_fn.name()
    y.sum().backward()
    assert U.grad is not None and S.grad is None and R.grad is None
    A = torch.randn(2, 5, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64)
    assert "TProd" in torch.ops.tsvd.tprod(A, B).grad_fn.name()


@pytest.mark.parametrize("n3", [1, 2, 5])
def test_tprod_second_derivative(n3):
    """tprod's backward is made of tprod calls, so it is differentiable again (oracle: finite
    differences of the first derivative, float64)."""
    g = torch.Generator().manual_seed(n3)
    A = torch.randn(1, n3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(1, n3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(torch.ops.tsvd.tprod, (A, B))


def test_a_build_of_another_api_version_is_not_used():
    """A stale in-place build (its build_info without this api_version) is refused with a
    message saying to rebuild; tsvd then runs the reference (checked in a fresh process)."""
    code = (
        "import json, torch\n"
        "import tsvd._C\n"
        "info = json.loads(torch.ops.tsvd.build_info()); info['api_version'] = 1\n"
        "torch.ops.tsvd.build_info = lambda: json.dumps(info)\n"
        "from tsvd import _ext\n"
        "import tsvd\n"
        "assert not _ext.available('cpu'), 'stale build used'\n"
        "assert 'rebuild' in _ext.build_info()['error'], _ext.build_info()\n"
        "A, B = torch.randn(3, 2, 2), torch.randn(3, 2, 2)\n"
        "tsvd.tprod(A, B)\n"
        "assert tsvd.last_backend('tprod') == 'reference'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(tsvd.__file__)), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


def test_treconstruct_direct_call_only_where_the_op_takes_the_inputs_unchanged():
    """tsvd.treconstruct calls the compiled op on the inputs as they are (no Python checks or
    reshapes: issue 13's host overhead) exactly when U, V (and the residual) have no batch
    dim or one that all four share, with the same float32/float64 dtype and device; every
    other input goes the general way. Either way the result is the float64 definition's (and
    its gradients), and a bad input gets the API's message."""
    from tsvd import _api
    g = torch.Generator().manual_seed(0)

    def r(*s, dt=torch.float64):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dt)

    U, S, V, R = r(2, 5, 6, 3), r(2, 5, 3), r(2, 5, 7, 3), r(2, 5, 6, 7)
    want = ref.treconstruct(U, S, V, R)
    for dt in (torch.float64, torch.float32):
        args = [t.to(dt) for t in (U, S, V, R)]
        out = _api._treconstruct_direct(*args, "fft")
        assert out is not None and out.dtype == dt
        assert tsvd.last_backend("treconstruct") == "compiled"
        assert torch.allclose(out.double(), want, atol=1e-5 if dt == torch.float32 else 1e-12)
        assert torch.equal(tsvd.treconstruct(*args[:3], residual=args[3]), out)
    assert _api._treconstruct_direct(U, S, V, None, "fft") is not None
    one = [t[1].clone().requires_grad_() for t in (U, S, V, R)]        # no batch dim
    out = _api._treconstruct_direct(*one, "fft")
    assert out is not None and out.shape == (5, 6, 7)
    assert torch.allclose(out, want[1], atol=1e-12)
    G = r(5, 6, 7)
    out.backward(G)
    leaves = [t[1].clone().requires_grad_() for t in (U, S, V, R)]
    ref.treconstruct(*leaves).backward(G)
    for a, b in zip(one, leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)
    general = {
        "S without the batch dim": (U, S[0], V, R, "fft"),
        "broadcast batch": (U, S[:1], V, R, "fft"),
        "mixed dtypes": (U.float(), S, V, R, "fft"),
        "float16": tuple(t.half() for t in (U, S, V, R)) + ("fft",),
        "two batch dims": (U[None], S[None], V[None], R[None], "fft"),
        "another transform": (U, S, V, R, "dct"),
    }
    for name, (u, s, v, res, tr) in general.items():
        assert _api._treconstruct_direct(u, s, v, res, tr) is None, name
        out = tsvd.treconstruct(u, s, v, residual=res, transform=tr)
        exp = ref.treconstruct(*(t.double() for t in (u, s, v, res)),
                               transform=tsvd.transforms.get_transform(tr))
        assert torch.allclose(out.double(), exp, atol=5e-2 if u.dtype == torch.half else 1e-5), name
    with tsvd.use_backend("reference"):
        assert _api._treconstruct_direct(U, S, V, R, "fft") is None
        tsvd.treconstruct(U, S, V, residual=R)
        assert tsvd.last_backend("treconstruct") == "reference"
    with pytest.raises(ValueError, match=r"V: expected \(\.\.\., 5, n2, 3\)"):
        tsvd.treconstruct(U, S, r(2, 5, 7, 4))
    with pytest.raises(ValueError, match="residual: expected"):
        tsvd.treconstruct(U, S, V, residual=r(2, 5, 6, 8))
    with pytest.raises(ValueError, match=r"S: expected diagonal tubes"):
        tsvd.treconstruct(U[0], r(5, 4), V[0])


def test_tprod_direct_call_only_where_the_op_takes_the_inputs_unchanged():
    """tsvd.tprod calls the compiled op on A, B as they are exactly when both are 3-D, or
    4-D with one batch, of one float32/float64 dtype and device; every other input goes the
    general way. Either way the result is the float64 definition's, and a bad input gets the
    API's message."""
    from tsvd import _api
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    B = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    want = ref.tprod(A, B)
    for a, b in ((A, B), (A[0], B[0]), (A.float(), B.float())):
        out = _api._tprod_direct(a, b, "fft")
        assert out is not None and tsvd.last_backend("tprod") == "compiled"
        exp = want if a.dim() == 4 else want[0]
        assert torch.allclose(out.double(), exp, atol=1e-4 if a.dtype == torch.float32 else 1e-12)
        assert torch.equal(tsvd.tprod(a, b), out)
    general = {"broadcast batch": (A, B[:1]), "mixed dtypes": (A.float(), B),
               "3-D and 4-D": (A[0], B), "float16": (A.half(), B.half())}
    for name, (a, b) in general.items():
        assert _api._tprod_direct(a, b, "fft") is None, name
        out = tsvd.tprod(a, b)
        exp = ref.tprod(a.double(), b.double())
        assert torch.allclose(out.double(), exp, atol=5e-2 if a.dtype == torch.half else 1e-5), name
    assert _api._tprod_direct(A, B, "dct") is None
    with pytest.raises(ValueError, match="inner dims differ"):
        tsvd.tprod(A, A)
    with pytest.raises(ValueError, match="tube lengths differ"):
        tsvd.tprod(A, B[:, :4])
