// The JPEG crop decoder against a whole-image decode by the same libjpeg: the decoded band's
// pixels equal the whole decode's exactly (4:2:0 / 4:2:2 / 4:4:4 / gray / progressive, every
// DCT scale, crops at the borders and at odd offsets), and the fused crop + resize equals
// crop_resize of the whole decode. Truncated, corrupted and oversized JPEGs throw
// InvalidArgument. Built without libjpeg-turbo, only the "unavailable" contract is checked.
#include "image/jpeg_decode.h"

#include <gtest/gtest.h>

#include <stdexcept>

#ifdef PYENGINE_HAVE_LIBJPEG
#include <jpeglib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>  // before jpeglib.h
#include <cstdlib>
#include <random>
#include <vector>

#include "common/errors.h"
#endif

namespace pe::image {
namespace {

#ifdef PYENGINE_HAVE_LIBJPEG

enum class Kind { k420, k422, k444, kGray, kProgressive420 };

// A picture with gradients, edges and noise: what chroma upsampling and IDCT get wrong shows.
std::vector<uint8_t> picture(int height, int width, int channels, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> noise(-25, 25);
  std::vector<uint8_t> px(static_cast<size_t>(height * width * channels));
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x)
      for (int c = 0; c < channels; ++c) {
        const int edge = ((x / 13 + y / 11) % 3) * 40;
        const int v = (c == 0 ? x * 255 / width : c == 1 ? y * 255 / height : (x + y) * 127 / (width + height)) + edge;
        px[(static_cast<size_t>(y) * width + x) * channels + c] =
            static_cast<uint8_t>(std::clamp(v + noise(rng), 0, 255));
      }
  return px;
}

// Encodes with libjpeg (the test's own data: the library's default error handler is fine here).
std::vector<uint8_t> encode(int height, int width, Kind kind, uint32_t seed = 1) {
  const int channels = kind == Kind::kGray ? 1 : 3;
  const std::vector<uint8_t> px = picture(height, width, channels, seed);
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* out = nullptr;
  unsigned long out_size = 0;
  jpeg_mem_dest(&c, &out, &out_size);
  c.image_width = static_cast<JDIMENSION>(width);
  c.image_height = static_cast<JDIMENSION>(height);
  c.input_components = channels;
  c.in_color_space = channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 90, TRUE);
  if (channels == 3) {
    c.comp_info[0].h_samp_factor = kind == Kind::k444 ? 1 : 2;
    c.comp_info[0].v_samp_factor = kind == Kind::k420 || kind == Kind::kProgressive420 ? 2 : 1;
  }
  if (kind == Kind::kProgressive420) jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = const_cast<uint8_t*>(&px[static_cast<size_t>(c.next_scanline) * width * channels]);
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  std::vector<uint8_t> bytes(out, out + out_size);
  jpeg_destroy_compress(&c);
  std::free(out);
  return bytes;
}

DecodedRegion decode(const std::vector<uint8_t>& jpeg, const CropBox& box, int scale_num = 8, bool fast = false) {
  JpegDecodeOptions options;
  options.scale_num = scale_num;
  options.fast_dct = fast;
  return decode_jpeg_region(jpeg.data(), jpeg.size(), box, options);
}

// Every pixel of `part` that `box` touches equals the whole decode's pixel at the same place
// (the band's margins may differ: there the upsampler saw the band's edge).
void expect_box_of_whole(const DecodedRegion& part, const DecodedRegion& whole, const CropBox& box,
                         const std::string& what) {
  ASSERT_EQ(part.channels, whole.channels) << what;
  ASSERT_EQ(part.scaled_width, whole.width) << what;
  ASSERT_LE(part.x0 + part.width, whole.width) << what;
  ASSERT_LE(part.y0 + part.height, whole.height) << what;
  const CropBox in = box_in_region(box, part);
  ASSERT_GE(in.left, -1e-9) << what;
  ASSERT_GE(in.top, -1e-9) << what;
  ASSERT_LE(in.right, part.width + 1e-9) << what;
  ASSERT_LE(in.bottom, part.height + 1e-9) << what;
  const auto x_lo = static_cast<int64_t>(std::floor(std::max(in.left, 0.0)));
  const auto x_hi = std::min<int64_t>(static_cast<int64_t>(std::ceil(in.right)), part.width);
  const auto y_lo = static_cast<int64_t>(std::floor(std::max(in.top, 0.0)));
  const auto y_hi = std::min<int64_t>(static_cast<int64_t>(std::ceil(in.bottom)), part.height);
  const int64_t c = part.channels;
  for (int64_t y = y_lo; y < y_hi; ++y) {
    const uint8_t* a = &part.pixels[static_cast<size_t>((y * part.width + x_lo) * c)];
    const uint8_t* b = &whole.pixels[static_cast<size_t>(((part.y0 + y) * whole.width + part.x0 + x_lo) * c)];
    ASSERT_TRUE(std::equal(a, a + (x_hi - x_lo) * c, b)) << what << ": row " << y;
  }
}

