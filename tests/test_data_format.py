"""The on-disk format: round trips, streaming writes, and clear errors for damaged files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.data import DatasetWriter, from_torch_dataset, write_dataset


def _fields(n: int = 100) -> dict:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((n, 3, 5)).astype(np.float32),
        "y": np.arange(n, dtype=np.int64),
        "tok": [np.arange(i % 9, dtype=np.int32) + i for i in range(n)],
        "raw": [bytes([i % 256]) * (i % 4) for i in range(n)],
    }


def test_round_trip_fixed_and_variable_fields_across_shards(tmp_path):
    f = _fields()
    ds = write_dataset(tmp_path / "d", f, samples_per_shard=30)
    assert len(ds) == 100 and ds.num_shards == 4
    assert ds.fields["x"].kind == "fixed" and ds.fields["x"].shape == (3, 5)
    assert ds.fields["tok"].kind == "variable" and ds.fields["tok"].dtype == np.int32
    for i in (0, 29, 30, 61, 99, -1):
        s = ds[i]
        j = i % 100
        np.testing.assert_array_equal(s["x"], f["x"][j])
        assert s["y"] == j
        np.testing.assert_array_equal(s["tok"], f["tok"][j])
        assert s["raw"].tobytes() == f["raw"][j]
    with pytest.raises(IndexError):
        ds[100]


def test_streaming_writer_equals_one_shot_write(tmp_path):
    f = _fields(250)
    with DatasetWriter(tmp_path / "s", samples_per_shard=64) as w:
        for start in range(0, 250, 37):
            w.append({k: v[start : start + 37] for k, v in f.items()})
    a, b = pe.data.Dataset(tmp_path / "s"), write_dataset(tmp_path / "o", f)
    assert len(a) == len(b) == 250 and a.num_shards == 4 and b.num_shards == 1
    for i in range(0, 250, 13):
        for k in f:
            np.testing.assert_array_equal(a[i][k], b[i][k])


def test_writer_rejects_inconsistent_chunks_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="sample shape"), DatasetWriter(tmp_path / "d") as w:
        w.append({"x": np.zeros((4, 3))})
        w.append({"x": np.zeros((4, 2))})
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="same number of samples"):
        write_dataset(tmp_path / "e", {"x": np.zeros((4, 3)), "y": np.zeros(5)})
    write_dataset(tmp_path / "f", {"x": np.zeros(3)})
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "f", {"x": np.zeros(3)})


def test_from_torch_dataset(tmp_path):
    class Squares(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return torch.full((2, 2), float(i)), i * i

    ds = from_torch_dataset(Squares(), tmp_path / "sq", chunk_samples=16)
    assert len(ds) == 50 and set(ds.fields) == {"x", "y"}
    assert ds[7]["x"].tolist() == [[7.0, 7.0], [7.0, 7.0]] and ds[7]["y"] == 49

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return {"tokens": torch.arange(i % 5), "label": i}

    with pytest.raises(ValueError, match="variable="):
        from_torch_dataset(Ragged(), tmp_path / "bad", chunk_samples=8)
    rg = from_torch_dataset(Ragged(), tmp_path / "rg", variable=("tokens",))
    assert rg.fields["tokens"].kind == "variable" and rg[13]["tokens"].tolist() == [0, 1, 2]


@pytest.fixture
def written(tmp_path):
    write_dataset(tmp_path / "d", _fields(), samples_per_shard=40)
    return tmp_path / "d"


def _damage(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_truncated_file_is_a_data_error_naming_the_file(written):
    victim = written / "x.00001.bin"
    os.truncate(victim, os.path.getsize(victim) - 10)
    with pytest.raises(pe.DataError, match=r"x\.00001\.bin is truncated.*write_dataset"):
        pe.data.Dataset(written)


def test_file_shorter_than_header_is_a_data_error(written):
    os.truncate(written / "tok.00000.bin", 100)
    with pytest.raises(pe.DataError, match=r"tok\.00000\.bin is truncated"):
        pe.data.Dataset(written)


def test_trailing_bytes_are_a_data_error(written):
    with open(written / "y.00002.bin", "ab") as fh:
        fh.write(b"junk")
    with pytest.raises(pe.DataError, match=r"y\.00002\.bin has trailing bytes"):
        pe.data.Dataset(written)


def test_corrupt_header_is_a_data_error(written):
    _damage(written / "x.00000.bin", 20, b"\x07")
    with pytest.raises(pe.DataError, match=r"x\.00000\.bin has a corrupt header"):
        pe.data.Dataset(written)


def test_foreign_file_is_a_data_error(written):
    _damage(written / "y.00000.bin", 0, b"NOTOURS!")
    with pytest.raises(pe.DataError, match="not a pyengine dataset file"):
        pe.data.Dataset(written)


def test_corrupt_offset_table_is_a_data_error(written):
    path = written / "tok.00001.bin"
    _damage(path, os.path.getsize(path) - 16, (2**40).to_bytes(8, "little"))
    with pytest.raises(pe.DataError, match=r"tok\.00001\.bin has a corrupt offset table"):
        pe.data.Dataset(written)


def test_corrupt_payload_is_found_on_read_or_by_verify_at_open(written):
    _damage(written / "x.00002.bin", 4096 + 100, b"\xff\xff\xff\xff")
    ds = pe.data.Dataset(written)  # sizes still agree: the default open does not read payloads
    with pytest.raises(pe.DataError, match=r"x\.00002\.bin has corrupt data.*samples 80 to 99"):
        ds[81]
    with pytest.raises(pe.DataError, match=r"x\.00002\.bin has corrupt data"):
        pe.data.Dataset(written, verify=True)


def test_corrupt_offset_or_block_table_is_found_at_open(written):
    path = written / "tok.00001.bin"
    size = os.path.getsize(path)
    _damage(path, size - 1, b"\x01")  # the block table ends the file
    with pytest.raises(pe.DataError, match=r"tok\.00001\.bin has a corrupt block checksum table"):
        pe.data.Dataset(written)
    _damage(path, size - 1, b"\x00")
    with open(path, "rb") as fh:
        original = fh.read()
    # The offset table: entry 1 moved by a whole element, still monotonic and inside the payload.
    table_at = (4096 + int.from_bytes(original[32:40], "little") + 7) // 8 * 8
    entry = int.from_bytes(original[table_at + 8 : table_at + 16], "little")
    _damage(path, table_at + 8, (entry + 4).to_bytes(8, "little"))
    with pytest.raises(pe.DataError, match=r"tok\.00001\.bin has a corrupt offset table \(checksum mismatch\)"):
        pe.data.Dataset(written)
    assert pe.data.Dataset(written, verify="never")[40]["tok"].size != 0  # the shifted data, unchecked


def test_metadata_round_trips_and_must_be_plain_json(tmp_path):
    meta = {"classes": ["cat", "dog"], "source": {"url": "file:///x", "n": 3, "ok": True, "none": None}}
    ds = write_dataset(tmp_path / "m", {"x": np.zeros(2)}, metadata=meta)
    assert ds.metadata == meta and pe.data.Dataset(tmp_path / "m").metadata == meta
    assert write_dataset(tmp_path / "e", {"x": np.zeros(2)}).metadata == {}
    for bad, why in (
        (["a"], "must be a dict"),
        ({"f": np.float32(1)}, "JSON-serialisable"),
        ({"t": (1, 2)}, "come back from JSON unchanged"),
        ({1: "a"}, "come back from JSON unchanged"),
        ({"x": float("nan")}, "JSON-serialisable"),
    ):
        with pytest.raises(ValueError, match=why):
            DatasetWriter(tmp_path / "bad", metadata=bad)
        assert not os.path.exists(tmp_path / "bad")
    manifest = json.loads((tmp_path / "m" / "dataset.json").read_text())
    manifest["metadata"] = ["not", "a", "dict"]
    (tmp_path / "m" / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(pe.DataError, match="metadata that is not a JSON object"):
        pe.data.Dataset(tmp_path / "m")


def test_swapped_files_do_not_match_the_manifest(written):
    os.replace(written / "y.00000.bin", written / "x.00000.bin")
    with pytest.raises(pe.DataError, match=r"x\.00000\.bin does not match dataset.json"):
        pe.data.Dataset(written)


def test_missing_pieces_are_data_errors(written, tmp_path):
    os.remove(written / "raw.00002.bin")
    with pytest.raises(pe.DataError, match=r"raw\.00002\.bin is missing"):
        pe.data.Dataset(written)
    (written / "dataset.json").write_text("{not json")
    with pytest.raises(pe.DataError, match="dataset.json is corrupt"):
        pe.data.Dataset(written)
    os.remove(written / "dataset.json")
    with pytest.raises(pe.DataError, match="dataset.json is missing"):
        pe.data.Dataset(written)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(pe.DataError, match="not a pyengine dataset manifest"):
        pe.data.Dataset(empty)


def test_progress_line_reports_samples_written(tmp_path, capsys):
    write_dataset(tmp_path / "p", {"x": np.zeros((300, 2))}, progress=True)
    err = capsys.readouterr().err
    assert f"writing {tmp_path / 'p'}" in err and "300/300 samples" in err
