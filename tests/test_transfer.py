"""Transfer learning: freezing with BatchNorm modes, gradual unfreezing across a resume,
optimizer state keyed by name, the bottleneck-feature cache and head replacement."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyengine as pe
from pyengine.transfer import (
    GradualUnfreezer,
    NamedOptimizerState,
    cache_features,
    freeze,
    is_bn_frozen,
    param_group_named,
    replace_head,
    unfreeze,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Net(nn.Module):
    """backbone (two blocks with BatchNorm) + head, like a small pretrained classifier."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.block1 = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 3)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) * 3 + 1, torch.randint(0, 3, (n,), generator=g)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    x, y = data()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- freeze / unfreeze -------------------------------------------------------------------


def test_frozen_parameters_get_no_gradient_and_do_not_change():
    model = Net()
    freeze(model.block1)
    freeze(model.block2)
    before = params_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # deliberately given every parameter
    train_steps(model, opt)
    after = params_of(model)
    assert all(p.grad is None for m in (model.block1, model.block2) for p in m.parameters())
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head"))
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode_and_across_train_calls():
    model = Net()
    freeze(model.block1, bn="frozen")
    freeze(model.block2, bn="frozen")
    stats = bn_stats(model)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    for _ in range(3):
        model.train()  # must not wake the frozen BatchNorm layers up
        train_steps(model, opt, steps=2)
    assert same(stats, bn_stats(model))
    assert all(is_bn_frozen(m) for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    # In train mode the frozen backbone computes exactly what it computes in eval mode
    # (dropout off in both for the comparison).
    x, _ = data(16)
    model.block2[3].p = 0.0
    model.train()
    train_out = model.backbone(x)
    model.eval()
    assert torch.equal(train_out, model.backbone(x))


def test_bn_train_mode_updates_statistics_but_not_affine_parameters():
    model = Net()
    freeze(model.block1, bn="train")
    stats, affine = bn_stats(model.block1), params_of(model.block1)
    train_steps(model, torch.optim.Adam(model.head.parameters(), lr=1e-2), steps=2)
    assert not same(stats, bn_stats(model.block1))
    assert same(affine, params_of(model.block1))
    assert not is_bn_frozen(model.block1[1])


def test_frozen_batchnorm_survives_deepcopy_and_a_checkpoint_round_trip(tmp_path):
    model = Net()
    freeze(model.block1)
    clone = copy.deepcopy(model)
    stats = bn_stats(clone.block1)
    train_steps(clone, torch.optim.SGD(clone.head.parameters(), lr=0.1), steps=2)
    assert same(stats, bn_stats(clone.block1))
    unfreeze(clone.block1)  # removes the copy's hook only, not the original's
    assert is_bn_frozen(model.block1[1]) and not is_bn_frozen(clone.block1[1])

    ckpt = pe.Checkpointer(tmp_path)
    ckpt.save(1, {"model": model}).wait()
    fresh = Net(seed=5)
    freeze(fresh.block1)  # freezing is structure: rebuilt the same way, then restored
    ckpt.restore({"model": fresh})
    assert same(bn_stats(fresh), bn_stats(model))
    stats = bn_stats(fresh.block1)
    train_steps(fresh, torch.optim.SGD(fresh.head.parameters(), lr=0.1), steps=2)
    assert same(stats, bn_stats(fresh.block1))


def test_unfreeze_restores_training_and_batchnorm_updates():
    model = Net()
    freeze(model)
    unfreeze(model.block1)
    assert all(p.requires_grad for p in model.block1.parameters())
    assert not any(p.requires_grad for p in model.block2.parameters())
    stats = bn_stats(model.block1)
    train_steps(model, torch.optim.SGD(model.block1.parameters(), lr=0.1), steps=1)
    assert not same(stats, bn_stats(model.block1))
    # bn="frozen" on unfreeze: affine parameters train, statistics stay.
    unfreeze(model.block2, bn="frozen")
    stats, affine = bn_stats(model.block2), params_of(model.block2)
    train_steps(model, torch.optim.SGD(model.block2.parameters(), lr=0.1), steps=2)
    assert same(stats, bn_stats(model.block2)) and not same(affine, params_of(model.block2))


def test_freeze_rejects_bad_input_and_warns_on_batchnorm_without_statistics():
    with pytest.raises(ValueError, match="bn must be"):
        freeze(Net(), bn="eval")
    with pytest.raises(TypeError):
        freeze("not a module")  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="track_running_stats=False"):
        freeze(nn.BatchNorm1d(4, track_running_stats=False))


