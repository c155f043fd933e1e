// The v2 CUDA kernels (issue 13), float32, for tube lengths fixed at compile time
// (12 and 48, the UNETR-Base LoRA-PT stacks). The glue (csrc/cuda/ops_cuda.cpp) runs them
// wherever they apply; TSVD_CUDA_KERNELS=v1 selects the v1 kernels (kernels.cu), which also
// handle every other case (float64, other n3).
//
//   trec_prep_v2   one launch for the factor transforms: a2 = rfft(U) rfft(S) and
//                  b2 = rfft(V), one thread per tube, in the layouts of the main kernel;
//   trec_fwd_v2    out = residual + irfft(A_f Vh_f^H): a block owns a strip of 32 columns j
//                  and a range of rows i; Vh of the strip sits in shared memory for all its
//                  rows; a thread owns one (i, j) at a time: it prefetches the N3 residual
//                  values of its tube (streaming loads), forms the F products in registers,
//                  and writes the tube with the compile-time inverse DFT (streaming stores).
//                  Per output element (N3 = 48, r = 8): ~23 instructions for the products
//                  (one shared and half a global 8-byte load per 4 FMA) and ~13 FMA for the
//                  inverse DFT, against ~225 for v1's kernel;
//   trec_bwd_prep_v2 / trec_bwd_post_v2   the backward around the glue's rfft of G and two
//                  batched complex GEMMs (bodies in fixed_dft.h);
//   tube_rfft_v2   rfft along dim 1 of (B, N3, E) -> (B, F, E) complex (the backward's
//                  transform of the output gradient, tprod's transforms);
//   tube_irfft_v2  the inverse.
// The arithmetic (fixed_dft.h) is shared with the CPU host harness of tests/test_cuda.py.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "fixed_dft.h"
#include "launch.h"

