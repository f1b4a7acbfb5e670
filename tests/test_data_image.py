"""Image transforms (RandomResizedCrop, CenterCrop), their decoding and resize kernel, and
write_image_folder: shapes and layouts, agreement with Pillow, determinism, flips, the DCT
downscale path, PNG / gray / CMYK inputs, clear errors, and the Loader end to end. The core's
JPEG crop decoder (when built with libjpeg-turbo): pixel-exact against a whole-image decode for
every sampling, progressive, DCT scales and crops at borders and odd offsets; corrupt and
truncated data; the whole-image fallback."""

from __future__ import annotations

import inspect
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyengine as pe
from pyengine import _core
from pyengine.data import image as image_module


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients, a few flat shapes and a little noise: edges and texture a resize can get wrong."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    for _ in range(4):
        y0, x0 = rng.integers(0, height - 10), rng.integers(0, width - 10)
        img[y0 : y0 + height // 4, x0 : x0 + width // 5] = rng.integers(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **options) -> np.ndarray:
    img = Image.fromarray(pixels)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}), **options)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _pillow_crop_resize(data: np.ndarray, box, size) -> np.ndarray:
    img = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
    return np.asarray(img.crop(box).resize((size[1], size[0]), Image.BILINEAR))


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def jpeg() -> np.ndarray:
    return _encode(_picture(240, 320))


def test_random_resized_crop_shapes_dtypes_and_layouts(jpeg):
    sample = {"image": jpeg, "label": np.asarray(7, dtype=np.int64)}
    rng = np.random.default_rng(0)
    hwc = pe.data.RandomResizedCrop(size=64)(sample, rng)
    assert hwc["image"].shape == (64, 64, 3) and hwc["image"].dtype == np.uint8
    assert hwc["label"] == 7 and hwc["label"].dtype == np.int64  # other fields pass through
    chw = pe.data.RandomResizedCrop(size=(48, 80), layout="CHW")(sample, rng)
    assert chw["image"].shape == (3, 48, 80) and chw["image"].dtype == np.uint8
    center = pe.data.CenterCrop(size=(50, 60), resize=70, layout="CHW")(sample, rng)
    assert center["image"].shape == (3, 50, 60)


def test_chw_holds_the_same_pixels_as_hwc(jpeg):
    hwc = pe.data.RandomResizedCrop(size=40)({"image": jpeg}, np.random.default_rng(3))["image"]
    chw = pe.data.RandomResizedCrop(size=40, layout="CHW")({"image": jpeg}, np.random.default_rng(3))["image"]
    np.testing.assert_array_equal(chw, hwc.transpose(2, 0, 1))


def test_crop_and_resize_match_pillow_on_the_same_box(jpeg):
    for box, size in [((10, 20, 300, 230), (224, 224)), ((0, 0, 320, 240), (60, 90)), ((100, 50, 150, 90), (96, 64))]:
        pixels, mapped = image_module.decode_for_crop(jpeg, box, size, dct_downscale=False)
        ours = _core.crop_resize(pixels, mapped, size[0], size[1])
        assert _mean_abs_diff(ours, _pillow_crop_resize(jpeg, box, size)) < 0.3, (box, size)


def test_random_resized_crop_is_pillow_crop_resize_of_torchvisions_box(jpeg):
    transform = pe.data.RandomResizedCrop(size=56, hflip=0.0, dct_downscale=False)
    for seed in range(5):
        out = transform({"image": jpeg}, np.random.default_rng(seed))["image"]
        top, left, h, w = image_module.random_resized_crop_box(
            240, 320, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed)
        )
        expected = _pillow_crop_resize(jpeg, (left, top, left + w, top + h), (56, 56))
        assert _mean_abs_diff(out, expected) < 0.3