# --- gradual unfreezing and resume --------------------------------------------------------

STEPS_PER_EPOCH, EPOCHS = 3, 4


def build(named: bool):
    model = Net()
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    unfreezer = GradualUnfreezer(opt, [model.block2, model.block1], at_epochs=[1, 2], lr=[1e-3, 5e-4])
    state = {"model": model, "unfreezer": unfreezer, "optimizer": NamedOptimizerState(opt, model) if named else opt}
    return model, opt, unfreezer, state


def run(model, opt, unfreezer, start: int, stop: int) -> None:
    """Global steps [start, stop); the unfreezer is told at each epoch boundary."""
    x, y = data(96, seed=2)
    model.train()
    for step in range(start, stop):
        epoch, i = divmod(step, STEPS_PER_EPOCH)
        if i == 0:
            unfreezer.on_epoch_start(epoch)
        rows = slice(32 * i, 32 * (i + 1))
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()  # dropout draws from the global RNG
        opt.step()


def test_gradual_unfreezing_adds_parameter_groups_at_the_right_epochs():
    model, opt, unfreezer, _ = build(named=False)
    assert not any(p.requires_grad for p in model.block1.parameters())
    assert unfreezer.on_epoch_start(0) == [] and len(opt.param_groups) == 1
    before = params_of(model.block1)
    run(model, opt, unfreezer, 0, STEPS_PER_EPOCH)
    assert same(before, params_of(model.block1))
    assert unfreezer.on_epoch_start(1) == [0]
    assert unfreezer.on_epoch_start(1) == []  # idempotent
    group = param_group_named(opt, "unfrozen/0")
    assert group is not None and group["lr"] == 1e-3
    assert {id(p) for p in group["params"]} == {id(p) for p in model.block2.parameters()}
    assert all(p.requires_grad for p in model.block2.parameters())
    assert not any(p.requires_grad for p in model.block1.parameters())
    assert unfreezer.on_epoch_start(5) == [1]  # catches up on skipped boundaries
    assert len(opt.param_groups) == 3 and param_group_named(opt, "unfrozen/1")["lr"] == 5e-4
    b2 = params_of(model.block2)
    run(model, opt, unfreezer, 5 * STEPS_PER_EPOCH, 5 * STEPS_PER_EPOCH + 2)
    assert not same(b2, params_of(model.block2))


def test_nested_groups_do_not_add_a_parameter_twice():
    model = Net()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    whole = nn.ModuleList([model.block1, model.block2])
    unfreezer = GradualUnfreezer(opt, [model.block2, whole], at_epochs=[0, 1])
    unfreezer.on_epoch_start(1)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("named", [False, True], ids=["torch-optimizer", "named-optimizer-state"])
@pytest.mark.parametrize("stop_at", [2, 4, 7], ids=["before-unfreezing", "after-first", "mid-epoch-after-second"])
def test_gradual_unfreezing_resumes_bit_exactly(tmp_path, named, stop_at):
    total = STEPS_PER_EPOCH * EPOCHS
    torch.manual_seed(123)
    model, opt, unfreezer, _ = build(named)
    run(model, opt, unfreezer, 0, total)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)
    model, opt, unfreezer, state = build(named)
    run(model, opt, unfreezer, 0, stop_at)
    with pe.Checkpointer(tmp_path) as ckpt:
        ckpt.save(stop_at, state).wait()
    run(model, opt, unfreezer, stop_at, stop_at + 2)  # work lost to a crash

    model, opt, unfreezer, state = build(named)  # a fresh process: new objects
    torch.manual_seed(999)
    with pe.Checkpointer(tmp_path) as ckpt:
        step = ckpt.restore(state)
    assert step == stop_at
    assert len(opt.param_groups) == 1 + len(unfreezer.trainable_groups)
    run(model, opt, unfreezer, step, total)
    resumed = model.state_dict()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert unfreezer.trainable_groups == [0, 1]


