// Skip-token tiling, CPU kernel: one fused pass from uint8 source pixels to normalised views.
//
// Per output row of a view: blend the source rows of its vertical window over just the columns the view
// needs (contiguous memory), then resample that one row horizontally and write normalised pixels. No padded
// canvas and no full-size float copy of the image is ever built; the only scratch is one source-width row
// per thread. Vertical-first because the vertical blend runs over contiguous memory: ~8x fewer operations
// than horizontal-first on a 1920x1080 -> 448 resize, and tiles side by side blend disjoint column ranges,
// so no source row is blended twice for the canvas.
//
// Two vertical passes (the vertical blend is ~80% of the work):
// - float weights (float32/float64 output: the accuracy of F.interpolate on the float image is kept);
// - bf16/fp16 output: uint8 x int16 weights with int32 sums (madd), as Pillow-SIMD and PyTorch's uint8 AVX2
//   resize do: 64 taps x pixels per AVX-512 instruction instead of 16 float FMAs after a uint8->float
//   convert per tap. Weights carry p fractional bits (p <= 22, chosen per view so the largest weight plus
//   rounding fits int16, at least 14 bits) and are rounded to sum exactly to 2^p, so the error is at most
//   sum|rounding| * 127.5 <= taps * 2^-(p+1) * 127.5 pixel levels: 0.004 for a 1:1 resize, far below half
//   an fp16 unit at the output's magnitude (0.07 levels) and a bf16 one (0.5 levels).
// The horizontal pass, normalisation and store are float; bf16 is stored by a vectorisable
// round-to-nearest-even on the float bits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "resample.h"
#include "tiles.h"

// x86-64: the integer vertical pass in AVX2 and AVX-512BW, chosen at run time, and the float loops cloned
// for both. Other CPUs (or -DSPHINX_KERNELS_PORTABLE): the same integer arithmetic in plain C++ (the results
// are bit-identical to the SIMD paths: integer sums do not depend on order).
#if defined(__x86_64__) && !defined(SPHINX_KERNELS_PORTABLE)
#include <immintrin.h>
#define SK_TILES_X86 1
#define SK_TILES_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SK_TILES_X86 0
#define SK_TILES_CLONES
#endif

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

// The taps of `taps` as int16 with `bits` fractional bits, each index's summing to exactly 2^bits; rows
// padded to an even count (madd takes taps in pairs), the pad weight 0.
struct IntTaps {
  std::vector<int16_t> weights;  // count * stride
  int stride = 0;
  int bits = 0;
};

IntTaps quantise(const AxisTaps& taps) {
  IntTaps q;
  q.stride = (taps.max_taps + 1) & ~1;
  float largest = 0.0f;
  for (float w : taps.weights) largest = std::max(largest, w);
  // Largest weight * 2^bits plus the sum's rounding (< taps/2) must fit int16; sums of 255 * 2^22 fit int32.
  q.bits = 22;
  while (q.bits > 0 && std::ldexp(double(largest), q.bits) + taps.max_taps > 32767.0) --q.bits;
  const int64_t n = static_cast<int64_t>(taps.count.size());
  q.weights.assign(n * q.stride, 0);
  const double one = std::ldexp(1.0, q.bits);
  for (int64_t i = 0; i < n; ++i) {
    const float* w = &taps.weights[i * taps.max_taps];
    int16_t* out = &q.weights[i * q.stride];
    int64_t total = 0, big = 0;
    for (int64_t j = 0; j < taps.count[i]; ++j) {
      out[j] = static_cast<int16_t>(std::lround(double(w[j]) * one));
      total += out[j];
      if (out[j] > out[big]) big = j;
    }
    if (taps.count[i] > 0) out[big] = static_cast<int16_t>(out[big] + (int64_t(one) - total));
  }
  return q;
}

// acc[k] = sum_j w[j] * rows[j * stride + k] for k < len (float weights, the float32/float64 path).
SK_TILES_CLONES void blend_rows(const uint8_t* rows, int64_t stride, const float* w, int64_t n, int64_t len,
                                float* acc) {
  for (int64_t k = 0; k < len; ++k) acc[k] = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* row = rows + j * stride;
    const float wj = w[j];
    for (int64_t k = 0; k < len; ++k) acc[k] += wj * static_cast<float>(row[k]);
  }
}

