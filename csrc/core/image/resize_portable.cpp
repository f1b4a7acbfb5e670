// The portable passes: plain loops, the reference the AVX2 passes must match bit for bit.
#include "image/resize_passes.h"

#include <cstddef>

namespace pe::image::detail {
namespace {

// One output pixel: `Taps` (a compile-time trip count, fully unrolled) or, for 0, `n` samples
// of C channels from p, weighted.
template <int C, int Taps>
inline void filter_pixel(const uint8_t* __restrict p, const int16_t* __restrict w, int32_t n, uint8_t* __restrict o) {
  int32_t acc[C];
  for (int c = 0; c < C; ++c) acc[c] = kRounding;
  const int32_t count = Taps > 0 ? Taps : n;
  for (int32_t t = 0; t < count; ++t)
    for (int c = 0; c < C; ++c) acc[c] += static_cast<int32_t>(p[t * C + c]) * w[t];
  for (int c = 0; c < C; ++c) o[c] = to_u8(acc[c]);
}

template <int C, int Taps>
void horizontal_rows(const SourceImage& src, const AxisFilter& fx, int64_t row_begin, int64_t row_end, bool hflip,
                     uint8_t* inter) {
  const int64_t out_w = static_cast<int64_t>(fx.first.size());
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* row = src.data + r * src.row_stride;
    uint8_t* out_row = inter + (r - row_begin) * out_w * C;
    for (int64_t x = 0; x < out_w; ++x)
      filter_pixel<C, Taps>(row + fx.first[x] * C, &fx.weights[static_cast<size_t>(x * fx.max_taps)], fx.count[x],
                            out_row + (hflip ? out_w - 1 - x : x) * C);
  }
}

template <int C>
void horizontal_channels(const SourceImage& src, const AxisFilter& fx, int64_t row_begin, int64_t row_end, bool hflip,
                         uint8_t* inter) {
  bool padded = true;
  for (int32_t n : fx.count) padded = padded && n == fx.max_taps;
  // The window sizes of upscaling (3) and of downscaling by up to 2x (5).
  if (padded && fx.max_taps == 3) return horizontal_rows<C, 3>(src, fx, row_begin, row_end, hflip, inter);
  if (padded && fx.max_taps == 5) return horizontal_rows<C, 5>(src, fx, row_begin, row_end, hflip, inter);
  horizontal_rows<C, 0>(src, fx, row_begin, row_end, hflip, inter);
}

}  // namespace

void horizontal_pass_portable(const SourceImage& src, const AxisFilter& fx, int64_t row_begin, int64_t row_end,
                              bool hflip, uint8_t* inter) {
  if (src.channels == 3) {
    horizontal_channels<3>(src, fx, row_begin, row_end, hflip, inter);
  } else {
    horizontal_channels<1>(src, fx, row_begin, row_end, hflip, inter);
  }
}

void vertical_row_portable(const uint8_t* const* rows, const int16_t* weights, int32_t n, int64_t begin, int64_t end,
                           uint8_t* out) {
  for (int64_t k = begin; k < end; ++k) {
    int32_t acc = kRounding;
    for (int32_t t = 0; t < n; ++t) acc += static_cast<int32_t>(rows[t][k]) * weights[t];
    out[k] = to_u8(acc);
  }
}

}  // namespace pe::image::detail
