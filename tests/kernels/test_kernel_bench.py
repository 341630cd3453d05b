"""`fastkd bench kernels` (bench/kernels.py): refuses to run without a GPU, and on a GPU writes
one row per (loss, shape, dtype, provider)."""
from __future__ import annotations

import json

import pytest
import torch

from fastkd.bench import kernels as bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_without_cuda_it_says_so_and_returns_2(capsys, tmp_path):
    assert bench.main(["--out", str(tmp_path), "--repeats", "2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_unknown_options_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtypes", "fp8"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--providers", "eager,apex"])


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_run_writes_every_row(tmp_path):
    assert bench.main(["--out", str(tmp_path), "--repeats", "2", "--dtypes", "bf16",
                       "--providers", "eager,fused"]) == 0
    report = tmp_path / "results.json"
    assert (tmp_path / "kernels.png").is_file()
    rows = json.loads(report.read_text())["rows"]
    scenarios = len(bench.LOGIT_SHAPES) * 5 + len(bench.MAP_SHAPES) * len(bench.MAP_PASSES)
    assert len(rows) == 2 * scenarios
    fused_maps = [row for row in rows if row["provider"] == "fused" and "gb_per_s" in row]
    assert len(fused_maps) == len(bench.MAP_SHAPES) * len(bench.MAP_PASSES)
    assert all(row["fwd_bwd_ms"] > 0 and row["gb_per_s"] > 0 for row in fused_maps)
