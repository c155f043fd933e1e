// Fused treconstruct (residual + U * fdiag(S) * V^T) forward and backward on CPU.
//
// The rank-r factors are moved to the Fourier domain with ATen (tiny tensors), then one
// tiled pass over the big (B, n3, n1, n2) tensor: per tile of IB rows x JB columns,
// Yh_f for all nf frequencies is formed in L1 and inverted with the cos/sin tables
// (csrc/kernels/dft.h), the residual added and the output written once. The backward
// reads the output gradient once, takes its real DFT per tile and accumulates
// Gh_f Vh_f (rows owned by the thread) and Gh_f^H A_f (per-thread buffer, reduced).
// The tiled loops are in tile_loops.h, compiled per ISA and chosen at run time (isa.h);
// this file is the ATen glue: checks, factors, tables, buffers, threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "cpu_ops.h"
#include "isa.h"
#include "../kernels/dft.h"

namespace tsvd {
namespace cpu {
namespace {

// Problems with fewer elements than this run on one thread (thread start-up dominates).
constexpr int64_t kSerialElems = 1 << 16;

void check_factors(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  TORCH_CHECK(U.dim() == 4, "tsvd::treconstruct: U must be (B, n3, n1, r), got ", U.sizes());
  TORCH_CHECK(S.dim() == 3, "tsvd::treconstruct: S must be (B, n3, r), got ", S.sizes());
  TORCH_CHECK(V.dim() == 4, "tsvd::treconstruct: V must be (B, n3, n2, r), got ", V.sizes());
  TORCH_CHECK(U.scalar_type() == at::kFloat || U.scalar_type() == at::kDouble,
              "tsvd::treconstruct: expected float32 or float64, got ", U.scalar_type());
  TORCH_CHECK(S.scalar_type() == U.scalar_type() && V.scalar_type() == U.scalar_type(),
              "tsvd::treconstruct: U, S, V must have the same dtype");
  const auto B = U.size(0), n3 = U.size(1), r = U.size(3);
  TORCH_CHECK(S.size(0) == B && S.size(1) == n3 && S.size(2) == r,
              "tsvd::treconstruct: S must be (", B, ", ", n3, ", ", r, "), got ", S.sizes());
  TORCH_CHECK(V.size(0) == B && V.size(1) == n3 && V.size(3) == r,
              "tsvd::treconstruct: V must be (", B, ", ", n3, ", n2, ", r, "), got ", V.sizes());
  TORCH_CHECK(n3 >= 1 && r >= 1, "tsvd::treconstruct: n3 and r must be >= 1");
}

// Fourier-domain factors: Uh, Sh (complex), a = [re|im] of Uh*Sh laid out (B,nf,n1,2r).
struct Factors {
  at::Tensor Uh, Sh, Vh, a;
};

Factors fourier_factors(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  Factors F;
  F.Uh = at::fft_rfft(U, std::nullopt, 1);
  F.Sh = at::fft_rfft(S, std::nullopt, 1);
  F.Vh = at::fft_rfft(V, std::nullopt, 1);
  auto A = F.Uh * F.Sh.unsqueeze(2);
  F.a = at::cat({at::real(A), at::imag(A)}, -1).contiguous();
  return F;
}

template <typename T>
void trec_forward_run(const T* a, const T* bt, const T* res, T* out, int64_t B, int64_t n3,
                      int64_t n1, int64_t n2, int64_t n2p, int64_t r, const Kernels<T>& K) {
  const int64_t JB = K.jb, IB = K.ib;
  const int64_t nf = n_freq(n3), nt = n3 / 2 + 1;
  std::vector<T> ic(nt * nf), is(nt * nf);
  make_dft_tables<T>(n3, DftScale::kIrfft, ic.data(), is.data());
  const int64_t nblk = (n1 + IB - 1) / IB;
  const int64_t njb = (n2 + JB - 1) / JB;
  const int64_t cjb = std::max<int64_t>(1, std::min<int64_t>(njb, kChunkBytes / (IB * nf * 2 * JB * int64_t(sizeof(T)))));
  const int64_t grain = std::max<int64_t>(1, kSerialElems / std::max<int64_t>(1, IB * n2 * n3));
  const TrecForwardArgs<T> p{a, bt, res, ic.data(), is.data(), out, B, n3, n1, n2, n2p, r, cjb};
  const int64_t scratch = 2 * cjb * IB * nf * JB + 2 * n3 * JB;
  at::parallel_for(0, B * nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(scratch, T(0));
    K.trec_forward(p, begin, end, buf.data());
  });
}

// g: (B,n3,n1,n2); a, a2: (B,nf,n1,RR); bk, bk2: (B,nf,n2,RR); gA (B,nf,n1,RR) and
// gB (B,nf,n2,RR) zero-initialised outputs, [re | im] packed (RR = 2 r', r' padded).
template <typename T>
void trec_backward_run(const T* g, const T* a, const T* a2, const T* bk, const T* bk2, T* gA,
                       T* gB, int64_t B, int64_t n3, int64_t n1, int64_t n2, int64_t RR,
                       const Kernels<T>& K) {
  const int64_t JB = K.jb, IB = K.ib;
  const int64_t nf = n_freq(n3), nt = n3 / 2 + 1;
  std::vector<T> fc(nt * nf), fs(nt * nf);
  make_dft_tables<T>(n3, DftScale::kUnit, fc.data(), fs.data());
  const int64_t nblk = (n1 + IB - 1) / IB;
  const int64_t plane = n1 * n2;
  const int64_t njb = (n2 + JB - 1) / JB;
  const int64_t cjb = std::max<int64_t>(1, std::min<int64_t>(njb, kChunkBytes / (IB * nf * 2 * JB * int64_t(sizeof(T)))));
  const int64_t scratch = 2 * cjb * IB * nf * JB + 2 * nt * JB + n3 * JB;
  const int64_t grain = std::max<int64_t>(1, kSerialElems / std::max<int64_t>(1, IB * n2 * n3));
  std::mutex mu;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t fa = b * nf * n1 * RR, fb = b * nf * n2 * RR;
    const TrecBackwardArgs<T> p{g + b * n3 * plane, a + fa, a2 + fa, bk + fb, bk2 + fb,
                                fc.data(), fs.data(), gA + fa, n3, n1, n2, RR, cjb};
    at::parallel_for(0, nblk, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> gb(nf * n2 * RR, T(0)), buf(scratch, T(0));
      K.trec_backward(p, begin, end, gb.data(), buf.data());
      std::lock_guard<std::mutex> lock(mu);
      T* dst = gB + fb;
      for (int64_t x = 0; x < nf * n2 * RR; ++x) dst[x] += gb[x];
    });
  }
}

}  // namespace