// The integer vertical pass: acc[k] = float(sum_j w[j] * rows[j * stride + k]) for k in [begin, len) over
// the window's `n` rows. (The SIMD versions take taps in pairs: an odd window's 0-weight pad tap re-reads its
// last row, never a row past the window, which may be past the image.)
void blend_rows_int_scalar(const uint8_t* rows, int64_t stride, const int16_t* w, int64_t n, int64_t begin,
                           int64_t len, float* acc) {
  for (int64_t k = begin; k < len; ++k) {
    int32_t sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += int32_t(w[j]) * int32_t(rows[j * stride + k]);
    acc[k] = static_cast<float>(sum);
  }
}

inline const uint8_t* pair_row(const uint8_t* rows, int64_t stride, int64_t j, int64_t count) {
  return rows + std::min(j, count - 1) * stride;  // a 0-weight pad tap re-reads the last real row
}

#if SK_TILES_X86
// 32 columns x 2 taps per step (Pillow-SIMD's layout): bytes of rows j, j+1 interleaved and widened to
// int16 pairs, multiplied by the weight pair and summed to int32 by one madd. The four sums hold columns
// {0-3,16-19}, {4-7,20-23}, {8-11,24-27}, {12-15,28-31}; two lane permutes put them back in order.
__attribute__((target("avx2"))) void blend_rows_int_avx2(const uint8_t* rows, int64_t stride, const int16_t* w,
                                                         int64_t n, int64_t count, int64_t len, float* acc) {
  if (len < 32) return blend_rows_int_scalar(rows, stride, w, count, 0, len, acc);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < len; k0 += 32) {
    const int64_t k = std::min(k0, len - 32);  // the last step overlaps the one before: same values again
    __m256i s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    for (int64_t j = 0; j < n; j += 2) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair_row(rows, stride, j, count) + k));
      const __m256i b =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair_row(rows, stride, j + 1, count) + k));
      const __m256i mmk = _mm256_set1_epi32(int32_t(uint16_t(w[j])) | (int32_t(uint16_t(w[j + 1])) << 16));
      const __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);
      s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), mmk));
      s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), mmk));
      s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), mmk));
      s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), mmk));
    }
    _mm256_storeu_ps(acc + k, _mm256_cvtepi32_ps(_mm256_permute2x128_si256(s0, s1, 0x20)));
    _mm256_storeu_ps(acc + k + 8, _mm256_cvtepi32_ps(_mm256_permute2x128_si256(s2, s3, 0x20)));
    _mm256_storeu_ps(acc + k + 16, _mm256_cvtepi32_ps(_mm256_permute2x128_si256(s0, s1, 0x31)));
    _mm256_storeu_ps(acc + k + 24, _mm256_cvtepi32_ps(_mm256_permute2x128_si256(s2, s3, 0x31)));
  }
}

