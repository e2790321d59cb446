// Skip-token tile gathering, CUDA kernel: one thread per output pixel (all three channels), blocks of
// 32 x 8 pixels of one view; grid.z walks the views. Each thread computes its own separable antialias
// taps (the weights are a few flops each, cheaper than staging them) and reads the uint8 source through
// the cache: neighbouring threads share most of their taps. Writes are coalesced along x per channel.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../resample.h"
#include "../tiles.h"

namespace sphinx_kernels {
namespace {

constexpr int kBlockX = 32;
constexpr int kBlockY = 8;

template <typename scalar_t>
__global__ void tile_gather_kernel(const uint8_t* __restrict__ data, const int64_t* __restrict__ table,
                                   int64_t tile, float3 scale, float3 shift, scalar_t* __restrict__ out) {
  const int64_t v = blockIdx.z;
  const int64_t x = blockIdx.x * kBlockX + threadIdx.x;
  const int64_t y = blockIdx.y * kBlockY + threadIdx.y;
  if (x >= tile || y >= tile) return;
  const int64_t* row = table + v * kViewColumns;
  const int64_t out_h = row[kOutH], out_w = row[kOutW];
  const int64_t sy = row[kY0] + y, sx = row[kX0] + x;
  const int64_t plane = tile * tile;
  scalar_t* dst = out + v * 3 * plane + y * tile + x;
  if (sy >= out_h || sx >= out_w) {  // padding: the mean colour normalises to exactly 0
    dst[0] = dst[plane] = dst[2 * plane] = static_cast<scalar_t>(0.0f);
    return;
  }
  const int64_t height = row[kHeight], width = row[kWidth];
  const uint8_t* image = data + row[kOffset];
  const ResampleAxis ay(height, out_h), ax(width, out_w);
  float cy, cx;
  int64_t y_start, y_count, x_start, x_count;
  ay.window(sy, cy, y_start, y_count);
  ax.window(sx, cx, x_start, x_count);

  float x_total = 0.0f;
  for (int64_t j = 0; j < x_count; ++j) x_total += ax.weight(x_start + j, cx);
  float y_total = 0.0f, r = 0.0f, g = 0.0f, b = 0.0f;
  for (int64_t i = 0; i < y_count; ++i) {
    const float wy = ay.weight(y_start + i, cy);
    y_total += wy;
    const uint8_t* src = image + ((y_start + i) * width + x_start) * 3;
    float rr = 0.0f, gg = 0.0f, bb = 0.0f;
    for (int64_t j = 0; j < x_count; ++j) {
      const float wx = ax.weight(x_start + j, cx);
      rr += wx * static_cast<float>(__ldg(src + 3 * j));
      gg += wx * static_cast<float>(__ldg(src + 3 * j + 1));
      bb += wx * static_cast<float>(__ldg(src + 3 * j + 2));
    }
    r += wy * rr;
    g += wy * gg;
    b += wy * bb;
  }
  const float norm = 1.0f / (x_total * y_total);
  dst[0] = static_cast<scalar_t>(r * norm * scale.x + shift.x);
  dst[plane] = static_cast<scalar_t>(g * norm * scale.y + shift.y);
  dst[2 * plane] = static_cast<scalar_t>(b * norm * scale.z + shift.z);
}

void tile_gather_out_cuda(const at::Tensor& data, const at::Tensor& view_table, at::ArrayRef<double> scale,
                          at::ArrayRef<double> shift, at::Tensor& out) {
  check_tile_gather_args(data, view_table, scale, shift, out);
  const int64_t num_views = view_table.size(0), tile = out.size(2);
  TORCH_CHECK(num_views <= 65535, "tile_gather_out: at most 65535 views per call on CUDA, got ", num_views);
  if (num_views == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const float3 scale_f = make_float3(scale[0], scale[1], scale[2]);
  const float3 shift_f = make_float3(shift[0], shift[1], shift[2]);
  const dim3 block(kBlockX, kBlockY);
  const dim3 grid((tile + kBlockX - 1) / kBlockX, (tile + kBlockY - 1) / kBlockY, num_views);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tile_gather_out_cuda", [&] {
    tile_gather_kernel<scalar_t><<<grid, block, 0, stream>>>(data.data_ptr<uint8_t>(),
                                                             view_table.data_ptr<int64_t>(), tile, scale_f,
                                                             shift_f, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(sphinx_kernels, CUDA, m) { m.impl("tile_gather_out", &tile_gather_out_cuda); }

}  // namespace sphinx_kernels