namespace tsvd {
namespace cuda {
namespace {

using cuda_fixed::irdft_fixed;
using cuda_fixed::rdft_fixed;
using cuda_fixed::static_for;
using cuda_fixed::yhat_fixed;

constexpr int kStrip = 32;        // columns j per block (one warp across them)
constexpr int kRowsPerPass = 8;   // rows per pass (8 warps)
constexpr int kV2Threads = kStrip * kRowsPerPass;

// ------------------------------------------------------------------------------------
// prep: U (B, N3, n1, r), S (B, N3, r), V (B, N3, n2, r) ->
//   a2 (B, n1, r, F) complex: rfft(U)[f, i, k] * rfft(S)[f, k]
//   b2 (B, r, F, n2) complex: rfft(V)[f, j, k]
// Threads [0, nU): U tubes, k fastest (coalesced reads of U); [nU, nU + nV): V tubes,
// j fastest (coalesced writes of b2).
// ------------------------------------------------------------------------------------
template <int N3>
__global__ void __launch_bounds__(kV2Threads)
trec_prep_v2(const float* __restrict__ U, const float* __restrict__ S, const float* __restrict__ V,
             float2* __restrict__ a2, float2* __restrict__ b2, int n1, int n2, int r, int64_t nU,
             int64_t nV) {
  constexpr int F = N3 / 2 + 1;
  int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < nU) {
    const int64_t k = idx % r, bi = idx / r, i = bi % n1, b = bi / n1;
    cuda_fixed::prep_u<N3, float, float2, false>(U + (b * N3 * n1 + i) * r + k, int64_t(n1) * r,
                                                 S + b * N3 * r + k, r,
                                                 a2 + ((b * n1 + i) * r + k) * F, 1);
  } else if (idx < nU + nV) {
    idx -= nU;
    const int64_t j = idx % n2, rest = idx / n2, k = rest % r, b = rest / r;
    cuda_fixed::prep_v<N3, float, float2>(V + (b * N3 * n2 + j) * r + k, int64_t(n2) * r,
                                          b2 + (b * r + k) * F * n2 + j, n2);
  }
}

// The main kernels' first step: the strip of b2 for columns j0 .. j0 + 31 into shared
// memory, sb[k * F + f][jj] (zero past n2), by all threads of the block.
__device__ __forceinline__ void stage_strip(const float2* __restrict__ bsrc, float2* sb, int nb,
                                            int j0, int n2, int tid) {
  for (int q = tid; q < nb; q += kV2Threads) {
    const int kf = q / kStrip, jj = q - kf * kStrip;
    const int j = j0 + jj;
    sb[q] = j < n2 ? bsrc[int64_t(kf) * n2 + j] : make_float2(0.f, 0.f);
  }
}

// ------------------------------------------------------------------------------------
// main: out (B, N3, n1, n2) = res + irfft_f(y), y_f[i, j] = sum_k a2[b, i, k, f] conj(b2[b, k, f, j])
// grid (ceil(n2 / 32), ceil(n1 / rows_per_block), B), block (32, 8); shared: b2's strip
// [r][F][32] (float2). Every thread reads its row's a2 from global memory inside the rank
// loop: r dependent rounds of loads. On an H200 (ncu, 2026-12-04, N3 = 48) 64 % of the
// stall cycles were waits on such loads, with 3.7 warps per scheduler to hide them; hence
// trec_fwd_v2_sa below, which this kernel backs up where its shared memory does not fit
// (or TSVD_V2_FWD_SA=0).
// ------------------------------------------------------------------------------------
template <int N3>
__global__ void __launch_bounds__(kV2Threads, 2)
trec_fwd_v2(const float2* __restrict__ a2, const float2* __restrict__ b2,
            const float* __restrict__ res, float* __restrict__ out, int n1, int n2, int r,
            int rows_per_block) {
  constexpr int F = N3 / 2 + 1;
  extern __shared__ float2 sb[];
  const int64_t b = blockIdx.z;
  const int j0 = blockIdx.x * kStrip;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kStrip + tx;
  const int nb = r * F * kStrip;
  stage_strip(b2 + b * r * F * n2, sb, nb, j0, n2, tid);
  __syncthreads();  // the only barrier: threads past n2 may leave after it
  const int j = j0 + tx;
  if (j >= n2) return;
  const int64_t plane = int64_t(n1) * n2;
  const int i_begin = blockIdx.y * rows_per_block;
  const int i_end = min(n1, i_begin + rows_per_block);
  for (int i = i_begin + ty; i < i_end; i += kRowsPerPass) {
    const int64_t off = b * N3 * plane + int64_t(i) * n2 + j;
    float rv[N3];
    if (res != nullptr) {
      static_for<N3>([&](auto tt) {
        constexpr int t = decltype(tt)::value;
        rv[t] = __ldcs(res + off + t * plane);
      });
    } else {
      static_for<N3>([&](auto tt) { rv[decltype(tt)::value] = 0.f; });
    }
    float yr[F], yi[F];
    yhat_fixed<N3, float, float2>(r, a2 + (b * n1 + i) * r * F, sb + tx, kStrip, yr, yi);
    float* o = out + off;
    irdft_fixed<N3>(yr, yi, [&](auto tt, float v) {
      constexpr int t = decltype(tt)::value;
      __stcs(o + t * plane, v + rv[t]);
    });
  }
}

// The same with the a2 rows staged (SA): each pass of 8 rows first copies their a2 into
// shared memory after the strip ([8][r][F] float2) with coalesced loads by the whole block,
// one load latency, so that the rank loop reads shared memory only (warp-uniform
// addresses: broadcasts). Two barriers per pass; the residual tube is prefetched before.
template <int N3, bool PREFETCH = true, int MIN_BLOCKS = 2>
__global__ void __launch_bounds__(kV2Threads, MIN_BLOCKS)
trec_fwd_v2_sa(const float2* __restrict__ a2, const float2* __restrict__ b2,
               const float* __restrict__ res, float* __restrict__ out, int n1, int n2, int r,
               int rows_per_block) {
  constexpr int F = N3 / 2 + 1;
  extern __shared__ float2 sb[];
  const int64_t b = blockIdx.z;
  const int j0 = blockIdx.x * kStrip;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kStrip + tx;
  const int nb = r * F * kStrip;
  const int rf = r * F;
  float2* sa = sb + nb;                           // [kRowsPerPass][r * F]
  stage_strip(b2 + b * r * F * n2, sb, nb, j0, n2, tid);
  const int j = j0 + tx;
  const int64_t plane = int64_t(n1) * n2;
  const int i_begin = blockIdx.y * rows_per_block;
  const int i_end = min(n1, i_begin + rows_per_block);
  // Every thread runs every pass (two barriers each), working only where (i, j) exists;
  // its residual tube is prefetched before the pass's rows of a2 are staged.
  for (int ib = i_begin; ib < i_end; ib += kRowsPerPass) {
    const int i = ib + ty;
    const bool work = j < n2 && i < i_end;
    const int64_t off = b * N3 * plane + int64_t(i) * n2 + j;
    float rv[PREFETCH ? N3 : 1];
    if constexpr (PREFETCH) {
      if (work && res != nullptr) {
        static_for<N3>([&](auto tt) {
          constexpr int t = decltype(tt)::value;
          rv[t] = __ldcs(res + off + t * plane);
        });
      } else {
        static_for<N3>([&](auto tt) { rv[decltype(tt)::value] = 0.f; });
      }
    }
    const int nrows = min(kRowsPerPass, i_end - ib);
    const float2* asrc = a2 + (b * n1 + ib) * rf;
    __syncthreads();  // the strip is staged (first pass); the last pass is done with sa
    for (int q = tid; q < nrows * rf; q += kV2Threads) sa[q] = asrc[q];
    __syncthreads();
    if (work) {
      float yr[F], yi[F];
      yhat_fixed<N3, float, float2>(r, sa + ty * rf, sb + tx, kStrip, yr, yi);
      float* o = out + off;
      irdft_fixed<N3>(yr, yi, [&](auto tt, float v) {
        constexpr int t = decltype(tt)::value;
        if constexpr (PREFETCH) {
          __stcs(o + t * plane, v + rv[t]);
        } else {
          __stcs(o + t * plane, res != nullptr ? v + __ldcs(res + off + t * plane) : v);
        }
      });
    }
  }
}

// ------------------------------------------------------------------------------------
// backward (bodies in fixed_dft.h): prep writes conj(A) (B, F, n1, r) and Vh (B, F, n2, r)
// for the two batched GEMMs of the glue (P = Gh Vh, Q = Gh^T conj(A)); post turns P and Q
// into gU, gS (atomicAdd over i into a zeroed gS) and gV. Threads: U tubes (b, i, k) then V
// tubes (b, j, k), k fastest (coalesced).
// ------------------------------------------------------------------------------------
template <int N3>
__global__ void __launch_bounds__(kV2Threads)
trec_bwd_prep_v2(const float* __restrict__ U, const float* __restrict__ S,
                 const float* __restrict__ V, float2* __restrict__ ca, float2* __restrict__ vh,
                 int n1, int n2, int r, int64_t nU, int64_t nV) {
  constexpr int F = N3 / 2 + 1;
  int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < nU) {
    const int64_t k = idx % r, bi = idx / r, i = bi % n1, b = bi / n1;
    const int64_t us = int64_t(n1) * r;
    cuda_fixed::prep_u<N3, float, float2, true>(U + (b * N3 * n1 + i) * r + k, us,
                                              S + b * N3 * r + k, r,
                                              ca + (b * F * n1 + i) * r + k, us);
  } else if (idx < nU + nV) {
    idx -= nU;
    const int64_t k = idx % r, bj = idx / r, j = bj % n2, b = bj / n2;
    const int64_t vs = int64_t(n2) * r;
    cuda_fixed::prep_v<N3, float, float2>(V + (b * N3 * n2 + j) * r + k, vs,
                                              vh + (b * F * n2 + j) * r + k, vs);
  }
}

template <int N3>
__global__ void __launch_bounds__(kV2Threads)
trec_bwd_post_v2(const float2* __restrict__ P, const float2* __restrict__ Q,
                 const float* __restrict__ U, const float* __restrict__ S, float* __restrict__ gU,
                 float* __restrict__ gS, float* __restrict__ gV, int n1, int n2, int r,
                 int64_t nU, int64_t nV) {
  constexpr int F = N3 / 2 + 1;
  int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < nU) {
    const int64_t k = idx % r, bi = idx / r, i = bi % n1, b = bi / n1;
    const int64_t us = int64_t(n1) * r;
    float* gs = gS + b * N3 * r + k;
    cuda_fixed::bwd_post_u<N3, float, float2>(
        P + (b * F * n1 + i) * r + k, us, U + (b * N3 * n1 + i) * r + k, us, S + b * N3 * r + k,
        r, gU + (b * N3 * n1 + i) * r + k, us,
        [&](int t, float v) { atomicAdd(gs + int64_t(t) * r, v); });
  } else if (idx < nU + nV) {
    idx -= nU;
    const int64_t k = idx % r, bj = idx / r, j = bj % n2, b = bj / n2;
    const int64_t vs = int64_t(n2) * r;
    cuda_fixed::bwd_post_v<N3, float, float2>(Q + (b * F * n2 + j) * r + k, vs,
                                              gV + (b * N3 * n2 + j) * r + k, vs);
  }
}