// The same with 64 columns per step; sums hold columns {16l+0-3}, {16l+4-7}, {16l+8-11}, {16l+12-15} of
// 128-bit lane l, put in order by two rounds of lane shuffles.
__attribute__((target("avx512f,avx512bw"))) void blend_rows_int_avx512(const uint8_t* rows, int64_t stride,
                                                                       const int16_t* w, int64_t n, int64_t count,
                                                                       int64_t len, float* acc) {
  if (len < 64) return blend_rows_int_avx2(rows, stride, w, n, count, len, acc);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k0 = 0; k0 < len; k0 += 64) {
    const int64_t k = std::min(k0, len - 64);
    __m512i s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    for (int64_t j = 0; j < n; j += 2) {
      const __m512i a = _mm512_loadu_si512(pair_row(rows, stride, j, count) + k);
      const __m512i b = _mm512_loadu_si512(pair_row(rows, stride, j + 1, count) + k);
      const __m512i mmk = _mm512_set1_epi32(int32_t(uint16_t(w[j])) | (int32_t(uint16_t(w[j + 1])) << 16));
      const __m512i lo = _mm512_unpacklo_epi8(a, b), hi = _mm512_unpackhi_epi8(a, b);
      s0 = _mm512_add_epi32(s0, _mm512_madd_epi16(_mm512_unpacklo_epi8(lo, zero), mmk));
      s1 = _mm512_add_epi32(s1, _mm512_madd_epi16(_mm512_unpackhi_epi8(lo, zero), mmk));
      s2 = _mm512_add_epi32(s2, _mm512_madd_epi16(_mm512_unpacklo_epi8(hi, zero), mmk));
      s3 = _mm512_add_epi32(s3, _mm512_madd_epi16(_mm512_unpackhi_epi8(hi, zero), mmk));
    }
    const __m512i t0 = _mm512_shuffle_i32x4(s0, s1, _MM_SHUFFLE(2, 0, 2, 0));  // s0.l0 s0.l2 s1.l0 s1.l2
    const __m512i t1 = _mm512_shuffle_i32x4(s2, s3, _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i u0 = _mm512_shuffle_i32x4(s0, s1, _MM_SHUFFLE(3, 1, 3, 1));  // s0.l1 s0.l3 s1.l1 s1.l3
    const __m512i u1 = _mm512_shuffle_i32x4(s2, s3, _MM_SHUFFLE(3, 1, 3, 1));
    _mm512_storeu_ps(acc + k, _mm512_cvtepi32_ps(_mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0))));
    _mm512_storeu_ps(acc + k + 16, _mm512_cvtepi32_ps(_mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0))));
    _mm512_storeu_ps(acc + k + 32, _mm512_cvtepi32_ps(_mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1))));
    _mm512_storeu_ps(acc + k + 48, _mm512_cvtepi32_ps(_mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1))));
  }
}
#endif

// Which integer vertical pass runs: the widest this CPU has, or a narrower one named by
// SPHINX_KERNELS_TILES_ISA=scalar|avx2|avx512 (tests run every path in one build and compare them bit for bit).
enum class Isa { kScalar, kAvx2, kAvx512 };

Isa pick_isa() {
  Isa best = Isa::kScalar;
#if SK_TILES_X86
  if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512f")) {
    best = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2")) {
    best = Isa::kAvx2;
  }
#endif
  const char* env = std::getenv("SPHINX_KERNELS_TILES_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string name(env);
  const Isa wanted = name == "scalar" ? Isa::kScalar : name == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
  TORCH_CHECK(name == "scalar" || name == "avx2" || name == "avx512",
              "SPHINX_KERNELS_TILES_ISA must be scalar, avx2 or avx512, got ", name);
  TORCH_CHECK(wanted <= best, "SPHINX_KERNELS_TILES_ISA=", name, ": this CPU or build does not have it");
  return wanted;
}

void blend_rows_int(Isa isa, const uint8_t* rows, int64_t stride, const int16_t* w, int64_t n, int64_t count,
                    int64_t len, float* acc) {
#if SK_TILES_X86
  if (isa == Isa::kAvx512) return blend_rows_int_avx512(rows, stride, w, n, count, len, acc);
  if (isa == Isa::kAvx2) return blend_rows_int_avx2(rows, stride, w, n, count, len, acc);
#endif
  (void)n;
  blend_rows_int_scalar(rows, stride, w, count, 0, len, acc);  // the real taps only: no pad row is read
}

// The horizontal pass of one output row: rgbx[4x + c] = sum_j w[x][j] * acc[3 (start[x] + j) + c].
// The taps of output x read 3*count consecutive floats of acc, so the SIMD paths take them as one run: a
// vector of V floats holds S = 3*floor(V/3) of them (5 pixels in AVX-512, 2 in AVX2; the lanes past S weigh
// 0), multiplied by the taps' weights expanded to channel lanes (precomputed per view), so lane l always
// holds channel l % 3 and three shifted adds finish the sums. Against one 4-lane FMA per tap (the scalar
// path) that is ~3x fewer instructions for the 4-18 taps of a 448-canvas view.
struct HTaps {
  std::vector<float> weights;  // per output x: chunks * width floats
  int chunks = 0, width = 0;
};

