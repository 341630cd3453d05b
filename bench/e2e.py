"""`fastkd bench e2e`: a whole KD training step, fastkd against the conventional loop.

The same teacher/student pair, batch, image size, data and number of steps in every lane:

* `conventional`: the loop users run today (`bench/conventional.py`);
* `online`: fastkd's own training path, built by `fastkd.build.build_training` and stepped by
  `fastkd.engine.train_step` (DALI, channels_last, AMP, fused kernels on CUDA);
* `cached`: the same, with the teacher replayed from a teacher cache built first by
  `fastkd.cache.build_cache` (its one-off precompute time is reported, not counted).

The lanes run round-robin, `--steps` steps each in turn, so load from elsewhere hits them alike;
the first round is warm-up; img/s is the median over `--repeats` rounds. Per lane: img/s, the
share of time spent waiting for data, peak memory (GPU allocator, or the training process's
RSS on a CPU), the speed-up over the conventional loop, and the fraction of the compute floor
reached: forward+backward FLOPs per image (`torch.utils.flop_counter`) over a matmul rate
measured on the spot. `flop_ratio` = (3·F_student + F_teacher) / (3·F_student) is what a
teacher cache can save at best; the cached lane's speed-up over online is compared with it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from fastkd.bench.report import bar_chart, default_out, progress, write_report

IMAGENET_TRAIN = 1_281_167
ANCHOR = "OFA-KD (Hao840/OFAKD issue #2): over 100 h for a 100-epoch ImageNet run on 4×V100"
LANES = ("conventional", "online", "cached")


# ------------------------------------------------------------------------------ lanes


class EngineLane:
    """fastkd's training path: `build_training` once, then `engine.train_step` per batch."""

    def __init__(self, cfg):
        from fastkd.build import build_training
        from fastkd.checkpoint import TrainPosition
        from fastkd.distributed import init_world
        from fastkd.engine import RunState
        from fastkd.meters import LossSums
        self.setup = build_training(cfg, init_world(cfg.train.device))
        self.state = RunState(run_dir=None, position=TrainPosition(), epoch_sums=LossSums())
        self.params = self.setup.trainable_parameters
        self.kind = self.setup.train_loader.kind
        self.setup.model.train()

    def batches(self):
        epoch = 1
        while True:
            self.setup.train_loader.set_epoch(epoch)
            yield from self.setup.train_loader
            epoch += 1

    def step(self, batch) -> None:
        from fastkd.engine import train_step
        train_step(self.setup, self.state, batch, self.params)


def lane_config(args, root: Path, cache_dir: Path | None):
    from fastkd.config import Config, from_dict
    return from_dict(Config, {
        "data": {"root": str(root), "img_size": args.img_size, "num_workers": args.workers,
                 "crop_pct": 1.0},
        "model": {"name": args.student, "kwargs": args.student_kwargs},
        "teacher": {"name": args.teacher, "kwargs": args.teacher_kwargs},
        "distill": {"method": "kd"},
        "optim": {"opt": "sgd", "lr": 0.1},
        "train": {"batch_size": args.batch_size, "amp": args.amp, "device": args.device,
                  "epochs": 1000, "log_interval": 10**6},
        "cache": {"dir": None if cache_dir is None else str(cache_dir), "topk": 10,
                  "epochs": 1},
        "output": {"tensorboard": False}})


def build_lanes(args, root: Path, device: torch.device, amp_dtype) -> tuple[dict, dict]:
    """The chosen lanes, and what building them cost (the cache's precompute seconds)."""
    import warnings
    warnings.filterwarnings("ignore", message=".*random weights.*")
    lanes, costs = {}, {}
    if "conventional" in args.lanes:
        from fastkd.bench.conventional import ConventionalLoop
        lanes["conventional"] = ConventionalLoop(
            root, student=args.student, teacher=args.teacher, num_classes=args.classes,
            img_size=args.img_size, batch_size=args.batch_size, workers=args.workers,
            device=device, amp_dtype=amp_dtype, student_kwargs=args.student_kwargs,
            teacher_kwargs=args.teacher_kwargs)
    if "online" in args.lanes:
        lanes["online"] = EngineLane(lane_config(args, root, None))
    if "cached" in args.lanes:
        from fastkd.cache import build_cache
        cfg = lane_config(args, root, Path(args.out) / "teacher-cache")
        start = time.perf_counter()
        build_cache(cfg)
        costs["cached"] = time.perf_counter() - start
        lanes["cached"] = EngineLane(cfg)
    return lanes, costs


