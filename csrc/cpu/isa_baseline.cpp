// The CPU tile loops for the architecture's baseline (x86-64: SSE2; 16-byte vectors), or
// for whatever the compiler flags say (TSVD_NATIVE=1 builds everything with -march=native).
// See isa.h for the rules of the per-ISA units.
#include "isa.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#define TSVD_CPU_ISA_NS baseline
#define TSVD_CPU_VBYTES 16
// hidden: the loops and the kernel templates they instantiate are called directly, not
// through the PLT (and are not exported from tsvd._C)
#pragma GCC visibility push(hidden)
#include "tile_loops.h"
#pragma GCC visibility pop

namespace tsvd {
namespace cpu {
const KernelSet kernels_baseline = {baseline::make_kernels<float>(), baseline::make_kernels<double>()};
}  // namespace cpu
}  // namespace tsvd