HTaps expand_taps(const AxisTaps& taps, int width) {
  HTaps h;
  const int step = 3 * (width / 3);
  h.width = width;
  h.chunks = (3 * taps.max_taps + step - 1) / step;
  const int64_t n = static_cast<int64_t>(taps.count.size());
  h.weights.assign(n * h.chunks * width, 0.0f);
  for (int64_t x = 0; x < n; ++x) {
    float* out = &h.weights[x * h.chunks * width];
    for (int64_t f = 0; f < 3 * taps.count[x]; ++f) out[(f / step) * width + f % step] = taps.weights[x * taps.max_taps + f / 3];
  }
  return h;
}

void hpass_scalar(const float* acc, const AxisTaps& xs, int64_t col_lo, int64_t nx, float* rgbx) {
  typedef float Pixel __attribute__((vector_size(16)));  // r, g, b and a spare lane: one SSE register
  const int tx = xs.max_taps;
  for (int64_t x = 0; x < nx; ++x) {
    const float* w = &xs.weights[x * tx];
    const float* src = acc + (xs.start[x] - col_lo) * 3;
    // Lanes r, g, b and the next pixel's r (ignored): the row buffer has slack past its last pixel.
    Pixel sum = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t j = 0; j < xs.count[x]; ++j) {
      Pixel p;
      std::memcpy(&p, src + 3 * j, sizeof(p));
      sum += w[j] * p;
    }
    std::memcpy(rgbx + 4 * x, &sum, sizeof(sum));
  }
}

#if SK_TILES_X86
__attribute__((target("avx2,fma"))) void hpass_avx2(const float* acc, const AxisTaps& xs, const HTaps& h,
                                                    int64_t col_lo, int64_t nx, float* rgbx) {
  const __m256i by3 = _mm256_setr_epi32(3, 4, 5, 6, 7, 7, 7, 7);
  for (int64_t x = 0; x < nx; ++x) {
    const float* w = &h.weights[x * h.chunks * 8];
    const float* src = acc + (xs.start[x] - col_lo) * 3;
    __m256 sum = _mm256_setzero_ps();
    for (int c = 0; c < h.chunks; ++c) sum = _mm256_fmadd_ps(_mm256_loadu_ps(src + 6 * c), _mm256_loadu_ps(w + 8 * c), sum);
    sum = _mm256_add_ps(sum, _mm256_permutevar8x32_ps(sum, by3));  // lanes c + c+3
    _mm_storeu_ps(rgbx + 4 * x, _mm256_castps256_ps128(sum));
  }
}

__attribute__((target("avx512f"))) void hpass_avx512(const float* acc, const AxisTaps& xs, const HTaps& h,
                                                     int64_t col_lo, int64_t nx, float* rgbx) {
  const __m512i by3 = _mm512_setr_epi32(3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15, 15, 15);
  const __m512i by6 = _mm512_setr_epi32(6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15, 15, 15, 15, 15, 15);
  const __m512i by12 = _mm512_setr_epi32(12, 13, 14, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15);
  for (int64_t x = 0; x < nx; ++x) {
    const float* w = &h.weights[x * h.chunks * 16];
    const float* src = acc + (xs.start[x] - col_lo) * 3;
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < h.chunks; ++c) sum = _mm512_fmadd_ps(_mm512_loadu_ps(src + 15 * c), _mm512_loadu_ps(w + 16 * c), sum);
    // Channel c is lanes c, c+3, ..., c+12 (lane 15 weighs 0).
    const __m512 s3 = _mm512_add_ps(sum, _mm512_permutexvar_ps(by3, sum));      // l + l+3
    const __m512 s6 = _mm512_add_ps(s3, _mm512_permutexvar_ps(by6, s3));        // l .. l+9
    const __m512 s12 = _mm512_add_ps(s6, _mm512_permutexvar_ps(by12, sum));     // + l+12
    _mm_storeu_ps(rgbx + 4 * x, _mm512_castps512_ps128(s12));
  }
}
#endif

