// The one TORCH_LIBRARY(sphinx_kernels, m): every op schema of the extension is declared here; the
// kernels register themselves per device with TORCH_LIBRARY_IMPL in their family's .cpp / .cu file.
// The fake (meta) implementations live on the Python side (sphinx_kernels/<family>.py).
#include <torch/library.h>

#ifdef SPHINX_KERNELS_PYTHON_MODULE
#include <Python.h>
// An empty Python module so `import sphinx_kernels._C` loads this library (and runs the registrations).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif

TORCH_LIBRARY(sphinx_kernels, m) {
  // Skip-token tiling: out[v] = normalised view v, resampled straight from the uint8 source (see tiles.cpp).
  m.def(
      "tile_gather_out(Tensor data, Tensor view_table, float[] scale, float[] shift, Tensor(a!) out) -> ()");
  // The same from a list of (H, W, 3) images, one pointer each (the view table's offset column is the image
  // index): packing 97 MB into one buffer cost more than the kernel. CPU only; the GPU paths take one buffer.
  m.def(
      "tile_gather_list_out(Tensor[] images, Tensor view_table, float[] scale, float[] shift, Tensor(a!) out) -> "
      "()");
  // Grouped MoE: rows sorted by expert (stable), int32 cumulative expert ends; weighted un-permutation (moe.cpp).
  m.def("moe_permute(Tensor x, Tensor expert_ids, int num_experts) -> (Tensor x_sorted, Tensor row_map, Tensor offsets)");
  m.def("moe_unpermute(Tensor y_sorted, Tensor row_map, Tensor weights) -> Tensor");
  m.def(
      "moe_unpermute_backward(Tensor grad, Tensor y_sorted, Tensor row_map, Tensor weights) -> "
      "(Tensor grad_y_sorted, Tensor grad_weights)");
  // The expert MLP's elementwise SwiGLU, forward h = silu(a1) * a3 and backward, one pass each (moe.cpp).
  // The backward overwrites dh with da1 and also recomputes h (for w2's gradient).
  m.def("swiglu_out(Tensor a1, Tensor a3, Tensor(a!) h) -> ()");
  m.def("swiglu_backward_(Tensor(a!) dh, Tensor a1, Tensor a3, Tensor(b!) da3, Tensor(c!) h) -> ()");
}
