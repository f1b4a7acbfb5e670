"""Loader(sample_transform=..., transform_threads=...): parallel, deterministic, resumable per-sample work."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import pyengine as pe

N = 700


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("sample_transform") / "ds"
    return pe.data.write_dataset(
        path,
        {
            "x": rng.integers(0, 255, (N, 6, 5), dtype=np.uint8),
            "y": np.arange(N, dtype=np.int64),
            "tokens": [rng.integers(0, 1000, int(rng.integers(1, 9)), dtype=np.int32) for _ in range(N)],
        },
        samples_per_shard=256,
        durable=False,
    )


def augment(sample, rng):
    """Random flip, noise and a random crop of the token sequence: every output depends on rng."""
    x = sample["x"][:, ::-1] if rng.random() < 0.5 else sample["x"]
    noisy = x.astype(np.float32) + rng.normal(0.0, 1.0, x.shape).astype(np.float32)
    tokens = np.zeros(4, dtype=np.int32)
    start = int(rng.integers(0, len(sample["tokens"])))
    piece = sample["tokens"][start : start + 4]
    tokens[: len(piece)] = piece
    return {"x": noisy, "y": sample["y"], "tokens": tokens, "draw": rng.integers(0, 2**62)}


def collect(loader, batches=None):
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if batches is not None and len(out) == batches:
            break
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert p.keys() == q.keys()
        for k in p:
            assert torch.equal(p[k], q[k]), k


def test_batches_are_identical_for_any_thread_count(ds):
    runs = [
        collect(pe.data.Loader(ds, 64, seed=5, sample_transform=augment, transform_threads=t, threads=w))
        for t, w in ((1, 1), (4, 2), (3, 1))
    ]
    assert_same(runs[0], runs[1])
    assert_same(runs[0], runs[2])
    assert len(runs[0]) == -(-N // 64)
    first = runs[0][0]
    assert first["x"].shape == (64, 6, 5) and first["x"].dtype == torch.float32
    assert first["tokens"].shape == (64, 4) and first["y"].dtype == torch.int64
    # The transform saw each sample of the epoch once, in the sampler's order.
    loader = pe.data.Loader(ds, 64, seed=5)
    order = np.concatenate([loader.batch_indices(0, b) for b in range(len(loader))])
    assert np.array_equal(torch.cat([b["y"] for b in runs[0]]).numpy(), order)


def test_each_sample_gets_the_generator_of_seed_epoch_and_index(ds):
    loader = pe.data.Loader(ds, 50, seed=9, sample_transform=augment, transform_threads=2)
    loader.set_epoch(3)
    batch = next(iter(loader))
    for y, draw in zip(batch["y"].tolist(), batch["draw"].tolist()):
        assert draw == augment(ds[y], pe.data.sample_rng(9, 3, y))["draw"]
    loader.set_epoch(4)
    other = next(iter(loader))
    assert not torch.equal(batch["x"][:5], other["x"][:5])  # a new epoch draws new augmentations


def test_resume_mid_epoch_gives_the_uninterrupted_batches(ds):
    whole = collect(pe.data.Loader(ds, 64, seed=2, sample_transform=augment, transform_threads=2))
    first = pe.data.Loader(ds, 64, seed=2, sample_transform=augment, transform_threads=3)
    head = collect(first, batches=4)  # workers are ahead of the consumer when it stops here
    state = first.state_dict()
    first.close()
    assert state["batch"] == 4
    resumed = pe.data.Loader(ds, 64, seed=2, sample_transform=augment, transform_threads=1)
    resumed.load_state_dict(state)
    assert_same(head + collect(resumed), whole)


def test_infinite_resume_across_the_epoch_boundary(ds):
    def stream(loader, count):
        it = iter(loader)
        return [{k: v.clone() for k, v in next(it).items()} for _ in range(count)]

    per_epoch = -(-N // 100)
    whole = stream(pe.data.Loader(ds, 100, seed=1, infinite=True, sample_transform=augment), 2 * per_epoch + 2)
    first = pe.data.Loader(ds, 100, seed=1, infinite=True, sample_transform=augment, transform_threads=2)
    head = stream(first, per_epoch - 1)
    state = first.state_dict()
    first.close()
    resumed = pe.data.Loader(ds, 100, seed=1, infinite=True, sample_transform=augment, transform_threads=4)
    resumed.load_state_dict(state)
    assert_same(head + stream(resumed, per_epoch + 3), whole)
    resumed.close()


def test_an_exception_reaches_the_consumer_at_its_batch_naming_the_sample(ds):
    loader = pe.data.Loader(ds, 64, seed=4, sample_transform=augment, transform_threads=3)
    victim = int(loader.batch_indices(0, 3)[10])

    def fails_once(sample, rng):
        if int(sample["y"]) == victim:
            raise KeyError("no such label")
        return augment(sample, rng)

    loader = pe.data.Loader(ds, 64, seed=4, sample_transform=fails_once, transform_threads=3)
    delivered = []
    with pytest.raises(pe.data.SampleTransformError, match=rf"sample {victim} \(epoch 0, batch 3\).*KeyError") as info:
        for batch in loader:
            delivered.append(batch["y"].clone())
    assert len(delivered) == 3  # every batch before the failing one arrived
    assert isinstance(info.value.__cause__, KeyError)
    assert loader.state_dict()["batch"] == 3  # the failed batch was not consumed
    assert threading.active_count() == _threads_without_transform_workers()


def test_inconsistent_outputs_are_refused_with_the_reason(ds):
    def ragged(sample, rng):
        return {"x": np.zeros(int(sample["y"]) % 2 + 1)}

    with pytest.raises(pe.data.SampleTransformError, match="same shape and dtype"):
        collect(pe.data.Loader(ds, 64, sample_transform=ragged, transform_threads=2))

    def keys_differ(sample, rng):
        return {"a" if int(sample["y"]) % 2 else "b": np.zeros(1)}

    with pytest.raises(pe.data.SampleTransformError, match="same keys"):
        collect(pe.data.Loader(ds, 64, sample_transform=keys_differ))

    with pytest.raises(pe.data.SampleTransformError, match="return a dict of arrays, got list"):
        collect(pe.data.Loader(ds, 64, sample_transform=lambda s, rng: [s["x"]]))


def test_samples_are_read_only_views(ds):
    def edits_in_place(sample, rng):
        sample["x"][0, 0] = 1
        return {"x": sample["x"]}

    with pytest.raises(pe.data.SampleTransformError, match="read-only"):
        collect(pe.data.Loader(ds, 64, sample_transform=edits_in_place))
    assert ds[0]["x"].shape == (6, 5)


def test_transforms_run_in_parallel_threads(ds):
    active, most = [0], [0]
    lock = threading.Lock()

    def slow(sample, rng):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.002)  # releases the GIL, as a decoder does
        with lock:
            active[0] -= 1
        return {"y": sample["y"]}

    collect(pe.data.Loader(ds, 64, sample_transform=slow, transform_threads=4), batches=3)
    assert most[0] >= 2
    most[0] = 0
    collect(pe.data.Loader(ds, 64, sample_transform=slow, transform_threads=1), batches=3)
    assert most[0] == 1


def test_breaking_out_stops_the_threads_and_the_loader_restarts(ds):
    baseline = _threads_without_transform_workers()
    loader = pe.data.Loader(ds, 64, seed=8, sample_transform=augment, transform_threads=4)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    loader.close()
    assert threading.active_count() == baseline
    again = collect(loader)  # the loader is a cursor: it goes on after the two consumed batches
    assert len(again) == len(loader) - 2
    assert_same(again, collect(pe.data.Loader(ds, 64, seed=8, sample_transform=augment))[2:])
    assert not any(t.name.startswith("pe-transform") for t in threading.enumerate())


def test_the_batch_transform_still_runs_after_the_sample_transform(ds):
    loader = pe.data.Loader(
        ds, 64, sample_transform=augment, transform=lambda b: {**b, "x": b["x"] * 0}, transform_threads=2
    )
    batch = next(iter(loader))
    assert torch.count_nonzero(batch["x"]) == 0 and "tokens" in batch
    loader.close()


def test_bad_arguments_are_refused(ds):
    with pytest.raises(ValueError, match="no sample_transform"):
        pe.data.Loader(ds, 64, transform_threads=2)
    with pytest.raises(ValueError, match="transform_threads"):
        pe.data.Loader(ds, 64, sample_transform=augment, transform_threads=0)
    with pytest.raises(TypeError, match="callable"):
        pe.data.Loader(ds, 64, sample_transform="flip")


def _threads_without_transform_workers() -> int:
    return sum(1 for t in threading.enumerate() if not t.name.startswith("pe-transform"))
