// Bindings for the image kernels: numpy arrays in, checked for dtype, shape and layout here so
// the core sees only raw buffers; the work runs with the GIL released so transform threads
// decode and resize in parallel.
#include <pybind11/numpy.h>

#include <string>

#include "bindings.h"
#include "common/errors.h"
#include "image/crop_resize.h"

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

py::array crop_resize(const py::array& src, const py::sequence& box, py::ssize_t height, py::ssize_t width,
                      const std::string& layout, bool hflip, py::object out) {
  if (layout != "HWC" && layout != "CHW") throw InvalidArgument("layout must be 'HWC' or 'CHW', got '" + layout + "'");
  if (py::len(box) != 4) throw InvalidArgument("box must be (left, top, right, bottom)");
  if (height < 1 || width < 1)
    throw InvalidArgument("output size must be positive, got " + std::to_string(height) + "x" + std::to_string(width));
  const bool chw = layout == "CHW";
  const image::SourceImage source = source_view(src);
  const image::CropBox crop{box[0].cast<double>(), box[1].cast<double>(), box[2].cast<double>(),
                            box[3].cast<double>()};
  py::array dst = out.is_none() ? py::array_t<uint8_t>(chw ? std::vector<py::ssize_t>{3, height, width}
                                                           : std::vector<py::ssize_t>{height, width, 3})
                                : out.cast<py::array>();
  const image::DestImage dest = dest_view(dst, chw);
  if (dest.height != height || dest.width != width)
    throw InvalidArgument("out is " + shape_text(dst) + ", not " + std::to_string(height) + "x" +
                          std::to_string(width) + " in " + layout);
  {
    // `src` and `dst` are held by the caller's frame and this one: the buffers outlive the call.
    py::gil_scoped_release release;
    image::crop_resize(source, crop, dest, hflip);
  }
  return dst;
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
}

}  // namespace pe::bindings