// ------------------------------------------------------------------------------------
// fused P/Q of the backward (opt-in: TSVD_CUDA_KERNELS=v2pq; not yet run on a GPU):
//   P_f = Gh_f Vh_f (n1 x R) and Q_f = Gh_f^T conj(A_f) (n2 x R), both from one read of Gh,
// in place of the glue's two cuBLAS GEMMs (each reads all of Gh: 109 + 105 us at 48x768x768
// on an H200, 23-24 % of DRAM throughput). A block owns a 64 x 64 tile of one Gh_f
// (grid: column tiles, row tiles, B * F); thread (tj, ti) = (tid % 64, tid / 64) takes
// column j = j0 + tj and rows i0 + ti + 4 m, m < 16: Q over its rows in registers, then
// over the 4 row groups in shared memory, one atomicAdd per (j, k) and block; P's terms of
// a row are summed over the warp's 32 columns by shuffles, one atomicAdd per (i, k) and
// warp. P and Q must be zeroed by the caller. Float sums in a varying order: the last bits
// of P and Q differ between runs.
// ------------------------------------------------------------------------------------
constexpr int kPQTile = 64, kPQGroups = kV2Threads / kPQTile, kPQRows = kPQTile / kPQGroups;

template <int R>
__global__ void __launch_bounds__(kV2Threads)
trec_bwd_pq_v2(const float2* __restrict__ gh, const float2* __restrict__ vh,
               const float2* __restrict__ ca, float2* __restrict__ P, float2* __restrict__ Q,
               int n1, int n2) {
  __shared__ float2 sca[kPQTile * R];                 // conj(A_f) rows i0 .. i0 + 63
  __shared__ float2 sq[kPQGroups * kPQTile * R];      // Q partials of the 4 row groups
  const int64_t bf = blockIdx.z;
  const int j0 = blockIdx.x * kPQTile, i0 = blockIdx.y * kPQTile;
  const int tid = threadIdx.x, tj = tid % kPQTile, ti = tid / kPQTile, lane = tid % 32;
  for (int q = tid; q < kPQTile * R; q += kV2Threads) {
    const int i = i0 + q / R;
    sca[q] = i < n1 ? ca[(bf * n1 + i0) * R + q] : make_float2(0.f, 0.f);
  }
  const int j = j0 + tj;
  const bool jok = j < n2;
  float2 vj[R];
  static_for<R>([&](auto kk) {
    constexpr int k = decltype(kk)::value;
    vj[k] = jok ? vh[(bf * n2 + j) * R + k] : make_float2(0.f, 0.f);
  });
  __syncthreads();
  float qr[R], qi[R], pr[R], pi[R];
  static_for<R>([&](auto kk) { qr[decltype(kk)::value] = qi[decltype(kk)::value] = 0.f; });
  const float2* g = gh + bf * int64_t(n1) * n2;
  for (int m = 0; m < kPQRows; ++m) {
    const int ii = ti + kPQGroups * m, i = i0 + ii;   // the same row for the whole warp
    const float2 t = (jok && i < n1) ? __ldcs(g + int64_t(i) * n2 + j) : make_float2(0.f, 0.f);
    cuda_fixed::pq_element<R, float, float2>(t, sca + ii * R, vj, qr, qi, pr, pi);
    static_for<R>([&](auto kk) {
      constexpr int k = decltype(kk)::value;
      for (int off = 16; off > 0; off >>= 1) {
        pr[k] += __shfl_xor_sync(0xffffffffu, pr[k], off);
        pi[k] += __shfl_xor_sync(0xffffffffu, pi[k], off);
      }
    });
    if (i < n1) {                                   // lane k adds component k of the row
      float* prow = reinterpret_cast<float*>(P + (bf * n1 + i) * R);
      static_for<R>([&](auto kk) {
        constexpr int k = decltype(kk)::value;
        if (lane == k % 32) {
          atomicAdd(prow + 2 * k, pr[k]);
          atomicAdd(prow + 2 * k + 1, pi[k]);
        }
      });
    }
  }
  static_for<R>([&](auto kk) {
    constexpr int k = decltype(kk)::value;
    sq[(ti * kPQTile + tj) * R + k] = make_float2(qr[k], qi[k]);
  });
  __syncthreads();
  if (ti == 0 && jok) {
    float* qrow = reinterpret_cast<float*>(Q + (bf * n2 + j) * R);
    static_for<R>([&](auto kk) {
      constexpr int k = decltype(kk)::value;
      float sr = 0.f, si = 0.f;
      for (int gi = 0; gi < kPQGroups; ++gi) {
        const float2 v = sq[(gi * kPQTile + tj) * R + k];
        sr += v.x;
        si += v.y;
      }
      atomicAdd(qrow + 2 * k, sr);
      atomicAdd(qrow + 2 * k + 1, si);
    });
  }
}

