// CUDA kernels of tsvd: the tube DFTs (rfft / irfft along dim 1), the fused
// treconstruct forward (residual + irfft(A_f Vh_f^H), one pass over the residual and the
// output) and its backward (Gh = rfft(G) kept on chip, reduced into the small
// Fourier-domain factor gradients). ATen-free: see launch.h for the layouts.
//
// Shared arithmetic: the per-column DFT and rank-r product micro-kernels live in
// column_dft.h as __host__ __device__ functions, tested on the CPU by tests/test_cuda.py.
//
// Launch heuristics are kept here, beside the kernels. None of them has been measured on
// a GPU yet (bench/gpu_check.sh does that).
#include <cuda_runtime.h>

#include <type_traits>

#include "column_dft.h"
#include "launch.h"

namespace tsvd {
namespace cuda {
namespace {

using cuda_tile::dft_table_entry;
using cuda_tile::irdft_column;
using cuda_tile::rdft_column;
using cuda_tile::yhat_column;

constexpr int kTX = 32;  // threads along the contiguous (j / e) axis
constexpr int kTY = 8;   // rows per pass
constexpr int kThreads = kTX * kTY;
// Register cap: 2 blocks of 256 threads per SM (<= 128 registers per thread), except for
// double with 32 frequencies, whose 2 x 32 register coefficients alone need 128 registers
// (1 block, <= 255 registers). Chosen from the compiler's resource report; unmeasured.
template <typename T, int MAXF>
constexpr int min_blocks() { return (sizeof(T) == 8 && MAXF > 16) ? 1 : 2; }

// Fills the ((n3/2 + 1) x nf) cos / -sin tables in shared memory (all threads of the block).
template <typename T>
__device__ inline void fill_tables(int64_t n3, int nf, bool scale_irfft, T* c, T* s) {
  const int nt = int(n3 / 2 + 1);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  for (int idx = tid; idx < nt * nf; idx += nthreads)
    dft_table_entry<T>(n3, idx / nf, idx % nf, scale_irfft, c + idx, s + idx);
  __syncthreads();
}

template <typename T> struct Vec2;
template <> struct Vec2<float> { using type = float2; };
template <> struct Vec2<double> { using type = double2; };

template <typename T>
__device__ inline void store2(T* p, T a, T b) {
  typename Vec2<T>::type v;
  v.x = a;
  v.y = b;
  *reinterpret_cast<typename Vec2<T>::type*>(p) = v;
}

template <typename T>
__device__ inline void load2(const T* p, T& a, T& b) {
  const typename Vec2<T>::type v = *reinterpret_cast<const typename Vec2<T>::type*>(p);
  a = v.x;
  b = v.y;
}

// ------------------------------------------------------------------------------------
// tube_rfft: x (B, n3, E) -> xh (B, nf, E, 2). One thread per (b, e), grid-stride.
// ------------------------------------------------------------------------------------
template <typename T, int MAXF>
__global__ void __launch_bounds__(kThreads, (min_blocks<T, MAXF>()))
tube_rfft_kernel(const T* __restrict__ x, T* __restrict__ xh, int64_t B, int64_t n3, int64_t E) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* fc = reinterpret_cast<T*>(smem_raw);
  const int nf = int(n3 / 2 + 1);
  T* fs = fc + (n3 / 2 + 1) * nf;
  fill_tables<T>(n3, nf, false, fc, fs);
  const int64_t total = B * E;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x * blockDim.y + threadIdx.y * blockDim.x +
                     threadIdx.x;
       idx < total; idx += int64_t(gridDim.x) * blockDim.x * blockDim.y) {
    const int64_t b = idx / E, e = idx - b * E;
    T xr[MAXF], xi[MAXF];
    rdft_column<T, MAXF>(n3, nf, fc, fs, x + b * n3 * E + e, E, xr, xi);
    T* o = xh + (b * nf * E + e) * 2;
#pragma unroll
    for (int f = 0; f < MAXF; ++f)
      if (f < nf) store2<T>(o + int64_t(f) * E * 2, xr[f], xi[f]);
  }
}

// ------------------------------------------------------------------------------------
// tube_irfft: xh (B, nf, E, 2) -> x (B, n3, E).
// ------------------------------------------------------------------------------------
template <typename T, int MAXF>
__global__ void __launch_bounds__(kThreads, (min_blocks<T, MAXF>()))
tube_irfft_kernel(const T* __restrict__ xh, T* __restrict__ x, int64_t B, int64_t n3, int64_t E) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ic = reinterpret_cast<T*>(smem_raw);
  const int nf = int(n3 / 2 + 1);
  T* is = ic + (n3 / 2 + 1) * nf;
  fill_tables<T>(n3, nf, true, ic, is);
  const int64_t total = B * E;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x * blockDim.y + threadIdx.y * blockDim.x +
                     threadIdx.x;
       idx < total; idx += int64_t(gridDim.x) * blockDim.x * blockDim.y) {
    const int64_t b = idx / E, e = idx - b * E;
    T yr[MAXF], yi[MAXF];
    const T* p = xh + (b * nf * E + e) * 2;
#pragma unroll
    for (int f = 0; f < MAXF; ++f) {
      yr[f] = T(0);
      yi[f] = T(0);
      if (f < nf) load2<T>(p + int64_t(f) * E * 2, yr[f], yi[f]);
    }
    irdft_column<T, MAXF>(n3, nf, ic, is, yr, yi, nullptr, 0, x + b * n3 * E + e, E);
  }
}

