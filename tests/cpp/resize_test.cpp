// crop_resize against a naive reference: the same triangle filter evaluated directly in 2-D in
// double precision, rounded once. The kernel rounds its 8-bit intermediate too, so the two may
// differ by one level. Also: exact identity at scale 1, flips and layouts that are exact
// permutations of each other, boxes at the borders, pixels outside the box never read, 1xN, and
// the AVX2 path bit-identical to the portable one on random boxes and sizes.
#include "image/crop_resize.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "common/errors.h"

namespace pe::image {
namespace {

struct Image {
  int64_t height, width;
  int channels;
  std::vector<uint8_t> pixels;  // [height, width, channels]
  uint8_t at(int64_t y, int64_t x, int c) const { return pixels[(y * width + x) * channels + c]; }
  SourceImage view() const { return SourceImage{pixels.data(), height, width, channels, width * channels}; }
};

// Smooth gradients plus noise: interpolation errors show on both.
Image test_image(int64_t height, int64_t width, int channels, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> noise(-40, 40);
  Image im{height, width, channels, std::vector<uint8_t>(static_cast<size_t>(height * width * channels))};
  for (int64_t y = 0; y < height; ++y)
    for (int64_t x = 0; x < width; ++x)
      for (int c = 0; c < channels; ++c) {
        const int base = static_cast<int>(255.0 * (c == 1 ? y : x + y * c) / static_cast<double>(height + width));
        im.pixels[(y * width + x) * channels + c] = static_cast<uint8_t>(std::clamp(base + noise(rng), 0, 255));
      }
  return im;
}

// Normalised triangle weights of every source sample in [clamp_lo, clamp_hi) for output i.
std::vector<double> reference_weights(double lo, double hi, int64_t out_size, int64_t i, int64_t clamp_lo,
                                      int64_t clamp_hi) {
  const double scale = (hi - lo) / static_cast<double>(out_size);
  const double widen = std::max(scale, 1.0);
  const double center = lo + (static_cast<double>(i) + 0.5) * scale;
  std::vector<double> w(static_cast<size_t>(clamp_hi - clamp_lo));
  double total = 0;
  for (int64_t j = clamp_lo; j < clamp_hi; ++j) {
    const double d = std::fabs((static_cast<double>(j) + 0.5 - center) / widen);
    w[j - clamp_lo] = d < 1 ? 1 - d : 0;
    total += w[j - clamp_lo];
  }
  for (double& v : w) v /= total;
  return w;
}

// [out_h, out_w, 3], computed output pixel by output pixel.
std::vector<uint8_t> reference_crop_resize(const Image& src, const CropBox& box, int64_t out_h, int64_t out_w,
                                           bool hflip) {
  const auto x0 = static_cast<int64_t>(std::floor(box.left)), x1 = static_cast<int64_t>(std::ceil(box.right));
  const auto y0 = static_cast<int64_t>(std::floor(box.top)), y1 = static_cast<int64_t>(std::ceil(box.bottom));
  std::vector<uint8_t> out(static_cast<size_t>(out_h * out_w * 3));
  for (int64_t oy = 0; oy < out_h; ++oy) {
    const std::vector<double> wy = reference_weights(box.top, box.bottom, out_h, oy, y0, y1);
    for (int64_t ox = 0; ox < out_w; ++ox) {
      const std::vector<double> wx = reference_weights(box.left, box.right, out_w, hflip ? out_w - 1 - ox : ox, x0, x1);
      for (int c = 0; c < 3; ++c) {
        double sum = 0;
        for (int64_t y = y0; y < y1; ++y)
          for (int64_t x = x0; x < x1; ++x) sum += wy[y - y0] * wx[x - x0] * src.at(y, x, src.channels == 1 ? 0 : c);
        out[(oy * out_w + ox) * 3 + c] = static_cast<uint8_t>(std::clamp(std::lround(sum), 0L, 255L));
      }
    }
  }
  return out;
}

std::vector<uint8_t> run_hwc(const Image& src, const CropBox& box, int64_t out_h, int64_t out_w, bool hflip = false) {
  std::vector<uint8_t> out(static_cast<size_t>(out_h * out_w * 3));
  crop_resize(src.view(), box, hwc_dest(out.data(), out_h, out_w), hflip);
  return out;
}

int max_abs_diff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  EXPECT_EQ(a.size(), b.size());
  int worst = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

CropBox whole(const Image& im) {
  return CropBox{0, 0, static_cast<double>(im.width), static_cast<double>(im.height)};
}

std::vector<uint8_t> run_portable(const Image& src, const CropBox& box, int64_t out_h, int64_t out_w, bool hflip) {
  std::vector<uint8_t> out(static_cast<size_t>(out_h * out_w * 3));
  crop_resize_portable(src.view(), box, hwc_dest(out.data(), out_h, out_w), hflip);
  return out;
}

// Both the dispatched (AVX2 where the CPU has it) and the portable path.
void expect_matches_reference(const Image& src, const CropBox& box, int64_t out_h, int64_t out_w, bool hflip = false) {
  const std::vector<uint8_t> reference = reference_crop_resize(src, box, out_h, out_w, hflip);
  const std::vector<uint8_t> fast = run_hwc(src, box, out_h, out_w, hflip);
  EXPECT_LE(max_abs_diff(fast, reference), 1)
      << "box (" << box.left << ", " << box.top << ", " << box.right << ", " << box.bottom << ") -> " << out_h << "x"
      << out_w << (hflip ? " flipped" : "");
  EXPECT_EQ(fast, run_portable(src, box, out_h, out_w, hflip));
}

TEST(CropResize, IdentitySizeCopiesEveryPixel) {
  const Image src = test_image(17, 23, 3, 1);
  EXPECT_EQ(run_hwc(src, whole(src), 17, 23), src.pixels);
}

TEST(CropResize, IdentitySizeCropCopiesTheBox) {
  const Image src = test_image(30, 40, 3, 2);
  const std::vector<uint8_t> out = run_hwc(src, CropBox{5, 7, 25, 19}, 12, 20);
  for (int64_t y = 0; y < 12; ++y)
    for (int64_t x = 0; x < 20; ++x)
      for (int c = 0; c < 3; ++c) ASSERT_EQ(out[(y * 20 + x) * 3 + c], src.at(y + 7, x + 5, c));
}

TEST(CropResize, DownscaleMatchesReference) {
  const Image src = test_image(97, 131, 3, 3);
  expect_matches_reference(src, whole(src), 20, 30);  // ~4.5x: the filter spans ~10 source pixels
  expect_matches_reference(src, whole(src), 48, 65);  // just under 2x
  expect_matches_reference(src, CropBox{3.25, 10.5, 120.75, 90}, 16, 16);
}

TEST(CropResize, UpscaleMatchesReference) {
  const Image src = test_image(9, 7, 3, 4);
  expect_matches_reference(src, whole(src), 40, 33);
  expect_matches_reference(src, CropBox{1, 2, 5, 8}, 25, 19);
}

TEST(CropResize, MixedUpAndDownScaleMatchesReference) {
  const Image src = test_image(20, 200, 3, 5);
  expect_matches_reference(src, whole(src), 60, 50);
}

TEST(CropResize, FlipMirrorsColumnsExactly) {
  const Image src = test_image(41, 57, 3, 6);
  const CropBox box{4.5, 3, 50, 38.25};
  const std::vector<uint8_t> plain = run_hwc(src, box, 19, 23), flipped = run_hwc(src, box, 19, 23, true);
  for (int64_t y = 0; y < 19; ++y)
    for (int64_t x = 0; x < 23; ++x)
      for (int c = 0; c < 3; ++c) ASSERT_EQ(flipped[(y * 23 + x) * 3 + c], plain[(y * 23 + (22 - x)) * 3 + c]);
  expect_matches_reference(src, box, 19, 23, true);
}

TEST(CropResize, ChwHoldsTheSamePixelsAsHwc) {
  const Image src = test_image(50, 60, 3, 7);
  const CropBox box{2, 3, 47, 44};
  const std::vector<uint8_t> hwc = run_hwc(src, box, 13, 11);
  std::vector<uint8_t> chw(13 * 11 * 3);
  crop_resize(src.view(), box, chw_dest(chw.data(), 13, 11), false);
  for (int64_t y = 0; y < 13; ++y)
    for (int64_t x = 0; x < 11; ++x)
      for (int c = 0; c < 3; ++c) ASSERT_EQ(chw[(c * 13 + y) * 11 + x], hwc[(y * 11 + x) * 3 + c]);
}

TEST(CropResize, BoxesAtEveryBorderMatchReference) {
  const Image src = test_image(64, 80, 3, 8);
  expect_matches_reference(src, CropBox{0, 0, 30, 25}, 12, 14);      // top-left corner
  expect_matches_reference(src, CropBox{50, 39, 80, 64}, 12, 14);    // bottom-right corner
  expect_matches_reference(src, CropBox{0, 10, 80, 20}, 7, 33);      // full width
  expect_matches_reference(src, CropBox{10.4, 0, 11.6, 64}, 16, 5);  // a sliver, upscaled across
}

TEST(CropResize, PixelsOutsideTheBoxAreNeverRead) {
  Image src = test_image(40, 40, 3, 9);
  const CropBox box{10, 10, 30, 30};
  const std::vector<uint8_t> before = run_hwc(src, box, 7, 9);
  for (int64_t y = 0; y < 40; ++y)
    for (int64_t x = 0; x < 40; ++x)
      if (y < 10 || y >= 30 || x < 10 || x >= 30)
        for (int c = 0; c < 3; ++c) src.pixels[(y * 40 + x) * 3 + c] = 255;
  EXPECT_EQ(run_hwc(src, box, 7, 9), before);
}

TEST(CropResize, OneRowAndOneColumnImages) {
  const Image row = test_image(1, 50, 3, 10);
  expect_matches_reference(row, whole(row), 1, 10);
  expect_matches_reference(row, whole(row), 4, 70);
  const Image column = test_image(50, 1, 3, 11);
  expect_matches_reference(column, whole(column), 10, 1);
  const Image square = test_image(30, 30, 3, 12);
  expect_matches_reference(square, whole(square), 1, 30);
}

TEST(CropResize, ConstantImageStaysConstantAtEveryScale) {
  Image src{33, 45, 3, std::vector<uint8_t>(33 * 45 * 3, 255)};
  for (auto [h, w] : {std::pair<int64_t, int64_t>{33, 45}, {7, 5}, {100, 90}, {1, 1}}) {
    const std::vector<uint8_t> out = run_hwc(src, CropBox{0.3, 1.7, 44.1, 32.9}, h, w);
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](uint8_t v) { return v == 255; })) << h << "x" << w;
  }
}