# ------------------------------------------------------------------------------ measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_memory_mb(device: torch.device) -> float:
    """Peak GPU allocation since the last reset, or this process's resident set now."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_round(lane, batches, steps: int, device: torch.device) -> dict:
    """`steps` steps of one lane: seconds, data-wait seconds and peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    waited, peak = 0.0, 0.0
    start = time.perf_counter()
    for _ in range(steps):
        fetch = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - fetch
        lane.step(batch)
        if device.type != "cuda":
            peak = max(peak, current_memory_mb(device))
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "wait": waited,
            "memory": current_memory_mb(device) if device.type == "cuda" else peak}


def measure(lanes: dict, args, device: torch.device) -> dict[str, list[dict]]:
    """Round-robin rounds; round 0 is warm-up and dropped."""
    streams = {name: lane.batches() for name, lane in lanes.items()}
    rounds: dict[str, list[dict]] = {name: [] for name in lanes}
    with progress((args.repeats + 1) * len(lanes), "e2e rounds") as bar:
        for round_no in range(args.repeats + 1):
            for name, lane in lanes.items():
                steps = args.warmup_steps if round_no == 0 else args.steps
                result = run_round(lane, streams[name], steps, device)
                if round_no > 0:
                    rounds[name].append(result)
                bar.update()
    return rounds


# ------------------------------------------------------------------------------ compute floor


def forward_flops(model: torch.nn.Module, x: torch.Tensor, backward: bool) -> float:
    """FLOPs of one forward (+ backward) per image, counted by `torch.utils.flop_counter`."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        if backward:
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / x.shape[0]


def compute_floor(args, device: torch.device, amp_dtype) -> dict:
    """FLOPs per image of each lane's step and the matmul rate measured here and now."""
    import timm
    x = torch.randn(2, 3, args.img_size, args.img_size)
    student = timm.create_model(args.student, num_classes=args.classes, **args.student_kwargs)
    teacher = timm.create_model(args.teacher, num_classes=args.classes, **args.teacher_kwargs)
    f_student = forward_flops(student.eval(), x, backward=False)
    fb_student = forward_flops(student.train(), x, backward=True)
    f_teacher = forward_flops(teacher.eval(), x, backward=False)
    return {"student_fwd_gflop": f_student / 1e9, "student_fwd_bwd_gflop": fb_student / 1e9,
            "teacher_fwd_gflop": f_teacher / 1e9,
            "flop_ratio": (3 * f_student + f_teacher) / (3 * f_student),
            "matmul_tflops": matmul_rate(device, amp_dtype) / 1e12}


