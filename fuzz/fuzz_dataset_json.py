"""atheris target: a mutated dataset.json beside the files of a dataset, opened and read back.

The corpus (fuzz/corpus/fuzz_dataset_json/) holds the dataset.json pe.data.write_dataset wrote
for fuzz/fixtures/dataset/; dataset_reading.py states the contract.
"""

from __future__ import annotations

import dataset_reading
import harness

import pyengine as pe

DATASET = harness.private_copy("dataset")
REFERENCE = dataset_reading.samples_of(pe.data.Dataset(DATASET))


def test_one_input(data: bytes) -> None:
    (DATASET / "dataset.json").write_bytes(data)
    dataset_reading.read_dataset(DATASET, REFERENCE)


if __name__ == "__main__":
    harness.run(test_one_input)
