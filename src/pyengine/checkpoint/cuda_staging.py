"""Device-to-host staging of CUDA tensors through torch, into pinned buffers reused across
saves. The C++ core never sees CUDA: it receives the pinned host copies."""

from __future__ import annotations

import torch


class PinnedMirror:
    """Pinned host buffers, one per tensor name, refilled on every save.

    The copies run on a side stream that first waits for the current stream, so they see
    every kernel queued before save(); the call returns once the copies are complete.
    Callers must not refill the mirror while a previous save may still read it (the
    Checkpointer waits for pending snapshots first).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._stream: torch.cuda.Stream | None = None

    def to_host(self, named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not named:
            return {}
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        out = {}
        with torch.cuda.stream(self._stream):
            for name, tensor in named:
                buf = self._buffers.get(name)
                if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
                    buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                    self._buffers[name] = buf
                buf.copy_(tensor, non_blocking=True)
                out[name] = buf
        self._stream.synchronize()
        return out
