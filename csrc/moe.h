#pragma once
#include <ATen/core/Tensor.h>

namespace sphinx_kernels {
// Argument checks shared by the CPU and CUDA kernels of moe_permute / moe_unpermute (the Python side checks
// first, with friendlier messages; these guard direct callers of torch.ops.sphinx_kernels.*).
void check_moe_permute_args(const at::Tensor& x, const at::Tensor& expert_ids, int64_t num_experts);
void check_moe_unpermute_args(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights);
}  // namespace sphinx_kernels
