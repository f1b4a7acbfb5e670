#include "image/jpeg_decode.h"

#include <stdexcept>

#ifdef PYENGINE_HAVE_LIBJPEG
#include <jpeglib.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>  // before jpeglib.h, which uses FILE and size_t
#include <cstring>
#include <utility>

#include "common/errors.h"
#endif

namespace pe::image {

#ifdef PYENGINE_HAVE_LIBJPEG
namespace {

// Scaled pixels added to each side of the decoded band: fancy upsampling makes a pixel from
// its chroma sample and the next one, and replicates the sample at the band's edges instead.
constexpr int64_t kBandMargin = 2;
// Rows per jpeg_read_scanlines call: at least one iMCU row of any sampling (2 x 8 at full size).
constexpr int kRowsPerRead = 16;
// Coordinates a little outside the image (a box computed in floating point) are clipped.
constexpr double kEdgeTolerance = 1e-6;

// libjpeg's error manager, extended with where to jump back to and the message.
struct ErrorManager {
  jpeg_error_mgr pub;  // first: libjpeg reaches the rest through a cast of cinfo->err
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX + 64];
};

struct ProgressMonitor {
  jpeg_progress_mgr pub;  // first, as above
  int max_scans;
};

[[noreturn]] void jump_back(j_common_ptr cinfo) { std::longjmp(reinterpret_cast<ErrorManager*>(cinfo->err)->jump, 1); }

[[noreturn]] void on_error(j_common_ptr cinfo) {
  (*cinfo->err->format_message)(cinfo, reinterpret_cast<ErrorManager*>(cinfo->err)->message);
  jump_back(cinfo);
}

// Level -1 is a warning: data libjpeg found corrupt or missing and would decode as grey.
// TurboJPEG (and so simplejpeg) fails those decodes too.
void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) on_error(cinfo);
}

// Called before each row of input is consumed: a progressive JPEG's scans each revisit every block.
void on_progress(j_common_ptr cinfo) {
  const int scan = reinterpret_cast<j_decompress_ptr>(cinfo)->input_scan_number;
  const int limit = reinterpret_cast<ProgressMonitor*>(cinfo->progress)->max_scans;
  if (scan > limit) {
    std::snprintf(reinterpret_cast<ErrorManager*>(cinfo->err)->message, sizeof(ErrorManager::message),
                  "more than %d progressive scans", limit);
    jump_back(cinfo);
  }
}

// One decompression. Every libjpeg call runs inside one of the bool members: each sets the
// jump target in its own frame and holds no object with a destructor (longjmp would skip it),
// and returns false with message() set when libjpeg failed. The destructor frees libjpeg's
// state whatever happened; after a failure only the destructor may follow.
class Decompressor {
 public:
  explicit Decompressor(const JpegLimits& limits) : limits_(limits) {
    std::memset(&cinfo_, 0, sizeof(cinfo_));
    cinfo_.err = jpeg_std_error(&err_.pub);
    err_.pub.error_exit = on_error;
    err_.pub.emit_message = on_message;
    err_.message[0] = '\0';
    progress_.pub.progress_monitor = on_progress;
    progress_.max_scans = limits.max_scans;
  }
  ~Decompressor() {
    if (created_) jpeg_destroy_decompress(&cinfo_);
  }
  Decompressor(const Decompressor&) = delete;
  Decompressor& operator=(const Decompressor&) = delete;

  // Creates the decompressor over `data` and reads the header.
  bool open(const uint8_t* data, size_t size) {
    if (setjmp(err_.jump)) return false;
    created_ = true;
    jpeg_create_decompress(&cinfo_);
    cinfo_.mem->max_memory_to_use = static_cast<long>(limits_.max_memory_bytes);
    cinfo_.progress = &progress_.pub;
    jpeg_mem_src(&cinfo_, data, static_cast<unsigned long>(size));
    jpeg_read_header(&cinfo_, TRUE);
    multi_scan_ = jpeg_has_multiple_scans(&cinfo_) != 0;
    return true;
  }

