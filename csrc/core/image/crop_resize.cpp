#include "image/crop_resize.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/errors.h"
#include "image/resize_passes.h"

namespace pe::image {
namespace {

using detail::AxisFilter;

// Coordinates a little outside the image (a box computed in floating point, e.g. scaled onto
// a DCT-downscaled decode) are clipped rather than rejected.
constexpr double kEdgeTolerance = 1e-6;

double triangle(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Weights mapping [lo, hi) of the source axis onto `out_size` samples, reading only source
// samples in [clamp_lo, clamp_hi). Pillow's BILINEAR: a triangle of support 1, widened by the
// scale factor when downscaling, centred on each output sample's centre.
AxisFilter make_axis_filter(double lo, double hi, int64_t clamp_lo, int64_t clamp_hi, int64_t out_size) {
  const double scale = (hi - lo) / static_cast<double>(out_size);
  const double support = std::max(scale, 1.0);
  AxisFilter f;
  f.max_taps = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  f.first.resize(out_size);
  f.count.resize(out_size);
  f.weights.assign(static_cast<size_t>(out_size * f.max_taps), 0);
  std::vector<double> w(static_cast<size_t>(f.max_taps));
  for (int64_t i = 0; i < out_size; ++i) {
    const double center = lo + (static_cast<double>(i) + 0.5) * scale;
    const int64_t begin = std::max(static_cast<int64_t>(std::floor(center - support + 0.5)), clamp_lo);
    const int64_t end = std::min(static_cast<int64_t>(std::floor(center + support + 0.5)), clamp_hi);
    const int64_t n = std::min(end - begin, f.max_taps);
    double total = 0;
    for (int64_t t = 0; t < n; ++t) {
      w[t] = triangle((static_cast<double>(begin + t) - center + 0.5) / support);
      total += w[t];
    }
    f.first[i] = begin;
    f.count[i] = static_cast<int32_t>(n);
    int16_t* out = &f.weights[static_cast<size_t>(i * f.max_taps)];
    if (total <= 0) {  // unreachable for a valid box; keep the nearest sample rather than black
      f.first[i] = std::clamp(static_cast<int64_t>(center), clamp_lo, clamp_hi - 1);
      f.count[i] = 1;
      out[0] = 1 << detail::kPrecisionBits;
      continue;
    }
    for (int64_t t = 0; t < n; ++t)
      out[t] = static_cast<int16_t>(std::lround(w[t] / total * (1 << detail::kPrecisionBits)));
  }
  return f;
}

// Every output's window widened to exactly max_taps samples (zero weights at the ends) where
// the clamp range allows, so the horizontal inner loop has a constant trip count.
void pad_to_max_taps(AxisFilter& f, int64_t clamp_lo, int64_t clamp_hi) {
  if (clamp_hi - clamp_lo < f.max_taps) return;
  for (size_t i = 0; i < f.first.size(); ++i) {
    const int64_t start = std::clamp(f.first[i], clamp_lo, clamp_hi - f.max_taps);
    const int64_t shift = f.first[i] - start;  // the real taps move this far right in the window
    int16_t* w = &f.weights[i * static_cast<size_t>(f.max_taps)];
    std::copy_backward(w, w + f.count[i], w + shift + f.count[i]);
    std::fill(w, w + shift, 0);
    std::fill(w + shift + f.count[i], w + f.max_taps, 0);
    f.first[i] = start;
    f.count[i] = static_cast<int32_t>(f.max_taps);
  }
}

// The intermediate's rows filtered along y into `dst`, gray expanded to three channels.
template <int C>
void vertical_pass(const uint8_t* inter, int64_t row_begin, const AxisFilter& fy, const DestImage& dst, bool avx2) {
  const int64_t row_elems = dst.width * C;
  std::vector<uint8_t> narrowed(static_cast<size_t>(row_elems));
  std::vector<const uint8_t*> rows(static_cast<size_t>(fy.max_taps));
  const bool packed_hwc = C == 3 && dst.col_stride == 3 && dst.channel_stride == 1;
  for (int64_t y = 0; y < dst.height; ++y) {
    for (int32_t t = 0; t < fy.count[y]; ++t) rows[t] = inter + (fy.first[y] + t - row_begin) * row_elems;
    uint8_t* out_row = dst.data + y * dst.row_stride;
    uint8_t* into = packed_hwc ? out_row : narrowed.data();
    const int16_t* w = &fy.weights[static_cast<size_t>(y * fy.max_taps)];
    if (avx2) {
      detail::vertical_row_avx2(rows.data(), w, fy.count[y], row_elems, into);
    } else {
      detail::vertical_row_portable(rows.data(), w, fy.count[y], 0, row_elems, into);
    }
    if (packed_hwc) continue;
    for (int64_t x = 0; x < dst.width; ++x) {
      uint8_t* o = out_row + x * dst.col_stride;
      for (int c = 0; c < 3; ++c) o[c * dst.channel_stride] = narrowed[x * C + (C == 1 ? 0 : c)];
    }
  }
}

template <int C>
void crop_resize_channels(const SourceImage& src, const AxisFilter& fx, const AxisFilter& fy, const DestImage& dst,
                          bool hflip, bool avx2) {
  int64_t row_begin = fy.first[0], row_end = row_begin;
  for (size_t y = 0; y < fy.first.size(); ++y) {
    row_begin = std::min(row_begin, fy.first[y]);
    row_end = std::max(row_end, fy.first[y] + fy.count[y]);
  }
  std::vector<uint8_t> inter(static_cast<size_t>((row_end - row_begin) * dst.width * C));
  if (avx2 && C == 3) {
    detail::horizontal_pass_avx2(src, fx, row_begin, row_end, hflip, inter.data());
  } else {
    detail::horizontal_pass_portable(src, fx, row_begin, row_end, hflip, inter.data());
  }
  vertical_pass<C>(inter.data(), row_begin, fy, dst, avx2);
}

std::string box_text(const CropBox& b) {
  return "(left " + std::to_string(b.left) + ", top " + std::to_string(b.top) + ", right " + std::to_string(b.right) +
         ", bottom " + std::to_string(b.bottom) + ")";
}

void check_extent(double lo, double hi, int64_t size, const char* axis, const CropBox& box) {
  if (!(lo >= -kEdgeTolerance && hi <= static_cast<double>(size) + kEdgeTolerance && hi > lo))
    throw InvalidArgument(std::string("crop box ") + box_text(box) + " is empty or outside the image's " + axis +
                          " [0, " + std::to_string(size) + "]");
}

void check_arguments(const SourceImage& src, const CropBox& box, const DestImage& dst) {
  if (src.channels != 1 && src.channels != 3)
    throw InvalidArgument("source must have 1 (gray) or 3 (RGB) channels, got " + std::to_string(src.channels));
  if (src.height < 1 || src.width < 1 || src.data == nullptr) throw InvalidArgument("source image is empty");
  if (src.row_stride < src.width * src.channels)
    throw InvalidArgument("source row stride " + std::to_string(src.row_stride) + " is shorter than a row of " +
                          std::to_string(src.width * src.channels) + " bytes");
  if (dst.height < 1 || dst.width < 1 || dst.data == nullptr) throw InvalidArgument("destination image is empty");
  check_extent(box.left, box.right, src.width, "width", box);
  check_extent(box.top, box.bottom, src.height, "height", box);
}

void run(const SourceImage& src, const CropBox& box, const DestImage& dst, bool hflip, bool avx2) {
  check_arguments(src, box, dst);
  const double left = std::max(box.left, 0.0), right = std::min(box.right, static_cast<double>(src.width));
  const double top = std::max(box.top, 0.0), bottom = std::min(box.bottom, static_cast<double>(src.height));
  // Only pixels the box touches are read: cropping happens before the filter sees the image.
  const auto x_lo = static_cast<int64_t>(std::floor(left)), x_hi = static_cast<int64_t>(std::ceil(right));
  AxisFilter fx = make_axis_filter(left, right, x_lo, x_hi, dst.width);
  pad_to_max_taps(fx, x_lo, x_hi);
  const AxisFilter fy = make_axis_filter(top, bottom, static_cast<int64_t>(std::floor(top)),
                                         static_cast<int64_t>(std::ceil(bottom)), dst.height);
  if (src.channels == 3) {
    crop_resize_channels<3>(src, fx, fy, dst, hflip, avx2);
  } else {
    crop_resize_channels<1>(src, fx, fy, dst, hflip, avx2);
  }
}

}  // namespace

DestImage hwc_dest(uint8_t* data, int64_t height, int64_t width) {
  return DestImage{data, height, width, width * 3, 3, 1};
}

DestImage chw_dest(uint8_t* data, int64_t height, int64_t width) {
  return DestImage{data, height, width, width, 1, height * width};
}

void crop_resize(const SourceImage& src, const CropBox& box, const DestImage& dst, bool hflip) {
  run(src, box, dst, hflip, detail::avx2_available());
}

void crop_resize_portable(const SourceImage& src, const CropBox& box, const DestImage& dst, bool hflip) {
  run(src, box, dst, hflip, false);
}

}  // namespace pe::image
