"""Where the Trainer's per-epoch records go: the returned history, a CSV file and, when the
tensorboard package is installed, TensorBoard."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one row per virtual epoch to `log_dir/metrics.csv` (and TensorBoard).

    A resumed run keeps appending: rows after the resumed step are dropped first, so the
    file matches the history the checkpoint holds.
    """

    def __init__(self, log_dir: str | Path | None) -> None:
        self.dir = Path(log_dir) if log_dir is not None else None
        self._tb: Any = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    @property
    def csv_path(self) -> Path | None:
        return self.dir / "metrics.csv" if self.dir is not None else None

    def rewrite(self, history: list[dict[str, Any]]) -> None:
        """Makes the CSV equal to `history` (after a resume)."""
        if self.csv_path is None:
            return
        self.csv_path.unlink(missing_ok=True)
        for record in history:
            self.append(record, tensorboard=False)

    def append(self, record: dict[str, Any], tensorboard: bool = True) -> None:
        if self.csv_path is None:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(record), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)
        if tensorboard and self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
