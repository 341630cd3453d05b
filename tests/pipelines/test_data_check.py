import os

from fastkd.pipelines import data_check_main
from pipelines_imagegen import make_bad_and_odd_files


def test_clean_root_exits_0(image_root, capsys):
    assert data_check_main([str(image_root)]) == 0
    out = capsys.readouterr().out
    assert "[train] 15 usable images in 3 classes" in out and "[val] 5 usable" in out


def test_excluded_files_exit_1_and_are_all_listed(image_root, capsys):
    _, bad = make_bad_and_odd_files(image_root / "val" / "class_2")
    assert data_check_main([str(image_root), "--splits", "val"]) == 1
    out = capsys.readouterr().out
    assert "3 file(s)" in out
    assert all(os.path.join("class_2", name) in out for name in bad)


def test_unusable_root_exits_2(image_root, tmp_path, capsys):
    assert data_check_main([str(tmp_path / "nowhere")]) == 2
    (image_root / "train" / "class_7").mkdir()
    assert data_check_main([str(image_root)]) == 2
    assert "class_7" in capsys.readouterr().out
