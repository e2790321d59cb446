// Grouped MoE data movement, CUDA kernels, without a host sync: a stable counting sort of the (token, slot)
// pairs by expert in three launches, fused with the row copy, and the weighted un-permutation.
//
//   1. count:  one block per chunk of kChunk slots; each thread ranks its slot among the chunk's earlier slots
//              of the same expert (a shared-memory scan: 256 compares, cheaper than a global sort) and the
//              block writes its per-expert histogram to block_counts[chunk, e].
//   2. scan:   one block, one thread per expert: prefix sums over chunks (per expert) then over experts give
//              every (chunk, expert) its first destination row and the int32 offsets (cumulative ends).
//   3. scatter: one block per slot: destination = base[chunk, e] + rank; the block copies the token's row.
// Permutation is ~1% of an MoE layer's time (the issue), so simplicity wins over a radix sort here.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../moe.h"

namespace sphinx_kernels {
namespace {

constexpr int kChunk = 256;       // slots per block in the count pass
constexpr int kMaxExperts = 1024; // one thread per expert in the scan pass

__global__ void count_kernel(const int64_t* __restrict__ ids, int64_t slots, int64_t num_experts,
                             int32_t* __restrict__ rank, int32_t* __restrict__ block_counts) {
  __shared__ int64_t chunk_ids[kChunk];
  extern __shared__ int32_t hist[];  // num_experts
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
  const int64_t e = s < slots ? ids[s] : -1;
  CUDA_KERNEL_ASSERT(s >= slots || (e >= 0 && e < num_experts));
  chunk_ids[threadIdx.x] = e;
  __syncthreads();
  if (s < slots) {
    int32_t r = 0;
    for (int i = 0; i < static_cast<int>(threadIdx.x); ++i) r += chunk_ids[i] == e;
    rank[s] = r;
    atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < num_experts; i += blockDim.x) {
    block_counts[blockIdx.x * num_experts + i] = hist[i];
  }
}

// In place: block_counts[c, e] becomes the first destination row of chunk c's slots of expert e.
__global__ void scan_kernel(int32_t* __restrict__ block_counts, int64_t chunks, int64_t num_experts,
                            int32_t* __restrict__ offsets) {
  __shared__ int32_t totals[kMaxExperts];
  const int e = threadIdx.x;
  int32_t running = 0;
  if (e < num_experts) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = block_counts[c * num_experts + e];
      block_counts[c * num_experts + e] = running;
      running += n;
    }
    totals[e] = running;
  }
  __syncthreads();
  if (e == 0) {  // <= 1024 serial adds: negligible next to the other passes
    int32_t sum = 0;
    for (int64_t i = 0; i < num_experts; ++i) {
      sum += totals[i];
      totals[i] = sum;
    }
  }
  __syncthreads();
  if (e < num_experts) {
    const int32_t base = totals[e] - running;
    for (int64_t c = 0; c < chunks; ++c) block_counts[c * num_experts + e] += base;
    offsets[e] = totals[e];
  }
}

template <typename scalar_t>
__global__ void scatter_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ ids,
                               const int32_t* __restrict__ rank, const int32_t* __restrict__ base, int64_t k,
                               int64_t d, int64_t num_experts, int64_t* __restrict__ row_map,
                               scalar_t* __restrict__ x_sorted) {
  const int64_t s = blockIdx.x;
  const int64_t e = ids[s];
  const int64_t dest = base[(s / kChunk) * num_experts + e] + rank[s];
  if (threadIdx.x == 0) row_map[s] = dest;
  const scalar_t* src = x + (s / k) * d;
  scalar_t* dst = x_sorted + dest * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

template <typename scalar_t>
__global__ void unpermute_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ row_map,
                                 const float* __restrict__ w, int64_t k, int64_t d, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    acc_t acc = 0;
    for (int64_t j = 0; j < k; ++j) {  // slots in order, as on every backend
      acc += static_cast<acc_t>(w[t * k + j]) * static_cast<acc_t>(y[row_map[t * k + j] * d + c]);
    }
    out[t * d + c] = static_cast<scalar_t>(acc);
  }
}

int threads_for(int64_t d) { return d >= 1024 ? 256 : (d >= 256 ? 128 : 64); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& x, const at::Tensor& expert_ids,
                                                                int64_t num_experts) {
  check_moe_permute_args(x, expert_ids, num_experts);
  TORCH_CHECK(num_experts <= kMaxExperts, "moe_permute: at most ", kMaxExperts, " experts on CUDA, got ",
              num_experts);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), k = expert_ids.size(1), slots = tokens * k, d = x.size(1);
  auto x_sorted = at::empty({slots, d}, x.options());
  auto row_map = at::empty({tokens, k}, expert_ids.options());
  auto offsets = at::zeros({num_experts}, expert_ids.options().dtype(at::kInt));
  if (slots == 0) return {x_sorted, row_map, offsets};
  TORCH_CHECK(slots < (int64_t(1) << 31), "moe_permute: at most 2^31 - 1 (token, slot) pairs");
  const int64_t chunks = (slots + kChunk - 1) / kChunk;
  auto rank = at::empty({slots}, expert_ids.options().dtype(at::kInt));
  auto block_counts = at::empty({chunks, num_experts}, expert_ids.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  count_kernel<<<chunks, kChunk, num_experts * sizeof(int32_t), stream>>>(
      expert_ids.data_ptr<int64_t>(), slots, num_experts, rank.data_ptr<int32_t>(), block_counts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scan_kernel<<<1, kMaxExperts, 0, stream>>>(block_counts.data_ptr<int32_t>(), chunks, num_experts,
                                             offsets.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute_cuda", [&] {
    scatter_kernel<scalar_t><<<slots, threads_for(d), 0, stream>>>(
        x.data_ptr<scalar_t>(), expert_ids.data_ptr<int64_t>(), rank.data_ptr<int32_t>(),
        block_counts.data_ptr<int32_t>(), k, d, num_experts, row_map.data_ptr<int64_t>(),
        x_sorted.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_sorted, row_map, offsets};
}

at::Tensor moe_unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
  check_moe_unpermute_args(y_sorted, row_map, weights);
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const int64_t tokens = row_map.size(0), k = row_map.size(1), d = y_sorted.size(1);
  auto out = at::empty({tokens, d}, y_sorted.options());
  if (tokens == 0 || d == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_sorted.scalar_type(), "moe_unpermute_cuda", [&] {
    unpermute_kernel<scalar_t><<<tokens, threads_for(d), 0, stream>>>(
        y_sorted.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), weights.data_ptr<float>(), k, d,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sphinx_kernels, CUDA, m) {
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
}

}  // namespace sphinx_kernels