// ------------------------------------------------------------------------------------
// treconstruct forward: out = res + irfft_f( A_f Vh_f^H ). Block = 8 rows x 32 columns;
// each thread: its (i, j) Yh in registers -> inverse DFT -> residual read once and output
// written once, coalesced along j. (One (i, j) per thread: a loop over several rows made
// the compiler keep the per-frequency addresses live across it, 255 registers + spills.)
// ------------------------------------------------------------------------------------
template <typename T, int MAXF>
__global__ void __launch_bounds__(kThreads, (min_blocks<T, MAXF>()))
treconstruct_fwd_kernel(const T* __restrict__ a, const T* __restrict__ bt, const T* __restrict__ res,
                        T* __restrict__ out, int64_t n3, int64_t n1, int64_t n2, int64_t r,
                        int64_t n_itiles, int64_t n_jtiles) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ic = reinterpret_cast<T*>(smem_raw);
  const int nf = int(n3 / 2 + 1);
  T* is = ic + (n3 / 2 + 1) * nf;
  fill_tables<T>(n3, nf, true, ic, is);

  const int64_t tile = blockIdx.x;
  const int64_t per_b = n_itiles * n_jtiles;
  const int64_t b = tile / per_b;
  const int64_t rem = tile - b * per_b;
  const int64_t it = rem / n_jtiles, jt = rem - it * n_jtiles;
  const int64_t j = jt * kTX + threadIdx.x;
  const int64_t i = it * kTY + threadIdx.y;
  if (j >= n2 || i >= n1) return;
  const int64_t plane = n1 * n2;
  const int64_t R2 = 2 * r;
  T yr[MAXF], yi[MAXF];
  yhat_column<T, MAXF>(nf, r, a + (b * nf * n1 + i) * R2, n1 * R2, bt + b * nf * R2 * n2 + j, n2,
                       yr, yi);
  const int64_t off = b * n3 * plane + i * n2 + j;
  irdft_column<T, MAXF>(n3, nf, ic, is, yr, yi, res ? res + off : nullptr, plane, out + off, plane);
}

