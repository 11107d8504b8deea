// Registration of the bdfast operators: schemas, and the CPU and CUDA kernels behind them.
//
// Fake (meta) kernels and autograd formulas are registered from Python, next to each op's
// wrapper in bdfast/ops/<op>.py, with torch.library, so the ops work under torch.compile.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// Importing bdfast._C loads this library, which runs the TORCH_LIBRARY blocks below.
// bdfast._C.cpu_isa() -> str: the instruction set of the CPU row kernels (see backend_info).
static PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(bdfast::cpu::row_kernel_isa());
}

// bdfast._C.cuda_arch_list() -> str | None: the TORCH_CUDA_ARCH_LIST the CUDA kernels were
// built for, entries joined by "_" (e.g. "7.5_8.0_9.0+PTX"); None without CUDA kernels.
#define BDFAST_STRINGIFY(x) #x
#define BDFAST_EXPAND_STRINGIFY(x) BDFAST_STRINGIFY(x)
static PyObject* cuda_arch_list(PyObject*, PyObject*) {
#ifdef BDFAST_CUDA_ARCHS
  return PyUnicode_FromString(BDFAST_EXPAND_STRINGIFY(BDFAST_CUDA_ARCHS));
#else
  Py_RETURN_NONE;
#endif
}

extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU row kernels."},
      {"cuda_arch_list", cuda_arch_list, METH_NOARGS,
       "The CUDA architectures the kernels were built for, joined by '_', or None."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(bdfast, m) {
  for (const char* schema : bdfast::kOpSchemas) m.def(schema);
}

TORCH_LIBRARY_IMPL(bdfast, CPU, m) { BDFAST_IMPL_ALL(bdfast::cpu) }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(bdfast, CUDA, m) { BDFAST_IMPL_ALL(bdfast::cuda) }
#endif
