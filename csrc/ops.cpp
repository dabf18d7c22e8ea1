// Schema, Meta (shape-only) implementation and the Python module neuslice._C.
//
// Importing neuslice._C loads this library, whose static registrars add
// torch.ops.neuslice.block_gram_norms; the module itself only carries WITH_CUDA.
#include <Python.h>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "block_gram.h"

namespace neuslice {

Route check_inputs(const at::Tensor& x, c10::string_view route) {
  TORCH_CHECK(x.dim() == 3, "block_gram_norms: x must have shape (n, d, s), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "block_gram_norms: x must be floating point, got ", x.scalar_type());
  if (route == "feature") return Route::Feature;
  if (route == "sample") return Route::Sample;
  TORCH_CHECK(false, "block_gram_norms: route must be 'feature' or 'sample', got '",
              std::string(route), "'");
}

namespace {

// Fake/meta kernel: only the (d, d) shape and the accumulation dtype (symbolic d allowed).
at::Tensor block_gram_norms_meta(const at::Tensor& x, c10::string_view route) {
  check_inputs(x, route);
  c10::SymInt d = x.sym_size(1);
  return at::empty_symint({d, d}, x.options().dtype(acc_dtype(x.scalar_type())));
}

}  // namespace
}  // namespace neuslice

TORCH_LIBRARY(neuslice, m) {
  m.def("block_gram_norms(Tensor x, str route) -> Tensor", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(neuslice, Meta, m) {
  m.impl("block_gram_norms", &neuslice::block_gram_norms_meta);
}

// Not differentiable: the result never requires grad (no misleading autograd warning path).
TORCH_LIBRARY_IMPL(neuslice, Autograd, m) {
  m.impl("block_gram_norms", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(neuslice, CPU, m) {
  m.impl("block_gram_norms", &neuslice::block_gram_norms_cpu);
}

// ------------------------------------------------------------------ Python module
#ifdef WITH_CUDA
static constexpr long kWithCuda = 1;
#else
static constexpr long kWithCuda = 0;
#endif

static PyModuleDef neuslice_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Native ops of neuslice; importing registers torch.ops.neuslice.block_gram_norms.",
    -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&neuslice_c_module);
  if (mod == nullptr) return nullptr;
  PyObject* flag = PyBool_FromLong(kWithCuda);
  if (PyModule_AddObject(mod, "WITH_CUDA", flag) < 0) {  // steals flag on success only
    Py_XDECREF(flag);
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