def matmul_rate(device: torch.device, dtype) -> float:
    """FLOP/s of a square matmul in the training dtype, median of a few runs."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:])


# ------------------------------------------------------------------------------ report


def summarize(rounds: dict, costs: dict, floor: dict, args) -> list[dict]:
    rows = []
    for name, results in rounds.items():
        rates = [args.steps * args.batch_size / r["seconds"] for r in results]
        rows.append({"lane": name, "pair": f"{args.teacher} -> {args.student}",
                     "img_size": args.img_size, "batch": args.batch_size, "amp": args.amp,
                     "img/s (median)": statistics.median(rates), "min": min(rates),
                     "max": max(rates),
                     "data_wait": statistics.median(r["wait"] / r["seconds"] for r in results),
                     "peak_mem_mb": max(r["memory"] for r in results),
                     "precompute_s": costs.get(name)})
    base = next((r["img/s (median)"] for r in rows if r["lane"] == "conventional"), None)
    online = next((r["img/s (median)"] for r in rows if r["lane"] == "online"), None)
    for row in rows:
        flops = floor["student_fwd_bwd_gflop"] + (0 if row["lane"] == "cached"
                                                  else floor["teacher_fwd_gflop"])
        floor_rate = floor["matmul_tflops"] * 1e3 / flops
        row["vs conventional"] = row["img/s (median)"] / base if base else None
        row["of compute floor"] = row["img/s (median)"] / floor_rate
        if row["lane"] == "cached" and online:
            row["cached/online"] = row["img/s (median)"] / online
            row["of flop_ratio"] = row["cached/online"] / floor["flop_ratio"]
    return rows


def projection(rows: list[dict], gpus: int, device_name: str) -> str:
    """Wall time of a 100-epoch ImageNet-1k run at the measured img/s."""
    lines = [f"Projection, 100 epochs of ImageNet-1k ({IMAGENET_TRAIN:,} images) at the img/s "
             f"measured here ({device_name}); the {gpus}-GPU column assumes linear scaling over "
             f"data-parallel ranks (no communication or input bottleneck), an upper bound:", "",
             f"| lane | img/s | hours, this device | hours, {gpus} devices |", "|---|---|---|---|"]
    for row in rows:
        hours = 100 * IMAGENET_TRAIN / row["img/s (median)"] / 3600
        lines.append(f"| {row['lane']} | {row['img/s (median)']:.0f} | {hours:.1f} | "
                     f"{hours / gpus:.1f} |")
    lines += ["", f"Anchor: {ANCHOR}."]
    return "\n".join(lines)


def chart(path: Path, rows: list[dict], args) -> None:
    labels = [row["lane"] for row in rows]
    notes = [f"{row['vs conventional']:.2f}x" if row["vs conventional"] else "" for row in rows]
    bar_chart(path, labels, [row["img/s (median)"] for row in rows],
              title=f"KD step, {args.teacher} -> {args.student}, {args.img_size} px, "
                    f"batch {args.batch_size}, {args.amp}",
              ylabel="img/s (median)", annotations=notes)


# ------------------------------------------------------------------------------ command


def _kwargs(text: str) -> dict:
    import yaml
    return yaml.safe_load(text) or {}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd bench e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--teacher", default="resnet34")
    parser.add_argument("--student-kwargs", type=_kwargs, default={}, help="YAML dict for timm")
    parser.add_argument("--teacher-kwargs", type=_kwargs, default={}, help="YAML dict for timm")
    parser.add_argument("--img-size", type=int, default=None, help="224 on a GPU, 112 on a CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="256 on a GPU, 32 on a CPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per lane per round")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds")
    parser.add_argument("--images", type=int, default=1000, help="generated training images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="DataLoader workers = DALI threads (default: the usable cores)")
    parser.add_argument("--amp", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--lanes", default=",".join(LANES), help=f"from {','.join(LANES)}")
    parser.add_argument("--project", choices=("imagenet",), help="print a 100-epoch projection")
    parser.add_argument("--gpus", type=int, default=8, help="devices of the projected node")
    parser.add_argument("--data", default=os.path.join("~", ".cache", "fastkd", "bench-e2e"))
    parser.add_argument("--out", default=default_out("e2e"))
    return parser


def parse_args(argv) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    args.lanes = args.lanes.split(",")
    unknown = set(args.lanes) - set(LANES)
    if unknown:
        parser.error(f"unknown lanes {sorted(unknown)}")
    gpu = args.device != "cpu" and torch.cuda.is_available()
    args.device = "cuda" if gpu else "cpu"
    args.img_size = args.img_size or (224 if gpu else 112)
    args.batch_size = args.batch_size or (256 if gpu else 32)
    return args


def prepare_data(args) -> Path:
    """The generated ImageNet-like set of `fastkd bench loader`, plus a tiny val split (the
    engine's loaders want one; nothing here evaluates)."""
    from fastkd.bench.loader import generate_dataset
    root = generate_dataset(Path(os.path.expanduser(args.data)), args.images)
    val = root / "val"
    if not val.exists():
        for folder in sorted((root / "train").iterdir()):
            (val / folder.name).mkdir(parents=True)
            first = sorted(folder.iterdir())[0]
            os.link(first, val / folder.name / first.name)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fastkd.build import AMP_DTYPES
    device, amp_dtype = torch.device(args.device), AMP_DTYPES[args.amp]
    root = prepare_data(args)
    args.classes = len(list((root / "train").iterdir()))
    lanes, costs = build_lanes(args, root, device, amp_dtype)
    rounds = measure(lanes, args, device)
    floor = compute_floor(args, device, amp_dtype)
    rows = summarize(rounds, costs, floor, args)
    from fastkd.bench.report import environment
    notes = (f"Lanes round-robin, {args.steps} steps each per round, median of {args.repeats} "
             f"rounds after a warm-up round of {args.warmup_steps} steps. Random teacher weights "
             f"(speed does not depend on them). Loaders: "
             + ", ".join(f"{n}: {lane.kind}" for n, lane in lanes.items())
             + f". Compute floor: student fwd+bwd {floor['student_fwd_bwd_gflop']:.3f} GFLOP, "
             f"teacher fwd {floor['teacher_fwd_gflop']:.3f} GFLOP per image "
             f"(torch.utils.flop_counter), matmul rate {floor['matmul_tflops'] * 1e3:.1f} GFLOP/s "
             f"measured in this run; flop_ratio (3·F_s + F_t)/(3·F_s) = {floor['flop_ratio']:.3f}. "
             "peak_mem_mb: GPU allocator peak, or on a CPU the training process's RSS (the "
             "conventional lane's worker processes not included).")
    if args.project:
        notes += "\n\n" + projection(rows, args.gpus, environment()["device"])
    json_path, md_path = write_report("e2e", rows, args.out, notes=notes,
                                      chart=lambda path: chart(path, rows, args))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
