import numpy as np
import pytest

from fastkd.pipelines.sampling import ShardPlan, epoch_order


def test_epoch_order_is_a_pure_permutation():
    a = epoch_order(3, 0, 101)
    assert sorted(a.tolist()) == list(range(101))
    assert np.array_equal(a, epoch_order(3, 0, 101))
    assert not np.array_equal(a, epoch_order(3, 1, 101))
    assert not np.array_equal(a, epoch_order(4, 0, 101))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_cover_the_dataset_exactly_once(world, shuffle):
    n, batch = 23, 4
    plans = [ShardPlan(n, batch, seed=1, shuffle=shuffle, rank=r, world_size=world)
             for r in range(world)]
    assert len({len(p) for p in plans}) == 1          # every rank runs the same step count
    seen, padded = [], 0
    for plan in plans:
        batches = list(plan.batches(epoch=2))
        assert len(batches) == len(plan)
        assert all(len(b.indices) == batch for b in batches[:-1])   # only the last is partial
        for b in batches:
            seen += [i for i in b.indices.tolist() if i >= 0]
            padded += int((b.indices < 0).sum())
            assert (b.sample_ids >= 0).all() and (b.sample_ids < n).all()   # pads read real files
            real = b.indices >= 0
            assert np.array_equal(b.sample_ids[real], b.indices[real])
    assert sorted(seen) == list(range(n))
    assert padded == plans[0].samples_per_rank * world - n


def test_docstring_example_seven_samples_two_ranks():
    r0 = [b.indices.tolist() for b in ShardPlan(7, 2, seed=0, shuffle=False, rank=0,
                                                world_size=2).batches(0)]
    r1 = [b.indices.tolist() for b in ShardPlan(7, 2, seed=0, shuffle=False, rank=1,
                                                world_size=2).batches(0)]
    assert r0 == [[0, 2], [4, 6]] and r1 == [[1, 3], [5, -1]]
    drop = ShardPlan(7, 2, seed=0, shuffle=False, rank=1, world_size=2, drop_last=True)
    assert [b.indices.tolist() for b in drop.batches(0)] == [[1, 3]]


def test_global_batches_do_not_depend_on_world_size():
    n = 40
    single = list(ShardPlan(n, 12, seed=5, shuffle=True).batches(1))
    ranks = [list(ShardPlan(n, 4, seed=5, shuffle=True, rank=r, world_size=3).batches(1))
             for r in range(3)]
    for b, whole in enumerate(single[:-1]):
        union = sorted(i for r in range(3) for i in ranks[r][b].indices.tolist())
        assert union == sorted(whole.indices.tolist())


def test_drop_last_keeps_only_full_batches_and_no_padding():
    plans = [ShardPlan(23, 4, seed=0, shuffle=True, rank=r, world_size=3, drop_last=True)
             for r in range(3)]
    for plan in plans:
        assert len(plan) == (23 // 3) // 4
        for b in plan.batches(0):
            assert len(b.indices) == 4 and (b.indices >= 0).all()


def test_start_batch_resumes_identically():
    plan = ShardPlan(50, 8, seed=2, shuffle=True, rank=1, world_size=2)
    full = list(plan.batches(3))
    tail = list(plan.batches(3, start_batch=2))
    assert len(tail) == len(full) - 2
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(full[2:], tail))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ShardPlan(0, 4, seed=0, shuffle=False)
    with pytest.raises(ValueError):
        ShardPlan(10, 4, seed=0, shuffle=False, rank=2, world_size=2)
