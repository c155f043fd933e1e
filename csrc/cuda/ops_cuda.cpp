// CUDA implementations of the tsvd operators (schemas in csrc/ops.cpp): ATen glue over
// the kernels of kernels.cu (launch.h). Plain C++ (compiled by the host compiler), with
// only c10/cuda headers beside ATen (no cuBLAS/cuFFT headers are needed here: cuFFT and
// cuBLAS are reached through ATen ops).
//
// What runs where (nf = n3/2 + 1):
//   nf <= 32 (n3 <= 63): own register kernels for the tube DFTs, the fused treconstruct
//                        forward and backward; the per-frequency products of tprod in
//                        cuBLAS (at::matmul on complex tensors);
//   nf > 32:             cuFFT through at::fft_rfft / at::fft_irfft, same formulas.
// The switch at nf = 32 follows the register budget of the kernels (2 x 32 coefficients per
// thread), not a timing: it is unmeasured until bench/gpu_check.sh runs on a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "launch.h"

namespace tsvd {
namespace cuda_ops {
namespace {

using at::Tensor;

void check_real(const Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-d, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_same(const Tensor& a, const Tensor& b, const char* op, const char* name) {
  TORCH_CHECK(b.device() == a.device(), op, ": ", name, " is on ", b.device(), ", expected ",
              a.device());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": ", name, " has dtype ", b.scalar_type(),
              ", expected ", a.scalar_type());
}

cudaStream_t stream_of(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

bool fused(int64_t n3) { return n3 / 2 + 1 <= tsvd::cuda::kMaxFusedFreq; }

// The stand-alone tube rfft kernel (one thread per tube, O(n3^2) work) against cuFFT. Measured
// on an H200 (bench/kernels.py --ops rfft, float32, 2026-11-26): 1.32x faster than cuFFT at
// n3 = 12, 0.21x at n3 = 48; hence cuFFT above 16. (The inverse was 1.27x and 0.99x: kept.)
bool own_rfft(int64_t n3) { return n3 <= 16 && fused(n3); }

// The v2 kernels (kernels_v2.cu) run where they apply, float32 and n3 in {12, 48}; they
// passed the CUDA tests and the NaN-poisoned checks on an H200 (2026-12-04,
// bench/results/h200_torch2.11_2026-12-04_v2/). TSVD_CUDA_KERNELS=v1 selects the v1 kernels
// instead. Read on every call (one getenv), so that a benchmark can time both in one process.
bool v2_enabled() {
  const char* e = std::getenv("TSVD_CUDA_KERNELS");
  return e == nullptr || std::strcmp(e, "v1") != 0;
}
// TSVD_CUDA_KERNELS=v2pq: the v2 kernels plus the backward's fused P/Q kernel in place of
// its two cuBLAS GEMMs (opt-in until it has passed the CUDA tests on a GPU).
bool v2_fused_pq() {
  const char* e = std::getenv("TSVD_CUDA_KERNELS");
  return e != nullptr && std::strcmp(e, "v2pq") == 0;
}
bool v2_tube(at::ScalarType real_type, int64_t n3) {
  return real_type == at::kFloat && (n3 == 12 || n3 == 48) && v2_enabled();
}

// The inverse-DFT weights w_f / n3 (w_f = 1 for the DC and Nyquist bins, 2 otherwise) times
// `scale`, as a (nf,) tensor made on the device (fill_ on views: no host-to-device copy).
Tensor freq_weights(int64_t n3, int64_t nf, double scale, const at::TensorOptions& opts) {
  Tensor c = at::full({nf}, 2.0 * scale / double(n3), opts);
  c.narrow(0, 0, 1).fill_(scale / double(n3));
  if (n3 % 2 == 0 && nf > 1) c.narrow(0, nf - 1, 1).fill_(scale / double(n3));
  return c;
}

at::ScalarType complex_of(at::ScalarType t) {
  return t == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
}

// ---------------------------------------------------------------------------------------
Tensor tube_rfft_impl(const Tensor& X) {
  check_real(X, "tsvd::tube_rfft", "X", 4);
  c10::cuda::CUDAGuard guard(X.device());
  const int64_t B = X.size(0), n3 = X.size(1), n1 = X.size(2), n2 = X.size(3);
  TORCH_CHECK(n3 >= 1, "tsvd::tube_rfft: X must have n3 >= 1 tubes, got shape ", X.sizes());
  const int64_t nf = n3 / 2 + 1;
  if (X.numel() == 0)
    return at::empty({B, nf, n1, n2}, X.options().dtype(complex_of(X.scalar_type())));
  if (v2_tube(X.scalar_type(), n3)) {
    const Tensor x = X.contiguous();
    Tensor out = at::empty({B, nf, n1, n2, 2}, x.options());
    C10_CUDA_CHECK(tsvd::cuda::launch_tube_rfft_v2(x.data_ptr<float>(), out.data_ptr<float>(), B,
                                                   n3, n1 * n2, stream_of(x)));
    return at::view_as_complex(out);
  }
  // cuFFT returns the transformed dim innermost in memory: make it contiguous, as the
  // fake implementation (and every other path) promises.
  if (!own_rfft(n3)) return at::fft_rfft(X, std::nullopt, 1).contiguous();
  const Tensor x = X.contiguous();
  Tensor out = at::empty({B, nf, n1, n2, 2}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tsvd_tube_rfft_cuda", [&] {
    C10_CUDA_CHECK(tsvd::cuda::launch_tube_rfft<scalar_t>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, n3, n1 * n2, stream_of(x)));
  });
  return at::view_as_complex(out);
}

Tensor tube_irfft_impl(const Tensor& Xh, int64_t n3) {
  const char* op = "tsvd::tube_irfft";
  TORCH_CHECK(Xh.is_cuda(), op, ": Xh must be a CUDA tensor, got device ", Xh.device());
  TORCH_CHECK(Xh.dim() == 4, op, ": Xh must be 4-d (B, nf, n1, n2), got shape ", Xh.sizes());
  TORCH_CHECK(Xh.scalar_type() == at::kComplexFloat || Xh.scalar_type() == at::kComplexDouble,
              op, ": Xh must be complex64 or complex128, got ", Xh.scalar_type());
  TORCH_CHECK(n3 >= 1, op, ": n3 must be >= 1, got ", n3);
  c10::cuda::CUDAGuard guard(Xh.device());
  const int64_t B = Xh.size(0), nf = Xh.size(1), n1 = Xh.size(2), n2 = Xh.size(3);
  const at::ScalarType rt = Xh.scalar_type() == at::kComplexDouble ? at::kDouble : at::kFloat;
  // Other spectrum lengths (torch.fft.irfft pads or trims) and long tubes go to cuFFT.
  if (nf != n3 / 2 + 1 || !fused(n3)) {
    if (B * n1 * n2 == 0) return at::empty({B, n3, n1, n2}, Xh.options().dtype(rt));
    return at::fft_irfft(Xh, n3, 1).contiguous();
  }
  if (B * n1 * n2 == 0) return at::empty({B, n3, n1, n2}, Xh.options().dtype(rt));
  const Tensor xh = at::view_as_real(Xh.resolve_conj().contiguous());
  Tensor out = at::empty({B, n3, n1, n2}, xh.options());
  if (v2_tube(rt, n3)) {
    C10_CUDA_CHECK(tsvd::cuda::launch_tube_irfft_v2(xh.data_ptr<float>(), out.data_ptr<float>(), B,
                                                    n3, n1 * n2, stream_of(xh)));
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(rt, "tsvd_tube_irfft_cuda", [&] {
    C10_CUDA_CHECK(tsvd::cuda::launch_tube_irfft<scalar_t>(
        xh.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, n3, n1 * n2, stream_of(xh)));
  });
  return out;
}

// ---------------------------------------------------------------------------------------
Tensor tprod_impl(const Tensor& A, const Tensor& Bt) {
  const char* op = "tsvd::tprod";
  check_real(A, op, "A", 4);
  check_real(Bt, op, "B", 4);
  check_same(A, Bt, op, "B");
  TORCH_CHECK(A.size(1) == Bt.size(1), op, ": tube lengths differ: A has n3 = ", A.size(1),
              ", B has n3 = ", Bt.size(1));
  TORCH_CHECK(A.size(3) == Bt.size(2), op, ": inner dims differ: A is ", A.sizes(), ", B is ",
              Bt.sizes());
  TORCH_CHECK(A.size(0) == Bt.size(0), op, ": batch sizes differ: ", A.size(0), " vs ",
              Bt.size(0));
  c10::cuda::CUDAGuard guard(A.device());
  const int64_t n3 = A.size(1);
  if (A.numel() == 0 || Bt.numel() == 0)
    return at::zeros({A.size(0), n3, A.size(2), Bt.size(3)}, A.options());
  // Small n3: own tube DFT kernels around cuBLAS; large n3: cuFFT.
  const Tensor ch = at::matmul(tube_rfft_impl(A), tube_rfft_impl(Bt));
  return tube_irfft_impl(ch, n3);
}

// ---------------------------------------------------------------------------------------
// Fourier-domain factors shared by the forward and the backward.
struct Factors {
  Tensor uh;  // (B, nf, n1, r) complex
  Tensor sh;  // (B, nf, 1, r)  complex
  Tensor vh;  // (B, nf, n2, r) complex
  Tensor ah;  // uh * sh
};

void check_factors(const char* op, const Tensor& U, const Tensor& S, const Tensor& V) {
  check_real(U, op, "U", 4);
  check_real(S, op, "S", 3);
  check_real(V, op, "V", 4);
  check_same(U, S, op, "S");
  check_same(U, V, op, "V");
  const int64_t B = U.size(0), n3 = U.size(1), r = U.size(3);
  TORCH_CHECK(n3 >= 1, op, ": U must have n3 >= 1 tubes, got shape ", U.sizes());
  TORCH_CHECK(S.size(0) == B && S.size(1) == n3 && S.size(2) == r, op,
              ": S must be (B, n3, r) = (", B, ", ", n3, ", ", r, "), got ", S.sizes());
  TORCH_CHECK(V.size(0) == B && V.size(1) == n3 && V.size(3) == r, op,
              ": V must be (B, n3, n2, r) with B = ", B, ", n3 = ", n3, ", r = ", r, ", got ",
              V.sizes());
}

Factors factors(const Tensor& U, const Tensor& S, const Tensor& V) {
  Factors f;
  f.uh = tube_rfft_impl(U);
  f.sh = tube_rfft_impl(S.unsqueeze(2));
  f.vh = tube_rfft_impl(V);
  f.ah = f.uh * f.sh;
  return f;
}

Tensor treconstruct_impl(const Tensor& U, const Tensor& S, const Tensor& V,
                         const std::optional<Tensor>& residual) {
  const char* op = "tsvd::treconstruct";
  check_factors(op, U, S, V);
  c10::cuda::CUDAGuard guard(U.device());
  const int64_t B = U.size(0), n3 = U.size(1), n1 = U.size(2), r = U.size(3), n2 = V.size(2);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_real(*residual, op, "residual", 4);
    check_same(U, *residual, op, "residual");
    TORCH_CHECK(residual->size(0) == B && residual->size(1) == n3 && residual->size(2) == n1 &&
                    residual->size(3) == n2,
                op, ": residual must be (", B, ", ", n3, ", ", n1, ", ", n2, "), got ",
                residual->sizes());
  }
  if (B * n1 * n2 == 0) return at::zeros({B, n3, n1, n2}, U.options());
  if (r == 0) return has_res ? residual->clone(at::MemoryFormat::Contiguous)
                             : at::zeros({B, n3, n1, n2}, U.options());
  if (v2_tube(U.scalar_type(), n3) && tsvd::cuda::v2_supported(n3, r, n1, n2) && B <= 65535) {
    // v2: one prep launch (factor transforms) and one main launch; a2 and b2 share one
    // scratch buffer.
    const int64_t nf = n3 / 2 + 1;
    const Tensor u = U.contiguous(), s = S.contiguous(), v = V.contiguous();
    Tensor res;
    if (has_res) res = residual->contiguous();
    Tensor scratch = at::empty({B * (n1 + n2) * r * nf * 2}, U.options());
    Tensor out = at::empty({B, n3, n1, n2}, U.options());
    float* a2 = scratch.data_ptr<float>();
    C10_CUDA_CHECK(tsvd::cuda::launch_treconstruct_fwd_v2(
        u.data_ptr<float>(), s.data_ptr<float>(), v.data_ptr<float>(),
        has_res ? res.data_ptr<float>() : nullptr, out.data_ptr<float>(), a2,
        a2 + B * n1 * r * nf * 2, B, n3, n1, n2, r, stream_of(out)));
    return out;
  }
  const Factors fa = factors(U, S, V);
  if (!fused(n3)) {
    Tensor out = at::fft_irfft(at::matmul(fa.ah, at::conj_physical(fa.vh).transpose(-2, -1)), n3, 1).contiguous();
    return has_res ? out.add_(*residual) : out;
  }
  // a: (B, nf, n1, 2, r); bt: (B, nf, 2, r, n2) (coalesced along j in the kernel).
  const Tensor a = at::view_as_real(fa.ah).permute({0, 1, 2, 4, 3}).contiguous();
  const Tensor bt = at::view_as_real(fa.vh).permute({0, 1, 4, 3, 2}).contiguous();
  Tensor res;
  if (has_res) res = residual->contiguous();
  Tensor out = at::empty({B, n3, n1, n2}, U.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "tsvd_treconstruct_cuda", [&] {
    C10_CUDA_CHECK(tsvd::cuda::launch_treconstruct_fwd<scalar_t>(
        a.data_ptr<scalar_t>(), bt.data_ptr<scalar_t>(),
        has_res ? res.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), B, n3, n1, n2, r,
        /*num_sms=*/0, stream_of(out)));
  });
  return out;
}

// Adjoint of the half-spectrum rfft along dim 1: Re(sum_f g_f e^{+i th}) = irfft(g n3 / w_f).
Tensor rfft_adjoint(const Tensor& gh, int64_t n3) {
  const int64_t nf = gh.size(1);
  auto real = gh.scalar_type() == at::kComplexDouble ? at::kDouble : at::kFloat;
  // n3 / w_f = 1 / (w_f / n3) (weights n3 for DC and Nyquist, n3 / 2 otherwise)
  Tensor d = at::full({nf}, double(n3) / 2.0, gh.options().dtype(real));
  d.narrow(0, 0, 1).fill_(double(n3));
  if (n3 % 2 == 0 && nf > 1) d.narrow(0, nf - 1, 1).fill_(double(n3));
  return tube_irfft_impl(gh * d.view({1, nf, 1, 1}), n3);
}

std::tuple<Tensor, Tensor, Tensor> treconstruct_backward_impl(const Tensor& grad, const Tensor& U,
                                                               const Tensor& S, const Tensor& V) {
  const char* op = "tsvd::treconstruct_backward";
  check_factors(op, U, S, V);
  check_real(grad, op, "grad", 4);
  check_same(U, grad, op, "grad");
  c10::cuda::CUDAGuard guard(U.device());
  const int64_t B = U.size(0), n3 = U.size(1), n1 = U.size(2), r = U.size(3), n2 = V.size(2);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == n3 && grad.size(2) == n1 && grad.size(3) == n2,
              op, ": grad must be (", B, ", ", n3, ", ", n1, ", ", n2, "), got ", grad.sizes());
  if (B * n1 * n2 * r == 0)
    return {at::zeros_like(U, at::MemoryFormat::Contiguous),
            at::zeros_like(S, at::MemoryFormat::Contiguous),
            at::zeros_like(V, at::MemoryFormat::Contiguous)};
  const int64_t nf = n3 / 2 + 1;
  if (v2_tube(U.scalar_type(), n3) && tsvd::cuda::v2_supported(n3, r, n1, n2)) {
    // v2: prep (conj(A), Vh) -> Gh = rfft(G) -> two batched complex GEMMs (cuBLAS through
    // ATen; Gh^T is a transposed view, no copy) -> post (gU, gS, gV): six launches.
    const Tensor u = U.contiguous(), s = S.contiguous(), v = V.contiguous();
    Tensor scratch = at::empty({B * nf * (n1 + n2) * r * 2}, U.options());
    const int64_t na = B * nf * n1 * r * 2;
    C10_CUDA_CHECK(tsvd::cuda::launch_treconstruct_bwd_prep_v2(
        u.data_ptr<float>(), s.data_ptr<float>(), v.data_ptr<float>(), scratch.data_ptr<float>(),
        scratch.data_ptr<float>() + na, B, n3, n1, n2, r, stream_of(u)));
    const Tensor ca = at::view_as_complex(scratch.narrow(0, 0, na).view({B, nf, n1, r, 2}));
    const Tensor vh = at::view_as_complex(
        scratch.narrow(0, na, B * nf * n2 * r * 2).view({B, nf, n2, r, 2}));
    const Tensor gh = tube_rfft_impl(grad);
    Tensor P, Q;
    if (v2_fused_pq() && tsvd::cuda::bwd_pq_v2_supported(r)) {
      P = at::zeros({B, nf, n1, r}, gh.options());
      Q = at::zeros({B, nf, n2, r}, gh.options());
      const Tensor ghc = gh.contiguous();
      C10_CUDA_CHECK(tsvd::cuda::launch_treconstruct_bwd_pq_v2(
          at::view_as_real(ghc).data_ptr<float>(), at::view_as_real(vh).data_ptr<float>(),
          at::view_as_real(ca).data_ptr<float>(), at::view_as_real(P).data_ptr<float>(),
          at::view_as_real(Q).data_ptr<float>(), B * nf, n1, n2, r, stream_of(u)));
    } else {
      P = at::matmul(gh, vh).contiguous();
      Q = at::matmul(gh.transpose(-2, -1), ca).contiguous();
    }
    Tensor gU = at::empty({B, n3, n1, r}, U.options());
    Tensor gV = at::empty({B, n3, n2, r}, U.options());
    Tensor gS = at::zeros({B, n3, r}, U.options());
    C10_CUDA_CHECK(tsvd::cuda::launch_treconstruct_bwd_post_v2(
        at::view_as_real(P).data_ptr<float>(), at::view_as_real(Q).data_ptr<float>(),
        u.data_ptr<float>(), s.data_ptr<float>(), gU.data_ptr<float>(), gS.data_ptr<float>(),
        gV.data_ptr<float>(), B, n3, n1, n2, r, stream_of(u)));
    return {gU, gS, gV};
  }
  const Factors fa = factors(U, S, V);
  Tensor gah, gbh;  // (B, nf, n1, r), (B, nf, n2, r): (c Gh) Vh and (c Gh)^H A
  if (!fused(n3)) {
    const Tensor c = freq_weights(n3, nf, 1.0, U.options()).view({1, nf, 1, 1});
    const Tensor gh = at::fft_rfft(grad, std::nullopt, 1) * c;
    gah = at::matmul(gh, fa.vh);
    gbh = at::matmul(at::conj_physical(gh).transpose(-2, -1), fa.ah);
  } else {
    const Tensor g = grad.contiguous();
    const Tensor a = at::view_as_real(fa.ah).permute({0, 1, 2, 4, 3}).contiguous();
    const Tensor bk = at::view_as_real(fa.vh).permute({0, 1, 2, 4, 3}).contiguous();
    Tensor ga = at::zeros({B, nf, n1, 2, r}, U.options());
    Tensor gb = at::zeros({B, nf, n2, 2, r}, U.options());
    AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "tsvd_treconstruct_backward_cuda", [&] {
      C10_CUDA_CHECK(tsvd::cuda::launch_treconstruct_bwd<scalar_t>(
          g.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), bk.data_ptr<scalar_t>(),
          ga.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), B, n3, n1, n2, r, stream_of(g)));
    });
    gah = at::view_as_complex(ga.permute({0, 1, 2, 4, 3}).contiguous());
    gbh = at::view_as_complex(gb.permute({0, 1, 2, 4, 3}).contiguous());
  }
  // A = Uh diag(Sh): gUh = gA conj(Sh), gSh = sum_i conj(Uh) gA.
  // conj_physical, not the lazy conj() view (as on the CPU path): on an H200 with torch
  // 2.11, every call made from torch.compile'd code (backend "eager" included) gave gU and
  // gS as if the conjugation were dropped, while gV (no conj) stayed right
  // (bench/results/h200_*/aot_conj.log).
  const Tensor guh = gah * at::conj_physical(fa.sh);
  const Tensor gsh = (at::conj_physical(fa.uh) * gah).sum(2, /*keepdim=*/true);
  Tensor gU = rfft_adjoint(guh, n3);
  Tensor gS = rfft_adjoint(gsh, n3).squeeze(2);
  Tensor gV = rfft_adjoint(gbh, n3);
  return {gU, gS, gV};
}

}  // namespace

TORCH_LIBRARY_IMPL(tsvd, CUDA, m) {
  m.impl("treconstruct", TORCH_FN(treconstruct_impl));
  m.impl("treconstruct_backward", TORCH_FN(treconstruct_backward_impl));
  m.impl("tprod", TORCH_FN(tprod_impl));
  m.impl("tube_rfft", TORCH_FN(tube_rfft_impl));
  m.impl("tube_irfft", TORCH_FN(tube_irfft_impl));
}

}  // namespace cuda_ops
}  // namespace tsvd
