// Bindings for the image kernels: numpy arrays and byte buffers in, checked for dtype, shape
// and layout here so the core sees only raw buffers; the work runs with the GIL released so
// transform threads decode and resize in parallel.
#include <pybind11/numpy.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bindings.h"
#include "common/errors.h"
#include "image/crop_resize.h"
#include "image/jpeg_decode.h"

namespace py = pybind11;

namespace pe::bindings {
namespace {

std::string shape_text(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A uint8 [H, W] (gray) or [H, W, 1 or 3] array whose pixels are interleaved: any row stride.
image::SourceImage source_view(const py::array& src) {
  if (!py::dtype::of<uint8_t>().is(src.dtype()))
    throw InvalidArgument("image must be uint8, got " + py::str(src.dtype()).cast<std::string>());
  if (src.ndim() != 2 && src.ndim() != 3)
    throw InvalidArgument("image must be [H, W] or [H, W, C], got shape " + shape_text(src));
  const int channels = src.ndim() == 2 ? 1 : static_cast<int>(src.shape(2));
  if (channels != 1 && channels != 3)
    throw InvalidArgument("image must have 1 or 3 channels, got shape " + shape_text(src));
  // A channel axis of length 1 may have any stride (numpy gives [:, :, None] a stride of 0).
  const bool packed_pixels = src.strides(1) == channels && (src.ndim() == 2 || channels == 1 || src.strides(2) == 1);
  if (!packed_pixels || src.strides(0) < src.shape(1) * channels)
    throw InvalidArgument("image pixels must be contiguous within each row (use np.ascontiguousarray)");
  return image::SourceImage{static_cast<const uint8_t*>(src.data()), src.shape(0), src.shape(1), channels,
                            src.strides(0)};
}

// A writable uint8 destination of [h, w, 3] (HWC) or [3, h, w] (CHW), any strides.
image::DestImage dest_view(py::array& out, bool chw) {
  if (!py::dtype::of<uint8_t>().is(out.dtype()) || out.ndim() != 3 || (chw ? out.shape(0) : out.shape(2)) != 3)
    throw InvalidArgument(std::string("out must be a uint8 array of shape ") + (chw ? "[3, H, W]" : "[H, W, 3]") +
                          ", got " + py::str(out.dtype()).cast<std::string>() + " " + shape_text(out));
  if (!out.writeable()) throw InvalidArgument("out is read-only");
  auto* data = static_cast<uint8_t*>(out.mutable_data());
  if (chw) return image::DestImage{data, out.shape(1), out.shape(2), out.strides(1), out.strides(2), out.strides(0)};
  return image::DestImage{data, out.shape(0), out.shape(1), out.strides(0), out.strides(1), out.strides(2)};
}

// The output array: `out` when given (checked against the layout and size), else a new one.
py::array output_array(const py::object& out, const std::string& layout, py::ssize_t height, py::ssize_t width,
                       image::DestImage* dest) {
  if (layout != "HWC" && layout != "CHW") throw InvalidArgument("layout must be 'HWC' or 'CHW', got '" + layout + "'");
  if (height < 1 || width < 1)
    throw InvalidArgument("output size must be positive, got " + std::to_string(height) + "x" + std::to_string(width));
  const bool chw = layout == "CHW";
  py::array dst = out.is_none() ? py::array_t<uint8_t>(chw ? std::vector<py::ssize_t>{3, height, width}
                                                           : std::vector<py::ssize_t>{height, width, 3})
                                : out.cast<py::array>();
  *dest = dest_view(dst, chw);
  if (dest->height != height || dest->width != width)
    throw InvalidArgument("out is " + shape_text(dst) + ", not " + std::to_string(height) + "x" +
                          std::to_string(width) + " in " + layout);
  return dst;
}

image::CropBox crop_box(const py::sequence& box) {
  if (py::len(box) != 4) throw InvalidArgument("box must be (left, top, right, bottom)");
  return image::CropBox{box[0].cast<double>(), box[1].cast<double>(), box[2].cast<double>(), box[3].cast<double>()};
}

py::array crop_resize(const py::array& src, const py::sequence& box, py::ssize_t height, py::ssize_t width,
                      const std::string& layout, bool hflip, const py::object& out) {
  const image::CropBox crop = crop_box(box);
  const image::SourceImage source = source_view(src);
  image::DestImage dest;
  py::array dst = output_array(out, layout, height, width, &dest);
  {
    // `src` and `dst` are held by the caller's frame and this one: the buffers outlive the call.
    py::gil_scoped_release release;
    image::crop_resize(source, crop, dest, hflip);
  }
  return dst;
}

// An encoded image: any buffer of single bytes, contiguous (bytes, bytearray, uint8 arrays).
py::buffer_info encoded_bytes(const py::buffer& data) {
  py::buffer_info info = data.request();
  if (info.itemsize != 1 || info.ndim != 1 || (info.shape[0] > 1 && info.strides[0] != 1))
    throw InvalidArgument("data must be a contiguous 1-D buffer of bytes (bytes or a uint8 array)");
  return info;
}

py::tuple jpeg_header(const py::buffer& data) {
  const py::buffer_info bytes = encoded_bytes(data);
  const image::JpegHeader h =
      image::read_jpeg_header(static_cast<const uint8_t*>(bytes.ptr), static_cast<size_t>(bytes.size));
  return py::make_tuple(h.height, h.width, h.channels);
}

image::JpegDecodeOptions decode_options(int scale_num, bool fast_dct) {
  image::JpegDecodeOptions options;
  options.scale_num = scale_num;
  options.fast_dct = fast_dct;
  return options;
}

py::array decode_crop_resize_jpeg(const py::buffer& data, const py::sequence& box, py::ssize_t height,
                                  py::ssize_t width, const std::string& layout, bool hflip, int scale_num,
                                  bool fast_dct, const py::object& out) {
  const py::buffer_info bytes = encoded_bytes(data);
  const image::CropBox crop = crop_box(box);
  image::DestImage dest;
  py::array dst = output_array(out, layout, height, width, &dest);
  const image::JpegDecodeOptions options = decode_options(scale_num, fast_dct);
  {
    // `bytes` holds the input's buffer and `dst` the output until after the GIL is back.
    py::gil_scoped_release release;
    image::decode_crop_resize_jpeg(static_cast<const uint8_t*>(bytes.ptr), static_cast<size_t>(bytes.size), crop,
                                   options, dest, hflip);
  }
  return dst;
}

py::tuple decode_jpeg_region(const py::buffer& data, const py::sequence& box, int scale_num, bool fast_dct) {
  const py::buffer_info bytes = encoded_bytes(data);
  const image::CropBox crop = crop_box(box);
  const image::JpegDecodeOptions options = decode_options(scale_num, fast_dct);
  image::DecodedRegion r;
  {
    py::gil_scoped_release release;
    r = image::decode_jpeg_region(static_cast<const uint8_t*>(bytes.ptr), static_cast<size_t>(bytes.size), crop,
                                  options);
  }
  py::array_t<uint8_t> pixels(
      {static_cast<py::ssize_t>(r.height), static_cast<py::ssize_t>(r.width), static_cast<py::ssize_t>(r.channels)});
  std::copy(r.pixels.begin(), r.pixels.end(), pixels.mutable_data());
  return py::make_tuple(pixels, py::make_tuple(r.x0, r.y0), py::make_tuple(r.scaled_height, r.scaled_width));
}

}  // namespace

void bind_image(py::module_& m) {
  m.def("crop_resize", &crop_resize, py::arg("image"), py::arg("box"), py::arg("height"), py::arg("width"),
        py::arg("layout") = "HWC", py::arg("hflip") = false, py::arg("out") = py::none(),
        "Crops `box` = (left, top, right, bottom) (source pixels, may be fractional) of a uint8 [H, W] or "
        "[H, W, 1|3] image and resizes it to height x width with antialiased bilinear filtering (Pillow's "
        "BILINEAR), mirrored left-right if hflip. Returns uint8 [height, width, 3] (layout 'HWC') or "
        "[3, height, width] ('CHW'), written into `out` when given. Gray is expanded to RGB. Releases the GIL "
        "while it works; raises ValueError for bad arrays or a box outside the image.");
  m.def("jpeg_crop_decoder", &image::jpeg_crop_decoder,
        "The libjpeg-turbo the core decodes JPEG crops with ('libjpeg-turbo 2.1.5'), or '' when it was built "
        "without one (then the JPEG functions below raise RuntimeError).");
  m.def("jpeg_header", &jpeg_header, py::arg("data"),
        "(height, width, channels) of the JPEG in `data` (bytes or a uint8 array) from its header; channels is 1 "
        "(gray), 3 (RGB) or 0 (CMYK / YCCK, which the crop decoder does not convert). Holds the GIL (it reads "
        "only the markers); raises ValueError for data libjpeg cannot parse or over 178,956,970 pixels.");
  m.def("decode_crop_resize_jpeg", &decode_crop_resize_jpeg, py::arg("data"), py::arg("box"), py::arg("height"),
        py::arg("width"), py::arg("layout") = "HWC", py::arg("hflip") = false, py::arg("scale_num") = 8,
        py::arg("fast_dct") = false, py::arg("out") = py::none(),
        "Decodes only the part of the JPEG in `data` that `box` = (left, top, right, bottom) (full-size source "
        "pixels) covers, at scale_num / 8 of full size (1..8), with libjpeg's JDCT_IFAST IDCT if fast_dct, then "
        "crop_resize of the box to height x width (flipped if hflip): the pixels crop_resize gives on the whole "
        "image decoded at that scale. Returns uint8 [height, width, 3] ('HWC') or [3, height, width] ('CHW'), "
        "written into `out` when given. Blocks with the GIL released; raises ValueError for a corrupt, truncated, "
        "CMYK or too large JPEG or a box outside it.");
  m.def("decode_jpeg_region", &decode_jpeg_region, py::arg("data"), py::arg("box"), py::arg("scale_num") = 8,
        py::arg("fast_dct") = false,
        "The decode step of decode_crop_resize_jpeg alone: (pixels uint8 [h, w, 1|3], (x0, y0), (scaled_height, "
        "scaled_width)), the decoded band that covers `box` and where it sits in the whole image at scale_num / 8. "
        "Blocks with the GIL released; raises ValueError as decode_crop_resize_jpeg.");
}

}  // namespace pe::bindings