const Kind kKinds[] = {Kind::k420, Kind::k422, Kind::k444, Kind::kGray, Kind::kProgressive420};

std::string name(Kind k) {
  switch (k) {
    case Kind::k420:
      return "4:2:0";
    case Kind::k422:
      return "4:2:2";
    case Kind::k444:
      return "4:4:4";
    case Kind::kGray:
      return "gray";
    case Kind::kProgressive420:
      return "progressive 4:2:0";
  }
  return "?";
}

TEST(JpegDecode, ReportsTheLibrary) { EXPECT_EQ(jpeg_crop_decoder().rfind("libjpeg-turbo ", 0), 0u); }

TEST(JpegDecode, HeaderGivesSizeChannelsAndScans) {
  const std::vector<uint8_t> color = encode(37, 53, Kind::k420), gray = encode(20, 30, Kind::kGray);
  const std::vector<uint8_t> progressive = encode(20, 30, Kind::kProgressive420);
  const JpegHeader h = read_jpeg_header(color.data(), color.size());
  EXPECT_EQ(h.height, 37);
  EXPECT_EQ(h.width, 53);
  EXPECT_EQ(h.channels, 3);
  EXPECT_FALSE(h.multi_scan);
  EXPECT_EQ(read_jpeg_header(gray.data(), gray.size()).channels, 1);
  EXPECT_TRUE(read_jpeg_header(progressive.data(), progressive.size()).multi_scan);
}

TEST(JpegDecode, BandEqualsTheWholeDecodeForEverySamplingScaleAndBorder) {
  const int H = 131, W = 203;  // neither a multiple of 16: partial iMCUs at the right and bottom
  const CropBox boxes[] = {
      {0, 0, W, H},    {0, 0, 40, 30},    {W - 41.0, H - 29.0, W, H}, {0, H - 20.0, 35, H},     {W - 17.0, 0, W, 19},
      {17, 9, 18, 10}, {31, 45, 97, 111}, {15.5, 7.25, 120.75, 64.5}, {1, 1, W - 1.0, H - 1.0}, {63, 0, 65, H},
  };
  for (Kind kind : kKinds) {
    const std::vector<uint8_t> jpeg = encode(H, W, kind);
    for (int scale : {8, 7, 5, 4, 3, 2, 1}) {
      for (bool fast : {false, true}) {
        const DecodedRegion whole = decode(jpeg, CropBox{0, 0, W, H}, scale, fast);
        ASSERT_EQ(whole.x0, 0);
        ASSERT_EQ(whole.width, whole.scaled_width);
        ASSERT_EQ(whole.height, whole.scaled_height);
        ASSERT_EQ(whole.width, (W * scale + 7) / 8);
        for (const CropBox& b : boxes) {
          const DecodedRegion part = decode(jpeg, b, scale, fast);
          const std::string what = name(kind) + " scale " + std::to_string(scale) + "/8" + (fast ? " fast" : "") +
                                   " box (" + std::to_string(b.left) + ", " + std::to_string(b.top) + ", " +
                                   std::to_string(b.right) + ", " + std::to_string(b.bottom) + ")";
          expect_box_of_whole(part, whole, b, what);
        }
      }
    }
  }
}

TEST(JpegDecode, SmallCropsDecodeFewerRowsAndColumns) {
  const std::vector<uint8_t> jpeg = encode(400, 600, Kind::k420);
  const DecodedRegion r = decode(jpeg, CropBox{301, 203, 340, 250});
  EXPECT_LE(r.width, 39 + 2 * 2 + 15);  // the box, the margins, the left edge moved to an iMCU boundary
  EXPECT_EQ(r.x0 % 16, 0);
  EXPECT_EQ(r.y0, 203);
  EXPECT_EQ(r.height, 47);
}

TEST(JpegDecode, FusedCropResizeEqualsCropResizeOfTheWholeDecode) {
  std::mt19937 rng(7);
  for (Kind kind : kKinds) {
    const std::vector<uint8_t> jpeg = encode(150, 170, kind, 3);
    for (int trial = 0; trial < 12; ++trial) {
      std::uniform_real_distribution<double> u(0, 1);
      const double w = 4 + u(rng) * 160, h = 4 + u(rng) * 140;
      const double left = u(rng) * (170 - w), top = u(rng) * (150 - h);
      const CropBox box{left, top, left + w, top + h};
      const int scale = trial % 3 == 0 ? 4 : 8;
      const bool flip = trial % 2 == 1;
      JpegDecodeOptions options;
      options.scale_num = scale;
      std::vector<uint8_t> fused(32 * 48 * 3), expected(32 * 48 * 3);
      decode_crop_resize_jpeg(jpeg.data(), jpeg.size(), box, options, hwc_dest(fused.data(), 32, 48), flip);
      const DecodedRegion whole = decode(jpeg, CropBox{0, 0, 170, 150}, scale);
      crop_resize(whole.view(), box_in_region(box, whole), hwc_dest(expected.data(), 32, 48), flip);
      int worst = 0;
      for (size_t i = 0; i < fused.size(); ++i) worst = std::max(worst, std::abs(fused[i] - expected[i]));
      // The same pixels and filter; the box's offset changes the weights' rounding at most.
      EXPECT_LE(worst, 1) << name(kind) << " trial " << trial;
    }
  }
}

