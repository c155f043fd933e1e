// Python module tsvd._C: importing it registers the operators (torch.ops.tsvd.*); the
// module itself only reports how the extension was built.
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

bool has_cuda() {
#ifdef TSVD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tsvd compiled kernels (operators are registered under torch.ops.tsvd)";
  m.def("has_cuda", &has_cuda, "whether CUDA kernels were compiled in");
  m.def("num_threads", []() { return at::get_num_threads(); });
  m.def("parallel_info", []() { return at::get_parallel_info(); });
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
#if defined(__AVX512F__)
  m.attr("simd") = "avx512";
#elif defined(__AVX2__)
  m.attr("simd") = "avx2";
#else
  m.attr("simd") = "baseline";
#endif
#ifdef __VERSION__
  m.attr("compiler") = __VERSION__;
#endif
}
