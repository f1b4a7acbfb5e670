"""AcceleratorCheckpointer inside Accelerate: a loop SIGKILLed at random moments and resumed from
the newest checkpoint ends bit for bit where an uninterrupted loop ends (pe.data.Loader resumed
mid-epoch, dropout through the stored RNG states, gradient accumulation); a tiny GPT-2 resumed in
process does too, and its export loads with from_pretrained (tied weights stored once) into the
same weights and outputs; bad input is refused clearly and nothing saved is lost."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from killed_worker_runs import assert_identical, killed_and_uninterrupted, write_regression_data

import pyengine as pe

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from safetensors import safe_open  # noqa: E402

from pyengine.integrations.accelerate import AcceleratorCheckpointer  # noqa: E402

WORKER = Path(__file__).with_name("accelerate_worker.py")
STEPS = 16  # the worker's 4 epochs of 8 batches, 2 batches per optimizer step
STEPS_PER_EPOCH = 4
KILLS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_regression_data(tmp_path_factory.mktemp("data") / "regression")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """An uninterrupted run (beside the others: each start imports Accelerate), and one
    SIGKILLed KILLS times and restarted until it finishes."""
    return killed_and_uninterrupted(WORKER, data, tmp_path_factory.mktemp("accelerate-runs"), kills=KILLS,
                                    seed="accelerate-kills", steps_before_kill=(4, 6), timeout=120)


def _final(run_dir: Path) -> dict:
    with pe.Checkpointer(run_dir / "final") as ckpt:
        assert ckpt.steps() == [STEPS]
        return ckpt.load()


@pytest.mark.slow
def test_sigkilled_loop_resumed_from_the_newest_checkpoint_ends_bit_identical(runs):
    reference, resumed = _final(runs.reference), _final(runs.killed)
    assert set(reference) == {"model", "optimizer", "scheduler", "custom_checkpoint_0", "accelerator"}
    assert_identical(resumed, reference)
    assert reference["custom_checkpoint_0"]["epoch"] == 4 and reference["custom_checkpoint_0"]["batch"] == 0
    # The kills interrupted training part way and the runs resumed from later steps, mid-epoch
    # (saves every 3 optimizer steps, 4 to an epoch), where only the loader's state says which
    # batch comes next.
    steps = runs.resumed_from
    assert steps[0] == 0 and steps == sorted(steps) and 0 < steps[-1] < STEPS, steps
    assert any(s % STEPS_PER_EPOCH for s in steps), steps


# ------------------------------------------------------------------------ transformers, in process

def _gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    set_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)  # dropout 0.1 by default
    return transformers.GPT2LMHeadModel(config)


def _prepared(seed: int, directory: Path):
    model = _gpt2(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    accelerator = Accelerator(cpu=True)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    return accelerator, model, optimizer, schedule, AcceleratorCheckpointer(accelerator, directory)


def _train(accelerator, model, optimizer, schedule, steps: range) -> None:
    model.train()
    for step in steps:
        tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step))
        accelerator.backward(model(input_ids=tokens, labels=tokens).loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory):
    """A GPT-2 trained 6 steps straight, and one saved at step 3 and restored into fresh objects
    (another seed: other weights and RNG) that trains the other 3."""
    base = tmp_path_factory.mktemp("gpt2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = _prepared(0, base / "straight")
        _train(*straight[:4], range(6))
        straight[4].save(6)
        straight[4].close()

        first = _prepared(0, base / "resumed")
        _train(*first[:4], range(3))
        first[4].save(3)
        first[4].close()
        resumed = _prepared(1, base / "resumed")
        assert resumed[4].restore() == 3
        _train(*resumed[:4], range(3, 6))
        resumed[4].save(6)
        resumed[4].close()
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(base=base, straight=straight, resumed=resumed)


def test_a_restored_gpt2_ends_bit_identical(gpt2_runs):
    straight, resumed = gpt2_runs.straight, gpt2_runs.resumed
    assert_identical(resumed[1].state_dict(), straight[1].state_dict(), "model")
    assert_identical(resumed[2].optimizer.state_dict(), straight[2].optimizer.state_dict(), "optimizer")
    assert resumed[3].get_last_lr() == straight[3].get_last_lr()


def test_from_pretrained_loads_the_export_with_the_tied_weights(gpt2_runs):
    accelerator, model, *_, ckpt = gpt2_runs.straight
    out = ckpt.export_pretrained(gpt2_runs.base / "exported")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["step"] == "6"
        stored = set(f.keys())
    trained = accelerator.unwrap_model(model)
    assert "lm_head.weight" not in stored and stored == set(trained.state_dict()) - {"lm_head.weight"}

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is transformers.GPT2LMHeadModel
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again on load
    assert_identical(loaded.state_dict(), trained.state_dict(), "from_pretrained")
    trained.eval()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, trained(input_ids=tokens).logits)


class Vocabulary:
    """An arbitrary object: storing it would need pickle."""


class Tagged:
    """Registered for checkpointing, with a state that holds an object."""

    def state_dict(self):
        return {"vocabulary": Vocabulary()}

    def load_state_dict(self, state):
        pass


def test_bad_input_is_refused_clearly_and_nothing_saved_is_lost(gpt2_runs, tmp_path):
    accelerator, model, optimizer, schedule, _ = gpt2_runs.straight
    directory = gpt2_runs.base / "straight"
    with pe.Checkpointer(directory) as reader:
        before = reader.load()

    ckpt = AcceleratorCheckpointer(accelerator, directory)
    accelerator.register_for_checkpointing(Tagged())
    try:
        refused = r"custom_checkpoint_0/vocabulary.*Tagged given to register_for_checkpointing"
        with pytest.raises(TypeError, match=refused):
            ckpt.save(7)
    finally:
        accelerator._custom_objects.clear()
    plain = accelerator.prepare(torch.nn.Linear(4, 2))  # not a PreTrainedModel: there is no config
    with pytest.raises(TypeError, match="Linear: it is not a transformers PreTrainedModel .* config="):
        ckpt.export_pretrained(tmp_path / "plain", plain)
    assert not (tmp_path / "plain").exists()
    with pytest.raises(ValueError, match="prepared 2 models: name the one"):
        ckpt.export_pretrained(tmp_path / "plain")
    accelerator._models.remove(plain)
    ckpt.close()

    left = sorted(set(os.listdir(directory)) - {".pyengine-writer.lock"})
    assert left == ["step-00000006"]  # no step 7, no temporary directory
    with pe.Checkpointer(directory) as reader:
        assert_identical(reader.load(), before)


def test_a_save_inside_a_gradient_accumulation_cycle_is_refused(tmp_path):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = accelerator.prepare(torch.nn.Linear(4, 1))
    ckpt = AcceleratorCheckpointer(accelerator, tmp_path, policy=pe.checkpoint.Every(steps=1))
    for batch in range(2):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(2, 4)).sum())
        if batch == 0:  # the gradients accumulated so far are not state: a resumed run would differ
            with pytest.raises(RuntimeError, match="middle of a gradient accumulation cycle"):
                ckpt.save(1)
            assert ckpt.maybe_save(1) is None
    assert ckpt.maybe_save(1) is not None  # the cycle is complete
    ckpt.close()
    assert ckpt.checkpointer.steps() == [1]
