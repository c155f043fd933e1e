// The Python module tsvd._C. Loading it runs the static TORCH_LIBRARY registrations of
// the other translation units (torch.ops.tsvd.*); the module itself is empty. It uses
// only the stable (limited) Python C API, so one build serves every CPython >= 3.10 for
// a given torch (setup.py builds it with py_limited_api=True); the build queries are
// operators too (torch.ops.tsvd.build_info, see ops.cpp), not pybind11 functions.
#include <Python.h>

#define TSVD_CONCAT2(a, b) a##b
#define TSVD_CONCAT(a, b) TSVD_CONCAT2(a, b)
#define TSVD_STR2(a) #a
#define TSVD_STR(a) TSVD_STR2(a)

extern "C" PyMODINIT_FUNC TSVD_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {
      PyModuleDef_HEAD_INIT,
      TSVD_STR(TORCH_EXTENSION_NAME),  // m_name
      "tsvd compiled kernels: importing this module registers torch.ops.tsvd.*",  // m_doc
      -1,       // m_size: no per-interpreter state
      nullptr,  // m_methods
      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
