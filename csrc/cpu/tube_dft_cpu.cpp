// Real DFT along the tube axis (dim 1 of (B, n3, n1, n2)) and the t-product on CPU.
//
// tube_rfft / tube_irfft: for short tubes the DFT is done as a small dense product on
// tiles of JB contiguous elements of the (n1, n2) plane (csrc/kernels/dft.h): one pass
// over the input, one over the output, no transposes. For long tubes (n3 above kDftMaxN3*)
// pocketfft (at::fft_rfft) is used: its cost grows as n3 log n3 against the DFT's n3^2.
// tprod: rfft of both operands, a batched complex matmul per frequency (MKL), irfft.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_ops.h"
#include "../kernels/dft.h"
#include "isa.h"

namespace tsvd {
namespace cpu {
namespace {

// DFT-as-product up to these tube lengths, pocketfft (at::fft_rfft/irfft) above: the DFT
// costs ~n3/2 FMAs per element against the FFT's O(log n3) but streams the big tensor
// once, in long runs. Measured with bench/kernels.py --ops rfft irfft on the 2-core
// Xeon (AVX-512), float32, 2026-11-26: rfft is 1.3-1.6x faster than pocketfft at n3 = 12
// and 48; irfft 1.4x at n3 = 12 and 0.8-0.9x of a bare pocketfft at n3 = 48, but the
// pocketfft result along dim 1 needs a strided copy to be contiguous, which made the
// fallback 0.24x of plain torch.fft.irfft at n3 = 48: the DFT is kept up to 64 both ways.
constexpr int64_t kDftMaxN3Forward = 64;
constexpr int64_t kDftMaxN3Inverse = 64;

// Both DFTs work on chunks of CJ tiles of the flattened (n1*n2) plane, in two phases
// with a per-thread buffer of the chunk's spectrum (<= kChunkBytes): the real-space
// side is streamed with t outermost (runs of CJ*JB contiguous elements per t), the
// spectrum side with f outermost. The loops are in tile_loops.h (per ISA, isa.h).

template <typename T>
void rfft_run(const T* x, T* out /* interleaved complex (B,nf,P,2) */, int64_t B, int64_t n3,
              int64_t P) {
  const Kernels<T>& K = kernels<T>();
  const int64_t JB = K.jb;
  const int64_t nf = n_freq(n3), nt = n3 / 2 + 1;
  std::vector<T> fc(nt * nf), fs(nt * nf);
  make_dft_tables<T>(n3, DftScale::kUnit, fc.data(), fs.data());
  const int64_t ntile = (P + JB - 1) / JB;
  const int64_t cj = std::max<int64_t>(1, std::min<int64_t>(ntile, kChunkBytes / (nf * 2 * JB * int64_t(sizeof(T)))));
  const int64_t nchunk = (ntile + cj - 1) / cj;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (cj * JB * n3));
  const RfftArgs<T> p{x, fc.data(), fs.data(), out, B, n3, P, cj};
  const int64_t scratch = 2 * cj * nf * JB + 2 * nt * JB + n3 * JB;
  at::parallel_for(0, B * nchunk, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(scratch, T(0));
    K.rfft(p, begin, end, buf.data());
  });
}

// xh: interleaved complex with strides (in T units) sb, sf, s1, s2 for (B, nf, n1, n2): any
// layout is read directly (torch.fft.rfft along dim 1 returns f as the fastest dim).
template <typename T>
void irfft_run(const T* xh, int64_t sb, int64_t sf, int64_t s1, int64_t s2, T* out, int64_t B,
               int64_t n3, int64_t n2, int64_t P) {
  const Kernels<T>& K = kernels<T>();
  const int64_t JB = K.jb;
  const int64_t nf = n_freq(n3), nt = n3 / 2 + 1;
  std::vector<T> ic(nt * nf), is(nt * nf);
  make_dft_tables<T>(n3, DftScale::kIrfft, ic.data(), is.data());
  const int64_t ntile = (P + JB - 1) / JB;
  const int64_t cj = std::max<int64_t>(1, std::min<int64_t>(ntile, kChunkBytes / (nf * 2 * JB * int64_t(sizeof(T)))));
  const int64_t nchunk = (ntile + cj - 1) / cj;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (cj * JB * n3));
  const IrfftArgs<T> p{xh, ic.data(), is.data(), out, sb, sf, s1, s2, B, n3, n2, P, cj};
  const int64_t scratch = 2 * cj * nf * JB + n3 * JB;
  at::parallel_for(0, B * nchunk, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(scratch, T(0));
    std::vector<int64_t> offs(cj * JB);
    K.irfft(p, begin, end, buf.data(), offs.data());
  });
}

}  // namespace

