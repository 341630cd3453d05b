"""The loader contract, checked identically on the torch fallback and the DALI CPU pipeline."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastkd.pipelines import Batch, build_loader
from pipelines_imagegen import MODEL_CFG, data_config, make_bad_and_odd_files

KINDS = ["torch", pytest.param("dali", marks=pytest.mark.dali)]


def loader(root, kind, *, split="train", train=True, batch_size=4, seed=0, **kw):
    data_kw = {k: kw.pop(k) for k in list(kw) if k not in
               ("rank", "world_size", "amp_dtype", "channels_last", "num_classes")}
    return build_loader(data_config(root, loader=kind, **data_kw), split=split, train=train,
                        batch_size=batch_size, model_cfg=MODEL_CFG, seed=seed, **kw)


def epoch_batches(ld, epoch=0, start_batch=0) -> list[Batch]:
    ld.set_epoch(epoch, start_batch)
    return list(ld)


def by_index(batches) -> dict[int, torch.Tensor]:
    return {int(i): b.images[k] for b in batches for k, i in enumerate(b.indices) if i >= 0}


@pytest.mark.parametrize("kind", KINDS)
def test_batch_contract(image_root, kind):
    ld = loader(image_root, kind)
    assert ld.kind == ("torch" if kind == "torch" else "dali-cpu")
    assert (ld.num_samples, ld.num_classes, ld.classes) == (15, 3, ["class_0", "class_1", "class_2"])
    batches = epoch_batches(ld)
    assert len(batches) == len(ld) == 4
    for b in batches:
        assert isinstance(b, Batch)
        assert b.images.shape[1:] == (3, 32, 32) and b.images.dtype == torch.float32
        assert b.labels.dtype == torch.int64 and b.indices.dtype == torch.int64
        assert b.images.is_contiguous()
    assert [len(b.indices) for b in batches] == [4, 4, 4, 3]
    assert sorted(i for b in batches for i in b.indices.tolist()) == list(range(15))
    for b in batches:   # labels follow the class folders
        assert all(ld.index.labels[i] == label for i, label in zip(b.indices.tolist(), b.labels.tolist()))
    # Normalized: ImageNet mean/std brings values to roughly zero mean, unit spread.
    pixels = torch.cat([b.images for b in batches])
    assert -1.5 < pixels.mean() < 1.5 and 0.2 < pixels.std() < 2.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_dtype_and_channels_last(image_root, kind, dtype):
    plain = epoch_batches(loader(image_root, kind, split="val", train=False))[0].images
    b = epoch_batches(loader(image_root, kind, split="val", train=False, amp_dtype=dtype,
                             channels_last=True))[0]
    assert b.images.dtype == dtype
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    tol = 0.02 if dtype == torch.bfloat16 else 0.005
    torch.testing.assert_close(b.images.float(), plain, atol=tol * 3, rtol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_runs_are_bit_identical_and_epochs_differ(image_root, kind):
    a = epoch_batches(loader(image_root, kind), epoch=1)
    b = epoch_batches(loader(image_root, kind), epoch=1)
    assert all(torch.equal(x.images, y.images) and torch.equal(x.indices, y.indices)
               for x, y in zip(a, b))
    next_epoch = epoch_batches(loader(image_root, kind), epoch=2)
    assert [x.indices.tolist() for x in a] != [y.indices.tolist() for y in next_epoch]
    same, other = by_index(a), by_index(next_epoch)
    assert sum(torch.equal(same[i], other[i]) for i in same) < 3   # new crops for (nearly) all


@pytest.mark.parametrize("kind", KINDS)
def test_samples_independent_of_batch_size_and_threads(image_root, kind):
    """Batch size 7 on one thread and 12 on two threads/workers give the same image per index."""
    small = by_index(epoch_batches(loader(image_root, kind, batch_size=7), epoch=3))
    large = by_index(epoch_batches(loader(image_root, kind, batch_size=12, num_workers=2), 3))
    assert sorted(small) == sorted(large) == list(range(15))
    for i in small:
        assert torch.equal(small[i], large[i]), i


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_epoch_covers_dataset_once(image_root, kind, world):
    for train in (True, False):
        split = "train" if train else "val"
        seen, padded, lengths = [], 0, set()
        for rank in range(world):
            ld = loader(image_root, kind, split=split, train=train, batch_size=2, rank=rank,
                        world_size=world)
            batches = epoch_batches(ld, epoch=1)
            lengths.add(len(batches))
            seen += [i for b in batches for i in b.indices.tolist() if i >= 0]
            padded += sum(int((b.indices < 0).sum()) for b in batches)
        n = 15 if train else 5
        assert sorted(seen) == list(range(n)) and len(lengths) == 1
        assert padded == -(-n // world) * world - n


@pytest.mark.parametrize("kind", KINDS)
def test_resume_and_abandoned_epoch(image_root, kind):
    ld = loader(image_root, kind)
    full = epoch_batches(ld, epoch=4)
    resumed = epoch_batches(ld, epoch=4, start_batch=2)
    assert len(resumed) == len(full) - 2
    for x, y in zip(full[2:], resumed):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.images, y.images)
    ld.set_epoch(5)
    next(iter(ld))                          # leave epoch 5 after one batch
    again = epoch_batches(ld, epoch=4)
    assert all(torch.equal(x.images, y.images) for x, y in zip(full, again))
    assert epoch_batches(ld, epoch=4, start_batch=len(ld)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_bad_files_never_stop_a_run(image_root, kind):
    good, bad = make_bad_and_odd_files(image_root / "train" / "class_2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ld = loader(image_root, kind, batch_size=5)
    assert sum("cannot be decoded" in str(w.message) for w in caught) == 1
    batches = epoch_batches(ld)
    seen = {ld.index.paths[i].split("/")[-1] for b in batches for i in b.indices.tolist()}
    assert set(good) <= seen and not set(bad) & seen
    assert sum(len(b.indices) for b in batches) == 15 + len(good)
    assert all(torch.isfinite(b.images).all() for b in batches)
    evaluated = epoch_batches(loader(image_root, kind, train=False, batch_size=8))
    assert sum(len(b.indices) for b in evaluated) == 15 + len(good)


@pytest.mark.parametrize("kind", KINDS)
def test_mixup_cutmix_soft_targets(image_root, kind):
    kw = dict(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    batches = epoch_batches(loader(image_root, kind, **kw))
    for b in batches:
        assert b.labels.shape == (len(b.indices), 3) and b.labels.dtype == torch.float32
        torch.testing.assert_close(b.labels.sum(1), torch.ones(len(b.indices)))
        assert b.labels.min() >= 0.1 / 3 - 1e-6    # smoothing reaches every class
    again = epoch_batches(loader(image_root, kind, **kw))
    assert all(torch.equal(x.labels, y.labels) and torch.equal(x.images, y.images)
               for x, y in zip(batches, again))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("extra", [dict(auto_augment="rand-m9-mstd0.5-inc1"),
                                   dict(color_jitter=0.4), dict(reprob=1.0)])
def test_strong_augmentation_changes_images(image_root, kind, extra):
    plain = by_index(epoch_batches(loader(image_root, kind)))
    strong = by_index(epoch_batches(loader(image_root, kind, **extra)))
    assert sorted(plain) == sorted(strong)
    changed = sum(not torch.allclose(plain[i], strong[i], atol=1e-3) for i in plain)
    assert changed >= len(plain) // 2


@pytest.mark.parametrize("kind", KINDS)
def test_epochs_consumed_without_reaching_the_end_signal(image_root, kind):
    """The engine calls next() exactly len(loader) times; the next epoch must still be right."""
    ld, fresh = loader(image_root, kind), loader(image_root, kind)
    for epoch in range(3):
        ld.set_epoch(epoch)
        batches = iter(ld)
        taken = [next(batches) for _ in range(len(ld))]
        expected = epoch_batches(fresh, epoch)
        assert all(torch.equal(x.images, y.images) for x, y in zip(taken, expected))


# ------------------------------------------------------------------------------ broken files


@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
@pytest.mark.parametrize("damage", ["truncate", "text", "delete"])
def test_a_file_broken_after_indexing_is_replaced_counted_and_named(tmp_path, kind, damage):
    """Between epochs a file is truncated, overwritten with text or deleted: the run goes on,
    the sample is replaced by the next usable one (the same one each time: resume stays
    exact), and the replacement is reported by `take_replaced`."""
    from fastkd.config import load_config
    from fastkd.engine import train
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from run_helpers import make_image_folder, read_summary, write_config
    make_image_folder(tmp_path / "data")
    victim = tmp_path / "data" / "train" / "class1" / "3.jpg"
    config = load_config(write_config(tmp_path, data={"loader": kind}, train={"epochs": 2}))
    import fastkd.engine as engine
    original = engine._epoch_end

    def break_after_first_epoch(setup, state):
        row = original(setup, state)
        if row["epoch"] == 1:
            if damage == "truncate":
                victim.write_bytes(victim.read_bytes()[:200])
            elif damage == "text":
                victim.write_text("not an image any more\n" * 20)
            else:
                victim.unlink()
        return row
    engine._epoch_end = break_after_first_epoch
    try:
        result = train(config)
    finally:
        engine._epoch_end = original
    rows = read_summary(result.run_dir)
    assert [row["replaced_samples"] for row in rows] == ["0", "1"]
    assert "class1/3.jpg" in (result.run_dir / "log.txt").read_text()