// ------------------------------------------------------------------------------------
// treconstruct backward. Block = a strip of 32 columns of G, `ntiles` row tiles of 8 rows.
// Per row tile:
//   phase 1: each thread transforms its tube with the adjoint-of-irfft tables (c_f Gh_f)
//            into shared memory gs[f][re/im][row][col] (row pitch 33); G is read once and
//            its transform never goes to global memory;
//   phase 2: ga[f, i, :] += sum_j gs[f, i, j] Vh_f[j, :]   (complex; one atomicAdd per entry
//            and row tile)
//            gb[f, j, :] += sum_i conj(gs[f, i, j]) A_f[i, :] (accumulated over the row tiles
//            in shared memory when it fits (`acc_gb`), then one atomicAdd per entry;
//            otherwise one atomicAdd per entry and row tile).
// Each gb entry (f, jj, k) is owned by the same thread in every row tile, so the
// shared-memory accumulation needs no atomics.
// ------------------------------------------------------------------------------------
constexpr int kGsPitch = kTX + 1;

template <typename T, int MAXF>
__global__ void __launch_bounds__(kThreads, (min_blocks<T, MAXF>()))
treconstruct_bwd_kernel(const T* __restrict__ g, const T* __restrict__ a, const T* __restrict__ bk,
                        T* __restrict__ ga, T* __restrict__ gb, int64_t n3, int64_t n1, int64_t n2,
                        int64_t r, int ntiles, int64_t n_itiles, int64_t n_jtiles, bool acc_gb) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* fc = reinterpret_cast<T*>(smem_raw);
  const int nf = int(n3 / 2 + 1);
  const int64_t nt = n3 / 2 + 1;
  T* fs = fc + nt * nf;
  T* gs = fs + nt * nf;                       // [nf][2][kTY][kGsPitch]
  T* gacc = gs + nf * 2 * kTY * kGsPitch;     // [nf][w][2r] when acc_gb
  fill_tables<T>(n3, nf, true, fc, fs);

  const int64_t tile = blockIdx.x;
  const int64_t per_b = n_itiles * n_jtiles;
  const int64_t b = tile / per_b;
  const int64_t rem = tile - b * per_b;
  const int64_t it = rem / n_jtiles, j0 = (rem % n_jtiles) * kTX;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kTX + tx;
  const int64_t plane = n1 * n2;
  const int64_t R2 = 2 * r;
  const int w = int(n2 - j0 < kTX ? n2 - j0 : kTX);
  const int64_t n_gb = int64_t(nf) * w * r;
  if (acc_gb)
    for (int64_t idx = tid; idx < n_gb; idx += kThreads) {
      gacc[2 * idx] = T(0);
      gacc[2 * idx + 1] = T(0);
    }

  for (int rt = 0; rt < ntiles; ++rt) {
    const int64_t i0 = (it * ntiles + rt) * kTY;
    if (i0 >= n1) break;  // uniform over the block
    const int hrows = int(n1 - i0 < kTY ? n1 - i0 : kTY);
    if (rt > 0) __syncthreads();  // the previous tile's phase 2 is done with gs
    {
      T xr[MAXF], xi[MAXF];
      if (tx < w && ty < hrows) {
        rdft_column<T, MAXF>(n3, nf, fc, fs, g + b * n3 * plane + (i0 + ty) * n2 + j0 + tx,
                             plane, xr, xi);
      } else {
#pragma unroll
        for (int f = 0; f < MAXF; ++f) { xr[f] = T(0); xi[f] = T(0); }
      }
#pragma unroll
      for (int f = 0; f < MAXF; ++f) {
        if (f < nf) {
          gs[((f * 2 + 0) * kTY + ty) * kGsPitch + tx] = xr[f];
          gs[((f * 2 + 1) * kTY + ty) * kGsPitch + tx] = xi[f];
        }
      }
    }
    __syncthreads();

    // ga: entries (f, ii, k), k fastest.
    const int64_t n_ga = int64_t(nf) * hrows * r;
    for (int64_t idx = tid; idx < n_ga; idx += kThreads) {
      const int64_t k = idx % r;
      const int64_t rest = idx / r;
      const int ii = int(rest % hrows);
      const int f = int(rest / hrows);
      T sr, si;
      cuda_tile::ga_entry<T>(w, gs + ((f * 2 + 0) * kTY + ii) * kGsPitch,
                             gs + ((f * 2 + 1) * kTY + ii) * kGsPitch,
                             bk + ((b * nf + f) * n2 + j0) * R2 + k, r, &sr, &si);
      T* d = ga + ((b * nf + f) * n1 + i0 + ii) * R2 + k;
      atomicAdd(d, sr);
      atomicAdd(d + r, si);
    }
    // gb: entries (f, jj, k), k fastest.
    for (int64_t idx = tid; idx < n_gb; idx += kThreads) {
      const int64_t k = idx % r;
      const int64_t rest = idx / r;
      const int jj = int(rest % w);
      const int f = int(rest / w);
      T sr, si;
      cuda_tile::gb_entry<T>(hrows, gs + ((f * 2 + 0) * kTY) * kGsPitch + jj,
                             gs + ((f * 2 + 1) * kTY) * kGsPitch + jj, kGsPitch,
                             a + ((b * nf + f) * n1 + i0) * R2 + k, r, &sr, &si);
      if (acc_gb) {
        gacc[2 * idx] += sr;
        gacc[2 * idx + 1] += si;
      } else {
        T* d = gb + ((b * nf + f) * n2 + j0 + jj) * R2 + k;
        atomicAdd(d, sr);
        atomicAdd(d + r, si);
      }
    }
  }
  if (acc_gb)
    for (int64_t idx = tid; idx < n_gb; idx += kThreads) {
      const int64_t k = idx % r;
      const int64_t rest = idx / r;
      const int jj = int(rest % w);
      const int f = int(rest / w);
      T* d = gb + ((b * nf + f) * n2 + j0 + jj) * R2 + k;
      atomicAdd(d, gacc[2 * idx]);
      atomicAdd(d + r, gacc[2 * idx + 1]);
    }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid for the grid-stride DFT kernels: enough blocks to fill the device a few times.