  // Sets the scale, IDCT and output colour space and starts decoding (a progressive JPEG's
  // whole input is read here).
  bool start(int scale_num, bool fast_dct, J_COLOR_SPACE out_space) {
    if (setjmp(err_.jump)) return false;
    cinfo_.scale_num = static_cast<unsigned int>(scale_num);
    cinfo_.scale_denom = 8;
    cinfo_.dct_method = fast_dct ? JDCT_IFAST : JDCT_ISLOW;
    cinfo_.out_color_space = out_space;
    // Smoothing guesses the AC coefficients a progressive JPEG that stops early leaves out,
    // from neighbouring blocks, which a cropped decode does not have: the band would differ
    // from the whole image (found by fuzz_jpeg_decode). A complete progression is not smoothed.
    cinfo_.do_block_smoothing = FALSE;
    jpeg_start_decompress(&cinfo_);
    return true;
  }

  // Limits decoding to columns [*x, *x + *width); *x moves down to an iMCU boundary.
  bool crop_columns(JDIMENSION* x, JDIMENSION* width) {
    if (setjmp(err_.jump)) return false;
    jpeg_crop_scanline(&cinfo_, x, width);
    return true;
  }

  // Skips `rows` rows (entropy-decoded, no IDCT or colour conversion).
  bool skip_rows(JDIMENSION rows) {
    if (setjmp(err_.jump)) return false;
    if (jpeg_skip_scanlines(&cinfo_, rows) != rows) return fail("skipped fewer rows than asked");
    return true;
  }

  // Reads `rows` rows into out, row_bytes apart; with row_bytes 0 every row lands on out.
  bool read_rows(uint8_t* out, size_t row_bytes, JDIMENSION rows) {
    if (setjmp(err_.jump)) return false;
    JSAMPROW pointers[kRowsPerRead];
    for (JDIMENSION done = 0; done < rows;) {
      const JDIMENSION n = std::min<JDIMENSION>(rows - done, kRowsPerRead);
      for (JDIMENSION i = 0; i < n; ++i) pointers[i] = out + (done + i) * row_bytes;
      const JDIMENSION got = jpeg_read_scanlines(&cinfo_, pointers, n);
      if (got == 0) return fail("the decoder returned no rows");  // unreachable: memory input never suspends
      done += got;
    }
    return true;
  }

  // Reads the rest of the input through the EOI marker, so missing data is reported; `row`
  // holds one output row.
  bool read_to_end(uint8_t* row) {
    if (setjmp(err_.jump)) return false;
    const JDIMENSION left = cinfo_.output_height - cinfo_.output_scanline;
    // Skipping the last row would mark the input finished unread: skip all but it, read it.
    if (left > 1 && can_skip() && jpeg_skip_scanlines(&cinfo_, left - 1) != left - 1) return fail("skip failed");
    while (cinfo_.output_scanline < cinfo_.output_height) {
      JSAMPROW pointer = row;
      if (jpeg_read_scanlines(&cinfo_, &pointer, 1) == 0) return fail("the decoder returned no rows");
    }
    jpeg_finish_decompress(&cinfo_);
    return true;
  }

  // crop_columns / skip_rows only for the common samplings (gray; luma 1 or 2 x 1 or 2 and
  // chroma 1x1): rarer ones are decoded from the first row, all columns.
  bool can_skip() const {
    if (cinfo_.num_components == 1) return true;
    const jpeg_component_info* c = cinfo_.comp_info;
    const bool luma_ok = c[0].h_samp_factor <= 2 && c[0].v_samp_factor <= 2;
    for (int i = 1; i < cinfo_.num_components; ++i)
      if (c[i].h_samp_factor != 1 || c[i].v_samp_factor != 1) return false;
    return luma_ok;
  }

  const jpeg_decompress_struct& info() const { return cinfo_; }
  bool multi_scan() const { return multi_scan_; }
  std::string message() const { return err_.message; }

 private:
  bool fail(const char* what) {
    std::snprintf(err_.message, sizeof(err_.message), "%s", what);
    return false;
  }

  JpegLimits limits_;
  jpeg_decompress_struct cinfo_;
  ErrorManager err_;
  ProgressMonitor progress_;
  bool created_ = false;
  bool multi_scan_ = false;
};

[[noreturn]] void throw_corrupt(const Decompressor& d) { throw InvalidArgument("corrupt JPEG: " + d.message()); }

