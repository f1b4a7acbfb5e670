// Decoding only the part of a JPEG a crop needs, with libjpeg-turbo, then resizing it: the
// per-sample work of RandomResizedCrop / CenterCrop on JPEGs, in one call.
//
// libjpeg-turbo decodes a horizontal band of iMCU columns (jpeg_crop_scanline: the band's
// left edge moves down to an iMCU boundary), skips the rows above the crop without the inverse
// DCT or colour conversion (jpeg_skip_scanlines), and the rows below are never decoded; the
// DCT domain may scale the image by n/8 first. Entropy decoding still reads every row above
// the crop's bottom (Huffman data is sequential); progressive JPEGs read the whole file.
// The band is widened by two pixels on each side where the image allows, so the edge handling
// of chroma upsampling falls outside the crop: the crop's pixels equal a whole-image decode's
// (TurboJPEG's, simplejpeg's, bit for bit; except for a progressive JPEG that stops before its
// last scan, which libjpeg would smooth from neighbouring blocks the crop lacks: never here).
//
// Untrusted input: every libjpeg error, and every warning (corrupt or missing data, which
// libjpeg would otherwise paper over with grey), becomes pe::InvalidArgument; the work is
// bounded (dimensions and libjpeg's memory checked against JpegLimits, progressive scans
// counted). A JPEG that does not end with an EOI marker is read to its end, so truncation is
// reported whichever crop is asked for; corrupt data in rows below the crop goes unseen.
//
// Built only when CMake finds libjpeg-turbo (PYENGINE_HAVE_LIBJPEG); without it,
// jpeg_crop_decoder() returns "" and every other function throws std::runtime_error.
// Thread-safe: no shared state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "image/crop_resize.h"

namespace pe::image {

// "libjpeg-turbo 2.1.5" when built with it, else "".
std::string jpeg_crop_decoder();

// What an untrusted JPEG may make the decoder do.
struct JpegLimits {
  // Pillow's decompression-bomb error threshold (2 x 89,478,485 pixels).
  int64_t max_pixels = 178956970;
  // libjpeg's own allocations: a progressive JPEG's coefficients (2 bytes each) are held whole.
  int64_t max_memory_bytes = int64_t{1} << 30;
  // Real progressive JPEGs have about 10; thousands of tiny scans each revisit every block.
  int max_scans = 500;
};

struct JpegHeader {
  int64_t height = 0;
  int64_t width = 0;
  int channels = 0;  // decoded channels: 1 (gray) or 3 (RGB); 0 for CMYK / YCCK (unsupported here)
  // Progressive (or otherwise several scans): the whole file is read before the first row.
  bool multi_scan = false;
};

// The header of `data` (markers up to the first scan). Throws InvalidArgument when it is not
// a JPEG libjpeg can parse or exceeds `limits`.
JpegHeader read_jpeg_header(const uint8_t* data, size_t size, const JpegLimits& limits = {});

struct JpegDecodeOptions {
  int scale_num = 8;      // decode at scale_num / 8 of full size, 1..8 (libjpeg's DCT scaling)
  bool fast_dct = false;  // JDCT_IFAST instead of JDCT_ISLOW: faster, slightly less accurate
  JpegLimits limits;
};

// Decoded pixels covering a crop, and where they sit in the whole image at the decode's scale.
struct DecodedRegion {
  std::vector<uint8_t> pixels;  // [height, width, channels], rows packed
  int64_t x0 = 0, y0 = 0, width = 0, height = 0;
  int channels = 0;
  int64_t scaled_height = 0, scaled_width = 0;  // the whole image at this scale
  int64_t full_height = 0, full_width = 0;      // and at full size
  SourceImage view() const { return SourceImage{pixels.data(), height, width, channels, width * channels}; }
};

// Decodes the pixels `box` (full-resolution source pixels) covers, at options.scale_num / 8.
// Throws InvalidArgument for a corrupt, truncated, unsupported (CMYK) or too large JPEG, a bad
// scale, or a box outside the image.
DecodedRegion decode_jpeg_region(const uint8_t* data, size_t size, const CropBox& box,
                                 const JpegDecodeOptions& options = {});

// The box of a full-resolution crop in the coordinates of `region`'s pixels.
CropBox box_in_region(const CropBox& box, const DecodedRegion& region);

// decode_jpeg_region, then crop_resize of the box onto `dst` (mirrored when `hflip`): the
// result equals decoding the whole image at the same scale and crop_resize of the mapped box.
void decode_crop_resize_jpeg(const uint8_t* data, size_t size, const CropBox& box, const JpegDecodeOptions& options,
                             const DestImage& dst, bool hflip);

}  // namespace pe::image
