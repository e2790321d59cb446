// Grouped MoE CPU kernels: a stable counting sort of the (token, slot) pairs by expert, then a parallel row
// copy (permute), the weighted sum of each token's k expert rows (unpermute), and the SwiGLU elementwise
// forward and backward of the expert MLP in one pass each (the GEMMs around them are at::mm per expert).
//
// The sort is sequential: it touches T*k int64 ids (4096 for 2048 tokens, top-2: ~10 us), while the row
// copies move T*k*d elements and are what at::parallel_for spreads over threads. Rows are copied with
// memcpy, so permute is bit-exact for every dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "moe.h"

// x86-64: SwiGLU loops cloned for AVX-512 and AVX2 (chosen at run time; the baseline has 4-wide SSE2 only) and
// float16 staged through F16C. Other CPUs (aarch64 hosts, or -DSPHINX_KERNELS_PORTABLE): the same loops as the
// compiler vectorises them for its baseline, float16 converted by c10::Half.
#if defined(__x86_64__) && !defined(SPHINX_KERNELS_PORTABLE)
#include <immintrin.h>
#define SPHINX_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define SPHINX_X86_F16C 1
#else
#define SPHINX_SIMD_CLONES
#define SPHINX_X86_F16C 0
#endif

namespace sphinx_kernels {

void check_moe_permute_args(const at::Tensor& x, const at::Tensor& expert_ids, int64_t num_experts) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "moe_permute: x must be a contiguous (T, d) tensor");
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong && expert_ids.dim() == 2 && expert_ids.is_contiguous() &&
                  expert_ids.size(0) == x.size(0),
              "moe_permute: expert_ids must be a contiguous int64 (T, k) tensor");
  TORCH_CHECK(num_experts >= 1, "moe_permute: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(x.device() == expert_ids.device(), "moe_permute: x and expert_ids must be on one device");
}

void check_moe_unpermute_args(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
  TORCH_CHECK(y_sorted.dim() == 2 && y_sorted.is_contiguous(),
              "moe_unpermute: y_sorted must be a contiguous (T*k, d) tensor");
  TORCH_CHECK(row_map.scalar_type() == at::kLong && row_map.dim() == 2 && row_map.is_contiguous(),
              "moe_unpermute: row_map must be a contiguous int64 (T, k) tensor");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.sizes() == row_map.sizes() && weights.is_contiguous(),
              "moe_unpermute: weights must be a contiguous float32 tensor shaped like row_map");
  TORCH_CHECK(row_map.numel() == y_sorted.size(0), "moe_unpermute: y_sorted must have T*k rows");
  TORCH_CHECK(y_sorted.device() == row_map.device() && weights.device() == row_map.device(),
              "moe_unpermute: y_sorted, row_map and weights must be on one device");
}

namespace {

// ---- SwiGLU: h = silu(a1) * a3, and its derivative ------------------------------------------------------
// One fused pass instead of PyTorch's silu, mul (forward) and silu, mul, mul, silu_backward (backward): at
// Mixtral's shape scaled down 8x these passes are ~10% of the expert MLP's time on the CPU.

// exp(x) for float, branch-free so GCC vectorises the loops calling it: Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, Cephes' degree-6 polynomial for exp(r) (~1 ulp), 2^n assembled in the exponent bits.
static inline float exp_float(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // 2^n stays a normal float (std::fmin would not vectorise)
  const float shifter = 12582912.0f;           // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  int32_t n_int;
  std::memcpy(&n_int, &t, sizeof n_int);
  n_int -= 0x4B400000;  // the bits of `shifter`
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two: the product is exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

static inline float exp_neg(float x) { return exp_float(-x); }
static inline double exp_neg(double x) { return std::exp(-x); }

template <typename scalar_t>
using op_t = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double

template <typename scalar_t>
SPHINX_SIMD_CLONES void swiglu_forward_kernel(
    const scalar_t* __restrict a1, const scalar_t* __restrict a3, scalar_t* __restrict h, int64_t n) {
  using acc_t = op_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = a1[i];
    h[i] = static_cast<scalar_t>(g / (acc_t(1) + exp_neg(g)) * static_cast<acc_t>(a3[i]));  // PyTorch's silu form
  }
}

// In place on dh: da1 = dh * a3 * silu'(a1), silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g); da3 = dh * silu(a1);
// and h = silu(a1) * a3 again, nearly free here, so the forward need not keep h for w2's gradient. Distinct
// restrict pointers: with six possibly aliased ones GCC gives up vectorising (too many overlap checks).
template <typename scalar_t>
SPHINX_SIMD_CLONES void swiglu_backward_kernel(
    scalar_t* __restrict dh_da1, const scalar_t* __restrict a1, const scalar_t* __restrict a3,
    scalar_t* __restrict da3, scalar_t* __restrict h, int64_t n) {
  using acc_t = op_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = a1[i], up = a3[i], grad = dh_da1[i];
    const acc_t denominator = acc_t(1) + exp_neg(g);
    const acc_t s = acc_t(1) / denominator;
    const acc_t silu = g / denominator;  // the forward's rounding exactly (h below equals it bit for bit)
    h[i] = static_cast<scalar_t>(silu * up);
    da3[i] = static_cast<scalar_t>(grad * silu);
    dh_da1[i] = static_cast<scalar_t>(grad * up * s * (acc_t(1) + g * (acc_t(1) - s)));
  }
}

