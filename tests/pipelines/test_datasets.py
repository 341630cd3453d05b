import os
import warnings

import numpy as np
import pytest
from PIL import Image

from fastkd.pipelines import datasets
from fastkd.pipelines.datasets import DataError, load_index
from fastkd.pipelines.image_probe import probe_image
from pipelines_imagegen import make_bad_and_odd_files, make_image_folder


def test_image_folder_index(image_root):
    index = load_index(str(image_root), "train")
    assert index.classes == ["class_0", "class_1", "class_2"]
    assert len(index) == 15 and index.labels.tolist() == sorted(index.labels.tolist())
    for i in range(len(index)):
        with Image.open(index.full_path(i)) as img:
            assert (img.height, img.width) == (index.heights[i], index.widths[i])
        assert index.paths[i].startswith(index.classes[index.labels[i]] + os.sep)
    assert index.bad_files == []


def test_file_list_index_and_refusals(image_root):
    (image_root / "train.txt").write_text("train/class_1/img_0.JPEG 4\n# comment\n\n"
                                          "train/class_0/img_3.JPEG 0\n")
    index = load_index(str(image_root), "train.txt")
    assert index.paths == [os.path.join("train", "class_1", "img_0.JPEG"),
                           os.path.join("train", "class_0", "img_3.JPEG")]
    assert index.labels.tolist() == [4, 0] and len(index.classes) == 5
    for bad_line in ["../outside.JPEG 0", "/etc/hostname 0", "train/../../x.JPEG 1"]:
        (image_root / "bad.txt").write_text(bad_line + "\n")
        with pytest.raises(DataError, match="outside the data root"):
            load_index(str(image_root), "bad.txt", use_cache=False)
    (image_root / "bad.txt").write_text("train/class_0/img_0.JPEG cat\n")
    with pytest.raises(DataError, match="relative/path label"):
        load_index(str(image_root), "bad.txt", use_cache=False)


def test_missing_file_in_list_is_excluded(image_root):
    (image_root / "val.txt").write_text("val/class_1/img_0.JPEG 1\nval/class_1/gone.JPEG 1\n")
    index = load_index(str(image_root), "val.txt")
    assert len(index) == 1 and [p for p, _ in index.bad_files] == [os.path.join("val", "class_1",
                                                                                 "gone.JPEG")]
    (image_root / "val" / "class_1" / "img_0.JPEG").rename(image_root / "val" / "class_1" /
                                                           "gone.JPEG")
    index = load_index(str(image_root), "val.txt")   # the folder changed: rebuilt, not cached
    assert [os.path.basename(p) for p in index.paths] == ["gone.JPEG"]


def test_index_is_cached_and_rebuilt_on_change(image_root, monkeypatch):
    first = load_index(str(image_root), "train")
    assert any((image_root / ".fastkd-index").iterdir())

    def no_probe(*args, **kwargs):
        raise AssertionError("the cached index should have been used")
    monkeypatch.setattr(datasets, "probe_image", no_probe)
    cached = load_index(str(image_root), "train")
    assert cached.paths == first.paths and np.array_equal(cached.heights, first.heights)
    monkeypatch.undo()
    make_image_folder(image_root, "train", classes=1, per_class=6, seed=9)  # rewrites class_0
    (image_root / "train" / "class_2" / "img_4.JPEG").unlink()
    rebuilt = load_index(str(image_root), "train")
    assert len(rebuilt) == 15 + 1 - 1


def test_index_dir_used_when_given(image_root, tmp_path):
    index_dir = tmp_path / "idx"
    load_index(str(image_root), "val", index_dir=str(index_dir))
    assert len(list(index_dir.glob("*.npz"))) == 1
    assert not (image_root / ".fastkd-index").exists()


def test_read_only_data_folder_falls_back(image_root, tmp_path, monkeypatch):
    """A data folder we may not write to: the index goes to ~/.cache/fastkd/index instead
    (simulated, since tests may run as root, for whom chmod does not forbid writing)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real_save = datasets._save

    def save_refusing_data_folder(path, *args):
        if str(path).startswith(str(image_root)):
            raise PermissionError(13, "Permission denied", str(path))
        real_save(path, *args)
    monkeypatch.setattr(datasets, "_save", save_refusing_data_folder)
    index = load_index(str(image_root), "val")
    assert len(index) == 5 and not (image_root / ".fastkd-index").exists()
    assert list((tmp_path / "home" / ".cache" / "fastkd" / "index").glob("*.npz"))


def test_probe_classifies_bad_and_odd_files(tmp_path):
    good, bad = make_bad_and_odd_files(tmp_path / "c")
    for name in good:
        probe = probe_image(str(tmp_path / "c" / name))
        assert probe.problem is None and (probe.height, probe.width) == (40, 52), name
    for name in bad:
        assert probe_image(str(tmp_path / "c" / name)).problem, name


def test_bad_files_excluded_and_warned_once(image_root):
    good, bad = make_bad_and_odd_files(image_root / "train" / "class_1")
    index = load_index(str(image_root), "train")
    names = {os.path.basename(p) for p in index.paths}
    assert set(good) <= names and not set(bad) & names
    assert len(index) == 15 + len(good)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index.warn_bad_files()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("3 file(s)")
    assert all(os.path.join("class_1", name) in message for name in bad)


@pytest.mark.parametrize("problem", ["missing_root", "missing_split", "no_classes",
                                     "empty_class", "only_bad_files", "empty_list"])
def test_unusable_splits_raise_clear_errors(tmp_path, problem):
    root = tmp_path / "data"
    if problem != "missing_root":
        make_image_folder(root, "train", classes=2, per_class=1)
    split = "train"
    if problem == "missing_split":
        split = "val"
    elif problem == "no_classes":
        (root / "empty_split").mkdir()
        split = "empty_split"
    elif problem == "empty_class":
        (root / "train" / "class_9").mkdir()
    elif problem == "only_bad_files":
        (root / "train" / "class_9").mkdir()
        (root / "train" / "class_9" / "x.JPEG").write_bytes(b"")
    elif problem == "empty_list":
        (root / "l.txt").write_text("\n")
        split = "l.txt"
    with pytest.raises(DataError) as err:
        load_index(str(root), split)
    assert str(root) in str(err.value) or "class_9" in str(err.value) or "l.txt" in str(err.value)


def test_a_file_changed_after_indexing_is_probed_again(tmp_path):
    """Rewritten in place, a file changes no directory mtime: the cached index notices it by
    its size and mtime, probes it again and drops it when it no longer decodes."""
    import os
    from fastkd.pipelines.datasets import load_index
    root = tmp_path / "data"
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 16), (40 * c, 10, 10)).save(root / "train" / f"c{c}" / f"{i}.png")
    first = load_index(str(root), "train")
    assert len(first) == 6 and not first.bad_files
    victim = root / "train" / "c1" / "2.png"
    stamp = os.stat(victim.parent).st_mtime_ns
    victim.write_text("no longer an image")
    os.utime(victim.parent, ns=(stamp, stamp))              # the folder looks untouched
    second = load_index(str(root), "train")
    assert len(second) == 5 and second.bad_files[-1][0] == "c1/2.png"
    assert "changed since indexing" in second.bad_files[-1][1]
    assert len(load_index(str(root), "train")) == 5          # the updated index was cached
    assert len(load_index(str(root), "train", rebuild=True)) == 5
