"""The YAHPO Gym LCBench surrogate as a tuning benchmark: neural-network learning curves on OpenML tasks.

YAHPO Gym (Pfisterer et al., AutoML-Conf 2022) fits one ONNX network to the LCBench learning
curves of Zimmer et al. (2021): 7 hyperparameters of a funnel-shaped MLP trained with SGD,
plus the epoch (1-52) as fidelity, on 34 OpenML tasks. This module evaluates that network
directly with onnxruntime, exactly as `yahpo_gym.BenchmarkSet.objective_function` builds its
inputs (continuous features in the order of `_CONT`, the task as an integer code from
`encoding.json`), so neither yahpo-gym nor ConfigSpace is needed: yahpo-gym 1.0.2 pins
ConfigSpace 0.6, whose compiled module does not load under numpy 2. The data folder is the
`lcbench/` folder of slds-lmu/yahpo_data (config_space.json, encoding.json, model.onnx).

The objective is the validation error in percent, 100 - val_accuracy, after `epoch` epochs.
One evaluation of a whole curve (52 epochs in one batch) takes about half a millisecond.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import pyengine as pe

# The shared/ folder beside the checkout (this file is <checkout>/src/pyengine/benchmarks/), unless
# PYENGINE_LCBENCH_DIR says otherwise.
DEFAULT_DATA_DIR = Path(
    os.environ.get("PYENGINE_LCBENCH_DIR")
    or Path(__file__).resolve().parents[3].parent / "shared" / "data" / "yahpo" / "lcbench"
)
MAX_EPOCH = 52
# The order of the continuous inputs of model.onnx (yahpo_gym/benchmarks/lcbench.py cont_names).
_CONT = ("epoch", "batch_size", "learning_rate", "momentum", "weight_decay", "num_layers", "max_units", "max_dropout")
_OUTPUTS = (
    "time",
    "val_accuracy",
    "val_cross_entropy",
    "val_balanced_accuracy",
    "test_cross_entropy",
    "test_balanced_accuracy",
)


def search_space() -> dict[str, pe.tune.space.Param]:
    """LCBench's 7 hyperparameters with YAHPO's ranges and scales."""
    return {
        "batch_size": pe.tune.IntUniform(16, 512, log=True),
        "learning_rate": pe.tune.LogUniform(1e-4, 1e-1),
        "max_dropout": pe.tune.Uniform(0.0, 1.0),
        "max_units": pe.tune.IntUniform(64, 1024, log=True),
        "momentum": pe.tune.Uniform(0.1, 0.99),
        "num_layers": pe.tune.IntUniform(1, 5),
        "weight_decay": pe.tune.Uniform(1e-5, 0.1),
    }


class LCBench:
    """One LCBench task: `curve(config)` is the validation error after each of 52 epochs.

    Not thread-safe (one onnxruntime session); give each process or thread its own instance.

    Args:
        task: an OpenML task id from `tasks()`, e.g. "3945".
        data_dir: the yahpo_data `lcbench/` folder.

    Raises:
        FileNotFoundError: if the folder lacks model.onnx or encoding.json.
        ValueError: if the task is not one of LCBench's.
    """

    def __init__(self, task: str, data_dir: str | Path = DEFAULT_DATA_DIR) -> None:
        import onnxruntime

        data_dir = Path(data_dir)
        for name in ("model.onnx", "encoding.json", "config_space.json"):
            if not (data_dir / name).is_file():
                raise FileNotFoundError(
                    f"{data_dir / name} is missing: point data_dir at the lcbench/ folder of slds-lmu/yahpo_data"
                )
        if task not in tasks(data_dir):
            raise ValueError(f"LCBench task {task!r} is not one of {tasks(data_dir)}")
        codes = json.loads((data_dir / "encoding.json").read_text())["OpenML_task_id"]
        self.task = task
        self._code = np.array([[codes[task]]], dtype=np.int32)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(data_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._acc = _OUTPUTS.index("val_accuracy")

    def curve(self, config: Mapping[str, Any]) -> np.ndarray:
        """Validation error (%) after epochs 1..52 for one configuration, shape (52,)."""
        rows = np.array(
            [[float(e)] + [float(config[k]) for k in _CONT[1:]] for e in range(1, MAX_EPOCH + 1)], dtype=np.float32
        )
        cat = np.repeat(self._code, len(rows), axis=0)
        out = self._session.run(None, {self._inputs[0]: cat, self._inputs[1]: rows})[0]
        return 100.0 - out[:, self._acc].astype(np.float64)

    def error(self, config: Mapping[str, Any]) -> float:
        """Validation error (%) after the full 52 epochs."""
        return float(self.curve(config)[-1])


def tasks(data_dir: str | Path = DEFAULT_DATA_DIR) -> list[str]:
    """LCBench's OpenML task ids, as listed in config_space.json."""
    space = json.loads((Path(data_dir) / "config_space.json").read_text())
    return next(h["choices"] for h in space["hyperparameters"] if h["name"] == "OpenML_task_id")