int decoded_channels(const jpeg_decompress_struct& info) {
  if (info.jpeg_color_space == JCS_GRAYSCALE && info.num_components == 1) return 1;
  if ((info.jpeg_color_space == JCS_YCbCr || info.jpeg_color_space == JCS_RGB) && info.num_components == 3) return 3;
  return 0;
}

// The whole-image coefficient buffers a multi-scan decode allocates (blocks padded to whole MCUs).
int64_t coefficient_bytes(const jpeg_decompress_struct& info) {
  int64_t total = 0;
  for (int i = 0; i < info.num_components; ++i) {
    const jpeg_component_info& c = info.comp_info[i];
    const int64_t w =
        (static_cast<int64_t>(c.width_in_blocks) + c.h_samp_factor - 1) / c.h_samp_factor * c.h_samp_factor;
    const int64_t h =
        (static_cast<int64_t>(c.height_in_blocks) + c.v_samp_factor - 1) / c.v_samp_factor * c.v_samp_factor;
    total += w * h * static_cast<int64_t>(sizeof(JBLOCK));
  }
  return total;
}

// Opens `data` and checks it against `limits`.
JpegHeader open_checked(Decompressor& d, const uint8_t* data, size_t size, const JpegLimits& limits) {
  if (data == nullptr || size == 0) throw InvalidArgument("empty JPEG data");
  if (!d.open(data, size)) throw_corrupt(d);
  const jpeg_decompress_struct& info = d.info();
  const JpegHeader h{info.image_height, info.image_width, decoded_channels(info), d.multi_scan()};
  // libjpeg itself refuses 0 and more than 65500 per side.
  if (h.height * h.width > limits.max_pixels)
    throw InvalidArgument("JPEG of " + std::to_string(h.width) + "x" + std::to_string(h.height) + " exceeds " +
                          std::to_string(limits.max_pixels) + " pixels");
  // A multi-scan JPEG's coefficients are held whole (libjpeg-turbo before 3.0 ignores
  // max_memory_to_use without a backing store, so the check is made here).
  if (h.multi_scan && coefficient_bytes(info) > limits.max_memory_bytes)
    throw InvalidArgument("progressive JPEG of " + std::to_string(h.width) + "x" + std::to_string(h.height) +
                          " needs " + std::to_string(coefficient_bytes(info)) + " bytes of coefficients, over " +
                          std::to_string(limits.max_memory_bytes));
  return h;
}

bool ends_with_eoi(const uint8_t* data, size_t size) {
  return size >= 2 && data[size - 2] == 0xFF && data[size - 1] == 0xD9;
}

void check_box(const CropBox& b, const JpegHeader& h) {
  const double tol = kEdgeTolerance;
  if (!(b.left >= -tol && b.top >= -tol && b.right <= static_cast<double>(h.width) + tol &&
        b.bottom <= static_cast<double>(h.height) + tol && b.right > b.left && b.bottom > b.top))
    throw InvalidArgument("crop box (left " + std::to_string(b.left) + ", top " + std::to_string(b.top) + ", right " +
                          std::to_string(b.right) + ", bottom " + std::to_string(b.bottom) +
                          ") is empty or outside the " + std::to_string(h.width) + "x" + std::to_string(h.height) +
                          " JPEG");
}

// [lo, hi) of whole scaled pixels that [a, b) (full-size coordinates, times `scale`) touches,
// widened by `margin`, within [0, size).
std::pair<int64_t, int64_t> pixel_span(double a, double b, double scale, int64_t margin, int64_t size) {
  const auto lo = static_cast<int64_t>(std::floor(a * scale)) - margin;
  const auto hi = static_cast<int64_t>(std::ceil(b * scale)) + margin;
  return {std::clamp<int64_t>(lo, 0, size - 1), std::clamp<int64_t>(hi, 1, size)};
}

}  // namespace

#define PE_JPEG_STRINGIFY2(x) #x
#define PE_JPEG_STRINGIFY(x) PE_JPEG_STRINGIFY2(x)
std::string jpeg_crop_decoder() { return "libjpeg-turbo " PE_JPEG_STRINGIFY(LIBJPEG_TURBO_VERSION); }

