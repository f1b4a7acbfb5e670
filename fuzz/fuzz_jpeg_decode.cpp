// libFuzzer target: the JPEG crop decoder (csrc/core/image/jpeg_decode) on untrusted bytes.
//
// Input: how to decode, then the JPEG itself:
//   u8 flags          bits 0-2: scale (scale_num = 1 + bits); bit 3: fast IDCT; bit 4: hflip
//   u16 left, top, right, bottom   the crop, in 1/65535ths of the image's width and height
//   the rest:         the JPEG
// Seeds (fuzz/corpus/fuzz_jpeg_decode/): small Pillow-written JPEGs, baseline 4:2:0 / 4:2:2 /
// 4:4:4 / gray, progressive, with restart markers, optimized Huffman tables and CMYK, each
// behind a few crops; their names say which.
//
// Contract: read_jpeg_header and decode_jpeg_region either throw pe::InvalidArgument or
// succeed; a decoded band lies inside the image at its scale, holds exactly its pixels and
// covers the crop; the fused crop + resize succeeds on whatever decoded; and for images of up
// to 256 x 256 pixels whose whole decode also succeeds, the band's pixels inside the crop are
// the whole decode's. libjpeg-turbo is the system's, not instrumented: coverage guides only
// through this wrapper, and ASan sees libjpeg's memory only through its interceptors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/errors.h"
#include "fuzz_input.h"
#include "image/jpeg_decode.h"

namespace {

using pe::fuzz::require;
namespace image = pe::image;

// Small enough for -rss_limit_mb=512 with room to spare; each input decodes in milliseconds.
image::JpegLimits fuzz_limits() {
  image::JpegLimits limits;
  limits.max_pixels = int64_t{1} << 22;
  limits.max_memory_bytes = int64_t{64} << 20;
  limits.max_scans = 100;
  return limits;
}

constexpr int64_t kCompareMaxPixels = 256 * 256;

void check_against_whole(const std::string& jpeg, const image::CropBox& box, const image::JpegDecodeOptions& options,
                         const image::DecodedRegion& part) {
  image::DecodedRegion whole;
  try {
    whole = image::decode_jpeg_region(
        reinterpret_cast<const uint8_t*>(jpeg.data()), jpeg.size(),
        image::CropBox{0, 0, static_cast<double>(part.full_width), static_cast<double>(part.full_height)}, options);
  } catch (const pe::InvalidArgument&) {
    return;  // corrupt data below or beside the crop: the band may still have decoded
  }
  require(whole.width == part.scaled_width && whole.height == part.scaled_height, "whole decode size");
  const image::CropBox in = image::box_in_region(box, part);
  const auto x_lo = static_cast<int64_t>(std::floor(std::max(in.left, 0.0)));
  const auto x_hi = std::min<int64_t>(static_cast<int64_t>(std::ceil(in.right)), part.width);
  const auto y_lo = static_cast<int64_t>(std::floor(std::max(in.top, 0.0)));
  const auto y_hi = std::min<int64_t>(static_cast<int64_t>(std::ceil(in.bottom)), part.height);
  const int64_t c = part.channels;
  for (int64_t y = y_lo; y < y_hi; ++y) {
    const uint8_t* a = &part.pixels[static_cast<size_t>((y * part.width + x_lo) * c)];
    const uint8_t* b = &whole.pixels[static_cast<size_t>(((part.y0 + y) * whole.width + part.x0 + x_lo) * c)];
    require(std::equal(a, a + (x_hi - x_lo) * c, b), "the band differs from the whole decode inside the crop");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pe::fuzz::ByteReader in(data, size);
  const auto flags = in.take<uint8_t>();
  uint16_t edges[4];
  for (uint16_t& e : edges) e = in.take<uint16_t>();
  const std::string jpeg = in.rest();
  const auto* bytes = reinterpret_cast<const uint8_t*>(jpeg.data());

  image::JpegDecodeOptions options;
  options.scale_num = 1 + (flags & 7);
  options.fast_dct = (flags & 8) != 0;
  options.limits = fuzz_limits();
  image::JpegHeader header;
  try {
    header = image::read_jpeg_header(bytes, jpeg.size(), options.limits);
  } catch (const pe::InvalidArgument&) {
    return 0;
  }
  require(header.height >= 1 && header.width >= 1 && header.height * header.width <= options.limits.max_pixels,
          "header size within limits");
  // A non-empty box inside the image.
  const double w = static_cast<double>(header.width), h = static_cast<double>(header.height);
  double left = edges[0] / 65535.0 * w, right = edges[2] / 65535.0 * w;
  double top = edges[1] / 65535.0 * h, bottom = edges[3] / 65535.0 * h;
  if (left > right) std::swap(left, right);
  if (top > bottom) std::swap(top, bottom);
  right = std::min(std::max(right, left + 1), w);
  left = std::min(left, right - 1);
  bottom = std::min(std::max(bottom, top + 1), h);
  top = std::min(top, bottom - 1);
  const image::CropBox box{left, top, right, bottom};

  image::DecodedRegion part;
  try {
    part = image::decode_jpeg_region(bytes, jpeg.size(), box, options);
  } catch (const pe::InvalidArgument&) {
    return 0;
  }
  require(header.channels == 1 || header.channels == 3, "decoded a colour space the header called unsupported");
  require(part.channels == header.channels, "channels differ from the header's");
  require(part.full_width == header.width && part.full_height == header.height, "full size differs from the header");
  require(part.scaled_width == (header.width * options.scale_num + 7) / 8 &&
              part.scaled_height == (header.height * options.scale_num + 7) / 8,
          "scaled size is not ceil(size * n / 8)");
  require(part.x0 >= 0 && part.y0 >= 0 && part.width >= 1 && part.height >= 1 &&
              part.x0 + part.width <= part.scaled_width && part.y0 + part.height <= part.scaled_height,
          "band outside the image");
  require(part.pixels.size() == static_cast<size_t>(part.width * part.height * part.channels), "band size");
  const image::CropBox inside = image::box_in_region(box, part);
  require(inside.left >= -1e-6 && inside.top >= -1e-6 && inside.right <= part.width + 1e-6 &&
              inside.bottom <= part.height + 1e-6,
          "band does not cover the crop");

  std::vector<uint8_t> out(24 * 24 * 3);
  image::crop_resize(part.view(), inside, image::hwc_dest(out.data(), 24, 24), (flags & 16) != 0);
  if (header.height * header.width <= kCompareMaxPixels) check_against_whole(jpeg, box, options, part);
  return 0;
}
