// Runtime choice of the CPU instruction set of the tile loops (see isa.h). Compiled for
// the baseline like all the ATen glue.
#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace tsvd {
namespace cpu {
namespace {

// -1: not chosen yet (TSVD_CPU_ISA is read on first use)
std::atomic<int> g_active{-1};

const KernelSet* set_of(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return &kernels_baseline;
#ifdef TSVD_CPU_DISPATCH
    case Isa::kAvx2: return &kernels_avx2;
    case Isa::kAvx512: return &kernels_avx512;
#endif
    default: return nullptr;
  }
}

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return true;
#ifdef TSVD_CPU_DISPATCH
    case Isa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    default: return false;
  }
}

std::string supported_list() {
  std::string s;
  for (int i = 0; i < kNumIsa; ++i)
    if (isa_supported(Isa(i))) s += std::string(s.empty() ? "" : ", ") + isa_name(Isa(i));
  return s;
}

Isa parse(const char* name, const char* what) {
  const std::string n = name ? name : "";
  if (n.empty() || n == "auto") return best_isa();
  for (int i = 0; i < kNumIsa; ++i) {
    if (n == isa_name(Isa(i))) {
      TORCH_CHECK(isa_supported(Isa(i)), what, "=", n, ": ",
                  isa_compiled(Isa(i)) ? "this CPU lacks its instructions"
                                       : "not compiled into this build of tsvd._C",
                  "; supported here: auto, ", supported_list());
      return Isa(i);
    }
  }
  TORCH_CHECK(false, what, ": expected one of auto, baseline, avx2, avx512, got '", n, "'");
  return Isa::kBaseline;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return "baseline";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

bool isa_compiled(Isa isa) { return set_of(isa) != nullptr; }

bool isa_supported(Isa isa) { return isa_compiled(isa) && cpu_has(isa); }

Isa best_isa() {
  for (int i = kNumIsa - 1; i > 0; --i)
    if (isa_supported(Isa(i))) return Isa(i);
  return Isa::kBaseline;
}

Isa active_isa() {
  int a = g_active.load(std::memory_order_acquire);
  if (a < 0) {
    const Isa chosen = parse(std::getenv("TSVD_CPU_ISA"), "TSVD_CPU_ISA");
    int expected = -1;
    g_active.compare_exchange_strong(expected, int(chosen), std::memory_order_acq_rel);
    a = g_active.load(std::memory_order_acquire);
  }
  return Isa(a);
}

Isa set_isa(const char* name) {
  const Isa want = parse(name, "isa");
  Isa prev;
  try {
    prev = active_isa();
  } catch (const c10::Error&) {  // a bad TSVD_CPU_ISA is replaced, not reported here
    prev = best_isa();
  }
  g_active.store(int(want), std::memory_order_release);
  return prev;
}

const KernelSet& active_kernels() { return *set_of(active_isa()); }

}  // namespace cpu
}  // namespace tsvd
