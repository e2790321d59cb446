// Antialiased bilinear resampling weights, shared by the CPU and CUDA kernels.
//
// This reproduces PyTorch's F.interpolate(mode="bilinear", antialias=True, align_corners=False) (the PIL
// scheme): for output index i of an in_size -> out_size resize, scale = in/out, the triangle filter is
// stretched by max(scale, 1), and the taps are [start, start + count) normalised to sum 1.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace sphinx_kernels {

struct ResampleAxis {
  float scale;     // in_size / out_size
  float support;   // half-width of the filter in source pixels
  float invscale;  // 1 / max(scale, 1): maps source distance to filter argument
  int64_t in_size;

  SK_HOST_DEVICE ResampleAxis(int64_t in, int64_t out) : in_size(in) {
    scale = static_cast<float>(in) / static_cast<float>(out);
    support = scale >= 1.0f ? scale : 1.0f;
    invscale = scale >= 1.0f ? 1.0f / scale : 1.0f;
  }

  // Upper bound on taps over all output indices: the loop bound for kernels.
  SK_HOST_DEVICE int max_taps() const { return static_cast<int>(ceilf(support)) * 2 + 1; }

  // First tap and number of taps of output index i (truncation as in PyTorch: toward zero, then clamp).
  SK_HOST_DEVICE void window(int64_t i, float& center, int64_t& start, int64_t& count) const {
    center = scale * (static_cast<float>(i) + 0.5f);
    int64_t lo = static_cast<int64_t>(center - support + 0.5f);
    int64_t hi = static_cast<int64_t>(center + support + 0.5f);
    start = lo > 0 ? lo : 0;
    count = (hi < in_size ? hi : in_size) - start;
  }

  // Unnormalised weight of source pixel `src` for an output whose window is centred at `center`.
  SK_HOST_DEVICE float weight(int64_t src, float center) const {
    float x = (static_cast<float>(src) - center + 0.5f) * invscale;
    x = x < 0.0f ? -x : x;
    return x < 1.0f ? 1.0f - x : 0.0f;
  }
};

// Columns of the view table (int64, one row per output view). Output pixel (y, x) of a view is pixel
// (y0 + y, x0 + x) of the source image resized to out_h x out_w; outside that image it is padding (0).
enum ViewColumn : int {
  kOffset = 0,  // byte offset of the image in the flat uint8 buffer (HWC, RGB)
  kHeight = 1,
  kWidth = 2,
  kOutH = 3,
  kOutW = 4,
  kY0 = 5,
  kX0 = 6,
  kViewColumns = 7,
};

}  // namespace sphinx_kernels