// float16 through float tiles: c10::Half converts in software (bit manipulation), which made the fp16 passes
// 12x slower than PyTorch's; F16C (every x86-64-v3 CPU) converts 8 values per instruction, round to nearest
// even like c10::Half, so the results are the same bits.
#if SPHINX_X86_F16C
bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}

__attribute__((target("avx2,f16c"))) void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx2,f16c"))) void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i half = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), half);
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#else
bool has_f16c() { return false; }
void half_to_float(const c10::Half*, float*, int64_t) {}  // never called: has_f16c() is false
void float_to_half(const float*, c10::Half*, int64_t) {}
#endif

constexpr int64_t kHalfTile = 512;  // floats per staged operand: 5 of them stay in L1

template <typename scalar_t>
void swiglu_forward_range(const scalar_t* a1, const scalar_t* a3, scalar_t* h, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (has_f16c()) {
      float g[kHalfTile], up[kHalfTile], out[kHalfTile];
      for (int64_t i = 0; i < n; i += kHalfTile) {
        const int64_t m = std::min(kHalfTile, n - i);
        half_to_float(a1 + i, g, m);
        half_to_float(a3 + i, up, m);
        swiglu_forward_kernel<float>(g, up, out, m);
        float_to_half(out, h + i, m);
      }
      return;
    }
  }
  swiglu_forward_kernel<scalar_t>(a1, a3, h, n);
}

template <typename scalar_t>
void swiglu_backward_range(scalar_t* dh_da1, const scalar_t* a1, const scalar_t* a3, scalar_t* da3, scalar_t* h,
                           int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (has_f16c()) {
      float grad[kHalfTile], g[kHalfTile], up[kHalfTile], d3[kHalfTile], out[kHalfTile];
      for (int64_t i = 0; i < n; i += kHalfTile) {
        const int64_t m = std::min(kHalfTile, n - i);
        half_to_float(dh_da1 + i, grad, m);
        half_to_float(a1 + i, g, m);
        half_to_float(a3 + i, up, m);
        swiglu_backward_kernel<float>(grad, g, up, d3, out, m);
        float_to_half(grad, dh_da1 + i, m);
        float_to_half(d3, da3 + i, m);
        float_to_half(out, h + i, m);
      }
      return;
    }
  }
  swiglu_backward_kernel<scalar_t>(dh_da1, a1, a3, da3, h, n);
}

void check_swiglu_arg(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), op, ": ", name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), op, ": ", name,
              " must have a1's shape and dtype");
}

constexpr int64_t kSwigluGrain = 1 << 14;  // elements per task: large enough to amortise the fork

void swiglu_out_cpu(const at::Tensor& a1, const at::Tensor& a3, at::Tensor& h) {
  for (auto [name, t] : {std::pair{"a1", &a1}, {"a3", &a3}, {"h", &h}}) check_swiglu_arg("swiglu_out", name, *t, a1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a1.scalar_type(), "swiglu_out_cpu", [&] {
    const scalar_t* g = a1.data_ptr<scalar_t>();
    const scalar_t* up = a3.data_ptr<scalar_t>();
    scalar_t* out = h.data_ptr<scalar_t>();
    at::parallel_for(0, a1.numel(), kSwigluGrain, [&](int64_t begin, int64_t end) {
      swiglu_forward_range<scalar_t>(g + begin, up + begin, out + begin, end - begin);
    });
  });
}

bool same_memory(const at::Tensor& a, const at::Tensor& b) { return a.data_ptr() == b.data_ptr(); }

