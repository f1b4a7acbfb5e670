// Crop + antialiased bilinear resize + optional horizontal flip of an 8-bit image, the
// per-sample work of RandomResizedCrop / CenterCrop after the JPEG decode.
//
// The filter is Pillow's BILINEAR (and torchvision's antialias=True): a triangle whose support
// widens by the scale factor when downscaling, so every source pixel in the crop contributes
// and a 4x reduction does not alias. The resize is separable: a horizontal pass over the rows
// the vertical filter needs (into an 8-bit intermediate, flipped there if asked), then a
// vertical pass that writes the destination in any layout (HWC, CHW, or any strides).
// Weights are precomputed per output column and row in fixed point (14 fractional bits), so
// the inner loops are integer multiply-adds; on x86-64 CPUs with AVX2 they run 16 samples at a
// time, with results bit-identical to the portable loops.
//
// Sampling is clamped to the crop box (rounded out to whole pixels), as cropping first and
// then resizing does: pixels outside the box never leak in at its edges.
//
// Thread-safe: no shared state; each call allocates its own intermediate.
#pragma once

#include <cstdint>

namespace pe::image {

// A read-only 8-bit image with interleaved channels: 1 (gray, expanded to RGB) or 3 (RGB).
struct SourceImage {
  const uint8_t* data = nullptr;
  int64_t height = 0;
  int64_t width = 0;
  int channels = 3;
  int64_t row_stride = 0;  // bytes from one row to the next, >= width * channels
};

// A crop in source pixel coordinates (pixel x covers [x, x + 1)); edges may be fractional,
// e.g. a box chosen at full resolution and mapped onto a DCT-downscaled decode.
struct CropBox {
  double left = 0;
  double top = 0;
  double right = 0;
  double bottom = 0;
};

// A 3-channel 8-bit destination: element (y, x, c) is at data + y * row_stride +
// x * col_stride + c * channel_stride (strides in bytes).
struct DestImage {
  uint8_t* data = nullptr;
  int64_t height = 0;
  int64_t width = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  int64_t channel_stride = 0;
};

// Interleaved [height, width, 3], rows packed.
DestImage hwc_dest(uint8_t* data, int64_t height, int64_t width);
// Planar [3, height, width], planes and rows packed.
DestImage chw_dest(uint8_t* data, int64_t height, int64_t width);

// Resizes the `box` of `src` to fill `dst`, mirrored left-right when `hflip`.
// Throws pe::InvalidArgument for an empty or out-of-bounds box, unsupported channel count,
// empty destination or a row stride shorter than a row.
void crop_resize(const SourceImage& src, const CropBox& box, const DestImage& dst, bool hflip);

// The same with the portable loops only, exposed so tests can check the AVX2 path against it.
void crop_resize_portable(const SourceImage& src, const CropBox& box, const DestImage& dst, bool hflip);

}  // namespace pe::image