def test_crop_box_follows_torchvisions_rules():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = image_module.random_resized_crop_box(100, 300, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert top >= 0 and top + h <= 100 and left >= 0 and left + w <= 300
        assert 0.08 * 30000 * 0.95 <= h * w <= 30000
    # No try fits a tall ratio on a very wide image: the centred fallback clipped to the ratio range.
    assert image_module.random_resized_crop_box(10, 1000, (0.9, 1.0), (0.5, 0.6), rng) == (0, 497, 10, 6)


def test_center_crop_matches_resize_then_center_crop():
    pixels = _picture(300, 400, seed=2)
    data = _encode(pixels)
    ours = pe.data.CenterCrop(size=224, resize=256, dct_downscale=False)({"image": data}, None)["image"]
    decoded = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
    resized = decoded.resize((341, 256), Image.BILINEAR)  # torchvision's Resize(256): int(256 * 400 / 300)
    top, left = round((256 - 224) / 2), round((341 - 224) / 2)
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)))
    assert _mean_abs_diff(ours, expected) < 2.5  # one resize of the rounded-out box, not two steps


def test_same_seed_same_output_different_seed_different_crop(jpeg):
    transform = pe.data.RandomResizedCrop(size=32)
    first = transform({"image": jpeg}, np.random.default_rng(11))["image"]
    again = transform({"image": jpeg}, np.random.default_rng(11))["image"]
    np.testing.assert_array_equal(first, again)
    others = [transform({"image": jpeg}, np.random.default_rng(s))["image"] for s in range(12, 20)]
    assert all(not np.array_equal(first, o) for o in others)


def test_hflip_mirrors_the_same_crop(jpeg):
    plain = pe.data.RandomResizedCrop(size=(30, 50), hflip=0.0)({"image": jpeg}, np.random.default_rng(4))["image"]
    flipped = pe.data.RandomResizedCrop(size=(30, 50), hflip=1.0)({"image": jpeg}, np.random.default_rng(4))["image"]
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    assert not np.array_equal(flipped, plain)


def test_dct_downscale_is_taken_when_the_crop_allows_it_and_gives_close_pixels():
    data = _encode(_picture(480, 640, seed=3))
    box, size = (0, 0, 640, 480), (100, 120)
    small, small_box = image_module.decode_for_crop(data, box, size)
    full, full_box = image_module.decode_for_crop(data, box, size, dct_downscale=False)
    assert full.shape == (480, 640, 3) and full_box == box
    assert small.shape[0] >= 100 and small.shape[1] >= 120 and small.shape[0] <= 480 // 2  # reduced, >= output
    assert small_box == (0.0, 0.0, small.shape[1], small.shape[0])
    assert _mean_abs_diff(_core.crop_resize(small, small_box, *size), _core.crop_resize(full, full_box, *size)) < 2.0
    # A crop only a little larger than the output is decoded at full size (7/8 and 6/8 are no faster).
    near, _ = image_module.decode_for_crop(data, (0, 0, 300, 250), (224, 224))
    assert near.shape == (480, 640, 3)


def test_transform_asks_libjpeg_turbo_for_the_reduced_size(monkeypatch):
    if image_module.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    monkeypatch.setattr(image_module, "_crop_decode", False)  # the whole-image path
    data = _encode(_picture(480, 640, seed=4))
    calls = []
    real = image_module.simplejpeg.decode_jpeg

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(image_module.simplejpeg, "decode_jpeg", recording)
    pe.data.CenterCrop(size=64, resize=64)({"image": data}, None)  # box 480x480 -> 64: reducible
    pe.data.CenterCrop(size=224, resize=400)({"image": data}, None)  # box ~269 -> 224: not below 5/8
    assert calls[0]["min_height"] > 0 and calls[0]["min_width"] > 0
    assert calls[1]["min_height"] == 0 and calls[1]["min_width"] == 0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA"])
def test_png_inputs_decode_to_rgb_close_to_pillow(mode):
    data = _encode(_picture(90, 120, seed=5), "PNG", mode=mode)
    out = pe.data.RandomResizedCrop(size=40, hflip=0.0)({"image": data}, np.random.default_rng(1))["image"]
    assert out.shape == (40, 40, 3)
    rng = np.random.default_rng(1)
    top, left, h, w = image_module.random_resized_crop_box(90, 120, (0.08, 1.0), (3 / 4, 4 / 3), rng)
    assert _mean_abs_diff(out, _pillow_crop_resize(data, (left, top, left + w, top + h), (40, 40))) < 0.3
    if mode in ("L", "LA"):
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_grayscale_and_cmyk_jpegs_decode_to_rgb():
    pixels = _picture(100, 140, seed=6)
    gray = pe.data.CenterCrop(size=48, resize=56)({"image": _encode(pixels, mode="L")}, None)["image"]
    assert gray.shape == (48, 48, 3) and (gray[..., 0] == gray[..., 2]).all()
    cmyk = pe.data.CenterCrop(size=48, resize=56)({"image": _encode(pixels, mode="CMYK")}, None)["image"]
    rgb = pe.data.CenterCrop(size=48, resize=56)({"image": _encode(pixels)}, None)["image"]
    assert cmyk.shape == (48, 48, 3) and _mean_abs_diff(cmyk, rgb) < 6


