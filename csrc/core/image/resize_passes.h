// Internal to crop_resize: the per-axis filter and the two passes, in a portable version and
// (on x86-64) an AVX2 version chosen at run time. Both do the same integer arithmetic (exact
// sums of 8-bit samples times 14-bit weights), so they give bit-identical results on every CPU.
#pragma once

#include <cstdint>
#include <vector>

#include "image/crop_resize.h"

namespace pe::image::detail {

// Weights sum to 2^14 and fit int16 (the AVX2 pass multiplies 16-bit pairs); 8-bit samples
// times them stay far inside an int32 accumulator.
constexpr int kPrecisionBits = 14;
constexpr int32_t kRounding = 1 << (kPrecisionBits - 1);

// The filter of one axis: output i reads `count[i]` source samples from `first[i]`, weighted
// by weights[i * max_taps ...] (the rest of each window is zero).
struct AxisFilter {
  int64_t max_taps = 0;
  std::vector<int64_t> first;
  std::vector<int32_t> count;
  std::vector<int16_t> weights;
};

inline uint8_t to_u8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Rows [row_begin, row_end) of `src` filtered along x into `inter` ([rows, out_w, C], C the
// source's channels), columns written right to left when `hflip`.
void horizontal_pass_portable(const SourceImage& src, const AxisFilter& fx, int64_t row_begin, int64_t row_end,
                              bool hflip, uint8_t* inter);
void horizontal_pass_avx2(const SourceImage& src, const AxisFilter& fx, int64_t row_begin, int64_t row_end, bool hflip,
                          uint8_t* inter);

// One output row: samples [begin, end) (portable) or [0, row_elems) of `n` rows, weighted and
// summed into `out`.
void vertical_row_portable(const uint8_t* const* rows, const int16_t* weights, int32_t n, int64_t begin, int64_t end,
                           uint8_t* out);
void vertical_row_avx2(const uint8_t* const* rows, const int16_t* weights, int32_t n, int64_t row_elems, uint8_t* out);

// Whether this build and CPU can run the AVX2 passes.
bool avx2_available();

}  // namespace pe::image::detail