// ------------------------------------------------------------------------------------
// tube transforms along dim 1: x (B, N3, E) <-> xh (B, F, E) complex; one thread per (b, e),
// grid-stride; coalesced along e.
// ------------------------------------------------------------------------------------
template <int N3>
__global__ void __launch_bounds__(kV2Threads)
tube_rfft_v2(const float* __restrict__ x, float2* __restrict__ xh, int64_t B, int64_t E) {
  constexpr int F = N3 / 2 + 1;
  const int64_t total = B * E;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / E, e = idx - b * E;
    const float* p = x + b * N3 * E + e;
    float v[N3];
    static_for<N3>([&](auto tt) {
      constexpr int t = decltype(tt)::value;
      v[t] = __ldcs(p + t * E);
    });
    float yr[F], yi[F];
    rdft_fixed<N3>(v, yr, yi);
    float2* o = xh + b * F * E + e;
    static_for<F>([&](auto ff) {
      constexpr int f = decltype(ff)::value;
      o[f * E] = make_float2(yr[f], yi[f]);
    });
  }
}

template <int N3>
__global__ void __launch_bounds__(kV2Threads)
tube_irfft_v2(const float2* __restrict__ xh, float* __restrict__ x, int64_t B, int64_t E) {
  constexpr int F = N3 / 2 + 1;
  const int64_t total = B * E;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / E, e = idx - b * E;
    const float2* p = xh + b * F * E + e;
    float yr[F], yi[F];
    static_for<F>([&](auto ff) {
      constexpr int f = decltype(ff)::value;
      const float2 v = p[f * E];
      yr[f] = v.x;
      yi[f] = v.y;
    });
    float* o = x + b * N3 * E + e;
    irdft_fixed<N3>(yr, yi, [&](auto tt, float v) {
      constexpr int t = decltype(tt)::value;
      o[t * E] = v;
    });
  }
}

