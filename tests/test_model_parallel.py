"""Model parallelism (tensor and pipeline parallel) with real 2-rank torchrun launches on gloo.

The launch (tests/model_parallel_scenarios.py) asserts on every rank; these tests check its
exit status and the figures it writes, then restore its checkpoint in this plain process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import pyengine as pe

pytestmark = pytest.mark.distributed

SCENARIOS = Path(__file__).with_name("model_parallel_scenarios.py")
sys.path.insert(0, str(SCENARIOS.parent))
import model_parallel_scenarios as scen  # noqa: E402
from torchrun_launch import torchrun as launch  # noqa: E402


def torchrun(nproc: int, scenario: str, out: Path) -> None:
    launch(SCENARIOS, nproc, scenario, str(out))


def trained_mlp(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The scenarios' MLP trained in this process, then moved away from anything a launch trains."""
    model, opt, _ = scen.fit(scen.make_mlp())
    torch.manual_seed(seed)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p))
    return model, opt


@pytest.fixture(scope="module")
def tensor_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain checkpoint for the launch to restore, then one 2-rank tensor-parallel launch."""
    out = tmp_path_factory.mktemp("tp")
    model, _ = trained_mlp(5)
    with pe.Checkpointer(out / "ckpt-plain") as ckpt:
        ckpt.save(scen.STEPS, {"model": model}).wait()
    torch.save(model.state_dict(), out / "plain_state.pt")
    torchrun(2, "tensor", out)
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain checkpoint (model and Adam) for the launch to restore into stages, then one
    2-stage pipeline launch."""
    out = tmp_path_factory.mktemp("pp")
    model, opt = trained_mlp(6)
    with pe.Checkpointer(out / "ckpt-plain") as ckpt:
        ckpt.save(scen.STEPS, {"model": model, "optimizer": opt}).wait()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out / "plain_state.pt")
    torchrun(2, "pipeline", out)
    return out


def report(out: Path, rank: int, scenario: str = "tensor") -> dict:
    return json.loads((out / f"{scenario}-rank{rank}.json").read_text())


def test_tensor_parallel_mlp_equals_the_single_process_mlp(tensor_run: Path) -> None:
    for rank in (0, 1):
        r = report(tensor_run, rank)
        assert len(r["losses"]) == scen.STEPS
        assert r["loss_diff"] <= scen.TOLERANCE and r["weight_diff"] <= scen.TOLERANCE
        assert r["losses"][-1] < r["losses"][0]  # it trained, so equal weights are not the initial ones
        assert r["transformer_block_diff"] <= scen.TOLERANCE  # nn.TransformerEncoderLayer, its MLP sharded


def test_checkpoints_restore_between_tensor_parallel_and_plain_forms(tensor_run: Path) -> None:
    expected = torch.load(tensor_run / "tensor_state.pt")
    model = scen.make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pe.Checkpointer(tensor_run / "ckpt-tensor") as ckpt:
        assert ckpt.restore({"model": model, "optimizer": opt}) == scen.STEPS
    assert set(model.state_dict()) == set(expected)
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    # The optimizer state was sharded like its parameters; reassembled, it matches a plain run's.
    _, ref_opt, _ = scen.fit(scen.make_mlp())
    assert len(opt.state) == len(ref_opt.state) == 10
    for p, ref_p in zip(model.parameters(), ref_opt.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt.state[p][key], ref_opt.state[ref_p][key], rtol=0, atol=scen.TOLERANCE)
    for rank in (0, 1):
        assert report(tensor_run, rank)["restore_tp_diff"] == 0.0
        assert report(tensor_run, rank)["plain_to_tp_diff"] == 0.0


def test_outside_a_job_tensor_parallel_leaves_the_model_whole() -> None:
    model = scen.make_mlp()
    strategy = pe.distributed.make_strategy("tensor")
    assert strategy.wrap(model) is model and strategy.wrapped is model
    assert pe.distributed.tensor_parallel.linear_pairs(model) == {
        "0": "colwise",
        "2": "rowwise",
        "3": "colwise",
        "5": "rowwise",
    }
    assert not strategy.needs_rewrap()


