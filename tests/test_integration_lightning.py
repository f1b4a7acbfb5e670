"""PyEngineCheckpointIO inside Lightning: a run SIGKILLed at random moments and resumed with
ckpt_path="last" ends bit for bit where an uninterrupted run ends (pe.data.Loader resumed
mid-epoch, dropout through the stored RNG states); the checkpoint directory holds nothing
but pyengine checkpoints; a value that cannot be stored is refused by its key, and nothing
saved is lost; the save-path mechanics (atomic replacement, deferred removal, clean-up after
a crash) checked on the plugin directly."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from killed_worker_runs import assert_identical, killed_and_uninterrupted, write_regression_data

import pyengine as pe

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning_worker import Regressor  # noqa: E402
from safetensors import safe_open  # noqa: E402

from pyengine.checkpoint.manifest import MANIFEST, read_manifest, verify_files  # noqa: E402
from pyengine.integrations import lightning as lightning_io  # noqa: E402
from pyengine.integrations.lightning import PyEngineCheckpointIO  # noqa: E402

WORKER = Path(__file__).with_name("lightning_worker.py")
BATCHES_PER_EPOCH = 8  # 128 samples, batches of 16
STEPS = 4 * BATCHES_PER_EPOCH  # the worker's 4 epochs
KILLS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_regression_data(tmp_path_factory.mktemp("data") / "regression")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """An uninterrupted run, and one SIGKILLed KILLS times and resumed with ckpt_path="last"
    until it finishes. The uninterrupted one runs beside the killed ones (each start imports
    Lightning, which takes seconds)."""
    return killed_and_uninterrupted(WORKER, data, tmp_path_factory.mktemp("lightning-runs"), kills=KILLS,
                                    seed="lightning-kills", steps_before_kill=(4, 7), timeout=300)


def _load(path: Path) -> dict:
    return PyEngineCheckpointIO(rng=False).load_checkpoint(path)  # rng=False: this process's RNG stays as it is


@pytest.mark.slow
def test_sigkilled_run_resumed_from_last_ends_bit_identical(runs):
    reference, resumed = _load(runs.reference / "final.ckpt"), _load(runs.killed / "final.ckpt")
    assert resumed["global_step"] == reference["global_step"] == STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        assert_identical(resumed[key], reference[key], key)
    # The kills interrupted training part way, and the runs resumed from later steps, mid-epoch
    # (checkpoints every 3 steps, epochs of 8 batches), where only the loader's state can say
    # which batch comes next.
    steps = runs.resumed_from
    assert steps[0] == 0 and steps == sorted(steps) and 0 < steps[-1] < STEPS, steps
    assert any(s % BATCHES_PER_EPOCH for s in steps), steps


@pytest.mark.slow
def test_every_file_in_the_checkpoint_directory_is_a_pyengine_checkpoint(runs, monkeypatch):
    directory = runs.killed / "checkpoints"
    names = sorted(os.listdir(directory))
    # No leftovers of the kills (they are hidden names). There may be more than the top-1
    # checkpoint and last.ckpt: a kill between Lightning's two saves of one step (the top-k file,
    # then last.ckpt) leaves a top-k file that the resumed run does not know of; Lightning does
    # the same with its own CheckpointIO.
    assert "last.ckpt" in names and all(n.endswith(".ckpt") and not n.startswith(".") for n in names), names
    for name in names:
        checkpoint = directory / name
        assert checkpoint.is_dir() and not checkpoint.is_symlink(), name
        manifest = read_manifest(checkpoint)  # its own checksum, every size and offset
        verify_files(manifest)  # every byte of every shard against its CRC32C
        assert sorted(os.listdir(checkpoint)) == sorted([MANIFEST, *(s.file for s in manifest.shards)])
        for file in checkpoint.iterdir():
            head = file.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{file} looks like a pickle or a torch.save zip"
        names_in_shards = set()
        for shard in manifest.shards:
            with safe_open(checkpoint / shard.file, framework="pt") as f:  # a valid safetensors file
                names_in_shards.update(f.keys())
        assert names_in_shards == set(manifest.tensors)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    last = _load(directory / "last.ckpt")
    assert last["global_step"] == read_manifest(directory / "last.ckpt").step > 0
    assert last["hyper_parameters"] == {"width": 32}


class Tokenizer:
    """An arbitrary object, which pyengine stores only as what it is: it would need pickle."""


class TaggedRegressor(Regressor):
    def __init__(self, tokenizer: Tokenizer, width: int = 32) -> None:
        super().__init__(width)
        self.save_hyperparameters()


def _fit(make_model, data, directory, *, max_steps, every=2, save_last=True, ckpt_path=None):
    torch.manual_seed(0)
    model = make_model()
    loader = pe.data.Loader(data, batch_size=16, shuffle=True, seed=0, drop_last=True, threads=1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, deterministic=True,
                        plugins=[PyEngineCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=directory, every_n_train_steps=every, save_last=save_last)])
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def _snapshot(directory):
    return {name: _load(directory / name) for name in sorted(os.listdir(directory))}


@pytest.mark.usefixtures("one_torch_thread")
def test_a_value_that_cannot_be_stored_is_refused_by_its_key_and_nothing_saved_is_lost(data, tmp_path):
    directory = tmp_path / "checkpoints"
    _fit(Regressor, data, directory, max_steps=4)
    before = _snapshot(directory)
    assert set(before) == {"epoch=0-step=4.ckpt", "last.ckpt"}

    with pytest.raises(TypeError, match=r"checkpoint\['hyper_parameters'\]\['tokenizer'\].*Tokenizer.*ignore="):
        _fit(lambda: TaggedRegressor(Tokenizer()), data, directory, max_steps=4)
    plugin = PyEngineCheckpointIO()
    refused = {**before["last.ckpt"], "extra": {"callback": lambda: None}}
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['callback'\]: it is a builtins.function"):
        plugin.save_checkpoint(refused, directory / "last.ckpt")  # over an existing checkpoint
    in_a_list = {**before["last.ckpt"], "extra": {"hooks": [1, {"n": np.array(["a"])}]}}
    where = r"checkpoint\['extra'\]\['hooks'\]\[1\]\['n'\]"
    with pytest.raises(TypeError, match=where + ": it is a numpy array of dtype <U1"):
        plugin.save_checkpoint(in_a_list, directory / "last.ckpt")
    plugin.teardown()

    after = _snapshot(directory)  # the same names (no temp dirs either), the same contents
    assert after.keys() == before.keys()
    for name in before:
        assert_identical(after[name], before[name], name)


@pytest.mark.usefixtures("one_torch_thread")
def test_save_last_link_resumes_from_last_bit_identical(data, tmp_path):
    straight = _fit(Regressor, data, tmp_path / "straight", max_steps=12, save_last="link")
    directory = tmp_path / "resumed"
    _fit(Regressor, data, directory, max_steps=6, save_last="link")
    link = directory / "last.ckpt"
    assert link.is_symlink() and os.readlink(link) == "epoch=0-step=6.ckpt"
    resumed = _fit(Regressor, data, directory, max_steps=12, save_last="link", ckpt_path="last")
    assert os.readlink(link) == "epoch=1-step=12.ckpt"  # Lightning moved the link; the target is ours
    assert sorted(os.listdir(directory)) == ["epoch=1-step=12.ckpt", "last.ckpt"]
    assert_identical(resumed.lightning_module.state_dict(), straight.lightning_module.state_dict())


def _checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((3, 2), float(step))},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(float(step))}},
                                  "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]}],
            "extra": {"inf": float("inf"), "none": None, "scalar": np.float32(1.5), "array": np.arange(3),
                      "dtype": torch.bfloat16, "flags": [True, "text", 7]}}


@pytest.mark.parametrize("exchange", ["renameat2", "no exchange"])
def test_round_trip_and_atomic_replacement(tmp_path, monkeypatch, exchange):
    if exchange == "no exchange":  # a file system without RENAME_EXCHANGE: the old one steps aside
        monkeypatch.setattr(lightning_io, "_exchange", lambda a, b: False)
    plugin = PyEngineCheckpointIO(rng=False)
    plugin.save_checkpoint(_checkpoint(1), tmp_path / "last.ckpt")
    plugin.save_checkpoint(_checkpoint(2), tmp_path / "last.ckpt")  # replaces it: one rename
    plugin.teardown()
    loaded = plugin.load_checkpoint(tmp_path / "last.ckpt", map_location="cpu")
    want = _checkpoint(2)
    array, scalar = loaded["extra"].pop("array"), loaded["extra"].pop("scalar")
    np.testing.assert_array_equal(array, want["extra"].pop("array"))
    assert type(scalar) is np.float32 and scalar == want["extra"].pop("scalar")
    assert_identical(loaded, want)
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the old one is gone, no temp dir left


def test_load_refuses_a_torch_save_file(tmp_path):
    path = tmp_path / "epoch=0-step=1.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(pe.CheckpointError, match="torch.save.*never unpickles"):
        PyEngineCheckpointIO().load_checkpoint(path)


def test_a_removal_waits_for_the_saves_before_it(tmp_path, monkeypatch):
    plugin = PyEngineCheckpointIO(rng=False)
    plugin.save_checkpoint(_checkpoint(1), tmp_path / "a.ckpt")
    plugin.wait()
    release = threading.Event()
    publish = lightning_io._publish
    monkeypatch.setattr(lightning_io, "_publish", lambda tmp, final: (release.wait(10), publish(tmp, final)))
    plugin.save_checkpoint(_checkpoint(2), tmp_path / "b.ckpt")  # its commit waits for `release`
    plugin.remove_checkpoint(tmp_path / "a.ckpt")  # as ModelCheckpoint does right after saving the new best
    assert (tmp_path / "a.ckpt").is_dir(), "removed while the save that replaces it was not yet committed"
    release.set()
    plugin.teardown()
    assert os.listdir(tmp_path) == ["b.ckpt"]


def test_a_removal_after_a_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    plugin = PyEngineCheckpointIO(rng=False)
    plugin.save_checkpoint(_checkpoint(1), tmp_path / "a.ckpt")
    plugin.wait()
    release = threading.Event()

    def disk_full(tmp, final):
        release.wait(10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))

    monkeypatch.setattr(lightning_io, "_publish", disk_full)
    plugin.save_checkpoint(_checkpoint(2), tmp_path / "b.ckpt")
    plugin.remove_checkpoint(tmp_path / "a.ckpt")  # waits for the save of b.ckpt
    release.set()
    kept = r"kept .*a\.ckpt: .* a save that failed"
    with pytest.warns(lightning_io.CheckpointRemovalWarning, match=kept), pytest.raises(OSError) as failure:
        plugin.teardown()  # the raises block is the inner one: the warning is checked after it
    assert failure.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["a.ckpt"]
    assert _load(tmp_path / "a.ckpt")["global_step"] == 1


def test_a_writer_cleans_up_after_a_killed_one(tmp_path):
    plugin = PyEngineCheckpointIO(rng=False)
    plugin.save_checkpoint(_checkpoint(1), tmp_path / "last.ckpt")
    plugin.teardown()
    # What a writer killed mid-way leaves: a save in flight, a half-deleted checkpoint, and (where
    # no atomic exchange exists) a checkpoint moved aside for a replacement that never arrived.
    (tmp_path / ".epoch=0-step=3.ckpt.pyengine-tmp-0123abcd-1").mkdir()
    (tmp_path / ".epoch=0-step=2.ckpt.pyengine-removed-4567").mkdir()
    os.rename(tmp_path / "last.ckpt", tmp_path / ".last.ckpt.pyengine-replaced-89ab")
    plugin.save_checkpoint(_checkpoint(4), tmp_path / "epoch=0-step=4.ckpt")
    plugin.teardown()
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert _load(tmp_path / "last.ckpt")["global_step"] == 1


def test_a_second_writer_of_one_directory_is_refused(tmp_path):
    first, second = PyEngineCheckpointIO(), PyEngineCheckpointIO()
    first.save_checkpoint(_checkpoint(1), tmp_path / "a.ckpt")
    with pytest.raises(pe.CheckpointError, match="another writer .* is writing checkpoints"):
        second.save_checkpoint(_checkpoint(1), tmp_path / "b.ckpt")
    first.teardown()
    second.save_checkpoint(_checkpoint(2), tmp_path / "b.ckpt")  # once the first has let go
    second.teardown()