TEST(CropResize, GrayIsExpandedToThreeEqualChannels) {
  const Image gray = test_image(31, 29, 1, 13);
  Image rgb{31, 29, 3, std::vector<uint8_t>(31 * 29 * 3)};
  for (size_t i = 0; i < gray.pixels.size(); ++i) std::fill_n(&rgb.pixels[i * 3], 3, gray.pixels[i]);
  const CropBox box{1.5, 2, 27, 30};
  EXPECT_EQ(run_hwc(gray, box, 12, 10, true), run_hwc(rgb, box, 12, 10, true));
  expect_matches_reference(gray, box, 12, 10);
}

TEST(CropResize, RowStrideSkipsPadding) {
  const Image src = test_image(20, 30, 3, 14);
  std::vector<uint8_t> padded(20 * 100, 0);
  for (int64_t y = 0; y < 20; ++y) std::copy_n(&src.pixels[y * 90], 90, &padded[y * 100]);
  std::vector<uint8_t> out(8 * 9 * 3);
  crop_resize(SourceImage{padded.data(), 20, 30, 3, 100}, whole(src), hwc_dest(out.data(), 8, 9), false);
  EXPECT_EQ(out, run_hwc(src, whole(src), 8, 9));
}

TEST(CropResize, Avx2PathIsBitIdenticalToPortable) {
#if defined(__x86_64__)
  if (!__builtin_cpu_supports("avx2")) GTEST_SKIP() << "this CPU has no AVX2: only the portable path runs";
#endif
  std::mt19937 rng(16);
  std::uniform_real_distribution<double> unit(0, 1);
  std::uniform_int_distribution<int> dim(1, 300);
  for (int trial = 0; trial < 200; ++trial) {
    const Image src = test_image(dim(rng), dim(rng), trial % 5 == 0 ? 1 : 3, 100 + trial);
    const double w = static_cast<double>(src.width), h = static_cast<double>(src.height);
    const double left = unit(rng) * w * 0.9, top = unit(rng) * h * 0.9;
    const CropBox box{left, top, left + (w - left) * (0.05 + 0.95 * unit(rng)),
                      top + (h - top) * (0.05 + 0.95 * unit(rng))};
    const int64_t out_h = dim(rng) % 120 + 1, out_w = dim(rng) % 120 + 1;
    const bool flip = trial % 2 == 1;
    ASSERT_EQ(run_hwc(src, box, out_h, out_w, flip), run_portable(src, box, out_h, out_w, flip))
        << "trial " << trial << ": " << src.height << "x" << src.width << "x" << src.channels << " box (" << box.left
        << ", " << box.top << ", " << box.right << ", " << box.bottom << ") -> " << out_h << "x" << out_w;
  }
}