def test_unfreezer_state_checks():
    model, opt, unfreezer, _ = build(named=False)
    state = unfreezer.state_dict()
    other = GradualUnfreezer(torch.optim.SGD(Net().head.parameters(), lr=0.1), [Net().block1], at_epochs=[3])
    with pytest.raises(ValueError, match="plan"):
        other.load_state_dict(state)
    unfreezer.on_epoch_start(2)
    _, _, fresh, _ = build(named=False)
    fresh.on_epoch_start(1)
    fresh.load_state_dict(unfreezer.state_dict())  # extends [0] to [0, 1]
    assert fresh.trainable_groups == [0, 1]
    with pytest.raises(ValueError, match="already unfroze"):
        fresh.load_state_dict(state)  # taken before any unfreeze
    with pytest.raises(ValueError, match="at_epochs"):
        GradualUnfreezer(opt, [model.block1], at_epochs=[1, 2])
    with pytest.raises(ValueError, match="already in the optimizer"):
        GradualUnfreezer(opt, [model.head], at_epochs=[1])


# --- optimizer state keyed by name ---------------------------------------------------------


def test_named_state_restores_after_the_trainable_set_grew(tmp_path):
    model = Net()
    freeze(model.block1)
    freeze(model.block2)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    train_steps(model, opt, steps=3)
    opt.param_groups[0]["lr"] = 2.5e-3  # as a scheduler would have left it
    saved_head = {k: v.clone() for k, v in opt.state[model.head.weight].items()}
    ckpt = pe.Checkpointer(tmp_path)
    ckpt.save(3, {"model": model, "optimizer": NamedOptimizerState(opt, model)}).wait()
    plain_sd = opt.state_dict()

    fresh = Net(seed=7)
    unfreeze(fresh.block2)  # more trainable now, in a different group order
    opt2 = torch.optim.Adam([{"params": list(fresh.block2.parameters()), "lr": 1e-4},
                             {"params": list(fresh.head.parameters())}], lr=1e-2)  # fmt: skip
    with pytest.raises(ValueError):
        copy.deepcopy(opt2).load_state_dict(plain_sd)  # what index-keyed state does
    named = NamedOptimizerState(opt2, fresh)
    ckpt.restore({"model": fresh, "optimizer": named})
    state = opt2.state[fresh.head.weight]
    assert all(torch.equal(saved_head[k], state[k]) for k in saved_head)
    assert opt2.param_groups[1]["lr"] == 2.5e-3  # the head's group took the saved hyperparameters
    assert opt2.param_groups[0]["lr"] == 1e-4  # a group with no saved parameter keeps its own
    assert all(len(opt2.state[p]) == 0 for p in fresh.block2.parameters())
    result = named.load_state_dict(ckpt.load()["optimizer"])
    assert sorted(result.missing) == sorted(f"block2.{k}" for k, _ in fresh.block2.named_parameters())
    assert result.unexpected == [] and result.mismatched == []
    train_steps(fresh, opt2, steps=1)  # and training goes on


def test_named_state_restores_after_the_trainable_set_shrank_or_a_head_changed():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, steps=2)
    saved = NamedOptimizerState(opt, model).state_dict()

    fresh = Net(seed=3)
    replace_head(fresh, nn.Linear(16, 5), "head")
    opt2 = torch.optim.SGD([*fresh.block2.parameters(), *fresh.head.parameters()], lr=0.1, momentum=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = NamedOptimizerState(opt2, fresh).load_state_dict(saved)
    assert caught and "not restored" in str(caught[0].message)
    assert sorted(result.unexpected) == sorted(f"block1.{k}" for k, _ in model.block1.named_parameters())
    assert sorted(result.mismatched) == ["head.bias", "head.weight"]
    w = fresh.block2[0].weight
    assert torch.equal(opt2.state[w]["momentum_buffer"], opt.state[model.block2[0].weight]["momentum_buffer"])
    assert len(opt2.state[fresh.head.weight]) == 0


def test_named_state_refuses_foreign_input():
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    named = NamedOptimizerState(opt, model)
    with pytest.raises(ValueError, match="not a NamedOptimizerState"):
        named.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="SGD"):
        NamedOptimizerState(torch.optim.SGD(model.parameters(), lr=0.1), model).load_state_dict(named.state_dict())
    stray = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="not in the model"):
        NamedOptimizerState(stray, model).state_dict()


# --- feature cache and head ------------------------------------------------------------------


