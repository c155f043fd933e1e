// Schemas of the tsvd operators (one place; CPU kernels in csrc/cpu/, CUDA kernels in
// csrc/cuda/ register implementations for the same schemas). Autograd of treconstruct and
// tprod: csrc/autograd.cpp; fake (meta) kernels and the DFT ops' autograd: tsvd/_ext.py.
//
// Two ops without tensors describe the build (they replace a pybind11 module, so that
// tsvd._C needs only the stable Python C API, see module.cpp):
//   build_info() -> str             JSON object (tsvd._ext.build_info parses it)
//   _set_cpu_isa(str isa) -> str    chooses the CPU tile loops, returns the previous choice
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdio>
#include <string>

#include "cpu/isa.h"

namespace tsvd {
namespace {

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    switch (c) {
      case '"': o += "\\\""; break;
      case '\\': o += "\\\\"; break;
      case '\n': o += "\\n"; break;
      case '\t': o += "\\t"; break;
      case '\r': o += "\\r"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          o += buf;
        } else {
          o += c;
        }
    }
  }
  return o + "\"";
}

const char* jbool(bool b) { return b ? "true" : "false"; }

std::string isa_list(bool (*pred)(cpu::Isa)) {
  std::string s = "[";
  for (int i = 0; i < cpu::kNumIsa; ++i)
    if (pred(cpu::Isa(i))) s += std::string(s.size() > 1 ? ", " : "") + json_str(cpu::isa_name(cpu::Isa(i)));
  return s + "]";
}

std::string build_info() {
  std::string active = "null", error = "null";
  try {
    active = json_str(cpu::isa_name(cpu::active_isa()));
  } catch (const c10::Error& e) {
    error = json_str(e.what_without_backtrace());
  }
#ifdef TSVD_WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
#ifdef _OPENMP
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
#ifdef TSVD_NATIVE
  const bool native = true;
#else
  const bool native = false;
#endif
#ifdef Py_LIMITED_API
  const bool limited = true;
#else
  const bool limited = false;
#endif
  // what the compiler flags alone allow (the ATen glue and the baseline loops)
#if defined(__AVX512F__)
  const char* flags_isa = "avx512";
#elif defined(__AVX2__)
  const char* flags_isa = "avx2";
#else
  const char* flags_isa = "baseline";
#endif
#ifdef __VERSION__
  const std::string compiler = __VERSION__;
#else
  const std::string compiler = "unknown";
#endif
  std::string o = "{";
  // what tsvd/_ext.py expects of this build; raised when the Python side and the kernels
  // part ways (2: autograd of treconstruct and tprod in C++, csrc/autograd.cpp)
  o += "\"api_version\": 2";
  o += ", \"with_cuda\": " + std::string(jbool(cuda));
  o += ", \"openmp\": " + std::string(jbool(openmp));
  o += ", \"native\": " + std::string(jbool(native));
  o += ", \"limited_api\": " + std::string(jbool(limited));
  o += ", \"cpu_isa\": " + active;
  o += ", \"cpu_isa_error\": " + error;
  o += ", \"cpu_isas_supported\": " + isa_list(&cpu::isa_supported);
  o += ", \"cpu_isas_compiled\": " + isa_list(&cpu::isa_compiled);
  o += ", \"compiler_flags_isa\": " + json_str(flags_isa);
  o += ", \"compiler\": " + json_str(compiler);
  o += ", \"threads\": " + std::to_string(at::get_num_threads());
  o += ", \"parallel_info\": " + json_str(at::get_parallel_info());
  return o + "}";
}

std::string set_cpu_isa(const std::string& isa) {
  return cpu::isa_name(cpu::set_isa(isa.c_str()));
}

}  // namespace
}  // namespace tsvd

TORCH_LIBRARY(tsvd, m) {
  // U (B,n3,n1,r), S (B,n3,r), V (B,n3,n2,r), residual (B,n3,n1,n2) -> (B,n3,n1,n2)
  m.def("treconstruct(Tensor U, Tensor S, Tensor V, Tensor? residual) -> Tensor");
  // -> (grad_U, grad_S, grad_V)
  m.def("treconstruct_backward(Tensor grad, Tensor U, Tensor S, Tensor V) -> (Tensor, Tensor, Tensor)");
  // (B,n3,n1,n2) x (B,n3,n2,n4) -> (B,n3,n1,n4)
  m.def("tprod(Tensor A, Tensor B) -> Tensor");
  // (B,n3,n1,n2) real -> (B,n3//2+1,n1,n2) complex (== torch.fft.rfft(X, dim=1))
  m.def("tube_rfft(Tensor X) -> Tensor");
  // inverse: (B,nf,n1,n2) complex -> (B,n3,n1,n2) real (== torch.fft.irfft(Xh, n=n3, dim=1))
  m.def("tube_irfft(Tensor Xh, SymInt n3) -> Tensor");
  // the build, and the CPU instruction set of the tile loops (see csrc/cpu/isa.h)
  m.def("build_info() -> str", &tsvd::build_info);
  m.def("_set_cpu_isa(str isa) -> str", &tsvd::set_cpu_isa);
}
