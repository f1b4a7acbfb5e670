"""Image transforms for ``Loader(sample_transform=...)``: decode, crop, resize and flip one sample.

::

    loader = pe.data.Loader(ds, batch_size=256, sample_transform=pe.data.RandomResizedCrop(size=224),
                            transform_threads=4)
    for batch in loader:            # batch["image"]: uint8 [256, 224, 224, 3]
        ...

Each transform reads the encoded image in ``sample[field]`` (the bytes of a JPEG, PNG, ...),
picks its crop from the image's header with the sample's generator, decodes, and crops +
resizes + flips in one C++ pass (Pillow's antialiased BILINEAR filter). JPEGs may be reduced
in the DCT domain first when the crop stays at least as large as the output. Decoding and
resizing release the GIL, so the loader's transform threads run in parallel.

JPEG decoders, fastest first (:func:`jpeg_decoder` says which one is in use):

- ``libjpeg-turbo (crop decode)``: inside pyengine's C++ core, when it was built with
  libjpeg-turbo's headers. Only the crop's rows and iMCU columns go through the inverse DCT and
  colour conversion, and rows below the crop are not decoded at all; the Huffman data above
  the crop's bottom still is (it is sequential). For RandomResizedCrop's crops of 400x350 q90
  JPEGs: 0.73 ms against 1.17 for a whole decode. Install the headers and rebuild
  (Debian / Ubuntu: ``apt-get install libjpeg62-turbo-dev`` or ``libjpeg-turbo8-dev``, then
  ``pip install .`` again); the build log says ``JPEG crop decoding with libjpeg-turbo``.
  ``PYENGINE_JPEG_CROP_DECODE=0`` in the environment turns it off.
- ``simplejpeg (whole image)``: libjpeg-turbo through the simplejpeg wheel, the whole image.
- ``Pillow (whole image)``: when simplejpeg is not installed; about 2x slower.

Everything else (PNG, CMYK JPEGs, ...) is decoded whole by Pillow.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np

from pyengine import _core

try:
    import simplejpeg
except ImportError:  # a platform without its wheel: Pillow decodes JPEGs too, only slower
    simplejpeg = None

Size = Union[int, Sequence[int]]
Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels

_JPEG_MAGIC = b"\xff\xd8\xff"
# libjpeg-turbo decodes these colour spaces to RGB itself; CMYK / YCCK go to Pillow.
_TURBO_COLORSPACES = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "GRAY"}
_LAYOUTS = ("HWC", "CHW")
# libjpeg-turbo scales by n/8 in the DCT domain, but 7/8 and 6/8 decode no faster than full
# size (measured: 400x350 q90, 1.07 / 1.09 / 1.08 ms at 8/8, 7/8, 6/8; 0.88 at 5/8, 0.60 at
# 4/8) and filter a little differently: reduce only when the crop allows 5/8 or less.
_MAX_DCT_SCALE = 5 / 8
_warned_no_simplejpeg = False
# The core's libjpeg-turbo ("" when built without it) and whether transforms use it.
_CROP_DECODER = _core.jpeg_crop_decoder()
_crop_decode = bool(_CROP_DECODER) and os.environ.get("PYENGINE_JPEG_CROP_DECODE", "1") != "0"


def jpeg_decoder() -> str:
    """Which decoder the transforms use for JPEGs, e.g. "libjpeg-turbo 2.1.5 (crop decode)".

    "simplejpeg 1.9.0 (whole image)" or "Pillow (whole image)" when the core was built without
    libjpeg-turbo or ``PYENGINE_JPEG_CROP_DECODE=0`` is set; see the module's docstring.
    """
    if _crop_decode:
        return f"{_CROP_DECODER} (crop decode)"
    if simplejpeg is not None:
        return f"simplejpeg {simplejpeg.__version__} (whole image)"
    return "Pillow (whole image)"


class _ImageCrop:
    """What both transforms share: the field, the output size and layout, decode and resize."""

    def __init__(self, field: str, size: Size, layout: str, dct_downscale: bool, fast_dct: bool) -> None:
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be 'HWC' ([H, W, 3]) or 'CHW' ([3, H, W]), got {layout!r}")
        self.field, self.size, self.layout = field, _pair(size, "size"), layout
        self.dct_downscale, self.fast_dct = dct_downscale, bool(fast_dct)

    def __call__(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
        data = _encoded_bytes(sample, self.field)
        out = dict(sample)
        header = _crop_decodable_jpeg(data) if _crop_decode else None
        if header is not None:
            (top, left, h, w), flip = self._choose(header[0], header[1], rng)
            box = (left, top, left + w, top + h)
            out[self.field] = self._decode_crop_resize(data, header, box, flip)
            return out
        height, width = image_size(data, self.field)
        (top, left, h, w), flip = self._choose(height, width, rng)
        pixels, mapped = decode_for_crop(
            data,
            (left, top, left + w, top + h),
            self.size,
            field=self.field,
            dct_downscale=self.dct_downscale,
            fast_dct=self.fast_dct,
        )
        out[self.field] = _core.crop_resize(pixels, mapped, self.size[0], self.size[1], self.layout, flip)
        return out

    def _decode_crop_resize(self, data: np.ndarray, header: tuple[int, int], box: Box, flip: bool) -> np.ndarray:
        """The core's crop decode: only the rows and columns `box` needs, then the resize."""
        reduce = _reduce_factors(box, self.size) if self.dct_downscale else None
        scale = _dct_scale_num(*header, reduce)
        try:
            return _core.decode_crop_resize_jpeg(
                data, box, self.size[0], self.size[1], self.layout, flip, scale, self.fast_dct
            )
        except ValueError as e:
            raise _not_an_image(data, self.field, f"a JPEG libjpeg-turbo cannot decode ({e})") from None

    def _choose(self, height: int, width: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
        raise NotImplementedError


class RandomResizedCrop(_ImageCrop):
    """A random crop of random area and aspect ratio, resized to `size`, flipped with probability `hflip`.

    The crop follows torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of an area
    fraction uniform in `scale` and an aspect ratio log-uniform in `ratio` that fit the image,
    else the whole image clipped to the ratio range, centred.

    Args:
        field: The sample's field holding the encoded image; replaced by the pixels.
        size: Output (height, width), or one int for a square.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's width / height.
        hflip: Probability of a left-right flip.
        layout: "HWC" gives uint8 [H, W, 3] per sample ([B, H, W, 3] batches); "CHW" [3, H, W].
        dct_downscale: Let libjpeg-turbo decode JPEGs at a reduced size (n/8) when the crop
            still has at least the output's resolution: faster, and nearly the same pixels.
        fast_dct: Decode JPEGs with libjpeg's fast integer IDCT (JDCT_IFAST, as FFCV does)
            instead of the accurate one (JDCT_ISLOW), trading accuracy for speed: 224x224
            crops of 400x350 q90 JPEGs differ by 0.9 levels on average (up to 5), and the loss
            grows with quality. Off by default because it buys little: measured, a whole
            decode 6% faster (1.10 against 1.17 ms), a crop decode no faster (0.75 against
            0.73), where Huffman decoding dominates and libjpeg-turbo's accurate IDCT is SIMD.
    """

    def __init__(
        self,
        field: str = "image",
        size: Size = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        layout: str = "HWC",
        dct_downscale: bool = True,
        fast_dct: bool = False,
    ) -> None:
        super().__init__(field, size, layout, dct_downscale, fast_dct)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability, got {hflip}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip

    def _choose(self, height: int, width: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
        box = random_resized_crop_box(height, width, self.scale, self.ratio, rng)
        return box, bool(rng.random() < self.hflip)

    def __repr__(self) -> str:
        return (
            f"RandomResizedCrop(field={self.field!r}, size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, layout={self.layout!r}, fast_dct={self.fast_dct})"
        )


class CenterCrop(_ImageCrop):
    """The evaluation crop: the shorter side resized to `resize`, then the centre `size` cut out.

    Done as one resize of the matching source box (torchvision's ``Resize(resize)`` then
    ``CenterCrop(size)`` geometry), so the full image is never resized. Uses no randomness.

    Args:
        field: The sample's field holding the encoded image; replaced by the pixels.
        size: Output (height, width), or one int for a square.
        resize: The shorter side before cropping; None: the larger of `size`'s sides.
        layout: "HWC" ([H, W, 3]) or "CHW" ([3, H, W]).
        dct_downscale: As in :class:`RandomResizedCrop`.
        fast_dct: As in :class:`RandomResizedCrop`.
    """

    def __init__(
        self,
        field: str = "image",
        size: Size = 224,
        resize: Optional[int] = 256,
        layout: str = "HWC",
        dct_downscale: bool = True,
        fast_dct: bool = False,
    ) -> None:
        super().__init__(field, size, layout, dct_downscale, fast_dct)
        self.resize = int(resize) if resize is not None else max(self.size)
        if self.resize < max(self.size):
            raise ValueError(f"resize ({self.resize}) must be at least the crop size {self.size}")

    def _choose(self, height: int, width: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
        del rng
        return center_crop_box(height, width, self.size, self.resize), False

    def __repr__(self) -> str:
        return (
            f"CenterCrop(field={self.field!r}, size={self.size}, resize={self.resize}, layout={self.layout!r}, "
            f"fast_dct={self.fast_dct})"
        )


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, size: tuple[int, int], resize: int) -> tuple[int, int, int, int]:
    """The source box (top, left, h, w) that Resize(resize) then CenterCrop(size) would show.

    Rounded out to whole source pixels (at most one pixel of aspect error at the edges).
    """
    short = min(height, width)
    # torchvision's Resize(int): the shorter side becomes `resize`, the longer keeps the aspect.
    resized_h = resize if height == short else int(resize * height / short)
    resized_w = resize if width == short else int(resize * width / short)
    crop_h, crop_w = min(size[0], resized_h), min(size[1], resized_w)
    top = int(round((resized_h - crop_h) / 2.0))
    left = int(round((resized_w - crop_w) / 2.0))
    sy, sx = height / resized_h, width / resized_w
    y0, x0 = int(math.floor(top * sy)), int(math.floor(left * sx))
    y1, x1 = min(height, int(math.ceil((top + crop_h) * sy))), min(width, int(math.ceil((left + crop_w) * sx)))
    return y0, x0, y1 - y0, x1 - x0


def image_size(data: Union[bytes, np.ndarray], field: str = "image") -> tuple[int, int]:
    """(height, width) from the encoded image's header, without decoding it.

    Raises:
        ValueError: `data` is not an image this module can decode (the message names `field`).
    """
    data = _as_array(data)
    if _is_jpeg(data) and simplejpeg is not None:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(height), int(width)
        except ValueError:
            pass  # a JPEG libjpeg-turbo's header reader refuses (e.g. CMYK): Pillow may read it
    with _open_with_pillow(data, field) as img:
        return img.height, img.width


def decode_for_crop(
    data: Union[bytes, np.ndarray],
    box: Box,
    size: tuple[int, int],
    *,
    field: str = "image",
    dct_downscale: bool = True,
    fast_dct: bool = False,
) -> tuple[np.ndarray, Box]:
    """Decodes a whole encoded image for cropping `box` (full-resolution pixels) to `size` (h, w).

    JPEGs may be decoded at a reduced size (libjpeg-turbo's n/8 DCT scaling) chosen so the box
    keeps at least `size`'s resolution; the box is returned mapped onto the decoded pixels.
    `fast_dct` as in :class:`RandomResizedCrop` (simplejpeg only).

    Returns:
        (pixels, box): uint8 [H, W, 3] or [H, W, 1] (gray) and the box in its coordinates.

    Raises:
        ValueError: `data` is not a decodable image (the message names `field`).
    """
    data = _as_array(data)
    left, top, right, bottom = box
    if _is_jpeg(data):
        pixels, full = _decode_jpeg(data, field, _reduce_factors(box, size) if dct_downscale else None, fast_dct)
    else:
        pixels, full = _decode_with_pillow(data, field, None)
    sy, sx = pixels.shape[0] / full[0], pixels.shape[1] / full[1]
    return pixels, (left * sx, top * sy, right * sx, bottom * sy)


def _crop_decodable_jpeg(data: np.ndarray) -> Optional[tuple[int, int]]:
    """(height, width) of a JPEG the core's crop decoder converts itself, else None."""
    if not _is_jpeg(data):
        return None
    try:
        height, width, channels = _core.jpeg_header(data)
    except ValueError:
        return None  # the whole-image path tries simplejpeg and Pillow, and words the error
    return (height, width) if channels else None  # channels 0: CMYK / YCCK, for Pillow


def _reduce_factors(box: Box, size: tuple[int, int]) -> tuple[float, float]:
    """The smallest decode (y, x), as fractions of full size, at which the box still covers the output."""
    left, top, right, bottom = box
    return size[0] / max(bottom - top, 1e-9), size[1] / max(right - left, 1e-9)


def _dct_scale_num(height: int, width: int, reduce: Optional[tuple[float, float]]) -> int:
    """libjpeg's scale n (of n/8) for `reduce`: the smallest whose decode is at least
    _min_decode_size, as simplejpeg picks it; 8 (full size) when the rule allows no reduction."""
    min_h, min_w = _min_decode_size(height, width, reduce)
    if min_h == 0:
        return 8
    for n in range(1, 8):
        if -(-height * n // 8) >= min_h and -(-width * n // 8) >= min_w:
            return n
    return 8


def _decode_jpeg(
    data: np.ndarray, field: str, reduce: Optional[tuple[float, float]], fast_dct: bool = False
) -> tuple[np.ndarray, tuple[int, int]]:
    if simplejpeg is None:
        _warn_no_simplejpeg()
        return _decode_with_pillow(data, field, reduce)
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return _decode_with_pillow(data, field, reduce)  # CMYK and others libjpeg-turbo cannot convert
    target = _TURBO_COLORSPACES.get(colorspace)
    if target is None:
        return _decode_with_pillow(data, field, reduce)
    min_h, min_w = _min_decode_size(height, width, reduce)
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=target, fastdct=fast_dct, min_height=min_h, min_width=min_w)
    except ValueError as e:
        raise _not_an_image(data, field, f"a corrupt JPEG: {e}") from None
    return pixels, (height, width)


def _min_decode_size(height: int, width: int, reduce: Optional[tuple[float, float]]) -> tuple[int, int]:
    """The decoded size the DCT scaling must not go below (0, 0: full size)."""
    if reduce is None or max(reduce) > _MAX_DCT_SCALE:
        return 0, 0
    return math.ceil(height * reduce[0]), math.ceil(width * reduce[1])


def _decode_with_pillow(
    data: np.ndarray, field: str, reduce: Optional[tuple[float, float]]
) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image

    with _open_with_pillow(data, field) as img:
        full = (img.height, img.width)
        min_h, min_w = _min_decode_size(img.height, img.width, reduce)
        if min_h > 0 and img.format == "JPEG":
            img.draft("RGB", (min_w, min_h))  # Pillow's DCT scaling: at least this size
        try:
            img.load()
            if img.mode not in ("RGB", "L"):
                # Alpha is dropped, palettes and CMYK converted: the crop is always RGB.
                img = img.convert("RGB")
            pixels = np.asarray(img)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise _not_an_image(data, field, f"an image Pillow cannot decode ({e})") from None
    return (pixels if pixels.ndim == 3 else pixels[:, :, None]), full


def _open_with_pillow(data: np.ndarray, field: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data.tobytes()))
    except UnidentifiedImageError:
        raise _not_an_image(data, field, "no JPEG, PNG or other image Pillow can identify") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise _not_an_image(data, field, f"an image Pillow cannot open ({e})") from None


def _encoded_bytes(sample: dict[str, np.ndarray], field: str) -> np.ndarray:
    if field not in sample:
        raise ValueError(f"the sample has no field {field!r} (its fields: {sorted(sample)})")
    arr = _as_array(sample[field])
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(
            f"field {field!r} must hold encoded image bytes (a variable-length uint8 field), "
            f"got {arr.dtype} of shape {arr.shape}"
        )
    return arr


def _as_array(data: Union[bytes, np.ndarray]) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data)


def _is_jpeg(data: np.ndarray) -> bool:
    return data[:3].tobytes() == _JPEG_MAGIC


def _not_an_image(data: np.ndarray, field: str, what: str) -> ValueError:
    return ValueError(f"field {field!r} holds {what}: {data.nbytes} bytes starting {data[:16].tobytes()!r}")


def _pair(size: Size, name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def _warn_no_simplejpeg() -> None:
    global _warned_no_simplejpeg
    if not _warned_no_simplejpeg:
        _warned_no_simplejpeg = True
        warnings.warn(
            "simplejpeg is not installed: JPEGs are decoded with Pillow, about 2x slower (pip install simplejpeg)",
            RuntimeWarning,
            stacklevel=3,
        )