// ------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Device facts, read once per device (no attribute query on the hot path).
struct DeviceFacts {
  int sms = 0;
  int smem_optin = 0;
};
constexpr int kMaxDevices = 64;

cudaError_t device_facts(DeviceFacts* out) {
  static DeviceFacts facts[kMaxDevices];
  static std::atomic<bool> known[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  if (!known[dev].load(std::memory_order_acquire)) {
    DeviceFacts f;
    err = cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    facts[dev] = f;  // the same values from every thread that races here
    known[dev].store(true, std::memory_order_release);
  }
  *out = facts[dev];
  return cudaSuccess;
}

// The main kernel's dynamic shared memory above 48 KB needs an opt-in per kernel and
// device: made once (to the device's maximum), not on every call.
template <auto kernel>
cudaError_t allow_fwd_smem(int smem_optin) {
  static std::atomic<unsigned long long> done{0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = 1ULL << (dev & 63);
  if (done.load(std::memory_order_acquire) & bit) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             smem_optin);
  if (err != cudaSuccess) return err;
  done.fetch_or(bit, std::memory_order_acq_rel);
  return cudaSuccess;
}

// Shared memory of the main kernel: the strip of b2, plus (sa) the a2 rows of one pass.
size_t fwd_smem_bytes(int64_t n3, int64_t r, bool sa) {
  return size_t(r) * size_t(n3 / 2 + 1) * (kStrip + (sa ? kRowsPerPass : 0)) * sizeof(float2);
}
constexpr size_t kFwdSmemMax = size_t(100) * 1024;  // 2 blocks per SM

// Stage the a2 rows in shared memory (trec_fwd_v2_sa) at N3 = 48, where they fit beside the
// strip (r <= 12). Measured on an H200 (bench/trec_launch.py, r = 8, 2026-12-04): 127.5 us
// against 160.4 us at 48x768x768, but 119.4 against 107.9 us at 12x3072x768 (7 products
// per rank: the loads of a row were few, and the two barriers per pass cost more), so not at
// N3 = 12. TSVD_V2_FWD_SA=0 / =1 (read on every call) turns it off / on where it fits.
// TSVD_V2_FWD_SA=2 (opt-in, not yet run on a GPU): the staged kernel without the residual
// prefetch (the tube is read as it is written) and 3 blocks per SM (80 registers, 44 bytes
// of spills at N3 = 48, nvcc 13.0): more warps to hide latency, for bench/trec_launch.py.
int fwd_stage_a(int64_t n3, int64_t r) {
  if (fwd_smem_bytes(n3, r, true) > kFwdSmemMax) return 0;
  const char* knob = std::getenv("TSVD_V2_FWD_SA");
  if (knob != nullptr && std::strcmp(knob, "0") == 0) return 0;
  if (knob != nullptr && std::strcmp(knob, "1") == 0) return 1;
  if (knob != nullptr && std::strcmp(knob, "2") == 0 &&
      3 * fwd_smem_bytes(n3, r, true) <= size_t(225) * 1024)
    return 2;
  return n3 >= 48 ? 1 : 0;
}

template <typename Fn>
cudaError_t dispatch_n3(int64_t n3, Fn&& fn) {
  switch (n3) {
    case 12: return fn(std::integral_constant<int, 12>{});
    case 48: return fn(std::integral_constant<int, 48>{});
    default: return cudaErrorInvalidValue;
  }
}

unsigned grid_stride_blocks(int64_t total, int sms) {
  const int64_t want = cdiv(total, kV2Threads);
  const int64_t cap = int64_t(sms > 0 ? sms : 132) * 8;  // a few waves; the loop does the rest
  return unsigned(want < cap ? (want > 0 ? want : 1) : cap);
}

}  // namespace