void swiglu_backward_cpu_(at::Tensor& dh, const at::Tensor& a1, const at::Tensor& a3, at::Tensor& da3,
                          at::Tensor& h) {
  using Arg = std::pair<const char*, const at::Tensor*>;
  for (auto [name, t] : {Arg{"dh", &dh}, Arg{"a1", &a1}, Arg{"a3", &a3}, Arg{"da3", &da3}, Arg{"h", &h}}) {
    check_swiglu_arg("swiglu_backward_", name, *t, a1);
  }
  for (const at::Tensor* out : std::initializer_list<const at::Tensor*>{&dh, &da3, &h}) {
    for (const at::Tensor* other : std::initializer_list<const at::Tensor*>{&dh, &a1, &a3, &da3, &h}) {
      TORCH_CHECK(out == other || !same_memory(*out, *other),
                  "swiglu_backward_: dh, da3 and h are written and must not share memory with another argument");
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a1.scalar_type(), "swiglu_backward_cpu_", [&] {
    scalar_t* grad = dh.data_ptr<scalar_t>();
    const scalar_t* g = a1.data_ptr<scalar_t>();
    const scalar_t* up = a3.data_ptr<scalar_t>();
    scalar_t* d3 = da3.data_ptr<scalar_t>();
    scalar_t* out = h.data_ptr<scalar_t>();
    at::parallel_for(0, a1.numel(), kSwigluGrain, [&](int64_t begin, int64_t end) {
      swiglu_backward_range<scalar_t>(grad + begin, g + begin, up + begin, d3 + begin, out + begin, end - begin);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& x, const at::Tensor& expert_ids,
                                                               int64_t num_experts) {
  check_moe_permute_args(x, expert_ids, num_experts);
  const int64_t tokens = x.size(0), k = expert_ids.size(1), slots = tokens * k, d = x.size(1);
  auto x_sorted = at::empty({slots, d}, x.options());
  auto row_map = at::empty({tokens, k}, expert_ids.options());
  auto offsets = at::empty({num_experts}, expert_ids.options().dtype(at::kInt));
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  int64_t* map = row_map.data_ptr<int64_t>();

  std::vector<int64_t> next(num_experts + 1, 0);  // counts, then each expert's next free row
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t e = ids[s];
    TORCH_CHECK(e >= 0 && e < num_experts, "moe_permute: expert id ", e, " outside [0, ", num_experts, ")");
    ++next[e + 1];
  }
  int32_t* ends = offsets.data_ptr<int32_t>();
  for (int64_t e = 0; e < num_experts; ++e) {
    next[e + 1] += next[e];
    ends[e] = static_cast<int32_t>(next[e + 1]);
  }
  for (int64_t s = 0; s < slots; ++s) map[s] = next[ids[s]]++;  // in slot order: stable within an expert

  const auto* src = static_cast<const char*>(x.data_ptr());
  auto* dst = static_cast<char*>(x_sorted.data_ptr());
  const int64_t row_bytes = d * x.element_size();
  at::parallel_for(0, slots, 64, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) std::memcpy(dst + map[s] * row_bytes, src + (s / k) * row_bytes, row_bytes);
  });
  return {x_sorted, row_map, offsets};
}

at::Tensor moe_unpermute_cpu(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
  check_moe_unpermute_args(y_sorted, row_map, weights);
  const int64_t tokens = row_map.size(0), k = row_map.size(1), d = y_sorted.size(1);
  auto out = at::empty({tokens, d}, y_sorted.options());
  const int64_t* map = row_map.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_sorted.scalar_type(), "moe_unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y = y_sorted.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {  // slots in order: the same summation order as every backend
          const acc_t wj = static_cast<acc_t>(w[t * k + j]);
          const scalar_t* row = y + map[t * k + j] * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += wj * static_cast<acc_t>(row[c]);
        }
        for (int64_t c = 0; c < d; ++c) o[t * d + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

// Gradients of unpermute in one pass over the tokens: grad_y[row_map[t, j]] = weights[t, j] * grad[t] (each
// sorted row belongs to exactly one (token, slot): a scatter, never a sum) and grad_weights[t, j] =
// <grad[t], y_sorted[row_map[t, j]]>, accumulated in double: a sequential float sum over d is ~d/2 ulps
// off, 3x PyTorch's vectorised sum in the router's gradient (seed 2107923499 of test_moe_mlp_against_loop
// [cpu-multi_tile], d 45); in double the dot is exact to float rounding, at the cost of T*k*d FMAs.
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cpu(const at::Tensor& grad, const at::Tensor& y_sorted,
                                                              const at::Tensor& row_map, const at::Tensor& weights) {
  check_moe_unpermute_args(y_sorted, row_map, weights);
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && grad.size(0) == row_map.size(0) &&
                  grad.size(1) == y_sorted.size(1) && grad.scalar_type() == y_sorted.scalar_type() &&
                  grad.device() == y_sorted.device(),
              "moe_unpermute_backward: grad must be a contiguous (T, d) tensor of y_sorted's dtype");
  const int64_t tokens = row_map.size(0), k = row_map.size(1), d = y_sorted.size(1);
  auto grad_y = at::empty_like(y_sorted);
  auto grad_w = at::empty_like(weights);
  const int64_t* map = row_map.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  float* gw = grad_w.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_sorted.scalar_type(), "moe_unpermute_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* y = y_sorted.data_ptr<scalar_t>();
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g_row = g + t * d;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = map[t * k + j];
          const acc_t wj = static_cast<acc_t>(w[t * k + j]);
          const scalar_t* y_row = y + r * d;
          scalar_t* gy_row = gy + r * d;
          double dot = 0;
          for (int64_t c = 0; c < d; ++c) {
            const acc_t gc = static_cast<acc_t>(g_row[c]);
            gy_row[c] = static_cast<scalar_t>(wj * gc);
            dot += static_cast<double>(gc) * static_cast<double>(y_row[c]);
          }
          gw[t * k + j] = static_cast<float>(dot);
        }
      }
    });
  });
  return {grad_y, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(sphinx_kernels, CPU, m) {
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_cpu);
  m.impl("swiglu_out", &swiglu_out_cpu);
  m.impl("swiglu_backward_", &swiglu_backward_cpu_);
}

}  // namespace sphinx_kernels
