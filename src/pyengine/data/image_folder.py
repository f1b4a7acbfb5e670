"""Converting an image folder (torchvision's ImageFolder layout) into a pyengine dataset.

::

    train/                      ds = pe.data.write_image_folder("train", "train.ds")
        cat/001.jpg             ds.metadata["classes"]   # ["cat", "dog"]
        dog/a/002.png           ds[0]                    # {"image": encoded bytes, "label": 0}

The images are stored as they are (their encoded bytes, not decoded pixels: a JPEG stays
~10x smaller than its pixels); decode them in the loader with
``sample_transform=pe.data.RandomResizedCrop(...)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Union

import numpy as np

from pyengine.data.dataset import Dataset
from pyengine.data.writer import DatasetWriter

# torchvision's IMG_EXTENSIONS, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Files read per chunk handed to the writer: memory stays bounded by this, not by the folder.
_CHUNK_BYTES = 64 << 20


def write_image_folder(
    src_dir: Union[str, os.PathLike], dst: Union[str, os.PathLike], **writer_options: Any
) -> Dataset:
    """Writes every image under `src_dir` (one sub-folder per class) as a dataset at `dst`.

    Classes are the sub-folder names in sorted order, labelled 0..K-1; inside each, image
    files (by extension, see ``IMAGE_EXTENSIONS``) are found recursively and taken in sorted
    order, as torchvision's ImageFolder does. Nothing is shuffled: the loader shuffles.

    Fields: ``image`` (the file's bytes, variable-length uint8) and ``label`` (int64). The class
    names are stored as ``metadata["classes"]``.

    Args:
        src_dir: The folder of class folders.
        dst: The dataset directory to create.
        **writer_options: Passed to :class:`DatasetWriter` (overwrite, samples_per_shard,
            shard_bytes, durable, progress).

    Returns:
        The written dataset, opened.

    Raises:
        FileNotFoundError: `src_dir` does not exist or is not a directory.
        ValueError: It has no class folders, or a class folder has no images.
        OSError: An image file cannot be read (the message names it).
    """
    src = os.fspath(src_dir)
    classes, files = list_image_folder(src)
    if "metadata" in writer_options:
        raise ValueError("write_image_folder stores the class names as the metadata; metadata= cannot be given")
    writer_options.setdefault("total", len(files))
    with DatasetWriter(dst, metadata={"classes": classes}, **writer_options) as writer:
        for chunk in _read_in_chunks(files):
            writer.append(chunk)
    return Dataset(dst)


def list_image_folder(src_dir: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names (sorted) and every image as (path, label), in ImageFolder's order."""
    if not os.path.isdir(src_dir):
        what = "is not a directory" if os.path.exists(src_dir) else "does not exist"
        raise FileNotFoundError(f"image folder {src_dir} {what}")
    classes = sorted(entry.name for entry in os.scandir(src_dir) if entry.is_dir())
    if not classes:
        raise ValueError(f"{src_dir} has no class folders: expected one sub-folder of images per class")
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = _images_under(os.path.join(src_dir, name))
        if not found:
            raise ValueError(
                f"class folder {os.path.join(src_dir, name)} has no image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        files.extend((path, label) for path in found)
    return classes, files


def _images_under(class_dir: str) -> list[str]:
    found: list[str] = []
    for root, _, names in sorted(os.walk(class_dir, followlinks=True)):
        found.extend(os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _read_in_chunks(files: list[tuple[str, int]]) -> Iterator[dict[str, Any]]:
    images: list[bytes] = []
    labels: list[int] = []
    held = 0
    for path, label in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise OSError(e.errno, f"cannot read image file {path}: {e.strerror}", path) from None
        if not data:
            raise ValueError(f"image file {path} is empty")
        images.append(data)
        labels.append(label)
        held += len(data)
        if held >= _CHUNK_BYTES:
            yield {"image": images, "label": np.asarray(labels, dtype=np.int64)}
            images, labels, held = [], [], 0
    if images:
        yield {"image": images, "label": np.asarray(labels, dtype=np.int64)}
