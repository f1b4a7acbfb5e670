"""The loader's order: a pure function of (seed, epoch, rank, world_size), exact coverage."""

from __future__ import annotations

import numpy as np
import pytest

import pyengine as pe


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampler") / "d"
    return pe.data.write_dataset(path, {"i": np.arange(1003, dtype=np.int64)}, samples_per_shard=300)


def _epoch(loader: pe.data.Loader, epoch: int) -> list[np.ndarray]:
    return [loader.batch_indices(epoch, b) for b in range(len(loader))]


def _loaded(loader: pe.data.Loader) -> np.ndarray:
    return np.concatenate([b["i"].numpy() for b in loader])


@pytest.mark.parametrize("shuffle", [True, False, "block"])
def test_every_sample_exactly_once_without_drop_last(ds, shuffle):
    loader = pe.data.Loader(ds, batch_size=64, shuffle=shuffle, block_size=50, window_blocks=3)
    assert len(loader) == 16  # ceil(1003 / 64)
    for _ in range(2):
        got = _loaded(loader)
        assert sorted(got.tolist()) == list(range(1003))


@pytest.mark.parametrize("shuffle", [True, "block"])
def test_drop_last_gives_full_batches_of_distinct_samples(ds, shuffle):
    loader = pe.data.Loader(ds, batch_size=64, shuffle=shuffle, drop_last=True, block_size=50, window_blocks=3)
    batches = [b["i"].numpy() for b in loader]
    assert len(batches) == len(loader) == 15 and all(len(b) == 64 for b in batches)
    got = np.concatenate(batches)
    assert len(set(got.tolist())) == 960


def test_same_seed_same_order_new_order_each_epoch_and_seed(ds):
    a, b = pe.data.Loader(ds, 32, seed=7), pe.data.Loader(ds, 32, seed=7)
    np.testing.assert_array_equal(np.concatenate(_epoch(a, 0)), np.concatenate(_epoch(b, 0)))
    np.testing.assert_array_equal(_loaded(a), np.concatenate(_epoch(b, 0)))  # loading follows the sampler
    np.testing.assert_array_equal(_loaded(a), np.concatenate(_epoch(b, 1)))  # epochs advance by themselves
    e0, e1 = np.concatenate(_epoch(a, 0)), np.concatenate(_epoch(a, 1))
    other_seed = np.concatenate(_epoch(pe.data.Loader(ds, 32, seed=8), 0))
    assert (e0 != e1).mean() > 0.9 and (e0 != other_seed).mean() > 0.9


def test_full_shuffle_has_no_visible_structure(ds):
    order = np.concatenate(_epoch(pe.data.Loader(ds, 1003, seed=3), 0)).astype(float)
    rho = np.corrcoef(order, np.arange(len(order)))[0, 1]
    lag1 = np.corrcoef(order[:-1], order[1:])[0, 1]
    assert abs(rho) < 0.1 and abs(lag1) < 0.1
    # Where sample 0 lands is spread over the whole epoch across seeds.
    spots = [int(np.argmax(np.concatenate(_epoch(pe.data.Loader(ds, 1003, seed=s), 0)) == 0)) for s in range(40)]
    assert len(set(spots)) > 30 and max(spots) - min(spots) > 500


def test_block_shuffle_reads_one_window_at_a_time(ds):
    loader = pe.data.Loader(ds, batch_size=100, shuffle="block", block_size=50, window_blocks=4)
    order = np.concatenate(_epoch(loader, 0))
    blocks = order // 50
    for w in range(0, 1000 // 200):  # each window of 200 positions draws from 4 blocks only
        assert len(set(blocks[w * 200 : (w + 1) * 200].tolist())) == 4
    assert not np.array_equal(order[:200], np.sort(order[:200]))  # shuffled inside the window


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, "block"])
def test_ranks_are_disjoint_and_cover(ds, drop_last, shuffle):
    world = 3
    loaders = [
        pe.data.Loader(ds, 16, shuffle=shuffle, seed=5, rank=r, world_size=world, drop_last=drop_last, block_size=40)
        for r in range(world)
    ]
    per_rank = [np.concatenate(_epoch(lo, 2)) for lo in loaders]
    together = np.concatenate(per_rank)
    assert len(set(together.tolist())) == len(together)  # disjoint
    if drop_last:
        assert len({len(lo) for lo in loaders}) == 1  # DDP needs equal batch counts
        assert len(together) == world * len(loaders[0]) * 16
    else:
        assert sorted(together.tolist()) == list(range(1003))  # covering
    single = np.concatenate(_epoch(pe.data.Loader(ds, 16, shuffle=shuffle, seed=5, block_size=40), 2))
    # Rank r takes every world-th position of the one global order.
    assert set(together.tolist()) <= set(single.tolist())
    np.testing.assert_array_equal(per_rank[1][:10], single[1 : 1 + 10 * world : world][:10])


def test_invalid_geometry_is_rejected(ds):
    with pytest.raises(ValueError):
        pe.data.Loader(ds, 0)
    with pytest.raises(ValueError):
        pe.data.Loader(ds, 8, rank=2, world_size=2)
    with pytest.raises(ValueError):
        pe.data.Loader(ds, 8, shuffle="sorted")
