"""Fast, exactly resumable data loading: a self-describing on-disk format and a C++ loader.

::

    pe.data.write_dataset("train.ds", {"x": images, "y": labels})
    loader = pe.data.Loader(pe.data.Dataset("train.ds"), batch_size=256, shuffle=True, seed=0)
    for batch in loader:            # dict[str, torch.Tensor]
        ...
    state = loader.state_dict()     # JSON-serialisable; load_state_dict resumes exactly
"""

from __future__ import annotations

from pyengine.data.dataset import Dataset, FieldInfo
from pyengine.data.image import CenterCrop, RandomResizedCrop
from pyengine.data.image_folder import write_image_folder
from pyengine.data.loader import Loader
from pyengine.data.sample_transform import SampleTransformError, sample_rng
from pyengine.data.torch_interop import from_torch_dataset
from pyengine.data.writer import DatasetWriter, write_dataset
from pyengine.errors import UnverifiedDataWarning

__all__ = [
    "CenterCrop",
    "Dataset",
    "DatasetWriter",
    "FieldInfo",
    "Loader",
    "RandomResizedCrop",
    "SampleTransformError",
    "UnverifiedDataWarning",
    "from_torch_dataset",
    "sample_rng",
    "write_dataset",
    "write_image_folder",
]