// float -> bfloat16 bits, round to nearest even (no NaN can reach it: inputs are finite sums of pixels).
// Plain integer operations so the store loop vectorises, unlike c10's per-element conversion.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// dst[x] = src[4x] * scale + shift for x < n, converted to scalar_t (src: one channel of an rgbx row).
template <typename scalar_t>
SK_TILES_CLONES void store_row(const float* src, int64_t n, float scale, float shift, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
    for (int64_t x = 0; x < n; ++x) bits[x] = bf16_bits(src[4 * x] * scale + shift);
  } else {
    for (int64_t x = 0; x < n; ++x) dst[x] = static_cast<scalar_t>(src[4 * x] * scale + shift);
  }
}

struct View {
  const int64_t* row;  // the view's row of the table
  const uint8_t* image;  // its image's first pixel
  AxisTaps ys, xs;
  IntTaps ys_int;      // the vertical taps as int16 (bf16/fp16 output only)
  HTaps xs_simd;       // the horizontal taps expanded for the SIMD horizontal pass
  int64_t ny, nx;      // rows / columns holding image pixels; the rest is padding
  int64_t col_lo;      // first source column used
  int64_t cols;        // number of source columns used
};

void hpass(Isa isa, const float* acc, const View& view, int64_t nx, float* rgbx) {
#if SK_TILES_X86
  if (isa == Isa::kAvx512) return hpass_avx512(acc, view.xs, view.xs_simd, view.col_lo, nx, rgbx);
  if (isa == Isa::kAvx2) return hpass_avx2(acc, view.xs, view.xs_simd, view.col_lo, nx, rgbx);
#endif
  (void)isa;
  hpass_scalar(acc, view.xs, view.col_lo, nx, rgbx);
}

// `images`: one flat buffer (`indexed` false: a view's image starts at images[0] + its kOffset) or one
// pointer per image (`indexed` true: kOffset is the image's index), so a list of images needs no copy into
// one buffer (a 97 MB copy for 32 photos: more than the kernel itself takes).
template <typename scalar_t>
void gather_views(const uint8_t* const* images, bool indexed, const int64_t* table, int64_t num_views, int64_t tile,
                  const float* scale, const float* shift, scalar_t* out) {
  // Integer vertical pass for 16-bit outputs only: float32/float64 keep float weights (see the top).
  constexpr bool kIntegerPass = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;
  const Isa isa = pick_isa();
  std::vector<View> views(num_views);
  at::parallel_for(0, num_views, 1, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      View& view = views[v];
      const int64_t* r = table + v * kViewColumns;
      view.row = r;
      view.image = indexed ? images[r[kOffset]] : images[0] + r[kOffset];
      view.ny = std::max<int64_t>(0, std::min(tile, r[kOutH] - r[kY0]));
      view.nx = std::max<int64_t>(0, std::min(tile, r[kOutW] - r[kX0]));
      view.ys = axis_taps(r[kHeight], r[kOutH], r[kY0], view.ny);
      view.xs = axis_taps(r[kWidth], r[kOutW], r[kX0], view.nx);
      if (kIntegerPass) view.ys_int = quantise(view.ys);
      if (isa != Isa::kScalar) view.xs_simd = expand_taps(view.xs, isa == Isa::kAvx512 ? 16 : 8);
      if (view.nx > 0) {
        view.col_lo = view.xs.start[0];
        view.cols = view.xs.start[view.nx - 1] + view.xs.count[view.nx - 1] - view.col_lo;
      } else {
        view.col_lo = view.cols = 0;
      }
    }
  });

  const int64_t plane = tile * tile;
  // One work item per (view, output row) of all views at once: a few large images and many small ones
  // keep every thread busy (splitting by image leaves threads idle on mixed sizes).
  at::parallel_for(0, num_views * tile, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc, rgbx(4 * tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t v = item / tile, y = item % tile;
      const View& view = views[v];
      scalar_t* dst = out + v * 3 * plane + y * tile;
      int64_t nx = 0;
      if (y < view.ny && view.nx > 0) {
        nx = view.nx;
        const int64_t width = view.row[kWidth];
        const uint8_t* rows = view.image + (view.ys.start[y] * width + view.col_lo) * 3;
        // Slack past the last pixel: the SIMD horizontal pass reads up to a vector beyond its taps (at 0 weight).
        acc.resize(view.cols * 3 + 3 * view.xs.max_taps + 16);
        std::fill(acc.begin() + view.cols * 3, acc.end(), 0.0f);
        float unit = 1.0f;  // what one unit of `acc` is worth in pixel levels
        if constexpr (kIntegerPass) {
          const int64_t count = view.ys.count[y];
          blend_rows_int(isa, rows, width * 3, &view.ys_int.weights[y * view.ys_int.stride], (count + 1) & ~1,
                         count, view.cols * 3, acc.data());
          unit = std::ldexp(1.0f, -view.ys_int.bits);
        } else {
          blend_rows(rows, width * 3, &view.ys.weights[y * view.ys.max_taps], view.ys.count[y], view.cols * 3,
                     acc.data());
        }
        hpass(isa, acc.data(), view, nx, rgbx.data());
        for (int c = 0; c < 3; ++c) store_row(&rgbx[c], nx, scale[c] * unit, shift[c], dst + c * plane);
      }
      // Padding is the mean colour, which normalises to exactly 0.
      for (int c = 0; c < 3; ++c) std::fill(dst + c * plane + nx, dst + c * plane + tile, static_cast<scalar_t>(0.0f));
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

// Both entry points after their checks: the normalisation as floats, the kernel for out's dtype.
void run_gather(const uint8_t* const* images, bool indexed, const at::Tensor& view_table, at::ArrayRef<double> scale,
                at::ArrayRef<double> shift, at::Tensor& out) {
  const float scale_f[3] = {float(scale[0]), float(scale[1]), float(scale[2])};
  const float shift_f[3] = {float(shift[0]), float(shift[1]), float(shift[2])};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tile_gather_cpu", [&] {
    gather_views<scalar_t>(images, indexed, view_table.data_ptr<int64_t>(), view_table.size(0), out.size(2),
                           scale_f, shift_f, out.data_ptr<scalar_t>());
  });
}