TEST(CropResize, RejectsBadArguments) {
  const Image src = test_image(10, 10, 3, 15);
  std::vector<uint8_t> out(4 * 4 * 3);
  const DestImage dst = hwc_dest(out.data(), 4, 4);
  EXPECT_THROW(crop_resize(src.view(), CropBox{-1, 0, 5, 5}, dst, false), InvalidArgument);
  EXPECT_THROW(crop_resize(src.view(), CropBox{0, 0, 10.5, 5}, dst, false), InvalidArgument);
  EXPECT_THROW(crop_resize(src.view(), CropBox{5, 0, 5, 5}, dst, false), InvalidArgument);
  EXPECT_THROW(crop_resize(src.view(), CropBox{0, 0, 5, 5}, hwc_dest(out.data(), 0, 4), false), InvalidArgument);
  SourceImage four = src.view();
  four.channels = 4;
  EXPECT_THROW(crop_resize(four, CropBox{0, 0, 5, 5}, dst, false), InvalidArgument);
  SourceImage short_rows = src.view();
  short_rows.row_stride = 20;
  EXPECT_THROW(crop_resize(short_rows, CropBox{0, 0, 5, 5}, dst, false), InvalidArgument);
  // Floating-point dust at the edge is clipped, not rejected.
  EXPECT_NO_THROW(crop_resize(src.view(), CropBox{-1e-9, 0, 10 + 1e-9, 10}, dst, false));
}

}  // namespace
}  // namespace pe::image