def write_images(path, n: int = 50):
    x, y = data(n, seed=4)
    return pe.data.write_dataset(path, {"x": x.numpy(), "y": y.numpy(), "id": np.arange(n, dtype=np.int64)})


def test_cached_features_equal_the_backbones_outputs_exactly(tmp_path):
    ds = write_images(tmp_path / "images")
    model = Net()
    freeze(model.block1)
    freeze(model.block2)
    backbone = nn.Sequential(model.block1, model.block2)
    backbone.train()
    stats = bn_stats(backbone)
    loader = pe.data.Loader(ds, batch_size=16, shuffle=False)
    feats = cache_features(backbone, loader, tmp_path / "feats")
    assert isinstance(feats, pe.data.Dataset) and len(feats) == 50
    assert set(feats.fields) == {"features", "y", "id"}
    assert backbone.training and same(stats, bn_stats(backbone))  # mode restored, statistics untouched
    backbone.eval()
    with torch.no_grad():
        for start in range(0, 50, 16):  # the same batches the cache ran
            x = torch.from_numpy(np.stack([ds[i]["x"] for i in range(start, min(start + 16, 50))]))
            expected = backbone(x).numpy()
            got = np.stack([feats[i]["features"] for i in range(start, min(start + 16, 50))])
            assert np.array_equal(got, expected)
    assert [int(feats[i]["id"]) for i in range(50)] == list(range(50))
    assert all(int(feats[i]["y"]) == int(ds[i]["y"]) for i in range(50))
    # A head trains on the cache through the ordinary loader.
    head_batch = next(iter(pe.data.Loader(feats, batch_size=8, shuffle=True, seed=0)))
    assert head_batch["features"].shape == (8, 16)


def test_cache_features_with_a_shuffled_loader_keeps_rows_together(tmp_path):
    ds = write_images(tmp_path / "images")
    backbone = nn.Linear(8, 4)
    feats = cache_features(backbone, pe.data.Loader(ds, batch_size=7, shuffle=True, seed=3), tmp_path / "f",
                           keep=["id"])  # fmt: skip
    assert set(feats.fields) == {"features", "id"}
    with torch.no_grad():
        for i in range(len(feats)):
            row = feats[i]
            x = torch.from_numpy(ds[int(row["id"])]["x"])[None]
            assert torch.allclose(torch.from_numpy(row["features"]), backbone(x)[0], atol=1e-6)


def test_cache_features_rejects_bad_input(tmp_path):
    ds = write_images(tmp_path / "images")
    backbone = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="infinite"):
        cache_features(backbone, pe.data.Loader(ds, batch_size=8, infinite=True), tmp_path / "a")
    with pytest.raises(ValueError, match="no field 'pixels'"):
        cache_features(backbone, pe.data.Loader(ds, batch_size=8), tmp_path / "b", input_key="pixels")
    with pytest.raises(ValueError, match="collides"):
        cache_features(backbone, pe.data.Loader(ds, batch_size=8), tmp_path / "c", feature_key="y")
    with pytest.raises(ValueError, match="no batch"):
        cache_features(backbone, [], tmp_path / "d")
    with pytest.raises(TypeError, match="dict"):
        cache_features(backbone, [torch.zeros(2, 8)], tmp_path / "e")
    with pytest.raises(TypeError, match="nn.Module"):
        cache_features(lambda x: x, [{"x": torch.zeros(2, 8)}], tmp_path / "f")  # type: ignore[arg-type]

    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="one tensor"):
        cache_features(TwoOutputs(), [{"x": torch.zeros(2, 8)}], tmp_path / "g")
    assert not any(p.name[0] in "abcdefg" for p in tmp_path.iterdir())  # nothing half-written left behind


def test_replace_head():
    model = Net()
    new = nn.Linear(16, 7)
    old = replace_head(model, new, attr="head")
    assert isinstance(old, nn.Linear) and old.out_features == 3 and model.head is new
    assert model(torch.randn(4, 8)).shape == (4, 7)
    seq = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 2)))
    replace_head(seq, nn.Linear(8, 9), attr="1.1")
    assert seq(torch.randn(3, 8)).shape == (3, 9)
    with pytest.raises(AttributeError, match="children"):
        replace_head(model, nn.Linear(16, 2), attr="fc")
    double = Net().double()
    replace_head(double, nn.Linear(16, 2), "head")
    assert double.head.weight.dtype == torch.float64
