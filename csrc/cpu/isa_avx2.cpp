// The CPU tile loops compiled for AVX2 + FMA (x86-64-v3 class CPUs; 32-byte vectors), used
// when the running CPU has them (isa.cpp). Empty on other architectures. See isa.h for the
// rules of the per-ISA units.
#include "isa.h"

#ifdef TSVD_CPU_DISPATCH
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define TSVD_CPU_ISA_NS avx2
#define TSVD_CPU_VBYTES 32
// hidden: the loops and the kernel templates they instantiate are called directly, not
// through the PLT (and are not exported from tsvd._C)
#pragma GCC visibility push(hidden)
#include "tile_loops.h"
#pragma GCC visibility pop

namespace tsvd {
namespace cpu {
const KernelSet kernels_avx2 = {avx2::make_kernels<float>(), avx2::make_kernels<double>()};
}  // namespace cpu
}  // namespace tsvd

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // TSVD_CPU_DISPATCH
