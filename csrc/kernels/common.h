// Shared definitions for the tsvd kernels (CPU and CUDA). No ATen headers here: the
// arithmetic in csrc/kernels/*.h works on raw pointers and sizes so that the same
// functions compile as host code (tested on CPU) and as __host__ __device__ code.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TSVD_HOST_DEVICE __host__ __device__
#define TSVD_RESTRICT __restrict__
#else
#define TSVD_HOST_DEVICE
#define TSVD_RESTRICT __restrict__
#endif

namespace tsvd {

// Number of stored (Hermitian half) frequencies of a real tube of length n3.
TSVD_HOST_DEVICE inline int64_t n_freq(int64_t n3) { return n3 / 2 + 1; }

// Number of (t, n3 - t) pairs with 1 <= t < n3 - t.
TSVD_HOST_DEVICE inline int64_t n_pairs(int64_t n3) { return (n3 - 1) / 2; }

}  // namespace tsvd

#include <cstring>

namespace tsvd {

// Vector helpers: the tile kernels are written over a value type V holding L = sizeof(V) /
// sizeof(T) lanes of T. On CPU V is a GCC/Clang vector-extension type (see
// csrc/cpu/simd.h), in CUDA code V = T (one lane; a thread owns one column).
template <typename V, typename T>
TSVD_HOST_DEVICE inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
TSVD_HOST_DEVICE inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename T>
TSVD_HOST_DEVICE inline V vzero() {
  return V{} ;
}
template <typename V, typename T>
TSVD_HOST_DEVICE constexpr int lanes() { return int(sizeof(V) / sizeof(T)); }

}  // namespace tsvd