def test_a_bad_tensor_parallel_plan_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="styles must be one of"):
        pe.distributed.TensorParallel(plan={"0": "diagonal"})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        pe.distributed.TensorParallel(plan={"1": "colwise"}).wrap(scen.make_mlp())
    with pytest.raises(ValueError, match="no nn.Linear pair"):
        pe.distributed.TensorParallel().wrap(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_two_stage_pipeline_equals_the_single_process_model(pipeline_run: Path) -> None:
    stages = [report(pipeline_run, rank, "pipeline")["stage_params"] for rank in (0, 1)]
    # The even split by parameter count: 280 parameters on stage 0, 221 on stage 1.
    assert stages == [
        ["0.weight", "0.bias", "2.weight", "2.bias"],
        ["3.weight", "3.bias", "5.weight", "5.bias", "6.weight", "6.bias"],
    ]
    for rank in (0, 1):
        r = report(pipeline_run, rank, "pipeline")
        assert r["loss_diff"] <= scen.TOLERANCE and r["grad_diff"] <= scen.TOLERANCE
        assert r["weight_diff"] <= scen.TOLERANCE


def test_a_pipeline_checkpoint_restores_into_a_plain_model_with_identical_weights(pipeline_run: Path) -> None:
    stages = [torch.load(pipeline_run / f"pipeline_stage{rank}.pt") for rank in (0, 1)]
    model = scen.make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pe.Checkpointer(pipeline_run / "ckpt-pipeline") as ckpt:
        assert ckpt.restore({"model": model, "optimizer": opt}) == scen.STEPS
    restored = model.state_dict()
    expected = {**stages[0]["model"], **stages[1]["model"]}
    assert list(restored) == list(scen.make_mlp().state_dict())  # the plain model's keys, in its order
    assert set(expected) == set(restored)
    assert all(torch.equal(restored[k], expected[k]) for k in expected)
    # Adam's moments and step counts, renumbered from each stage's order to the plain model's.
    plain_ids = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    state = opt.state_dict()["state"]
    assert len(state) == len(plain_ids)
    for stage in stages:
        for local, name in enumerate(stage["names"]):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(state[plain_ids[name]][key], stage["optimizer"]["state"][local][key]), (name, key)
    # The weights are the trained ones, equal to the single-process run within tolerance.
    ref, _, _ = scen.fit(scen.make_mlp())
    assert max(float((restored[k] - v).abs().max()) for k, v in ref.state_dict().items()) <= scen.TOLERANCE
    assert not torch.equal(restored["0.weight"], scen.make_mlp().state_dict()["0.weight"])
    for rank in (0, 1):
        r = report(pipeline_run, rank, "pipeline")
        assert r["restore_pp_diff"] == r["continue_diff"] == r["plain_to_pp_diff"] == r["resplit_diff"] == 0.0
    # ... also into stages split elsewhere than the saving run's (its stage 0 held 0 and 2 only).
    assert report(pipeline_run, 0, "pipeline")["resplit_params"] == [
        "0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"]


def test_a_pipeline_checkpoint_is_one_plain_checkpoint_to_inspect_and_export(pipeline_run: Path,
                                                                             tmp_path: Path) -> None:
    step_dir = pipeline_run / "ckpt-pipeline" / f"step-{scen.STEPS:08d}"
    manifest = json.loads((step_dir / "manifest.json").read_text()[len('{"manifest_crc32c":"00000000","manifest":'):-2])
    writers = {name: {p["part"] for p in entry["pieces"]} for name, entry in manifest["tensors"].items()}
    # Each stage's tensors were written by its own rank, once.
    assert writers["model/0.weight"] == {0} and writers["model/6.weight"] == {1}
    pe.checkpoint.export_weights(pipeline_run / "ckpt-pipeline", tmp_path / "w.safetensors", key="model")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "w.safetensors")) == set(scen.make_mlp().state_dict())


def test_even_split_points_balance_parameters_and_bad_split_points_are_refused() -> None:
    model = scen.make_mlp()
    children = list(model.named_children())
    assert pe.distributed.pipeline_parallel.even_split_points(children, 2) == ["3"]
    assert len(pe.distributed.pipeline_parallel.even_split_points(children, 7)) == 6
    strategy = pe.distributed.PipelineParallel(scen.mse, split_points=["5"])
    assert [list(dict(s.named_children())) for s in strategy.stage_modules(model, 2)] == [
        ["0", "1", "2", "3", "4"],
        ["5", "6"],
    ]
    with pytest.raises(ValueError, match="must name 1 top-level"):
        pe.distributed.PipelineParallel(scen.mse, split_points=["9"]).stage_modules(model, 2)
    with pytest.raises(ValueError, match="model order"):
        pe.distributed.PipelineParallel(scen.mse, split_points=["5", "3"]).stage_modules(model, 3)
    with pytest.raises(ValueError, match="cannot split 7"):
        pe.distributed.pipeline_parallel.even_split_points(children, 8)


def test_outside_a_job_a_pipeline_step_is_a_plain_forward_and_backward() -> None:
    model, ref = scen.make_mlp(), scen.make_mlp()
    strategy = pe.distributed.PipelineParallel(scen.mse)
    assert strategy.wrap(model) is model
    x, y = scen.batches()[0]
    loss = strategy.step(x, y)
    ref_loss = scen.mse(ref(x), y)
    ref_loss.backward()
    assert torch.equal(loss, ref_loss.detach())
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))

