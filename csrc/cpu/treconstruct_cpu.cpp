// Fused treconstruct (residual + U * fdiag(S) * V^T) forward and backward on CPU.
//
// The rank-r factors are moved to the Fourier domain with ATen (tiny tensors), then one
// tiled pass over the big (B, n3, n1, n2) tensor: per tile of IB rows x JB columns,
// Yh_f for all nf frequencies is formed in L1 and inverted with the cos/sin tables
// (csrc/kernels/dft.h), the residual added and the output written once. The backward
// reads the output gradient once, takes its real DFT per tile and accumulates
// Gh_f Vh_f (rows owned by the thread) and Gh_f^H A_f (per-thread buffer, reduced).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu_ops.h"
#include "../kernels/dft.h"
#include "../kernels/treconstruct.h"
#include "simd.h"

namespace tsvd {
namespace cpu {
namespace {

// Tile shapes. JB = NV * lanes columns, IB rows share each load of Vh, TB (t, n3-t) pairs
// are register-blocked in the DFTs. Work on a block of IB rows goes in two phases over
// chunks of JC columns: (1) Yh (or Gh) of every tile of the chunk into a per-thread
// buffer (kept under kChunkBytes, i.e. in L2), (2) the DFT with t outermost, so the big
// tensor is read and written in runs of JC contiguous elements per t instead of JB.
constexpr int64_t kChunkBytes = 512 * 1024;
// Problems with fewer elements than this run on one thread (thread start-up dominates).
constexpr int64_t kSerialElems = 1 << 16;
template <typename T> struct Tile {
  using V = typename Simd<T>::type;
  static constexpr int L = int(sizeof(V) / sizeof(T));
  static constexpr int NV = 1, JB = NV * L, IB = 4, TB = 4, FB = 4;
};

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
void trec_forward_kernel(const T* a, const T* bt, const T* res, T* out, int64_t B, int64_t n3,
                         int64_t n1, int64_t n2, int64_t n2p, int64_t r) {
  using V = typename Tile<T>::V;
  constexpr int NV = Tile<T>::NV, JB = Tile<T>::JB, IB = Tile<T>::IB, TB = Tile<T>::TB;
  const int64_t nf = n_freq(n3), nt = n3 / 2 + 1, h = n_pairs(n3);
  std::vector<T> ic(nt * nf), is(nt * nf);
  make_dft_tables<T>(n3, DftScale::kIrfft, ic.data(), is.data());
  const T* icp = ic.data();
  const T* isp = is.data();
  const int64_t nblk = (n1 + IB - 1) / IB;
  const int64_t plane = n1 * n2;
  const int64_t njb = (n2 + JB - 1) / JB;
  const int64_t cjb = std::max<int64_t>(1, std::min<int64_t>(njb, kChunkBytes / (IB * nf * 2 * JB * int64_t(sizeof(T)))));
  const int64_t grain = std::max<int64_t>(1, kSerialElems / std::max<int64_t>(1, IB * n2 * n3));
  at::parallel_for(0, B * nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> yrb(cjb * IB * nf * JB), yib(cjb * IB * nf * JB), tin(n3 * JB), tout(n3 * JB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, i0 = (task % nblk) * IB;
      const int64_t rows = std::min<int64_t>(IB, n1 - i0);
      const T* ab = a + b * nf * n1 * 2 * r;
      const T* bb = bt + b * nf * 2 * r * n2p;
      const T* rb = res ? res + b * n3 * plane + i0 * n2 : nullptr;
      T* ob = out + b * n3 * plane + i0 * n2;
      for (int64_t jc = 0; jc < njb; jc += cjb) {
        const int64_t nj = std::min<int64_t>(cjb, njb - jc);
        // phase 1: Yh of every tile of the chunk
        for (int64_t q = 0; q < nj; ++q) {
          const int64_t j0 = (jc + q) * JB;
          T* yr = yrb.data() + q * IB * nf * JB;
          T* yi = yib.data() + q * IB * nf * JB;
          if (rows == IB) {
            trec_yhat_tile<T, V, NV, IB>(nf, r, n1, n2p, i0, j0, ab, bb, yr, yi);
          } else {
            for (int64_t ib = 0; ib < rows; ++ib)
              trec_yhat_tile<T, V, NV, 1>(nf, r, n1, n2p, i0 + ib, j0, ab, bb, yr + ib * nf * JB,
                                          yi + ib * nf * JB);
          }
        }
        // phase 2: inverse DFT, t outermost, full tiles
        const bool tail = (jc + nj == njb) && (n2 % JB != 0);
        const int64_t nfull = tail ? nj - 1 : nj;
        auto tile = [&](int64_t q, int64_t ib, const T*& yr, const T*& yi, int64_t& off) {
          yr = yrb.data() + (q * IB + ib) * nf * JB;
          yi = yib.data() + (q * IB + ib) * nf * JB;
          off = ib * n2 + (jc + q) * JB;
        };
        const T *yr, *yi;
        int64_t off;
        for (int64_t ib = 0; ib < rows; ++ib)
          for (int64_t q = 0; q < nfull; ++q) {
            tile(q, ib, yr, yi, off);
            irdft_real_row<T, V, NV>(nf, 0, icp, yr, rb ? rb + off : nullptr, plane, ob + off, plane);
          }
        int64_t t = 1;
        for (; t + TB - 1 <= h; t += TB)
          for (int64_t ib = 0; ib < rows; ++ib)
            for (int64_t q = 0; q < nfull; ++q) {
              tile(q, ib, yr, yi, off);
              irdft_pairs_block<T, V, NV, TB>(n3, nf, t, icp, isp, yr, yi, rb ? rb + off : nullptr,
                                              plane, ob + off, plane);
            }
        for (; t <= h; ++t)
          for (int64_t ib = 0; ib < rows; ++ib)
            for (int64_t q = 0; q < nfull; ++q) {
              tile(q, ib, yr, yi, off);
              irdft_pairs_block<T, V, NV, 1>(n3, nf, t, icp, isp, yr, yi, rb ? rb + off : nullptr,
                                             plane, ob + off, plane);
            }
        if (n3 % 2 == 0 && n3 > 1)
          for (int64_t ib = 0; ib < rows; ++ib)
            for (int64_t q = 0; q < nfull; ++q) {
              tile(q, ib, yr, yi, off);
              irdft_real_row<T, V, NV>(nf, n3 / 2, icp, yr, rb ? rb + off : nullptr, plane,
                                       ob + off, plane);
            }
        if (tail) {  // last, partial tile: through a padded copy
          const int64_t q = nj - 1, w = n2 - (jc + q) * JB;
          for (int64_t ib = 0; ib < rows; ++ib) {
            tile(q, ib, yr, yi, off);
            const T* rp = nullptr;
            if (rb) {
              std::fill(tin.begin(), tin.end(), T(0));
              for (int64_t tt = 0; tt < n3; ++tt)
                std::memcpy(tin.data() + tt * JB, rb + off + tt * plane, w * sizeof(T));
              rp = tin.data();
            }
            irdft_tile<T, V, NV, TB>(n3, icp, isp, yr, yi, rp, JB, tout.data(), JB);
            for (int64_t tt = 0; tt < n3; ++tt)
              std::memcpy(ob + off + tt * plane, tout.data() + tt * JB, w * sizeof(T));
          }
        }
      }
    }
  });
}

// k-slices of the packed rank dimension: NK vectors of L lanes at a time.
template <typename T, int IB>
void grad_tile_all_k(int64_t nf, int64_t n1, int64_t n2, int64_t RR, int64_t i0, int64_t j0,
                     int64_t w, const T* gr, const T* gi, const T* a, const T* a2, const T* bk,
                     const T* bk2, T* ga, T* gb) {
  using V = typename Tile<T>::V;
  constexpr int L = Tile<T>::L, JB = Tile<T>::JB;
  int64_t k0 = 0;
  for (; k0 + 2 * L <= RR; k0 += 2 * L)
    trec_grad_tile<T, V, 2, JB, IB>(nf, n1, n2, RR, k0, i0, j0, w, gr, gi, a, a2, bk, bk2, ga, gb);
  if (k0 < RR)
    trec_grad_tile<T, V, 1, JB, IB>(nf, n1, n2, RR, k0, i0, j0, w, gr, gi, a, a2, bk, bk2, ga, gb);
}

// g: (B,n3,n1,n2); a, a2: (B,nf,n1,RR); bk, bk2: (B,nf,n2,RR); gA (B,nf,n1,RR) and
// gB (B,nf,n2,RR) zero-initialised outputs, [re | im] packed (RR = 2 r', r' padded).
template <typename T>
void trec_backward_kernel(const T* g, const T* a, const T* a2, const T* bk, const T* bk2, T* gA,
                          T* gB, int64_t B, int64_t n3, int64_t n1, int64_t n2, int64_t RR) {
  using V = typename Tile<T>::V;
  constexpr int NV = Tile<T>::NV, JB = Tile<T>::JB, IB = Tile<T>::IB, TB = Tile<T>::TB,
                FB = Tile<T>::FB;
  const int64_t nf = n_freq(n3), nt = n3 / 2 + 1, h = n_pairs(n3);
  std::vector<T> fc(nt * nf), fs(nt * nf);
  make_dft_tables<T>(n3, DftScale::kUnit, fc.data(), fs.data());
  const T* fcp = fc.data();
  const T* fsp = fs.data();
  const int64_t nblk = (n1 + IB - 1) / IB;
  const int64_t plane = n1 * n2;
  const int64_t njb = (n2 + JB - 1) / JB;
  const int64_t cjb = std::max<int64_t>(1, std::min<int64_t>(njb, kChunkBytes / (IB * nf * 2 * JB * int64_t(sizeof(T)))));
  std::mutex mu;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t fa = b * nf * n1 * RR, fb = b * nf * n2 * RR;
    const int64_t grain = std::max<int64_t>(1, kSerialElems / std::max<int64_t>(1, IB * n2 * n3));
    at::parallel_for(0, nblk, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> gb(nf * n2 * RR, T(0));
      std::vector<T> grb(cjb * IB * nf * JB), gib(cjb * IB * nf * JB), work(2 * nt * JB),
          tin(n3 * JB, T(0));
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t i0 = blk * IB;
        const int64_t rows = std::min<int64_t>(IB, n1 - i0);
        const T* gbase = g + b * n3 * plane + i0 * n2;
        for (int64_t jc = 0; jc < njb; jc += cjb) {
          const int64_t nj = std::min<int64_t>(cjb, njb - jc);
          const bool tail = (jc + nj == njb) && (n2 % JB != 0);
          const int64_t nfull = tail ? nj - 1 : nj;
          auto tile = [&](int64_t q, int64_t ib, T*& xr, T*& xi, int64_t& off) {
            xr = grb.data() + (q * IB + ib) * nf * JB;
            xi = gib.data() + (q * IB + ib) * nf * JB;
            off = ib * n2 + (jc + q) * JB;
          };
          T *xr, *xi;
          int64_t off;
          // phase 1: Gh of every tile of the chunk, t outermost
          for (int64_t ib = 0; ib < rows; ++ib)
            for (int64_t q = 0; q < nfull; ++q) {
              tile(q, ib, xr, xi, off);
              rdft_real_accum<T, V, NV>(nf, 0, fcp, gbase + off, xr, xi, true);
            }
          int64_t t = 1;
          for (; t + TB - 1 <= h; t += TB)
            for (int64_t ib = 0; ib < rows; ++ib)
              for (int64_t q = 0; q < nfull; ++q) {
                tile(q, ib, xr, xi, off);
                rdft_pairs_accum<T, V, NV, TB>(n3, nf, t, fcp, fsp, gbase + off, plane, xr, xi);
              }
          for (; t <= h; ++t)
            for (int64_t ib = 0; ib < rows; ++ib)
              for (int64_t q = 0; q < nfull; ++q) {
                tile(q, ib, xr, xi, off);
                rdft_pairs_accum<T, V, NV, 1>(n3, nf, t, fcp, fsp, gbase + off, plane, xr, xi);
              }
          if (n3 % 2 == 0 && n3 > 1)
            for (int64_t ib = 0; ib < rows; ++ib)
              for (int64_t q = 0; q < nfull; ++q) {
                tile(q, ib, xr, xi, off);
                rdft_real_accum<T, V, NV>(nf, n3 / 2, fcp, gbase + off + (n3 / 2) * plane, xr, xi,
                                          false);
              }
          if (tail) {  // partial tile through a zero-padded copy
            const int64_t q = nj - 1, w = n2 - (jc + q) * JB;
            for (int64_t ib = 0; ib < rows; ++ib) {
              tile(q, ib, xr, xi, off);
              for (int64_t tt = 0; tt < n3; ++tt)
                std::memcpy(tin.data() + tt * JB, gbase + off + tt * plane, w * sizeof(T));
              rdft_tile<T, V, NV, FB>(n3, fcp, fsp, tin.data(), JB, work.data(), xr, xi);
            }
          }
          // phase 2: accumulate Gh Vh (rows owned here) and Gh^H A (per-thread buffer)
          for (int64_t q = 0; q < nj; ++q) {
            const int64_t j0 = (jc + q) * JB;
            const int64_t w = std::min<int64_t>(JB, n2 - j0);
            const T* gr = grb.data() + q * IB * nf * JB;
            const T* gi = gib.data() + q * IB * nf * JB;
            if (rows == IB) {
              grad_tile_all_k<T, IB>(nf, n1, n2, RR, i0, j0, w, gr, gi, a + fa, a2 + fa, bk + fb,
                                     bk2 + fb, gA + fa, gb.data());
            } else {
              for (int64_t ib = 0; ib < rows; ++ib)
                grad_tile_all_k<T, 1>(nf, n1, n2, RR, i0 + ib, j0, w, gr + ib * nf * JB,
                                      gi + ib * nf * JB, a + fa, a2 + fa, bk + fb, bk2 + fb,
                                      gA + fa, gb.data());
            }
          }
        }
      }
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
    constexpr int JB = Tile<T>::JB;
    const int64_t n2p = (n2 + JB - 1) / JB * JB;
    // bt: (B, nf, 2, r, n2p), j contiguous, zero padded
    auto vt = F.Vh.transpose(2, 3);  // (B, nf, r, n2)
    auto bt = at::stack({at::real(vt), at::imag(vt)}, 2);
    if (n2p != n2) bt = at::constant_pad_nd(bt, {0, n2p - n2}, 0);
    bt = bt.contiguous();
    trec_forward_kernel<T>(F.a.data_ptr<T>(), bt.data_ptr<T>(),
                           res.defined() ? res.data_ptr<T>() : nullptr, out.data_ptr<T>(), B, n3,
                           n1, n2, n2p, r);
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
  const int64_t half = U_.scalar_type() == at::kFloat ? Tile<float>::L / 2 : Tile<double>::L / 2;
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
      trec_backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                     a2.data_ptr<scalar_t>(), bk.data_ptr<scalar_t>(),
                                     bk2.data_ptr<scalar_t>(), gA.data_ptr<scalar_t>(),
                                     gB.data_ptr<scalar_t>(), B, n3, n1, n2, 2 * rp);
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
