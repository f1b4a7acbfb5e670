"""Host-to-GPU transfer for the loader: pinned batch buffers and side-stream copies."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch


def pin_pool_buffers(core: Any, count: int, nbytes: int) -> int:
    """Gives the loader's batch pool `count` pinned buffers of `nbytes`; returns how many.

    Workers then gather straight into page-locked memory, so the copy to the GPU is a
    direct DMA with no staging copy. torch owns the memory; the core keeps each tensor
    alive as long as any batch in it.
    """
    if nbytes <= 0:
        return 0
    for _ in range(count):
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        core.add_pinned_buffer(buf, buf.data_ptr(), nbytes)
    return count


class DeviceCopier:
    """Copies host batches to a CUDA device on a side stream.

    The copy of batch k is queued on a side stream when the consumer asks for it; the
    consumer's stream then waits on an event, so the copy overlaps whatever GPU work the
    consumer queued earlier (the CPU normally runs ahead of the GPU); the side stream does
    not wait for that work, and record_stream() keeps the caching allocator from handing the
    new tensors' memory back to the side stream before the consumer is done. The host batch (a
    pool buffer) is kept alive until its copy has completed, so the pool cannot hand its
    memory to a worker while the DMA still reads it.

    Used from the consumer thread only.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._in_flight: deque[tuple[torch.cuda.Event, dict[str, torch.Tensor]]] = deque()

    def __call__(self, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        while self._in_flight and self._in_flight[0][0].query():
            self._in_flight.popleft()
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = {
                k: (v if v.is_pinned() else v.pin_memory()).to(self.device, non_blocking=True) for k, v in host.items()
            }
            done = torch.cuda.Event()
            done.record(self.stream)
        consumer.wait_event(done)
        for t in out.values():
            t.record_stream(consumer)  # allocated on the side stream, used on the consumer's
        self._in_flight.append((done, host))
        return out

    def synchronize(self) -> None:
        """Waits for every copy in flight (before the pool may be torn down)."""
        self.stream.synchronize()
        self._in_flight.clear()
