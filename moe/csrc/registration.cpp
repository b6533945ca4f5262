// Operator schemas (namespace `moe`), CPU kernels, and the `moe._C` Python module.
//
// The ops are registered with the dispatcher (TORCH_LIBRARY_FRAGMENT), so they are reachable as
// torch.ops.moe.* once `moe._C` is imported; moe/ops/extension.py adds the fake (meta) kernels and the
// autograd formulas with torch.library.register_fake / register_autograd. The CUDA kernels are
// registered by dispatch_cuda.cpp, which is only compiled when torch has CUDA.
//
//   routing_index(expert_indices [T,k] int, num_experts, capacity?, priority? [T,k])
//       -> (tokens_per_expert [E], dest_rows [T,k], source_tokens [rows]) int64
//   permute(x [T,...], dest_rows [T,k], num_rows) -> [num_rows, ...]
//   unpermute(y [R,...], dest_rows [T,k], gate_weights? [T,k]) -> [T, ...]
//   unpermute_backward(grad_out [T,...], y [R,...], dest_rows, gate_weights) -> (grad_y, grad_w)
//   grouped_swiglu(x [N,d], w13 [E,2h,d], w2 [E,d,h], counts [E]) -> (out [N,d], h13 [N,2h], act [N,h])
//   grouped_swiglu_backward(grad_out, x, w13, w2, counts, h13, act) -> (grad_x, grad_w13, grad_w2)
//       (CPU only: on CUDA the experts run torch._grouped_mm or the per-expert loop)
//   routed_swiglu(x [T,d], dest_rows [T,k], gate_weights [T,k], w13, w2, counts, num_rows) -> (out [T,d], h13, act):
//       unpermute(grouped_swiglu(permute(x)), gate_weights) in one op, without the [N,d] permuted rows or
//       expert outputs; routed_swiglu_backward -> (grad_x [T,d], grad_gate_weights [T,k], grad_w13, grad_w2)
//   topk_indices(scores [T,E], k) -> [T,k] int64: the routers' top-k (CPU only; elsewhere torch.topk)
#include <Python.h>

#include <torch/library.h>

#include "dispatch.h"

TORCH_LIBRARY_FRAGMENT(moe, m) {
  m.def(
      "routing_index(Tensor expert_indices, int num_experts, int? capacity=None, Tensor? priority=None) "
      "-> (Tensor tokens_per_expert, Tensor dest_rows, Tensor source_tokens)");
  m.def("permute(Tensor x, Tensor dest_rows, SymInt num_rows) -> Tensor");
  m.def("unpermute(Tensor y, Tensor dest_rows, Tensor? gate_weights) -> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_out, Tensor y, Tensor dest_rows, Tensor gate_weights) "
      "-> (Tensor grad_y, Tensor grad_gate_weights)");
  m.def("grouped_swiglu(Tensor x, Tensor w13, Tensor w2, Tensor counts) -> (Tensor out, Tensor h13, Tensor act)");
  m.def(
      "grouped_swiglu_backward(Tensor grad_out, Tensor x, Tensor w13, Tensor w2, Tensor counts, Tensor h13, "
      "Tensor act) -> (Tensor grad_x, Tensor grad_w13, Tensor grad_w2)");
  m.def(
      "routed_swiglu(Tensor x, Tensor dest_rows, Tensor gate_weights, Tensor w13, Tensor w2, Tensor counts, "
      "SymInt num_rows) -> (Tensor out, Tensor h13, Tensor act)");
  m.def(
      "routed_swiglu_backward(Tensor grad_out, Tensor x, Tensor dest_rows, Tensor gate_weights, Tensor w13, "
      "Tensor w2, Tensor counts, Tensor h13, Tensor act) "
      "-> (Tensor grad_x, Tensor grad_gate_weights, Tensor grad_w13, Tensor grad_w2)");
  m.def("topk_indices(Tensor scores, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("routing_index", &moe::routing_index_cpu);
  m.impl("permute", &moe::permute_cpu);
  m.impl("unpermute", &moe::unpermute_cpu);
  m.impl("unpermute_backward", &moe::unpermute_backward_cpu);
  m.impl("grouped_swiglu", &moe::grouped_swiglu_cpu);
  m.impl("grouped_swiglu_backward", &moe::grouped_swiglu_backward_cpu);
  m.impl("routed_swiglu", &moe::routed_swiglu_cpu);
  m.impl("routed_swiglu_backward", &moe::routed_swiglu_backward_cpu);
  m.impl("topk_indices", &moe::topk_indices_cpu);
}

// ------------------------------------------------------------------------ Python module moe._C

#ifndef MOE_WITH_CUDA
#define MOE_WITH_CUDA 0
#endif

static PyObject* moe_cuda_compiled(PyObject*, PyObject*) {
  if (MOE_WITH_CUDA) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static PyObject* moe_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(moe::cpu_row_kernels().isa); }

static PyObject* moe_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* isa = PyUnicode_AsUTF8(arg);
  if (isa == nullptr) return nullptr;
  if (moe::set_cpu_isa(isa)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static PyObject* moe_cpu_gemm(PyObject*, PyObject*) { return PyUnicode_FromString(moe::cpu_gemm()); }

static PyObject* moe_set_cpu_gemm(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (moe::set_cpu_gemm(name)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static PyObject* moe_cpu_has_avx512f(PyObject*, PyObject*) {
  if (moe::cpu_has_avx512f()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static PyObject* moe_own_gemm_by_default(PyObject*, PyObject* args) {
  const char* env = nullptr;
  int avx512f = 0;
  if (!PyArg_ParseTuple(args, "zp", &env, &avx512f)) return nullptr;
  if (moe::own_gemm_by_default(env, avx512f != 0)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static PyMethodDef moe_methods[] = {
    {"cuda_compiled", moe_cuda_compiled, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"cpu_isa", moe_cpu_isa, METH_NOARGS, "Instruction set of the CPU row kernels in use: 'avx2' or 'base'."},
    {"set_cpu_isa", moe_set_cpu_isa, METH_O,
     "Use the 'base' or 'avx2' CPU row kernels (for tests); False when unavailable on this machine."},
    {"cpu_gemm", moe_cpu_gemm, METH_NOARGS,
     "GEMM of the fp32 expert ops: 'own' (the AVX2 build's, gemm_cpu_kernels.h) or 'aten'."},
    {"set_cpu_gemm", moe_set_cpu_gemm, METH_O,
     "Use the 'own' or 'aten' GEMM in the fp32 expert ops (tests, A/B benchmarks); False when 'own' is "
     "unavailable with the kernels in use."},
    {"cpu_has_avx512f", moe_cpu_has_avx512f, METH_NOARGS, "True when this CPU has AVX-512F."},
    {"own_gemm_by_default", moe_own_gemm_by_default, METH_VARARGS,
     "own_gemm_by_default(MOE_CPU_GEMM value or None, cpu has AVX-512F): whether the fp32 expert ops "
     "start on the own GEMM (the policy, for tests)."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef moe_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled token-dispatch ops; importing registers torch.ops.moe.* (see moe/ops/extension.py).", -1, moe_methods,
    nullptr, nullptr, nullptr, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&moe_module); }
