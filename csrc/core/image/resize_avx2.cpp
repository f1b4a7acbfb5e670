// The AVX2 passes, compiled for AVX2 by function attribute and called only when the CPU has it
// (the rest of the core stays baseline x86-64). Each multiplies pairs of 16-bit samples by
// pairs of 16-bit weights (vpmaddwd) into exact int32 sums: the same integers the portable
// loops compute, so results are bit-identical.
#include <cstddef>
#include <cstring>

#include "image/resize_passes.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PE_IMAGE_X86 1
#endif

namespace pe::image::detail {

#ifdef PE_IMAGE_X86
namespace {

// Four taps (12 bytes of RGB) per group: one 16-byte load broadcast to both 128-bit lanes,
// shuffled into 16-bit (tap, tap + 1) pairs per channel: lane 0 taps 0/1, lane 1 taps 2/3.
constexpr int kTapsPerGroup = 4;
constexpr int kGroupLoadBytes = 16;

// Per output, per group, the 16 weights matching the shuffle: (w0, w1) x 3 channels, 0, 0 |
// (w2, w3) x 3, 0, 0.
std::vector<int16_t> group_weights(const AxisFilter& fx, int64_t groups) {
  const int64_t out_w = static_cast<int64_t>(fx.first.size());
  std::vector<int16_t> g(static_cast<size_t>(out_w * groups * 16), 0);
  for (int64_t x = 0; x < out_w; ++x) {
    const int16_t* w = &fx.weights[static_cast<size_t>(x * fx.max_taps)];
    for (int64_t t = 0; t < fx.count[x]; ++t) {
      int16_t* lane = &g[static_cast<size_t>(((x * groups) + t / kTapsPerGroup) * 16 + ((t % 4) / 2) * 8)];
      for (int c = 0; c < 3; ++c) lane[c * 2 + (t % 2)] = w[t];
    }
  }
  return g;
}

__attribute__((target("avx2"))) void horizontal_rgb(const SourceImage& src, const AxisFilter& fx, int64_t row_begin,
                                                    int64_t row_end, bool hflip, uint8_t* inter) {
  const int64_t out_w = static_cast<int64_t>(fx.first.size());
  const int64_t groups = (fx.max_taps + kTapsPerGroup - 1) / kTapsPerGroup;
  const std::vector<int16_t> gw = group_weights(fx, groups);
  // Outputs whose last load would pass the end of the row take the portable loop instead.
  const int64_t row_bytes = src.width * 3;
  std::vector<uint8_t> fits(static_cast<size_t>(out_w));
  for (int64_t x = 0; x < out_w; ++x)
    fits[x] = fx.first[x] * 3 + (groups - 1) * kTapsPerGroup * 3 + kGroupLoadBytes <= row_bytes;
  const int8_t z = -1;  // a shuffle index with the high bit set writes zero
  const __m256i shuffle = _mm256_setr_epi8(0, z, 3, z, 1, z, 4, z, 2, z, 5, z, z, z, z, z,  //
                                           6, z, 9, z, 7, z, 10, z, 8, z, 11, z, z, z, z, z);
  const __m128i rounding = _mm_set1_epi32(kRounding);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* row = src.data + r * src.row_stride;
    uint8_t* out_row = inter + (r - row_begin) * out_w * 3;
    for (int64_t x = 0; x < out_w; ++x) {
      uint8_t* o = out_row + (hflip ? out_w - 1 - x : x) * 3;
      const uint8_t* p = row + fx.first[x] * 3;
      if (!fits[x]) {
        int32_t acc[3] = {kRounding, kRounding, kRounding};
        const int16_t* w = &fx.weights[static_cast<size_t>(x * fx.max_taps)];
        for (int32_t t = 0; t < fx.count[x]; ++t)
          for (int c = 0; c < 3; ++c) acc[c] += static_cast<int32_t>(p[t * 3 + c]) * w[t];
        for (int c = 0; c < 3; ++c) o[c] = to_u8(acc[c]);
        continue;
      }
      __m256i acc = _mm256_setzero_si256();
      const int16_t* w = &gw[static_cast<size_t>(x * groups * 16)];
      for (int64_t g = 0; g < groups; ++g) {
        const __m128i px = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + g * kTapsPerGroup * 3));
        const __m256i pairs = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(px), shuffle);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 16));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, wv));
      }
      __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
      sum = _mm_srai_epi32(_mm_add_epi32(sum, rounding), kPrecisionBits);
      sum = _mm_packus_epi16(_mm_packs_epi32(sum, sum), sum);
      const int32_t rgbx = _mm_cvtsi128_si32(sum);
      std::memcpy(o, &rgbx, 3);  // little-endian: the low three bytes are R, G, B
    }
  }
}

}  // namespace

bool avx2_available() {
  static const bool kHas = __builtin_cpu_supports("avx2");
  return kHas;
}

void horizontal_pass_avx2(const SourceImage& src, const AxisFilter& fx, int64_t row_begin, int64_t row_end, bool hflip,
                          uint8_t* inter) {
  if (src.channels != 3) return horizontal_pass_portable(src, fx, row_begin, row_end, hflip, inter);
  horizontal_rgb(src, fx, row_begin, row_end, hflip, inter);
}

// 16 samples of the row at a time; two taps per vpmaddwd (a zero weight pads an odd count).
__attribute__((target("avx2"))) void vertical_row_avx2(const uint8_t* const* rows, const int16_t* weights, int32_t n,
                                                       int64_t row_elems, uint8_t* out) {
  const __m256i rounding = _mm256_set1_epi32(kRounding);
  int64_t k = 0;
  for (; k + 16 <= row_elems; k += 16) {
    __m256i lo = rounding, hi = rounding;
    for (int32_t t = 0; t < n; t += 2) {
      const __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[t] + k)));
      const bool pair = t + 1 < n;
      const __m256i b = pair ? _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[t + 1] + k)))
                             : _mm256_setzero_si256();
      const uint32_t w1 = pair ? static_cast<uint16_t>(weights[t + 1]) : 0;
      const __m256i w = _mm256_set1_epi32(static_cast<int32_t>((w1 << 16) | static_cast<uint16_t>(weights[t])));
      lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), w));
      hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), w));
    }
    // unpacklo/hi split each lane in halves; packs puts them back in order within the lane.
    const __m256i words =
        _mm256_packs_epi32(_mm256_srai_epi32(lo, kPrecisionBits), _mm256_srai_epi32(hi, kPrecisionBits));
    const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(words, words), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm256_castsi256_si128(bytes));
  }
  vertical_row_portable(rows, weights, n, k, row_elems, out);  // the last < 16 samples
}

#else  // not x86-64: the portable passes only

bool avx2_available() { return false; }

void horizontal_pass_avx2(const SourceImage& src, const AxisFilter& fx, int64_t row_begin, int64_t row_end, bool hflip,
                          uint8_t* inter) {
  horizontal_pass_portable(src, fx, row_begin, row_end, hflip, inter);
}

void vertical_row_avx2(const uint8_t* const* rows, const int16_t* weights, int32_t n, int64_t row_elems, uint8_t* out) {
  vertical_row_portable(rows, weights, n, 0, row_elems, out);
}

#endif

}  // namespace pe::image::detail
