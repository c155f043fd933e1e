// CPU vector type for the tile kernels of csrc/kernels/: a GCC/Clang vector extension
// of 64 bytes (one AVX-512 register, two AVX2 registers, four SSE registers: the
// compiler splits it for the target given by -march). aligned(sizeof(T)) allows
// unaligned loads and stores through it.
#pragma once

namespace tsvd {
namespace cpu {

template <typename T> struct Simd;
template <> struct Simd<float> {
  typedef float type __attribute__((vector_size(64), aligned(4)));
};
template <> struct Simd<double> {
  typedef double type __attribute__((vector_size(64), aligned(8)));
};

}  // namespace cpu
}  // namespace tsvd
