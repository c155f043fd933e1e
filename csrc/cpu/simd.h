// CPU vector types for the tile kernels of csrc/kernels/: GCC/Clang vector extensions of
// one register of the target ISA (16 bytes SSE2, 32 bytes AVX2, 64 bytes AVX-512).
// aligned(sizeof(T)) allows unaligned loads and stores through them.
//
// Included only by the per-ISA translation units (isa_*.cpp, through tile_loops.h). Each
// ISA uses a vector type of a different size, so every instantiation of the csrc/kernels
// templates has a different mangled name per ISA: the linker can never merge an AVX-512
// copy of a kernel with the baseline one (the one-definition-rule trap of compiling the
// same inline code with different -m flags).
#pragma once

namespace tsvd {
namespace cpu {

template <typename T, int Bytes> struct Vec;
template <> struct Vec<float, 16> { typedef float type __attribute__((vector_size(16), aligned(4))); };
template <> struct Vec<float, 32> { typedef float type __attribute__((vector_size(32), aligned(4))); };
template <> struct Vec<float, 64> { typedef float type __attribute__((vector_size(64), aligned(4))); };
template <> struct Vec<double, 16> { typedef double type __attribute__((vector_size(16), aligned(8))); };
template <> struct Vec<double, 32> { typedef double type __attribute__((vector_size(32), aligned(8))); };
template <> struct Vec<double, 64> { typedef double type __attribute__((vector_size(64), aligned(8))); };

}  // namespace cpu
}  // namespace tsvd
