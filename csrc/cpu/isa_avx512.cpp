// The CPU tile loops compiled for AVX-512 (F, VL, DQ, BW; 64-byte vectors), used when the
// running CPU has them (isa.cpp). Empty on other architectures. See isa.h for the rules
// of the per-ISA units.
#include "isa.h"

#ifdef TSVD_CPU_DISPATCH
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#endif

#define TSVD_CPU_ISA_NS avx512
#define TSVD_CPU_VBYTES 64
// hidden: the loops and the kernel templates they instantiate are called directly, not
// through the PLT (and are not exported from tsvd._C)
#pragma GCC visibility push(hidden)
#include "tile_loops.h"
#pragma GCC visibility pop

namespace tsvd {
namespace cpu {
const KernelSet kernels_avx512 = {avx512::make_kernels<float>(), avx512::make_kernels<double>()};
}  // namespace cpu
}  // namespace tsvd

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // TSVD_CPU_DISPATCH
