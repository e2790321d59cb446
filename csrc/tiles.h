#pragma once
#include <ATen/core/Tensor.h>

namespace sphinx_kernels {
// Argument checks shared by the CPU and CUDA kernels of tile_gather_out (the Python side checks first,
// with friendlier messages; these guard direct callers of torch.ops.sphinx_kernels.tile_gather_out).
void check_tile_gather_args(const at::Tensor& data, const at::Tensor& view_table, at::ArrayRef<double> scale,
                            at::ArrayRef<double> shift, const at::Tensor& out);
}  // namespace sphinx_kernels
