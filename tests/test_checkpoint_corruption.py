"""A damaged checkpoint is never loaded: each kind of damage gives a CheckpointError that
names the file (and the tensor, for tensor data), and restore() falls back to the newest
older checkpoint that verifies, restoring its values exactly."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine import _core
from pyengine.checkpoint import CheckpointFallbackWarning

_PREFIX = re.compile(rb'^\{"manifest_crc32c":"([0-9a-f]{8})","manifest":')


def make_state(step: int) -> dict:
    """State whose every byte depends on `step`, spread over several shards."""
    return {
        "weights": torch.arange(40_000, dtype=torch.float32) * 0.25 + step,
        "bias": torch.full((1000,), float(-step), dtype=torch.float64),
        "table": np.arange(5000, dtype=np.int32) * (step + 1),
        "meta": {"step": step, "name": f"run-{step}", "lr": 0.5 / (step + 1)},
    }


def empty_state() -> dict:
    return {
        "weights": torch.zeros(40_000, dtype=torch.float32),
        "bias": torch.zeros(1000, dtype=torch.float64),
        "table": np.zeros(5000, dtype=np.int32),
        "meta": {},
    }


def assert_state_equals(actual: dict, step: int) -> None:
    expected = make_state(step)
    assert torch.equal(actual["weights"], expected["weights"])
    assert torch.equal(actual["bias"], expected["bias"])
    np.testing.assert_array_equal(actual["table"], expected["table"])
    assert actual["meta"] == expected["meta"]


def step_path(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def manifest_body(root: Path, step: int) -> dict:
    raw = (step_path(root, step) / "manifest.json").read_bytes()
    match = _PREFIX.match(raw)
    assert match is not None
    return json.loads(raw[match.end() : -2])


def write_manifest(root: Path, step: int, body: dict) -> None:
    """Re-writes a manifest with a correct checksum, so only deeper validation can refuse it."""
    data = json.dumps(body, separators=(",", ":")).encode()
    crc = _core.crc32c(memoryview(data))
    (step_path(root, step) / "manifest.json").write_bytes(
        b'{"manifest_crc32c":"%08x","manifest":' % crc + data + b"}\n"
    )


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


@pytest.fixture
def two_checkpoints(tmp_path: Path) -> Path:
    with pe.Checkpointer(tmp_path, keep_last=0, max_shards=3, capture_rng=False) as ck:
        ck.save(1, make_state(1)).wait()
        ck.save(2, make_state(2)).wait()
        assert ck.steps() == [1, 2]
    return tmp_path


def shard_of(root: Path, step: int, name: str) -> tuple[Path, dict, dict]:
    """The shard file holding tensor `name`, the manifest's entry for that shard, and the tensor's."""
    body = manifest_body(root, step)
    tensor = body["tensors"][name]
    shard = body["shards"][tensor["shard"]]
    return step_path(root, step) / shard["file"], shard, tensor


# Each damage to step 2 returns: the damaged file, the tensor the error must name (or None),
# and a phrase the error must hold.
def damage_tensor_data(root: Path) -> tuple[str, str | None, str]:
    path, _, tensor = shard_of(root, 2, "weights")
    flip_byte(path, tensor["offset"] + tensor["nbytes"] // 2)
    return path.name, "weights", "checksum mismatch"


def damage_shard_header(root: Path) -> tuple[str, str | None, str]:
    path, shard, _ = shard_of(root, 2, "weights")
    flip_byte(path, 8 + (shard["header_bytes"] - 8) // 3)  # inside the JSON header
    return path.name, None, "checksum mismatch in the header"


def truncate_shard(root: Path) -> tuple[str, str | None, str]:
    path, _, _ = shard_of(root, 2, "bias")
    os.truncate(path, path.stat().st_size - 100)
    return path.name, None, "truncated"


def delete_shard(root: Path) -> tuple[str, str | None, str]:
    path, _, _ = shard_of(root, 2, "table")
    path.unlink()
    return path.name, None, "missing"


def garbage_manifest(root: Path) -> tuple[str, str | None, str]:
    (step_path(root, 2) / "manifest.json").write_bytes(os.urandom(300))
    return "manifest.json", None, "not a pyengine manifest"


def flip_manifest_state(root: Path) -> tuple[str, str | None, str]:
    path = step_path(root, 2) / "manifest.json"
    raw = path.read_bytes()
    at = raw.index(b'"name":"run-2"') + len(b'"name":"run-')
    path.write_bytes(raw[:at] + b"3" + raw[at + 1 :])  # still valid JSON, but a different state
    return "manifest.json", None, "checksum"


DAMAGES = [
    damage_tensor_data,
    damage_shard_header,
    truncate_shard,
    delete_shard,
    garbage_manifest,
    flip_manifest_state,
]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_load_names_the_damaged_file(two_checkpoints: Path, damage) -> None:
    file_name, tensor, phrase = damage(two_checkpoints)
    with pe.Checkpointer(two_checkpoints) as ck:
        with pytest.raises(pe.CheckpointError) as info:
            ck.load(2)
        message = str(info.value)
        assert str(step_path(two_checkpoints, 2) / file_name) in message
        assert phrase in message
        if tensor is not None:
            assert f"'{tensor}'" in message
        assert_state_equals(ck.load(1), 1)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_restore_falls_back_to_the_older_checkpoint(two_checkpoints: Path, damage) -> None:
    file_name, _, _ = damage(two_checkpoints)
    target = empty_state()
    with pe.Checkpointer(two_checkpoints) as ck:
        with pytest.warns(CheckpointFallbackWarning, match=re.escape(file_name)):
            assert ck.restore(target) == 1
        assert_state_equals(target, 1)
        # The damaged checkpoint was moved aside: it is neither loaded nor pruned again.
        assert ck.steps() == [1]
        names = os.listdir(two_checkpoints)
        assert any(n.startswith("step-00000002.corrupt-") for n in names)
        # The next save may reuse step 2 and commits normally.
        ck.save(2, make_state(2)).wait()
    with pe.Checkpointer(two_checkpoints) as ck, warnings.catch_warnings():
        warnings.simplefilter("error")
        target = empty_state()
        assert ck.restore(target) == 2
        assert_state_equals(target, 2)


def test_restoring_some_keys_still_checks_the_header_of_the_shard_it_reads(tmp_path: Path) -> None:
    # One shard holds every tensor, so restoring only "weights" reads part of it; the header's
    # damage is still found (from the manifest's CRCs of the tensors not read) and restore falls back.
    with pe.Checkpointer(tmp_path, keep_last=0, max_shards=1, capture_rng=False) as ck:
        ck.save(1, make_state(1)).wait()
        ck.save(2, make_state(2)).wait()
    file_name, _, _ = damage_shard_header(tmp_path)
    target = {"weights": torch.zeros(40_000, dtype=torch.float32)}
    with pe.Checkpointer(tmp_path) as ck:
        with pytest.warns(CheckpointFallbackWarning, match="checksum mismatch in the header") as record:
            assert ck.restore(target) == 1
        assert file_name in str(record[0].message)
    assert torch.equal(target["weights"], make_state(1)["weights"])


def test_reader_does_not_quarantine_a_directory_another_checkpointer_writes(two_checkpoints: Path) -> None:
    damage_tensor_data(two_checkpoints)
    with pe.Checkpointer(two_checkpoints) as writer:
        writer.save(3, make_state(3)).wait()
        path, _, tensor = shard_of(two_checkpoints, 3, "weights")
        flip_byte(path, tensor["offset"])
        reader = pe.Checkpointer(two_checkpoints)
        target = empty_state()
        with pytest.warns(CheckpointFallbackWarning) as record:
            assert reader.restore(target) == 1
        assert len(record) == 2  # steps 3 and 2 both fail
        assert_state_equals(target, 1)
        assert writer.steps() == [1, 2, 3]  # only the lock holder may move checkpoints
        reader.close()


def test_restore_raises_when_no_checkpoint_verifies(two_checkpoints: Path) -> None:
    garbage_manifest(two_checkpoints)
    (step_path(two_checkpoints, 1) / "manifest.json").write_bytes(b"")
    target = empty_state()
    no_checkpoint = pytest.raises(pe.CheckpointError, match="no checkpoint")
    with pe.Checkpointer(two_checkpoints) as ck, pytest.warns(CheckpointFallbackWarning), no_checkpoint:
        ck.restore(target)
    assert torch.count_nonzero(target["weights"]) == 0


def test_manifest_naming_a_path_as_tensor_is_refused(two_checkpoints: Path) -> None:
    body = manifest_body(two_checkpoints, 2)
    body["tensors"]["../evil"] = body["tensors"].pop("weights")
    body["state"]["objects"]["weights"] = {"__tensor__": "../evil"}
    write_manifest(two_checkpoints, 2, body)
    with pe.Checkpointer(two_checkpoints) as ck:
        with pytest.raises(pe.CheckpointError, match=re.escape("'../evil'")) as info:
            ck.load(2)
        assert "manifest.json" in str(info.value)
        target = empty_state()
        with pytest.warns(CheckpointFallbackWarning, match="evil"):
            assert ck.restore(target) == 1
        assert_state_equals(target, 1)


def test_manifest_offset_past_the_shard_end_is_refused(two_checkpoints: Path) -> None:
    body = manifest_body(two_checkpoints, 2)
    tensor = body["tensors"]["bias"]
    tensor["offset"] = body["shards"][tensor["shard"]]["bytes"] - tensor["nbytes"] + 8
    write_manifest(two_checkpoints, 2, body)
    with pe.Checkpointer(two_checkpoints) as ck:
        with pytest.raises(pe.CheckpointError, match="'bias'.*outside") as info:
            ck.load(2)
        assert "manifest.json" in str(info.value)
        target = empty_state()
        with pytest.warns(CheckpointFallbackWarning):
            assert ck.restore(target) == 1
        assert_state_equals(target, 1)


def test_manifest_shard_size_larger_than_the_file_is_refused(two_checkpoints: Path) -> None:
    # The manifest is self-consistent (offsets inside its claimed size); only the real file size disagrees.
    body = manifest_body(two_checkpoints, 2)
    tensor = body["tensors"]["bias"]
    shard = body["shards"][tensor["shard"]]
    shard["bytes"] += 4096
    tensor["offset"] = shard["bytes"] - tensor["nbytes"]
    write_manifest(two_checkpoints, 2, body)
    with pe.Checkpointer(two_checkpoints) as ck, pytest.raises(pe.CheckpointError, match="truncated") as info:
        ck.load(2)
    assert shard["file"] in str(info.value)


@pytest.mark.parametrize(
    "offset_past_end", [8, 1 << 20, (1 << 64) - 8], ids=["just-past", "far-past", "wraps"]
)
def test_core_reader_refuses_an_offset_past_the_file_before_reading(
    two_checkpoints: Path, offset_past_end: int
) -> None:
    path, shard, good = shard_of(two_checkpoints, 2, "weights")
    real_size = path.stat().st_size
    assert real_size == shard["bytes"]
    sentinel = 0xA5
    good_dst = np.full(good["nbytes"], sentinel, dtype=np.uint8)
    bad_dst = np.full(16, sentinel, dtype=np.uint8)
    offset = min(real_size - 16 + offset_past_end, (1 << 64) - 1)
    reads = [
        _core.TensorRead("weights", good["offset"], good["nbytes"], good["crc32c"], good_dst),
        _core.TensorRead("bad", offset, 16, 0, bad_dst),
    ]
    with pytest.raises(pe.CheckpointError) as info:
        _core.read_shards(
            [_core.ShardRead(str(path), shard["bytes"], shard["header_bytes"], shard["crc32c"], reads)], 1)
    assert str(path) in str(info.value)
    assert "'bad'" in str(info.value)
    # Every range is checked before the first read: not even the valid tensor was read.
    assert np.all(good_dst == sentinel)
    assert np.all(bad_dst == sentinel)


def test_core_reader_checks_the_real_file_size(two_checkpoints: Path) -> None:
    path, shard, good = shard_of(two_checkpoints, 2, "weights")
    dst = np.full(good["nbytes"], 0xA5, dtype=np.uint8)
    claimed = shard["bytes"] + 64  # a manifest that claims a longer file than the one on disk
    reads = [_core.TensorRead("weights", claimed - good["nbytes"], good["nbytes"], good["crc32c"], dst)]
    with pytest.raises(pe.CheckpointError, match="truncated") as info:
        _core.read_shards([_core.ShardRead(str(path), claimed, shard["header_bytes"], shard["crc32c"], reads)], 1)
    assert str(path) in str(info.value)
    assert np.all(dst == 0xA5)


def test_core_reader_reads_an_intact_shard(two_checkpoints: Path) -> None:
    # The control for the refusals above: the same call with the manifest's values succeeds.
    path, shard, good = shard_of(two_checkpoints, 2, "weights")
    dst = np.zeros(good["nbytes"], dtype=np.uint8)
    reads = [_core.TensorRead("weights", good["offset"], good["nbytes"], good["crc32c"], dst)]
    _core.read_shards([_core.ShardRead(str(path), shard["bytes"], shard["header_bytes"], shard["crc32c"], reads)], 1)
    assert torch.equal(torch.from_numpy(dst).view(torch.float32), make_state(2)["weights"])


def test_same_step_failing_twice_in_one_second_is_moved_aside_twice(two_checkpoints: Path) -> None:
    # The quarantine name carries the time in seconds; a second failure of the same step must
    # not collide with the first one's directory (rename onto it fails with ENOTEMPTY).
    with pe.Checkpointer(two_checkpoints) as ck:
        for _ in range(2):
            garbage_manifest(two_checkpoints)
            target = empty_state()
            with pytest.warns(CheckpointFallbackWarning):
                assert ck.restore(target) == 1
            assert_state_equals(target, 1)
            ck.save(2, make_state(2)).wait()
        assert_state_equals(ck.load(2), 2)
    corrupt = [n for n in os.listdir(two_checkpoints) if n.startswith("step-00000002.corrupt-")]
    assert len(corrupt) == 2
