"""The compiled extension tsvd._C against the plain-PyTorch reference and the definitions.

Every registered op (torch.ops.tsvd.*) is compared with tsvd.reference / torch.fft in
float64 (tight) and float32 (loose) over odd and even n3, n3 = 1 and 2, n1 != n2,
rank 1, batches, non-contiguous inputs and a missing residual; gradients are checked
with gradcheck in float64 through the public API; opcheck covers the registration
(schema, fake kernels, autograd) and one test runs the hot path under torch.compile.
"""
import pytest
import torch

import tsvd
from tsvd import _ext, reference as ref

if not _ext.available("cpu"):
    pytest.skip(f"tsvd._C is not built: {_ext.build_info().get('error')}", allow_module_level=True)

OPS = torch.ops.tsvd

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
def test_treconstruct_forward(shape, dtype):
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
def test_treconstruct_backward(shape, dtype):
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
def test_tube_dft_and_tprod(shape, dtype):
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


def test_non_contiguous_inputs():
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
    assert info["with_cuda"] == bool(_ext._C.has_cuda())
    assert _ext.available("cpu")
    assert _ext.available("cuda") == (info["with_cuda"] and torch.cuda.is_available())
    assert not _ext.available("meta")


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
