// Skip-token tile gathering, CPU kernel: one fused pass from uint8 source pixels to normalised views.
//
// Per output row of a view: blend the source rows of its vertical window over just the columns the view
// needs (contiguous uint8 -> float, vectorised), then resample that one float row horizontally and write
// normalised pixels. No padded canvas and no full-size float copy of the image is ever built; the only
// scratch is one source-width float row per thread. Vertical-first because the vertical blend runs over
// contiguous memory: ~8x fewer scalar operations than horizontal-first on a 1920x1080 -> 448 resize.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "resample.h"
#include "tiles.h"

namespace sphinx_kernels {
namespace {

// Normalised taps of `count` consecutive output indices starting at `first`.
struct AxisTaps {
  std::vector<int64_t> start, count;
  std::vector<float> weights;  // count * max_taps, zero beyond each index's own taps
  int max_taps = 0;
};

AxisTaps axis_taps(int64_t in_size, int64_t out_size, int64_t first, int64_t n) {
  ResampleAxis axis(in_size, out_size);
  AxisTaps taps;
  taps.max_taps = axis.max_taps();
  taps.start.resize(n);
  taps.count.resize(n);
  taps.weights.assign(n * taps.max_taps, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    float center;
    axis.window(first + i, center, taps.start[i], taps.count[i]);
    float* w = &taps.weights[i * taps.max_taps];
    float total = 0.0f;
    for (int64_t j = 0; j < taps.count[i]; ++j) {
      w[j] = axis.weight(taps.start[i] + j, center);
      total += w[j];
    }
    if (total != 0.0f) {
      for (int64_t j = 0; j < taps.count[i]; ++j) w[j] /= total;
    }
  }
  return taps;
}

// acc[k] = sum_j w[j] * rows[j * stride + k] for k < len. Cloned for AVX2 (chosen at run time): this loop
// is ~80% of the kernel's time and the x86-64 baseline only has 4-wide SSE2.
__attribute__((target_clones("avx2", "default"))) void blend_rows(const uint8_t* rows, int64_t stride,
                                                                  const float* w, int64_t n, int64_t len,
                                                                  float* acc) {
  for (int64_t k = 0; k < len; ++k) acc[k] = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* row = rows + j * stride;
    const float wj = w[j];
    for (int64_t k = 0; k < len; ++k) acc[k] += wj * static_cast<float>(row[k]);
  }
}

// r, g, b (+ one spare lane) of a pixel: GCC/Clang vector extension, one SSE register.
typedef float Pixel __attribute__((vector_size(16)));

struct View {
  const int64_t* row;  // the view's row of the table
  AxisTaps ys, xs;
  int64_t ny, nx;      // rows / columns holding image pixels; the rest is padding
  int64_t col_lo;      // first source column used
  int64_t cols;        // number of source columns used
};

template <typename scalar_t>
void gather_views(const uint8_t* data, const int64_t* table, int64_t num_views, int64_t tile,
                  const float* scale, const float* shift, scalar_t* out) {
  std::vector<View> views(num_views);
  at::parallel_for(0, num_views, 1, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      View& view = views[v];
      const int64_t* r = table + v * kViewColumns;
      view.row = r;
      view.ny = std::max<int64_t>(0, std::min(tile, r[kOutH] - r[kY0]));
      view.nx = std::max<int64_t>(0, std::min(tile, r[kOutW] - r[kX0]));
      view.ys = axis_taps(r[kHeight], r[kOutH], r[kY0], view.ny);
      view.xs = axis_taps(r[kWidth], r[kOutW], r[kX0], view.nx);
      if (view.nx > 0) {
        view.col_lo = view.xs.start[0];
        view.cols = view.xs.start[view.nx - 1] + view.xs.count[view.nx - 1] - view.col_lo;
      } else {
        view.col_lo = view.cols = 0;
      }
    }
  });

  const int64_t plane = tile * tile;
  // One work item per (view, output row): balances a few large images over many threads.
  at::parallel_for(0, num_views * tile, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t v = item / tile, y = item % tile;
      const View& view = views[v];
      scalar_t* dst = out + v * 3 * plane + y * tile;
      int64_t x = 0;
      if (y < view.ny && view.nx > 0) {
        const int64_t width = view.row[kWidth];
        const uint8_t* image = data + view.row[kOffset];
        acc.resize(view.cols * 3 + 1);
        const int64_t ty = view.ys.max_taps;
        blend_rows(image + (view.ys.start[y] * width + view.col_lo) * 3, width * 3, &view.ys.weights[y * ty],
                   view.ys.count[y], view.cols * 3, acc.data());
        const int tx = view.xs.max_taps;
        for (; x < view.nx; ++x) {
          const float* w = &view.xs.weights[x * tx];
          const float* src = acc.data() + (view.xs.start[x] - view.col_lo) * 3;
          // One 4-lane multiply-add per tap: lanes r, g, b and the next pixel's r (ignored); the row
          // buffer has one float of slack so the last tap's 4th lane stays in bounds.
          Pixel sum = {0.0f, 0.0f, 0.0f, 0.0f};
          for (int64_t j = 0; j < view.xs.count[x]; ++j) {
            Pixel p;
            std::memcpy(&p, src + 3 * j, sizeof(p));
            sum += w[j] * p;
          }
          dst[x] = static_cast<scalar_t>(sum[0] * scale[0] + shift[0]);
          dst[plane + x] = static_cast<scalar_t>(sum[1] * scale[1] + shift[1]);
          dst[2 * plane + x] = static_cast<scalar_t>(sum[2] * scale[2] + shift[2]);
        }
      }
      // Padding is the mean colour, which normalises to exactly 0.
      for (; x < tile; ++x) {
        dst[x] = dst[plane + x] = dst[2 * plane + x] = static_cast<scalar_t>(0.0f);
      }
    }
  });
}

}  // namespace

