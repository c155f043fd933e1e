// The CPU tile loops for the architecture's baseline (x86-64: SSE2; 16-byte vectors), or
// for whatever the compiler flags say (TSVD_NATIVE=1 builds everything with -march=native).
// See isa.h for the rules of the per-ISA units.
#include "isa.h"

#define TSVD_CPU_ISA_NS baseline
#define TSVD_CPU_VBYTES 16
#include "tile_loops.h"

namespace tsvd {
namespace cpu {
const KernelSet kernels_baseline = {baseline::make_kernels<float>(), baseline::make_kernels<double>()};
}  // namespace cpu
}  // namespace tsvd
