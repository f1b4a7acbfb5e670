"""The safetensors dtype names used on disk, and their torch and numpy equivalents."""

from __future__ import annotations

import numpy as np
import torch

TORCH_TO_CODE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        TORCH_TO_CODE[getattr(torch, _name)] = _code

CODE_TO_TORCH: dict[str, torch.dtype] = {code: dtype for dtype, code in TORCH_TO_CODE.items()}

ITEMSIZE: dict[str, int] = {code: torch.empty((), dtype=dtype).element_size()
                            for code, dtype in CODE_TO_TORCH.items()}


def code_of_torch(dtype: torch.dtype, where: str) -> str:
    """Returns the on-disk name of a torch dtype, or raises ValueError naming `where`."""
    try:
        return TORCH_TO_CODE[dtype]
    except KeyError:
        raise ValueError(f"{where}: tensors of dtype {dtype} cannot be checkpointed; "
                         f"supported: {sorted(str(d) for d in TORCH_TO_CODE)}") from None


def torch_of_numpy(dtype: np.dtype, where: str) -> torch.dtype:
    """The torch dtype that holds the same bytes as a numpy dtype."""
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        raise ValueError(f"{where}: numpy arrays of dtype {dtype} cannot be checkpointed") from None
