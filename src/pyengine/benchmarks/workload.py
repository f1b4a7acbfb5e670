"""The training workload of the frequency study: an MLP with Adam whose step time and state
size are those of a real small / medium / large model on a CPU, and a step that a save must
not disturb (forward, backward, optimizer step)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# name -> (width, layers): 3.1M, 25.2M and 50.4M parameters.
MODEL_SIZES: dict[str, tuple[int, int]] = {"3M": (1024, 3), "25M": (2048, 6), "50M": (2048, 12)}
BATCH = 64  # ~30 ms a step for the 3M model on one torch thread


@dataclass
class Workload:
    """Model, optimizer and one fixed batch: training steps whose cost does not depend on data."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def create(cls, name: str, batch: int = BATCH) -> Workload:
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_SIZES)}")
        width, layers = MODEL_SIZES[name]
        torch.manual_seed(0)
        blocks: list[torch.nn.Module] = []
        for i in range(layers):
            blocks += [torch.nn.Linear(width, width)] + ([torch.nn.ReLU()] if i < layers - 1 else [])
        model = torch.nn.Sequential(*blocks)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        return cls(name, model, opt, torch.randn(batch, width), torch.randn(batch, width))

    def step(self) -> None:
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def state(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer}

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def state_bytes(self) -> int:
        tensors = list(self.model.state_dict().values())
        for s in self.optimizer.state_dict()["state"].values():
            tensors += [v for v in s.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def warm_up(self, steps: int = 10) -> float:
        """Runs `steps` steps (Adam allocates its state in the first) and returns the median step time."""
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