void tile_gather_out_cpu(const at::Tensor& data, const at::Tensor& view_table, at::ArrayRef<double> scale,
                         at::ArrayRef<double> shift, at::Tensor& out) {
  check_tile_gather_args(data, view_table, scale, shift, out);
  const uint8_t* base = data.data_ptr<uint8_t>();
  run_gather(&base, false, view_table, scale, shift, out);
}

// The same from a list of (H, W, 3) images; the view table's offset column holds each view's image index.
void tile_gather_list_out_cpu(at::TensorList images, const at::Tensor& view_table, at::ArrayRef<double> scale,
                              at::ArrayRef<double> shift, at::Tensor& out) {
  TORCH_CHECK(!images.empty(), "tile_gather_list_out: images is empty");
  check_tile_gather_args(images[0].reshape(-1), view_table, scale, shift, out);
  std::vector<const uint8_t*> bases(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& img = images[i];
    TORCH_CHECK(img.scalar_type() == at::kByte && img.dim() == 3 && img.size(2) == 3 && img.is_contiguous() &&
                    img.device() == out.device(),
                "tile_gather_list_out: images[", i, "] must be a contiguous uint8 (H, W, 3) tensor on ", out.device());
    bases[i] = img.data_ptr<uint8_t>();
  }
  const int64_t* table = view_table.data_ptr<int64_t>();
  for (int64_t v = 0; v < view_table.size(0); ++v) {
    const int64_t* r = table + v * kViewColumns;
    TORCH_CHECK(r[kOffset] >= 0 && r[kOffset] < int64_t(images.size()) && images[r[kOffset]].size(0) == r[kHeight] &&
                    images[r[kOffset]].size(1) == r[kWidth],
                "tile_gather_list_out: view ", v, " names image ", r[kOffset], " of size ", r[kHeight], "x", r[kWidth],
                ", which is not in images");
  }
  run_gather(bases.data(), true, view_table, scale, shift, out);
}

TORCH_LIBRARY_IMPL(sphinx_kernels, CPU, m) {
  m.impl("tile_gather_out", &tile_gather_out_cpu);
  m.impl("tile_gather_list_out", &tile_gather_list_out_cpu);
}

}  // namespace sphinx_kernels
