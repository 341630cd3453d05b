"""`fastkd bench kernels`: the fused loss kernels against eager and `torch.compile`d eager.

Every scenario builds one set of inputs and times forward + backward of each provider on it,
side by side: "eager" (the `fastkd.losses` reference, `FASTKD_KERNELS=eager`), "compiled"
(`torch.compile` of that reference) and "fused" (`fastkd.kernels.FUSED`). Times are medians of
`--repeats` runs measured with CUDA events after warm-up; memory is the peak allocated during
one forward + backward above what was allocated before it. For the feature-map losses the fused
row also gives the bytes the kernels must move, the GB/s that makes, and the GB/s of a
`clone()` of one map measured in the same run (a copy reads and writes each byte once).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path
from typing import Callable

import torch

from fastkd import losses
from fastkd.bench.report import bar_chart, default_out, write_report
from fastkd.losses import eager_only

LOGIT_SHAPES = [(256, 1000), (1024, 1000), (256, 21843)]
MAP_SHAPES = [(256, 768, 7, 7), (256, 384, 14, 14)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("eager", "compiled", "fused")
TOPK = 10
# map-sized transfers per forward + backward of the fused kernels (student and teacher read in
# each pass, the gradient written once): one forward pass, or two in channel mode
MAP_PASSES = {"feature_mimic": 5, "freq_spatial": 5, "freq_channel": 7}


Scenarios = dict[str, tuple[Callable, Callable, tuple]]  # name -> (eager, fused, args after student)


def _logit_scenarios(shape: tuple, dtype: torch.dtype) -> Scenarios:
    """Every logit loss on one set of inputs (the student is made by the caller)."""
    from fastkd.kernels import FUSED
    teacher = torch.randn(shape, device="cuda").to(dtype) * 3
    target = torch.randint(0, shape[1], (shape[0],), device="cuda")
    cached = losses.topk_from_logits(teacher, TOPK)
    return {
        "kd": (losses.kd_loss, FUSED["kd"], (teacher, 4.0)),
        f"kd_top{TOPK}": (losses.kd_loss, FUSED["kd"], (cached, 1.0)),
        "dkd": (losses.dkd_loss, FUSED["dkd"], (teacher, target, 1.0, 8.0, 4.0)),
        "nkd": (losses.nkd_loss, FUSED["nkd"], (teacher, target, 1.0, 1.5)),
        "ofa": (losses.ofa_loss, FUSED["ofa"], (teacher, target, 1.5, 1.0)),
    }


def _map_scenarios(shape: tuple, dtype: torch.dtype) -> Scenarios:
    """Every feature-map loss on one set of inputs."""
    from fastkd.kernels import FUSED
    teacher = torch.randn(shape, device="cuda").to(dtype)
    return {
        "feature_mimic": (losses.feature_mimic_loss, FUSED["feature_mimic"], (teacher,)),
        "freq_spatial": (losses.freq_decoupled_loss, FUSED["freq_decoupled"],
                         (teacher, 0.03, 0.065, "spatial")),
        "freq_channel": (losses.freq_decoupled_loss, FUSED["freq_decoupled"],
                         (teacher, 0.003, 0.0065, "channel")),
    }


def _forward_backward(loss_fn: Callable, student: torch.Tensor, args: tuple) -> None:
    student.grad = None
    loss_fn(student, *args).backward()


def time_forward_backward(loss_fn: Callable, student: torch.Tensor, args: tuple,
                          repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of forward + backward, CUDA events around each run."""
    for _ in range(warmup):
        _forward_backward(loss_fn, student, args)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        student.grad = None
        start.record()
        loss_fn(student, *args).backward()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak_memory_mb(loss_fn: Callable, student: torch.Tensor, args: tuple) -> float:
    """Peak allocation of one forward + backward above the allocation before it, in MB."""
    student.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _forward_backward(loss_fn, student, args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth_gbs(x: torch.Tensor, repeats: int) -> float:
    """GB/s of `x.clone()` (reads and writes every byte once): the achievable streaming rate."""
    for _ in range(3):
        x.clone()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        x.clone()
        end.record()
    torch.cuda.synchronize()
    ms = statistics.median(start.elapsed_time(end) for start, end in events)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def _providers(eager: Callable, fused: Callable, names: list[str]) -> dict[str, Callable]:
    """The loss callables to compare. Dynamo's caches are reset before compiling: they are kept
    per code object, and across scenarios one loss would pass the recompile limit and silently
    run eager."""
    providers = {}
    for name in names:
        if name == "compiled":
            torch._dynamo.reset()
            providers[name] = torch.compile(eager, dynamic=False)
        else:
            providers[name] = eager if name == "eager" else fused
    return providers


def bench_scenario(name: str, eager: Callable, fused: Callable, student: torch.Tensor,
                   args: tuple, repeats: int, providers: list[str]) -> list[dict]:
    """One row per provider for one loss on one set of inputs."""
    rows = []
    for provider, loss_fn in _providers(eager, fused, providers).items():
        context = contextlib.nullcontext() if provider == "fused" else eager_only()
        with context:
            ms = time_forward_backward(loss_fn, student, args, repeats)
            memory = peak_memory_mb(loss_fn, student, args)
        rows.append({"loss": name, "shape": "x".join(map(str, student.shape)),
                     "dtype": str(student.dtype).removeprefix("torch."), "provider": provider,
                     "fwd_bwd_ms": ms, "peak_mem_mb": memory})
    eager_ms = next((row["fwd_bwd_ms"] for row in rows if row["provider"] == "eager"), None)
    for row in rows:
        row["speedup_vs_eager"] = eager_ms / row["fwd_bwd_ms"] if eager_ms else None
    return rows


def _add_bandwidth(rows: list[dict], student: torch.Tensor, repeats: int) -> None:
    """Bytes moved, GB/s and the share of copy bandwidth, on the fused row."""
    copy_gbs = copy_bandwidth_gbs(student, repeats)
    map_bytes = student.numel() * student.element_size()
    for row in rows:
        if row["provider"] == "fused":
            moved = MAP_PASSES[row["loss"]] * map_bytes
            row["bytes_moved_mb"] = moved / 2**20
            row["gb_per_s"] = moved / row["fwd_bwd_ms"] / 1e6
            row["copy_gb_per_s"] = copy_gbs
            row["pct_of_copy"] = 100 * row["gb_per_s"] / copy_gbs


def run(dtypes: list[torch.dtype], repeats: int, providers: list[str]) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for shape in LOGIT_SHAPES:
            student = (torch.randn(shape, device="cuda") * 3).to(dtype).requires_grad_()
            for name, (eager, fused, args) in _logit_scenarios(shape, dtype).items():
                rows += bench_scenario(name, eager, fused, student, args, repeats, providers)
        for shape in MAP_SHAPES:
            student = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
            for name, (eager, fused, args) in _map_scenarios(shape, dtype).items():
                scenario_rows = bench_scenario(name, eager, fused, student, args, repeats,
                                               providers)
                _add_bandwidth(scenario_rows, student.detach(), repeats)
                rows += scenario_rows
    return rows


def _chart(path: Path, rows: list[dict]) -> None:
    """The fused kernels' speed-up over eager, one bar per (loss, shape, dtype)."""
    fused = [row for row in rows if row["provider"] == "fused" and row["speedup_vs_eager"]]
    bar_chart(path, [f"{r['loss']} {r['shape']} {r['dtype']}" for r in fused],
              [r["speedup_vs_eager"] for r in fused], title="fused kernel vs eager, fwd+bwd",
              ylabel="speed-up (x)", annotations=[f"{r['speedup_vs_eager']:.1f}x" for r in fused])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastkd bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out("kernels"), help="results folder")
    parser.add_argument("--dtypes", default="fp32,bf16",
                        help=f"comma-separated, from {','.join(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per provider")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated, from " + ",".join(PROVIDERS)
                        + " (compiling takes seconds per scenario)")
    args = parser.parse_args(argv)
    for option, known in (("dtypes", DTYPES), ("providers", PROVIDERS)):
        unknown = set(getattr(args, option).split(",")) - set(known)
        if unknown:
            parser.error(f"unknown {option} {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("fastkd bench kernels: needs a CUDA GPU (the kernels' timings mean nothing on the "
              "Triton interpreter); nothing measured.")
        return 2
    rows = run([DTYPES[name] for name in args.dtypes.split(",")], args.repeats,
               args.providers.split(","))
    notes = (f"Forward + backward, median of {args.repeats} runs (CUDA events); peak_mem_mb is "
             "the peak allocation of one forward + backward above what was allocated before. "
             f"kd_top{TOPK}: teacher given as a top-{TOPK} cache (eager rebuilds B×K logits). "
             "bytes_moved_mb counts map-sized transfers of the fused kernels "
             f"({MAP_PASSES}); copy_gb_per_s is a clone() of one student map.")
    json_path, md_path = write_report("kernels", rows, args.out, notes=notes,
                                      chart=lambda path: _chart(path, rows))
    print(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
