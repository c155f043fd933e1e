// Runtime choice of the CPU instruction set (no ATen here: included by the per-ISA
// translation units too).
//
// The tile loops of the CPU kernels (csrc/cpu/tile_loops.h over csrc/kernels/*.h) are
// compiled once per ISA, each in its own translation unit (isa_baseline.cpp,
// isa_avx2.cpp, isa_avx512.cpp) with `#pragma GCC target`, and each fills a
// KernelSet of function pointers. The ATen glue (treconstruct_cpu.cpp, tube_dft_cpu.cpp)
// allocates buffers, runs at::parallel_for and calls the active set's loops on ranges of
// tasks. The active set is the best one the CPU supports (__builtin_cpu_supports),
// unless TSVD_CPU_ISA (baseline | avx2 | avx512 | auto) or set_isa() says otherwise.
//
// Rules for code in the per-ISA units (they are compiled with instructions the CPU may
// lack): no ATen, no standard-library templates, no inline functions with external
// linkage whose mangled names do not depend on the ISA (helpers here are static, the
// kernels are templates over the ISA's vector type). tests/test_ext.py checks the built
// library: outside the AVX2 / AVX-512 code no function uses AVX instructions.
#pragma once
#include <cstdint>

namespace tsvd {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumIsa = 3;

// Per-thread buffers of the chunked two-phase loops are kept under this many bytes (L2).
constexpr int64_t kChunkBytes = 512 * 1024;

// Fused treconstruct forward over tasks [begin, end) of B * ceil(n1 / ib) row blocks.
// a (B,nf,n1,2r) = [re|im] of Uh diag(Sh); bt (B,nf,2,r,n2p) = [re;im] of Vh^T, j
// contiguous, zero padded to n2p (a multiple of jb); res (B,n3,n1,n2) or null; out
// (B,n3,n1,n2); ic/is the irfft tables of make_dft_tables. cjb tiles per chunk.
// scratch: 2 * cjb*ib*nf*jb + 2 * n3*jb values.
template <typename T> struct TrecForwardArgs {
  const T *a, *bt, *res, *ic, *is;
  T* out;
  int64_t B, n3, n1, n2, n2p, r, cjb;
};

// treconstruct backward for one batch element over tasks [begin, end) of ceil(n1 / ib)
// row blocks. g (n3,n1,n2); a, a2 (nf,n1,RR); bk, bk2 (nf,n2,RR); ga (nf,n1,RR) +=
// rows owned by the task; gb (nf,n2,RR) the calling thread's buffer (+=); fc/fs the
// rfft tables. scratch (zero-initialised): 2 * cjb*ib*nf*jb + 2*(n3/2+1)*jb + n3*jb.
template <typename T> struct TrecBackwardArgs {
  const T *g, *a, *a2, *bk, *bk2, *fc, *fs;
  T* ga;
  int64_t n3, n1, n2, RR, cjb;
};

// Tube rfft over tasks [begin, end) of B * ceil(ceil(P / jb) / cj) chunks. x (B,n3,P)
// real, out (B,nf,P,2) interleaved complex. scratch (zero-initialised):
// 2 * cj*nf*jb + 2*(n3/2+1)*jb + n3*jb.
template <typename T> struct RfftArgs {
  const T *x, *fc, *fs;
  T* out;
  int64_t B, n3, P, cj;
};

// Tube irfft, same tasks. xh interleaved complex with strides (in T) sb, sf, s1, s2 of
// (B,nf,n1,n2); out (B,n3,P = n1*n2). scratch (zero-initialised): 2 * cj*nf*jb + n3*jb
// values and cj*jb offsets.
template <typename T> struct IrfftArgs {
  const T *xh, *ic, *is;
  T* out;
  int64_t sb, sf, s1, s2, B, n3, n2, P, cj;
};

template <typename T> struct Kernels {
  int jb;             // tile width (columns, = lanes of one vector register)
  int ib;             // rows per tile of treconstruct
  int rank_multiple;  // backward: the rank is zero padded to a multiple of this
  void (*trec_forward)(const TrecForwardArgs<T>&, int64_t begin, int64_t end, T* scratch);
  void (*trec_backward)(const TrecBackwardArgs<T>&, int64_t begin, int64_t end, T* gb, T* scratch);
  void (*rfft)(const RfftArgs<T>&, int64_t begin, int64_t end, T* scratch);
  void (*irfft)(const IrfftArgs<T>&, int64_t begin, int64_t end, T* scratch, int64_t* offs);
};

struct KernelSet {
  Kernels<float> f32;
  Kernels<double> f64;
};

// Defined by the per-ISA translation units (the AVX ones only on x86-64 with GCC/Clang).
extern const KernelSet kernels_baseline;
#if defined(__x86_64__) && defined(__GNUC__)
#define TSVD_CPU_DISPATCH 1
extern const KernelSet kernels_avx2;
extern const KernelSet kernels_avx512;
#endif

// Dispatch (isa.cpp, compiled for the baseline).
const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);   // built into this library
bool isa_supported(Isa isa);  // built in and the running CPU has the instructions
Isa best_isa();               // best supported
Isa active_isa();             // the one in use (TSVD_CPU_ISA read on first use; throws on a bad value)
Isa set_isa(const char* name);  // "auto" | "baseline" | "avx2" | "avx512"; returns the previous
const KernelSet& active_kernels();

template <typename T> const Kernels<T>& of(const KernelSet& s);
template <> inline const Kernels<float>& of<float>(const KernelSet& s) { return s.f32; }
template <> inline const Kernels<double>& of<double>(const KernelSet& s) { return s.f64; }
template <typename T> const Kernels<T>& kernels() { return of<T>(active_kernels()); }

}  // namespace cpu
}  // namespace tsvd