TEST(JpegDecode, TruncatedDataThrowsWhereverTheCropIs) {
  for (Kind kind : {Kind::k420, Kind::kProgressive420}) {
    const std::vector<uint8_t> jpeg = encode(96, 128, kind);
    for (size_t keep = 0; keep < jpeg.size() - 2; keep += std::max<size_t>(1, jpeg.size() / 97)) {
      const std::vector<uint8_t> cut(jpeg.begin(), jpeg.begin() + static_cast<std::ptrdiff_t>(keep));
      // A crop at the top: the missing data lies below it and is still noticed.
      EXPECT_THROW(decode_jpeg_region(cut.data(), cut.size(), CropBox{0, 0, 16, 16}), InvalidArgument)
          << name(kind) << " cut at " << keep;
    }
  }
}

TEST(JpegDecode, CorruptedDataThrowsOrDecodesNeverCrashes) {
  const std::vector<uint8_t> jpeg = encode(64, 80, Kind::k420);
  std::mt19937 rng(3);
  int thrown = 0;
  for (int trial = 0; trial < 400; ++trial) {
    std::vector<uint8_t> bad = jpeg;
    const int flips = 1 + trial % 8;
    for (int i = 0; i < flips; ++i) bad[rng() % bad.size()] ^= static_cast<uint8_t>(1 + rng() % 255);
    try {
      const DecodedRegion r = decode(bad, CropBox{8, 8, 40, 40});
      EXPECT_EQ(r.pixels.size(), static_cast<size_t>(r.width * r.height * r.channels));
    } catch (const InvalidArgument&) {
      ++thrown;
    }
  }
  EXPECT_GT(thrown, 0);
}

TEST(JpegDecode, GarbageAndEmptyInputThrow) {
  const uint8_t text[] = "not a jpeg at all";
  EXPECT_THROW(read_jpeg_header(text, sizeof(text)), InvalidArgument);
  EXPECT_THROW(read_jpeg_header(text, 0), InvalidArgument);
  EXPECT_THROW(read_jpeg_header(nullptr, 0), InvalidArgument);
}

TEST(JpegDecode, LimitsAreEnforced) {
  const std::vector<uint8_t> jpeg = encode(64, 80, Kind::kProgressive420);
  JpegLimits small;
  small.max_pixels = 64 * 80 - 1;
  EXPECT_THROW(read_jpeg_header(jpeg.data(), jpeg.size(), small), InvalidArgument);
  JpegDecodeOptions options;
  options.limits.max_scans = 2;  // jpeg_simple_progression writes 10
  EXPECT_THROW(decode_jpeg_region(jpeg.data(), jpeg.size(), CropBox{0, 0, 8, 8}, options), InvalidArgument);
  options.limits = JpegLimits{};
  options.limits.max_memory_bytes = 64 * 80 * 2 * 3 / 2 - 1;  // less than the progressive coefficients
  EXPECT_THROW(decode_jpeg_region(jpeg.data(), jpeg.size(), CropBox{0, 0, 8, 8}, options), InvalidArgument);
}

TEST(JpegDecode, BadArgumentsThrow) {
  const std::vector<uint8_t> jpeg = encode(32, 40, Kind::k420);
  EXPECT_THROW(decode(jpeg, CropBox{0, 0, 41, 10}), InvalidArgument);
  EXPECT_THROW(decode(jpeg, CropBox{5, 5, 5, 10}), InvalidArgument);
  EXPECT_THROW(decode(jpeg, CropBox{0, 0, 10, 10}, 0), InvalidArgument);
  EXPECT_THROW(decode(jpeg, CropBox{0, 0, 10, 10}, 9), InvalidArgument);
}

#else  // built without libjpeg-turbo

TEST(JpegDecode, UnavailableWithoutLibjpeg) {
  EXPECT_EQ(jpeg_crop_decoder(), "");
  const uint8_t data[] = {0xFF, 0xD8, 0xFF};
  EXPECT_THROW(read_jpeg_header(data, sizeof(data)), std::runtime_error);
  EXPECT_THROW(decode_jpeg_region(data, sizeof(data), CropBox{0, 0, 1, 1}), std::runtime_error);
}

#endif

}  // namespace
}  // namespace pe::image