bool v2_supported(int64_t n3, int64_t r, int64_t n1, int64_t n2) {
  if (n3 != 12 && n3 != 48) return false;
  if (r < 1 || fwd_smem_bytes(n3, r, false) > kFwdSmemMax) return false;
  return n1 < (int64_t(1) << 31) && n2 < (int64_t(1) << 31);
}

cudaError_t launch_treconstruct_fwd_v2(const float* U, const float* S, const float* V,
                                       const float* res, float* out, float* a2, float* b2,
                                       int64_t B, int64_t n3, int64_t n1, int64_t n2, int64_t r,
                                       cudaStream_t s) {
  if (!v2_supported(n3, r, n1, n2)) return cudaErrorInvalidValue;
  if (B * n1 * n2 == 0) return cudaSuccess;
  if (B > 65535) return cudaErrorInvalidConfiguration;
  DeviceFacts df;
  cudaError_t err = device_facts(&df);
  if (err != cudaSuccess) return err;
  const int sa = fwd_stage_a(n3, r);
  const size_t smem = fwd_smem_bytes(n3, r, sa != 0);
  if (smem > size_t(df.smem_optin)) return cudaErrorInvalidValue;
  return dispatch_n3(n3, [&](auto nn) {
    constexpr int N3 = decltype(nn)::value;
    const int64_t nU = B * n1 * r, nV = B * n2 * r;
    trec_prep_v2<N3><<<unsigned(cdiv(nU + nV, kV2Threads)), kV2Threads, 0, s>>>(
        U, S, V, reinterpret_cast<float2*>(a2), reinterpret_cast<float2*>(b2), int(n1), int(n2),
        int(r), nU, nV);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (smem > 48 * 1024) {
      e = sa == 2 ? allow_fwd_smem<trec_fwd_v2_sa<N3, false, 3>>(df.smem_optin)
          : sa == 1 ? allow_fwd_smem<trec_fwd_v2_sa<N3>>(df.smem_optin)
                    : allow_fwd_smem<trec_fwd_v2<N3>>(df.smem_optin);
      if (e != cudaSuccess) return e;
    }
    // Rows per block: several passes of 8 rows, so that the strip of Vh staged in shared
    // memory serves many rows, while the grid keeps about 4 waves of 2 blocks per SM.
    // Unmeasured heuristic; TSVD_V2_FWD_PASSES=P (a tuning knob for bench/trec_launch.py,
    // read on every call) sets P passes per block instead.
    const int64_t strips = cdiv(n2, kStrip), passes = cdiv(n1, kRowsPerPass);
    int64_t per = (strips * passes * B) / (int64_t(df.sms) * 2 * 4);
    per = per < 1 ? 1 : (per > 8 ? 8 : per);
    if (const char* knob = std::getenv("TSVD_V2_FWD_PASSES")) {
      const long v = std::strtol(knob, nullptr, 10);
      if (v > 0) per = v < passes ? v : passes;
    }
    const int rows = int(per * kRowsPerPass);
    const int64_t gy = cdiv(n1, rows);
    if (gy > 65535 || strips > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    const dim3 grid{unsigned(strips), unsigned(gy), unsigned(B)}, block{unsigned(kStrip), unsigned(kRowsPerPass)};
    const float2* a2c = reinterpret_cast<const float2*>(a2);
    const float2* b2c = reinterpret_cast<const float2*>(b2);
    if (sa == 2)
      trec_fwd_v2_sa<N3, false, 3><<<grid, block, smem, s>>>(a2c, b2c, res, out, int(n1),
                                                             int(n2), int(r), rows);
    else if (sa == 1)
      trec_fwd_v2_sa<N3><<<grid, block, smem, s>>>(a2c, b2c, res, out, int(n1), int(n2), int(r),
                                                   rows);
    else
      trec_fwd_v2<N3><<<grid, block, smem, s>>>(a2c, b2c, res, out, int(n1), int(n2), int(r),
                                                rows);
    return cudaGetLastError();
  });
}

cudaError_t launch_treconstruct_bwd_prep_v2(const float* U, const float* S, const float* V,
                                            float* ca, float* vh, int64_t B, int64_t n3,
                                            int64_t n1, int64_t n2, int64_t r, cudaStream_t s) {
  if (!v2_supported(n3, r, n1, n2)) return cudaErrorInvalidValue;
  const int64_t nU = B * n1 * r, nV = B * n2 * r;
  if (nU + nV == 0) return cudaSuccess;
  return dispatch_n3(n3, [&](auto nn) {
    constexpr int N3 = decltype(nn)::value;
    trec_bwd_prep_v2<N3><<<unsigned(cdiv(nU + nV, kV2Threads)), kV2Threads, 0, s>>>(
        U, S, V, reinterpret_cast<float2*>(ca), reinterpret_cast<float2*>(vh), int(n1), int(n2),
        int(r), nU, nV);
    return cudaGetLastError();
  });
}

cudaError_t launch_treconstruct_bwd_post_v2(const float* P, const float* Q, const float* U,
                                            const float* S, float* gU, float* gS, float* gV,
                                            int64_t B, int64_t n3, int64_t n1, int64_t n2,
                                            int64_t r, cudaStream_t s) {
  if (!v2_supported(n3, r, n1, n2)) return cudaErrorInvalidValue;
  const int64_t nU = B * n1 * r, nV = B * n2 * r;
  if (nU + nV == 0) return cudaSuccess;
  return dispatch_n3(n3, [&](auto nn) {
    constexpr int N3 = decltype(nn)::value;
    trec_bwd_post_v2<N3><<<unsigned(cdiv(nU + nV, kV2Threads)), kV2Threads, 0, s>>>(
        reinterpret_cast<const float2*>(P), reinterpret_cast<const float2*>(Q), U, S, gU, gS, gV,
        int(n1), int(n2), int(r), nU, nV);
    return cudaGetLastError();
  });
}

bool bwd_pq_v2_supported(int64_t r) { return r == 1 || r == 2 || r == 4 || r == 8 || r == 16; }

cudaError_t launch_treconstruct_bwd_pq_v2(const float* gh, const float* vh, const float* ca,
                                          float* P, float* Q, int64_t BF, int64_t n1,
                                          int64_t n2, int64_t r, cudaStream_t s) {
  if (!bwd_pq_v2_supported(r) || n1 >= (int64_t(1) << 31) || n2 >= (int64_t(1) << 31))
    return cudaErrorInvalidValue;
  if (BF * n1 * n2 == 0) return cudaSuccess;
  const int64_t gx = cdiv(n2, kPQTile), gy = cdiv(n1, kPQTile);
  if (BF > 65535 || gy > 65535 || gx > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid{unsigned(gx), unsigned(gy), unsigned(BF)};
  const auto* g2 = reinterpret_cast<const float2*>(gh);
  const auto* v2 = reinterpret_cast<const float2*>(vh);
  const auto* c2 = reinterpret_cast<const float2*>(ca);
  auto* p2 = reinterpret_cast<float2*>(P);
  auto* q2 = reinterpret_cast<float2*>(Q);
  switch (r) {
    case 1: trec_bwd_pq_v2<1><<<grid, kV2Threads, 0, s>>>(g2, v2, c2, p2, q2, int(n1), int(n2)); break;
    case 2: trec_bwd_pq_v2<2><<<grid, kV2Threads, 0, s>>>(g2, v2, c2, p2, q2, int(n1), int(n2)); break;
    case 4: trec_bwd_pq_v2<4><<<grid, kV2Threads, 0, s>>>(g2, v2, c2, p2, q2, int(n1), int(n2)); break;
    case 8: trec_bwd_pq_v2<8><<<grid, kV2Threads, 0, s>>>(g2, v2, c2, p2, q2, int(n1), int(n2)); break;
    default: trec_bwd_pq_v2<16><<<grid, kV2Threads, 0, s>>>(g2, v2, c2, p2, q2, int(n1), int(n2)); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_tube_rfft_v2(const float* x, float* xh, int64_t B, int64_t n3, int64_t E,
                                cudaStream_t s) {
  if (B * E == 0) return cudaSuccess;
  DeviceFacts df;
  cudaError_t err = device_facts(&df);
  if (err != cudaSuccess) return err;
  return dispatch_n3(n3, [&](auto nn) {
    constexpr int N3 = decltype(nn)::value;
    tube_rfft_v2<N3><<<grid_stride_blocks(B * E, df.sms), kV2Threads, 0, s>>>(
        x, reinterpret_cast<float2*>(xh), B, E);
    return cudaGetLastError();
  });
}

cudaError_t launch_tube_irfft_v2(const float* xh, float* x, int64_t B, int64_t n3, int64_t E,
                                 cudaStream_t s) {
  if (B * E == 0) return cudaSuccess;
  DeviceFacts df;
  cudaError_t err = device_facts(&df);
  if (err != cudaSuccess) return err;
  return dispatch_n3(n3, [&](auto nn) {
    constexpr int N3 = decltype(nn)::value;
    tube_irfft_v2<N3><<<grid_stride_blocks(B * E, df.sms), kV2Threads, 0, s>>>(
        reinterpret_cast<const float2*>(xh), x, B, E);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace tsvd