at::Tensor treconstruct(const at::Tensor& U_, const at::Tensor& S_, const at::Tensor& V_,
                        const std::optional<at::Tensor>& residual) {
  check_factors(U_, S_, V_);
  const auto B = U_.size(0), n3 = U_.size(1), n1 = U_.size(2), r = U_.size(3);
  const auto n2 = V_.size(2);
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({B, n3, n1, n2}),
                "tsvd::treconstruct: residual must be (", B, ", ", n3, ", ", n1, ", ", n2,
                "), got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == U_.scalar_type(),
                "tsvd::treconstruct: residual must have the dtype of U");
    res = residual->contiguous();
  }
  auto out = at::empty({B, n3, n1, n2}, U_.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  auto F = fourier_factors(U_.contiguous(), S_.contiguous(), V_.contiguous());
  AT_DISPATCH_FLOATING_TYPES(U_.scalar_type(), "tsvd_treconstruct_cpu", [&] {
    using T = scalar_t;
    const Kernels<T>& K = kernels<T>();
    const int64_t JB = K.jb;
    const int64_t n2p = (n2 + JB - 1) / JB * JB;
    // bt: (B, nf, 2, r, n2p), j contiguous, zero padded
    auto vt = F.Vh.transpose(2, 3);  // (B, nf, r, n2)
    auto bt = at::stack({at::real(vt), at::imag(vt)}, 2);
    if (n2p != n2) bt = at::constant_pad_nd(bt, {0, n2p - n2}, 0);
    bt = bt.contiguous();
    trec_forward_run<T>(F.a.data_ptr<T>(), bt.data_ptr<T>(),
                        res.defined() ? res.data_ptr<T>() : nullptr, out.data_ptr<T>(), B, n3,
                        n1, n2, n2p, r, K);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> treconstruct_backward(const at::Tensor& grad,
                                                                     const at::Tensor& U_,
                                                                     const at::Tensor& S_,
                                                                     const at::Tensor& V_) {
  check_factors(U_, S_, V_);
  const auto B = U_.size(0), n3 = U_.size(1), n1 = U_.size(2), r = U_.size(3);
  const auto n2 = V_.size(2);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B, n3, n1, n2}),
              "tsvd::treconstruct_backward: grad must be (", B, ", ", n3, ", ", n1, ", ", n2,
              "), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == U_.scalar_type(),
              "tsvd::treconstruct_backward: grad must have the dtype of U");
  const int64_t nf = n_freq(n3);
  auto F = fourier_factors(U_.contiguous(), S_.contiguous(), V_.contiguous());
  auto g = grad.contiguous();
  // rank padded so that the packed [re | im] rows fill whole vectors
  const KernelSet& KS = active_kernels();  // one ISA for the padding and the loops
  const int64_t half = U_.scalar_type() == at::kFloat ? KS.f32.rank_multiple : KS.f64.rank_multiple;
  const int64_t rp = (r + half - 1) / half * half;
  auto pad = [&](const at::Tensor& x) { return rp == r ? x : at::constant_pad_nd(x, {0, rp - r}, 0); };
  auto A = pad(F.Uh * F.Sh.unsqueeze(2));  // (B,nf,n1,rp) complex
  auto Vh = pad(F.Vh);                      // (B,nf,n2,rp)
  auto Ar = at::real(A), Ai = at::imag(A), Br = at::real(Vh), Bi = at::imag(Vh);
  auto a = at::cat({Ar, Ai}, -1).contiguous();
  auto a2 = at::cat({Ai, -Ar}, -1).contiguous();
  auto bk = at::cat({Br, Bi}, -1).contiguous();
  auto bk2 = at::cat({-Bi, Br}, -1).contiguous();
  auto gA = at::zeros({B, nf, n1, 2 * rp}, U_.options());
  auto gB = at::zeros({B, nf, n2, 2 * rp}, U_.options());
  if (g.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(U_.scalar_type(), "tsvd_treconstruct_backward_cpu", [&] {
      trec_backward_run<scalar_t>(g.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                  a2.data_ptr<scalar_t>(), bk.data_ptr<scalar_t>(),
                                  bk2.data_ptr<scalar_t>(), gA.data_ptr<scalar_t>(),
                                  gB.data_ptr<scalar_t>(), B, n3, n1, n2, 2 * rp,
                                  of<scalar_t>(KS));
    });
  }
  auto gWh = at::complex(gA.narrow(-1, 0, r), gA.narrow(-1, rp, r));  // (B,nf,n1,r)
  auto gVh = at::complex(gB.narrow(-1, 0, r), gB.narrow(-1, rp, r));  // (B,nf,n2,r)
  auto gU = at::fft_irfft(gWh * at::conj_physical(F.Sh).unsqueeze(2), n3, 1);
  auto gS = at::fft_irfft((at::conj_physical(F.Uh) * gWh).sum(2), n3, 1);
  auto gV = at::fft_irfft(gVh, n3, 1);
  return {gU.contiguous(), gS.contiguous(), gV.contiguous()};
}

}  // namespace cpu
}  // namespace tsvd

TORCH_LIBRARY_IMPL(tsvd, CPU, m) {
  m.impl("treconstruct", &tsvd::cpu::treconstruct);
  m.impl("treconstruct_backward", &tsvd::cpu::treconstruct_backward);
}