JpegHeader read_jpeg_header(const uint8_t* data, size_t size, const JpegLimits& limits) {
  Decompressor d(limits);
  return open_checked(d, data, size, limits);
}

DecodedRegion decode_jpeg_region(const uint8_t* data, size_t size, const CropBox& box,
                                 const JpegDecodeOptions& options) {
  if (options.scale_num < 1 || options.scale_num > 8)
    throw InvalidArgument("scale_num must be 1..8 (a scale of n/8), got " + std::to_string(options.scale_num));
  Decompressor d(options.limits);
  const JpegHeader header = open_checked(d, data, size, options.limits);
  if (header.channels == 0) throw InvalidArgument("JPEG colour space is not gray, YCbCr or RGB (CMYK?)");
  check_box(box, header);
  if (!d.start(options.scale_num, options.fast_dct, header.channels == 1 ? JCS_GRAYSCALE : JCS_EXT_RGB))
    throw_corrupt(d);

  DecodedRegion r;
  r.channels = header.channels;
  r.full_height = header.height;
  r.full_width = header.width;
  r.scaled_height = d.info().output_height;
  r.scaled_width = d.info().output_width;
  const bool skip = d.can_skip();
  const auto [x_lo, x_hi] =
      pixel_span(box.left, box.right, static_cast<double>(r.scaled_width) / header.width, kBandMargin, r.scaled_width);
  const auto [y_lo, y_hi] =
      pixel_span(box.top, box.bottom, static_cast<double>(r.scaled_height) / header.height, 0, r.scaled_height);
  auto x = static_cast<JDIMENSION>(skip ? x_lo : 0);
  auto width = static_cast<JDIMENSION>(skip ? x_hi - x_lo : r.scaled_width);
  if (skip && width < r.scaled_width && !d.crop_columns(&x, &width)) throw_corrupt(d);
  r.x0 = x;
  r.width = width;
  r.y0 = y_lo;
  r.height = y_hi - y_lo;
  const auto row_bytes = static_cast<size_t>(r.width) * static_cast<size_t>(r.channels);
  std::vector<uint8_t> spare_row(row_bytes);
  if (skip) {
    if (r.y0 > 0 && !d.skip_rows(static_cast<JDIMENSION>(r.y0))) throw_corrupt(d);
  } else if (!d.read_rows(spare_row.data(), 0, static_cast<JDIMENSION>(r.y0))) {
    throw_corrupt(d);
  }
  r.pixels.resize(row_bytes * static_cast<size_t>(r.height));
  if (!d.read_rows(r.pixels.data(), row_bytes, static_cast<JDIMENSION>(r.height))) throw_corrupt(d);
  if (!header.multi_scan && !ends_with_eoi(data, size) && !d.read_to_end(spare_row.data())) throw_corrupt(d);
  return r;
}

#else  // built without libjpeg-turbo

namespace {
[[noreturn]] void unavailable() {
  throw std::runtime_error("pyengine's core was built without libjpeg-turbo (install libjpeg62-turbo-dev, rebuild)");
}
}  // namespace

std::string jpeg_crop_decoder() { return ""; }
JpegHeader read_jpeg_header(const uint8_t*, size_t, const JpegLimits&) { unavailable(); }
DecodedRegion decode_jpeg_region(const uint8_t*, size_t, const CropBox&, const JpegDecodeOptions&) { unavailable(); }

#endif

CropBox box_in_region(const CropBox& box, const DecodedRegion& r) {
  const double sx = static_cast<double>(r.scaled_width) / static_cast<double>(r.full_width);
  const double sy = static_cast<double>(r.scaled_height) / static_cast<double>(r.full_height);
  const auto x0 = static_cast<double>(r.x0), y0 = static_cast<double>(r.y0);
  return CropBox{box.left * sx - x0, box.top * sy - y0, box.right * sx - x0, box.bottom * sy - y0};
}

void decode_crop_resize_jpeg(const uint8_t* data, size_t size, const CropBox& box, const JpegDecodeOptions& options,
                             const DestImage& dst, bool hflip) {
  const DecodedRegion region = decode_jpeg_region(data, size, box, options);
  crop_resize(region.view(), box_in_region(box, region), dst, hflip);
}

}  // namespace pe::image