void check_tile_gather_args(const at::Tensor& data, const at::Tensor& view_table, at::ArrayRef<double> scale,
                            at::ArrayRef<double> shift, const at::Tensor& out) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.dim() == 1 && data.is_contiguous(),
              "tile_gather_out: data must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(view_table.scalar_type() == at::kLong && view_table.dim() == 2 &&
                  view_table.size(1) == kViewColumns && view_table.is_contiguous(),
              "tile_gather_out: view_table must be a contiguous int64 (V, ", kViewColumns, ") tensor");
  TORCH_CHECK(scale.size() == 3 && shift.size() == 3, "tile_gather_out: scale and shift need 3 values");
  TORCH_CHECK(out.dim() == 4 && out.size(0) == view_table.size(0) && out.size(1) == 3 &&
                  out.size(2) == out.size(3) && out.is_contiguous(),
              "tile_gather_out: out must be a contiguous (V, 3, t, t) tensor");
  TORCH_CHECK(data.device() == out.device() && view_table.device() == out.device(),
              "tile_gather_out: data, view_table and out must be on one device");
}

void tile_gather_out_cpu(const at::Tensor& data, const at::Tensor& view_table, at::ArrayRef<double> scale,
                         at::ArrayRef<double> shift, at::Tensor& out) {
  check_tile_gather_args(data, view_table, scale, shift, out);
  const float scale_f[3] = {float(scale[0]), float(scale[1]), float(scale[2])};
  const float shift_f[3] = {float(shift[0]), float(shift[1]), float(shift[2])};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tile_gather_out_cpu", [&] {
    gather_views<scalar_t>(data.data_ptr<uint8_t>(), view_table.data_ptr<int64_t>(), view_table.size(0),
                           out.size(2), scale_f, shift_f, out.data_ptr<scalar_t>());
  });
}

TORCH_LIBRARY_IMPL(sphinx_kernels, CPU, m) { m.impl("tile_gather_out", &tile_gather_out_cpu); }

}  // namespace sphinx_kernels
