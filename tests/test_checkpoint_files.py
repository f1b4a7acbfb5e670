"""Checkpoint files are open formats: every shard is a valid safetensors file, and
export_weights writes the model artifact as one safetensors file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import pyengine as pe


def _state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return model, opt


def test_every_shard_opens_with_safetensors_and_matches_the_manifest(tmp_path):
    model, opt = _state()
    with pe.Checkpointer(tmp_path, max_shards=3) as ckpt:
        handle = ckpt.save(7, {"model": model, "optimizer": opt})
        handle.wait()
        loaded = ckpt.load()
    step_dir = handle.path
    shards = sorted(step_dir.glob("shard-*.safetensors"))
    assert len(shards) == 3
    seen = {}
    for shard in shards:
        tensors = load_file(shard)
        with safe_open(shard, "pt") as f:
            assert f.metadata()["writer"] == "pyengine"
        seen.update(tensors)
    manifest_body = json.loads(step_dir.joinpath("manifest.json").read_text())["manifest"]
    assert set(seen) == set(manifest_body["tensors"])
    for name, t in model.state_dict().items():
        assert torch.equal(seen[f"model/{name}"], t)
    assert torch.equal(seen["optimizer/state/0/exp_avg"], loaded["optimizer"]["state"][0]["exp_avg"])


def test_export_weights_writes_a_loadable_model_artifact(tmp_path):
    model, opt = _state()
    with pe.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, {"model": model, "optimizer": opt}).wait()
    out = pe.checkpoint.export_weights(tmp_path / "ckpt", tmp_path / "model.safetensors")
    weights = load_file(out)
    assert set(weights) == set(model.state_dict())  # weights only: no optimizer state
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    fresh.load_state_dict(weights)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with safe_open(out, "pt") as f:
        assert f.metadata()["step"] == "3"
        assert f.metadata()["format"] == "pt"  # from_pretrained refuses a file without it


def test_export_weights_of_a_step_directory_named_otherwise_takes_the_step_from_the_manifest(tmp_path):
    # Integrations name committed steps their own way (Lightning: epoch=0-step=7.ckpt,
    # last.ckpt); the step came from the name "step-N" and such a directory failed to export.
    import shutil

    model, _ = _state()
    with pe.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(7, {"model": model}).wait()
    shutil.copytree(next((tmp_path / "ckpt").glob("step-*")), tmp_path / "last.ckpt")
    out = pe.checkpoint.export_weights(tmp_path / "last.ckpt", tmp_path / "w.safetensors")
    with safe_open(out, "pt") as f:
        assert f.metadata()["step"] == "7"
    assert set(load_file(out)) == set(model.state_dict())


def test_export_weights_of_a_missing_key_says_what_the_checkpoint_holds(tmp_path):
    model, _ = _state()
    with pe.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"net": model}).wait()
    with pytest.raises(pe.CheckpointError, match="net"):
        pe.checkpoint.export_weights(tmp_path / "ckpt", tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


def test_export_weights_of_a_step_never_saved_names_the_steps_there_are(tmp_path):
    # It used to fail later, with a file-not-found inside the step that does not exist.
    model, _ = _state()
    with pe.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"model": model}).wait()
        ckpt.save(2, {"model": model}).wait()
    with pytest.raises(pe.CheckpointError, match=r"no committed step 5; it holds \[1, 2\]"):
        pe.checkpoint.export_weights(tmp_path / "ckpt", tmp_path / "w.safetensors", step=5)
    with pytest.raises(pe.CheckpointError, match="holds no committed checkpoint"):
        pe.checkpoint.export_weights(tmp_path / "empty", tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("overlap", [False, True])
def test_checksums_taken_during_the_copy_match_the_bytes_on_disk(tmp_path, overlap):
    # The copy into staging computes each tensor's CRC32C in the same pass (split between
    # threads above 8 MB, here at odd byte offsets); check them against an independent
    # implementation over the bytes in the files, and the shard CRCs over the whole files.
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight = torch.nn.Parameter(torch.randint(0, 255, (9_000_001,), generator=g, dtype=torch.uint8),
                                          requires_grad=False)
        model.bias = torch.nn.Parameter(torch.randn(3, generator=g))
    state = {"model": model, "odd": torch.arange(7, dtype=torch.int8), "big": torch.randn(2_100_003, generator=g)}
    with pe.Checkpointer(tmp_path, max_shards=2, copy_threads=2) as ckpt:
        handle = ckpt.save(1, state, overlap=overlap)
        handle.wait()
    body = json.loads(handle.path.joinpath("manifest.json").read_text())["manifest"]
    for shard in body["shards"]:
        data = handle.path.joinpath(shard["file"]).read_bytes()
        assert pe._core.crc32c_portable(data) == shard["crc32c"], shard["file"]
        header = shard["header_bytes"]
        for name, entry in body["tensors"].items():
            if body["shards"][entry["shard"]] is shard:
                raw = data[entry["offset"]:entry["offset"] + entry["nbytes"]]
                assert pe._core.crc32c_portable(raw) == entry["crc32c"], name
                assert entry["offset"] >= header
    assert {"model/weight", "model/bias", "odd", "big"} <= set(body["tensors"])