inline unsigned grid_for(int64_t total) {
  const int64_t blocks = ceil_div(total, kThreads);
  return unsigned(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <typename T>
size_t table_bytes(int64_t n3) {
  return size_t(2) * size_t(n3 / 2 + 1) * size_t(n3 / 2 + 1) * sizeof(T);
}

// Calls fn.template operator()<MAXF>() for the bucket of nf; cudaErrorInvalidValue if none.
template <typename Fn>
cudaError_t dispatch_freq(int64_t nf, Fn&& fn) {
  switch (cuda_tile::freq_bucket(nf)) {
    case 8: return fn(std::integral_constant<int, 8>{});
    case 16: return fn(std::integral_constant<int, 16>{});
    case 32: return fn(std::integral_constant<int, 32>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

}  // namespace

template <typename T>
cudaError_t launch_tube_rfft(const T* x, T* xh, int64_t B, int64_t n3, int64_t E, cudaStream_t s) {
  if (B * E == 0) return cudaSuccess;
  return dispatch_freq(n3 / 2 + 1, [&](auto mf) {
    constexpr int MAXF = decltype(mf)::value;
    tube_rfft_kernel<T, MAXF><<<grid_for(B * E), dim3(kTX, kTY), table_bytes<T>(n3), s>>>(
        x, xh, B, n3, E);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_tube_irfft(const T* xh, T* x, int64_t B, int64_t n3, int64_t E, cudaStream_t s) {
  if (B * E == 0) return cudaSuccess;
  return dispatch_freq(n3 / 2 + 1, [&](auto mf) {
    constexpr int MAXF = decltype(mf)::value;
    tube_irfft_kernel<T, MAXF><<<grid_for(B * E), dim3(kTX, kTY), table_bytes<T>(n3), s>>>(
        xh, x, B, n3, E);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_treconstruct_fwd(const T* a, const T* bt, const T* res, T* out, int64_t B,
                                    int64_t n3, int64_t n1, int64_t n2, int64_t r, int num_sms,
                                    cudaStream_t s) {
  if (B * n1 * n2 == 0) return cudaSuccess;
  (void)num_sms;
  const int64_t n_itiles = ceil_div(n1, kTY), n_jtiles = ceil_div(n2, kTX);
  const int64_t blocks = B * n_itiles * n_jtiles;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_freq(n3 / 2 + 1, [&](auto mf) {
    constexpr int MAXF = decltype(mf)::value;
    treconstruct_fwd_kernel<T, MAXF><<<unsigned(blocks), dim3(kTX, kTY), table_bytes<T>(n3), s>>>(
        a, bt, res, out, n3, n1, n2, r, n_itiles, n_jtiles);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_treconstruct_bwd(const T* g, const T* a, const T* bk, T* ga, T* gb, int64_t B,
                                    int64_t n3, int64_t n1, int64_t n2, int64_t r, cudaStream_t s) {
  if (B * n1 * n2 == 0) return cudaSuccess;
  const int64_t nf = n3 / 2 + 1;
  int dev = 0, sms = 0, smem_max = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const size_t base = table_bytes<T>(n3) + size_t(nf) * 2 * kTY * kGsPitch * sizeof(T);
  const size_t acc = size_t(nf) * kTX * 2 * size_t(r) * sizeof(T);
  // Row tiles per block: up to 8 (gb reduced in shared memory over 64 rows) while the grid
  // keeps >= 4 blocks per SM, and only when the accumulator leaves room for 2 blocks per SM.
  // Unmeasured heuristic.
  const int64_t n_jtiles = ceil_div(n2, kTX), rows_total = ceil_div(n1, kTY);
  const bool acc_gb = base + acc <= size_t(smem_max) / 2;
  int ntiles = 1;
  if (acc_gb)
    for (int cand = 8; cand > 1; cand /= 2)
      if (B * ceil_div(rows_total, cand) * n_jtiles >= 4 * int64_t(sms)) { ntiles = cand; break; }
  const bool use_acc = acc_gb && ntiles > 1;
  const int64_t n_itiles = ceil_div(rows_total, ntiles);
  const int64_t blocks = B * n_itiles * n_jtiles;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const size_t smem = base + (use_acc ? acc : 0);
  return dispatch_freq(nf, [&](auto mf) {
    constexpr int MAXF = decltype(mf)::value;
    auto kernel = treconstruct_bwd_kernel<T, MAXF>;
    cudaError_t e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    kernel<<<unsigned(blocks), dim3(kTX, kTY), smem, s>>>(g, a, bk, ga, gb, n3, n1, n2, r, ntiles,
                                                          n_itiles, n_jtiles, use_acc);
    return cudaGetLastError();
  });
}

#define TSVD_INSTANTIATE(T)                                                                     \
  template cudaError_t launch_tube_rfft<T>(const T*, T*, int64_t, int64_t, int64_t, cudaStream_t); \
  template cudaError_t launch_tube_irfft<T>(const T*, T*, int64_t, int64_t, int64_t, cudaStream_t); \
  template cudaError_t launch_treconstruct_fwd<T>(const T*, const T*, const T*, T*, int64_t,      \
                                                  int64_t, int64_t, int64_t, int64_t, int,        \
                                                  cudaStream_t);                                  \
  template cudaError_t launch_treconstruct_bwd<T>(const T*, const T*, const T*, T*, T*, int64_t,  \
                                                  int64_t, int64_t, int64_t, int64_t, cudaStream_t);

TSVD_INSTANTIATE(float)
TSVD_INSTANTIATE(double)
#undef TSVD_INSTANTIATE

}  // namespace cuda
}  // namespace tsvd