def test_garbage_bytes_raise_value_error_naming_the_field(jpeg):
    transform = pe.data.RandomResizedCrop(field="photo", size=16)
    with pytest.raises(ValueError, match=r"field 'photo' holds no JPEG, PNG.*: 13 bytes starting b'not an image!'"):
        transform({"photo": np.frombuffer(b"not an image!", dtype=np.uint8)}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="field 'photo'"):
        transform({"photo": jpeg[: len(jpeg) // 2]}, np.random.default_rng(0))  # truncated JPEG
    with pytest.raises(ValueError, match="field 'photo'"):
        transform({"photo": np.zeros(0, dtype=np.uint8)}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="must hold encoded image bytes"):
        transform({"photo": np.zeros((4, 4), dtype=np.float32)}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no field 'photo'"):
        transform({"image": jpeg}, np.random.default_rng(0))


def test_bad_transform_arguments_are_refused():
    with pytest.raises(ValueError, match="layout"):
        pe.data.RandomResizedCrop(layout="NHWC")
    with pytest.raises(ValueError, match="size"):
        pe.data.RandomResizedCrop(size=(0, 4))
    with pytest.raises(ValueError, match="scale"):
        pe.data.RandomResizedCrop(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="resize"):
        pe.data.CenterCrop(size=224, resize=200)


def test_crop_resize_binding_checks_its_arrays():
    img = np.zeros((10, 12, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        _core.crop_resize(img.astype(np.float32), (0, 0, 4, 4), 2, 2)
    with pytest.raises(ValueError, match="channels"):
        _core.crop_resize(np.zeros((10, 12, 4), dtype=np.uint8), (0, 0, 4, 4), 2, 2)
    with pytest.raises(ValueError, match="contiguous"):
        _core.crop_resize(img[:, ::2], (0, 0, 4, 4), 2, 2)
    with pytest.raises(ValueError, match="outside the image"):
        _core.crop_resize(img, (0, 0, 13, 4), 2, 2)
    with pytest.raises(ValueError, match="out must be"):
        _core.crop_resize(img, (0, 0, 4, 4), 2, 2, out=np.zeros((2, 2, 3), dtype=np.int32))
    out = np.zeros((3, 2, 2), dtype=np.uint8)
    assert _core.crop_resize(img + 9, (0, 0, 4, 4), 2, 2, layout="CHW", out=out) is out and (out == 9).all()
    row_view = np.zeros((10, 20, 3), dtype=np.uint8)[:, 4:16]  # rows padded: a row stride is fine
    assert _core.crop_resize(row_view, (0, 0, 12, 10), 5, 6).shape == (5, 6, 3)


def test_pillow_fallback_when_simplejpeg_is_missing(monkeypatch, jpeg):
    monkeypatch.setattr(image_module, "_crop_decode", False)
    monkeypatch.setattr(image_module, "simplejpeg", None)
    monkeypatch.setattr(image_module, "_warned_no_simplejpeg", False)
    transform = pe.data.CenterCrop(size=64, resize=72)
    with pytest.warns(RuntimeWarning, match="simplejpeg is not installed"):
        out = transform({"image": jpeg}, None)["image"]
    monkeypatch.undo()
    assert _mean_abs_diff(out, transform({"image": jpeg}, None)["image"]) < 2.0


# ---- the core's JPEG crop decoder ----

needs_crop_decoder = pytest.mark.skipif(
    not _core.jpeg_crop_decoder(), reason="pyengine's core was built without libjpeg-turbo"
)
needs_simplejpeg = pytest.mark.skipif(image_module.simplejpeg is None, reason="simplejpeg is not installed")

# Pillow's options for each kind of JPEG the crop decoder must handle.
_JPEG_KINDS = {
    "4:2:0": {"subsampling": 2},
    "4:2:2": {"subsampling": 1},
    "4:4:4": {"subsampling": 0},
    "gray": {"mode": "L"},
    "progressive": {"progressive": True},
    "optimized": {"optimize": True},
}
_H, _W = 203, 261  # neither a multiple of 16: partial iMCUs at the right and bottom
# Crops at every border and corner, one pixel wide, odd offsets, fractional edges, the whole image.
_BOXES = [
    (0, 0, _W, _H), (0, 0, 37, 29), (_W - 41, _H - 30, _W, _H), (0, _H - 20, 35, _H), (_W - 17, 0, _W, 19),
    (17, 9, 18, 10), (31, 45, 97, 111), (15.5, 7.25, 200.75, 64.5), (1, 1, _W - 1, _H - 1), (63, 0, 65, _H),
    (129, 77, 261, 203),
]  # fmt: skip


def _kind_jpeg(kind: str, seed: int = 8) -> np.ndarray:
    options = dict(_JPEG_KINDS[kind])
    mode = options.pop("mode", None)
    return _encode(_picture(_H, _W, seed=seed), mode=mode, **options)


def _whole_decode(data: np.ndarray, scale: int, fast: bool) -> np.ndarray:
    """simplejpeg's whole-image decode at scale / 8 (the path the crop decoder replaces)."""
    gray = Image.open(io.BytesIO(data.tobytes())).mode == "L"
    h, w = -(-_H * scale // 8), -(-_W * scale // 8)
    pixels = image_module.simplejpeg.decode_jpeg(
        data.tobytes(), colorspace="GRAY" if gray else "RGB", fastdct=fast, min_height=h, min_width=w
    )
    assert pixels.shape[:2] == (h, w)
    return pixels.reshape(h, w, -1)


@needs_crop_decoder
@needs_simplejpeg
@pytest.mark.parametrize("kind", sorted(_JPEG_KINDS))
def test_crop_decode_is_the_whole_decode_inside_the_crop(kind):
    data = _kind_jpeg(kind)
    for scale in (8, 5, 4, 2, 1):
        for fast in (False, True):
            whole = _whole_decode(data, scale, fast)
            sy, sx = whole.shape[0] / _H, whole.shape[1] / _W
            for box in _BOXES:
                band, (x0, y0), scaled = _core.decode_jpeg_region(data, box, scale, fast)
                assert scaled == whole.shape[:2]
                # The pixels the box touches, in the band and in the whole image: bit for bit.
                xa, xb = int(np.floor(box[0] * sx)), min(int(np.ceil(box[2] * sx)), whole.shape[1])
                ya, yb = int(np.floor(box[1] * sy)), min(int(np.ceil(box[3] * sy)), whole.shape[0])
                assert x0 <= xa and xb <= x0 + band.shape[1] and y0 <= ya and yb <= y0 + band.shape[0]
                np.testing.assert_array_equal(
                    band[ya - y0 : yb - y0, xa - x0 : xb - x0], whole[ya:yb, xa:xb], err_msg=f"{scale}/8 {fast} {box}"
                )


@needs_crop_decoder
@needs_simplejpeg
@pytest.mark.parametrize("kind", sorted(_JPEG_KINDS))
def test_fused_crop_resize_equals_crop_resize_of_the_whole_decode(kind):
    data = _kind_jpeg(kind, seed=9)
    for i, box in enumerate(_BOXES):
        scale, flip, layout = (8, 4, 2)[i % 3], i % 2 == 1, ("HWC", "CHW")[i % 2]
        whole = _whole_decode(data, scale, False)
        sy, sx = whole.shape[0] / _H, whole.shape[1] / _W
        mapped = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        expected = _core.crop_resize(whole, mapped, 40, 56, layout, flip)
        fused = _core.decode_crop_resize_jpeg(data, box, 40, 56, layout, flip, scale)
        # The same pixels and filter; the band's offset can change a weight's rounding, no more.
        assert np.abs(fused.astype(np.int16) - expected).max() <= 1, (box, scale)
        assert _mean_abs_diff(fused, expected) < 0.01


@needs_crop_decoder
@needs_simplejpeg
def test_transforms_give_the_same_crops_with_and_without_the_crop_decoder(monkeypatch):
    small, large = _encode(_picture(240, 320, seed=1)), _encode(_picture(600, 800, seed=2))
    transforms = [
        pe.data.RandomResizedCrop(size=64),  # crops of large mostly allow a DCT reduction
        pe.data.RandomResizedCrop(size=(48, 80), layout="CHW"),
        pe.data.CenterCrop(size=96, resize=110),
    ]
    for transform in transforms:
        for data in (small, large):
            for seed in range(6):
                monkeypatch.setattr(image_module, "_crop_decode", True)
                crop = transform({"image": data}, np.random.default_rng(seed))["image"]
                monkeypatch.setattr(image_module, "_crop_decode", False)
                whole = transform({"image": data}, np.random.default_rng(seed))["image"]
                assert np.abs(crop.astype(np.int16) - whole).max() <= 1, (transform, seed)


@needs_simplejpeg
def test_dct_scale_is_the_one_simplejpeg_picks():
    rng = np.random.default_rng(5)
    for _ in range(300):
        height, width = int(rng.integers(16, 3000)), int(rng.integers(16, 3000))
        reduce = (float(rng.uniform(0.01, 1.2)), float(rng.uniform(0.01, 1.2)))
        n = image_module._dct_scale_num(height, width, reduce)
        min_h, min_w = image_module._min_decode_size(height, width, reduce)
        if min_h == 0:
            assert n == 8
            continue
        # simplejpeg's rule: the smallest n/8 decode at least (min_h, min_w).
        assert -(-height * n // 8) >= min_h and -(-width * n // 8) >= min_w
        assert n == 1 or -(-height * (n - 1) // 8) < min_h or -(-width * (n - 1) // 8) < min_w


@needs_crop_decoder
def test_crop_decoder_is_asked_for_the_reduced_scale(monkeypatch):
    calls = []
    real = _core.decode_crop_resize_jpeg

    def recording(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(_core, "decode_crop_resize_jpeg", recording)
    data = _encode(_picture(480, 640, seed=4))
    pe.data.CenterCrop(size=64, resize=64)({"image": data}, None)  # box 480x480 -> 64: 1/8 still covers it
    pe.data.CenterCrop(size=224, resize=400)({"image": data}, None)  # box ~269 -> 224: not below 5/8
    pe.data.CenterCrop(size=64, resize=64, dct_downscale=False, fast_dct=True)({"image": data}, None)
    assert [c[6:8] for c in calls] == [(2, False), (8, False), (8, True)]  # (scale_num, fast_dct)


@needs_crop_decoder
@pytest.mark.parametrize("kind", ["4:2:0", "progressive"])
def test_truncated_and_corrupt_jpegs_raise_value_error_naming_the_field(kind):
    data = _kind_jpeg(kind)
    transform = pe.data.RandomResizedCrop(field="photo", size=32)
    top_left = (0, 0, 16, 16)  # the missing rows lie below this crop, and are still noticed
    for keep in range(200, len(data) - 2, len(data) // 40):
        cut = data[:keep]
        with pytest.raises(ValueError, match="corrupt JPEG|Premature end"):
            _core.decode_crop_resize_jpeg(cut, top_left, 8, 8)
        with pytest.raises(ValueError, match="field 'photo' holds"):
            transform({"photo": cut}, np.random.default_rng(keep))
    rng = np.random.default_rng(1)
    failures = 0
    for _ in range(300):
        bad = data.copy()
        at = rng.integers(0, len(bad), int(rng.integers(1, 8)))
        bad[at] ^= rng.integers(1, 256, len(at)).astype(np.uint8)
        try:
            out = transform({"photo": bad}, rng)["photo"]
            assert out.shape == (32, 32, 3)
        except ValueError as e:
            assert "field 'photo'" in str(e)
            failures += 1
    assert failures > 0


@needs_crop_decoder
def test_crop_decoder_bindings_check_their_arguments(jpeg):
    with pytest.raises(ValueError, match="contiguous 1-D buffer of bytes"):
        _core.decode_crop_resize_jpeg(np.zeros((4, 4), np.uint8), (0, 0, 1, 1), 2, 2)
    with pytest.raises(ValueError, match="contiguous 1-D buffer of bytes"):
        _core.jpeg_header(jpeg[::2])
    with pytest.raises(ValueError, match="scale_num"):
        _core.decode_crop_resize_jpeg(jpeg, (0, 0, 10, 10), 2, 2, scale_num=9)
    with pytest.raises(ValueError, match="outside"):
        _core.decode_crop_resize_jpeg(jpeg, (0, 0, 321, 10), 2, 2)
    with pytest.raises(ValueError, match="layout"):
        _core.decode_crop_resize_jpeg(jpeg, (0, 0, 10, 10), 2, 2, layout="NHWC")
    with pytest.raises(ValueError, match="corrupt JPEG"):
        _core.jpeg_header(b"\xff\xd8\xff not really")
    assert _core.jpeg_header(jpeg) == (240, 320, 3)
    assert _core.jpeg_header(jpeg.tobytes()) == (240, 320, 3)
    assert _core.jpeg_header(_encode(_picture(20, 30), mode="CMYK"))[2] == 0  # left to Pillow
    out = np.zeros((3, 5, 6), np.uint8)
    assert _core.decode_crop_resize_jpeg(jpeg, (0, 0, 60, 50), 5, 6, "CHW", out=out) is out


@needs_crop_decoder
def test_fast_dct_gives_close_but_different_pixels(jpeg):
    box = (10, 20, 300, 230)
    accurate = _core.decode_crop_resize_jpeg(jpeg, box, 224, 224)
    fast = _core.decode_crop_resize_jpeg(jpeg, box, 224, 224, fast_dct=True)
    assert not np.array_equal(accurate, fast) and _mean_abs_diff(accurate, fast) < 1.0


_JPEG_REGRESSIONS = sorted((Path(__file__).parent.parent / "fuzz" / "regressions" / "fuzz_jpeg_decode").glob("*"))


@needs_crop_decoder
@pytest.mark.parametrize("case", _JPEG_REGRESSIONS, ids=lambda p: p.name)
def test_jpeg_that_failed_the_fuzzer_decodes_like_the_whole_image(case):
    """fuzz/fuzz_jpeg_decode.cpp's input: u8 flags (scale - 1, fast IDCT), u16 x4 box, the JPEG."""
    raw = case.read_bytes()
    flags, edges, data = raw[0], np.frombuffer(raw[1:9], "<u2") / 65535, raw[9:]
    height, width, _ = _core.jpeg_header(data)
    xs, ys = sorted(edges[0::2] * width), sorted(edges[1::2] * height)
    box = (xs[0], ys[0], max(xs[1], xs[0] + 1), max(ys[1], ys[0] + 1))
    scale, fast = 1 + (flags & 7), bool(flags & 8)
    band, (x0, y0), _ = _core.decode_jpeg_region(data, box, scale, fast)
    whole, _, _ = _core.decode_jpeg_region(data, (0, 0, width, height), scale, fast)
    xa, xb = int(box[0] * whole.shape[1] / width), math.ceil(box[2] * whole.shape[1] / width)
    ya, yb = int(box[1] * whole.shape[0] / height), math.ceil(box[3] * whole.shape[0] / height)
    np.testing.assert_array_equal(band[ya - y0 : yb - y0, xa - x0 : xb - x0], whole[ya:yb, xa:xb])


def test_jpeg_decoder_names_the_path_in_use(monkeypatch):
    if _core.jpeg_crop_decoder():
        assert image_module.jpeg_decoder() == f"{_core.jpeg_crop_decoder()} (crop decode)"
    monkeypatch.setattr(image_module, "_crop_decode", False)
    expected = "simplejpeg" if image_module.simplejpeg is not None else "Pillow"
    assert image_module.jpeg_decoder().startswith(expected) and image_module.jpeg_decoder().endswith("(whole image)")
    monkeypatch.setattr(image_module, "simplejpeg", None)
    assert image_module.jpeg_decoder() == "Pillow (whole image)"


def test_environment_variable_turns_the_crop_decoder_off(tmp_path):
    code = "from pyengine.data import image; print(image.jpeg_decoder())"
    env = dict(os.environ, PYENGINE_JPEG_CROP_DECODE="0")
    # From outside the repository root, where the source tree would shadow the installed package.
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert result.stdout.strip().endswith("(whole image)")


def _make_folder(root) -> dict[str, list[str]]:
    """Classes 'dog' and 'cat' (sorted: cat=0, dog=1), nested folders, mixed case, a non-image."""
    layout = {"dog": ["b.jpg", "a.PNG", "sub/c.jpeg"], "cat": ["z.jpg", "deep/er/y.png"]}
    for cls, names in layout.items():
        for i, name in enumerate(names):
            path = os.path.join(root, cls, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fmt = "PNG" if name.lower().endswith("png") else "JPEG"
            with open(path, "wb") as f:
                f.write(_encode(_picture(40 + i, 50, seed=i), fmt).tobytes())
    with open(os.path.join(root, "dog", "notes.txt"), "w") as f:
        f.write("not an image")
    return layout


def test_write_image_folder_round_trip(tmp_path):
    _make_folder(tmp_path / "src")
    ds = pe.data.write_image_folder(tmp_path / "src", tmp_path / "ds", samples_per_shard=2)
    assert ds.metadata["classes"] == ["cat", "dog"]
    # torchvision's order: sorted os.walk, so a folder's own files come before its sub-folders'.
    expected = [
        ("cat/z.jpg", 0), ("cat/deep/er/y.png", 0),
        ("dog/a.PNG", 1), ("dog/b.jpg", 1), ("dog/sub/c.jpeg", 1),
    ]  # fmt: skip
    assert len(ds) == len(expected)
    for i, (rel, label) in enumerate(expected):
        with open(tmp_path / "src" / rel, "rb") as f:
            assert ds[i]["image"].tobytes() == f.read(), rel
        assert int(ds[i]["label"]) == label and ds[i]["label"].dtype == np.int64
    assert ds.fields["image"].kind == "variable"


def test_write_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pe.data.write_image_folder(tmp_path / "missing", tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        pe.data.write_image_folder(tmp_path / "empty", tmp_path / "ds")
    _make_folder(tmp_path / "src")
    (tmp_path / "src" / "bird").mkdir()
    (tmp_path / "src" / "bird" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="bird has no image files"):
        pe.data.write_image_folder(tmp_path / "src", tmp_path / "ds")
    os.remove(tmp_path / "src" / "bird" / "readme.md")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "src" / "bird" / "gone.jpg")
    with pytest.raises(OSError, match="cannot read image file .*gone.jpg"):
        pe.data.write_image_folder(tmp_path / "src", tmp_path / "ds")
    assert not os.path.exists(tmp_path / "ds")  # nothing half-written is left as a dataset


def _loader_has_sample_transform() -> bool:
    return "sample_transform" in inspect.signature(pe.data.Loader).parameters


@pytest.mark.skipif(not _loader_has_sample_transform(), reason="Loader has no sample_transform yet")
def test_loader_over_an_image_folder_is_identical_at_1_and_4_transform_threads(tmp_path):
    root = tmp_path / "src"
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            pixels = _picture(60 + 7 * i, 80 + 5 * i, seed=i)
            (root / cls / f"{i:03d}.jpg").write_bytes(_encode(pixels).tobytes())
    ds = pe.data.write_image_folder(root, tmp_path / "ds")
    transform = pe.data.RandomResizedCrop(size=32, layout="CHW")

    def batches(threads: int) -> list[dict[str, np.ndarray]]:
        loader = pe.data.Loader(ds, 16, seed=3, sample_transform=transform, transform_threads=threads)
        return [{k: v.numpy().copy() for k, v in b.items()} for _ in range(2) for b in loader]

    one, four = batches(1), batches(4)
    assert len(one) == len(four) == 2 * 4
    for a, b in zip(one, four):
        assert a.keys() == {"image", "label"} and a["image"].shape[1:] == (3, 32, 32)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(one[0]["image"], one[4]["image"])  # epoch 2 draws new crops