at::Tensor tube_rfft(const at::Tensor& X) {
  TORCH_CHECK(X.dim() == 4, "tsvd::tube_rfft: X must be (B, n3, n1, n2), got ", X.sizes());
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble,
              "tsvd::tube_rfft: expected float32 or float64, got ", X.scalar_type());
  const auto B = X.size(0), n3 = X.size(1), n1 = X.size(2), n2 = X.size(3);
  TORCH_CHECK(n3 >= 1, "tsvd::tube_rfft: n3 must be >= 1");
  if (n3 > kDftMaxN3Forward) return at::fft_rfft(X, std::nullopt, 1).contiguous();
  const int64_t nf = n_freq(n3);
  auto out = at::empty({B, nf, n1, n2}, X.options().dtype(c10::toComplexType(X.scalar_type())));
  if (out.numel() == 0) return out;
  auto x = X.contiguous();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "tsvd_tube_rfft_cpu", [&] {
    rfft_run<scalar_t>(x.data_ptr<scalar_t>(), at::view_as_real(out).data_ptr<scalar_t>(), B,
                          n3, n1 * n2);
  });
  return out;
}

at::Tensor tube_irfft(const at::Tensor& Xh, int64_t n3) {
  TORCH_CHECK(Xh.dim() == 4, "tsvd::tube_irfft: Xh must be (B, nf, n1, n2), got ", Xh.sizes());
  TORCH_CHECK(Xh.scalar_type() == at::kComplexFloat || Xh.scalar_type() == at::kComplexDouble,
              "tsvd::tube_irfft: expected complex64 or complex128, got ", Xh.scalar_type());
  TORCH_CHECK(n3 >= 1, "tsvd::tube_irfft: n3 must be >= 1, got ", n3);
  const int64_t nf = n_freq(n3);
  TORCH_CHECK(Xh.size(1) == nf, "tsvd::tube_irfft: Xh must have n3//2+1 = ", nf,
              " frequencies along dim 1, got ", Xh.size(1));
  const auto B = Xh.size(0), n1 = Xh.size(2), n2 = Xh.size(3);
  if (n3 > kDftMaxN3Inverse) return at::fft_irfft(Xh, n3, 1).contiguous();
  auto rt = c10::toRealValueType(Xh.scalar_type());
  auto out = at::empty({B, n3, n1, n2}, Xh.options().dtype(rt));
  if (out.numel() == 0) return out;
  auto xr = at::view_as_real(Xh.resolve_conj());
  AT_DISPATCH_FLOATING_TYPES(rt, "tsvd_tube_irfft_cpu", [&] {
    irfft_run<scalar_t>(xr.data_ptr<scalar_t>(), xr.stride(0), xr.stride(1), xr.stride(2),
                           xr.stride(3), out.data_ptr<scalar_t>(), B, n3, n2, n1 * n2);
  });
  return out;
}

at::Tensor tprod(const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(A.dim() == 4 && B.dim() == 4, "tsvd::tprod: A (B,n3,n1,n2) and B (B,n3,n2,n4) "
              "must be 4-d, got ", A.sizes(), " and ", B.sizes());
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "tsvd::tprod: A and B must have the same dtype");
  TORCH_CHECK(A.size(0) == B.size(0) && A.size(1) == B.size(1) && A.size(3) == B.size(2),
              "tsvd::tprod: shapes do not match: A ", A.sizes(), ", B ", B.sizes());
  const auto n3 = A.size(1);
  return tube_irfft(at::matmul(tube_rfft(A), tube_rfft(B)), n3);
}

}  // namespace cpu
}  // namespace tsvd

TORCH_LIBRARY_IMPL(tsvd, CPU, m) {
  m.impl("tube_rfft", &tsvd::cpu::tube_rfft);
  m.impl("tube_irfft", &tsvd::cpu::tube_irfft);
  m.impl("tprod", &tsvd::cpu::tprod);
}
