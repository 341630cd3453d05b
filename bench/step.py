"""`fastkd bench step`: where one KD training step's time goes.

On synthetic tensors already on the device (no loader), for each (method, teacher → student)
row, four cumulative variants of the step are timed, each the median of `--repeats` runs after
warm-up, and the parts are their differences:

1. `student`: the student's forward + backward on the ground truth alone;
2. `+ teacher`: plus the teacher's forward, as the method asks for it (logits, or the stage
   maps / pooled features of `Needs`);
3. `+ method`: the whole distiller instead (student, teacher, the method's projectors and
   losses, backward through all of it);
4. `+ optimizer`: plus the optimizer step.

Everything is built by `fastkd.build` (the models, the method, timm's optimizer) and runs in
the training dtype and memory format. This is the table that says what to optimise next.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastkd.bench.report import default_out, progress, stacked_chart, write_report

METHODS = ("kd", "dkd", "ofa", "scalekd")
PAIRS = ("resnet34:resnet18", "deit_tiny_patch16_224:resnet18",
         "swin_tiny_patch4_window7_224:resnet18")
PARTS = ("student", "teacher", "method", "optimizer")


def build_parts(method: str, teacher_name: str, student_name: str, args, device):
    """Student, teacher, distiller and optimizer of one row, built as a run builds them."""
    from fastkd.build import build_distiller, build_optimizer, build_student, build_teacher
    from fastkd.config import Config, from_dict
    cfg = from_dict(Config, {"model": {"name": student_name},
                             "teacher": {"name": teacher_name},
                             "distill": {"method": method},
                             "train": {"amp": args.amp, "batch_size": args.batch_size},
                             "data": {"img_size": args.img_size}})
    size = (3, args.img_size, args.img_size)
    student = build_student(cfg, args.classes)
    teacher = build_teacher(cfg, args.classes, student_mean_std=None, device=device)
    distiller = build_distiller(cfg, student, teacher, args.classes, input_size=size,
                                num_samples=args.batch_size).to(device)
    distiller.to(memory_format=torch.channels_last)
    return cfg, distiller, teacher, build_optimizer(cfg, distiller, 0.01)


def step_variants(distiller, teacher, optimizer, images, labels, amp_dtype) -> dict:
    """The four cumulative variants of the step, as callables."""
    needs = distiller.needs
    autocast = lambda: torch.autocast(images.device.type, dtype=amp_dtype,  # noqa: E731
                                      enabled=amp_dtype is not None)

    def teacher_forward():
        if needs.teacher_stages or needs.teacher_pooled:
            teacher.features(images, needs.teacher_stages, graph=needs.teacher_graph)
        else:
            teacher.logits(images)

    def student_only(with_teacher: bool = False):
        with autocast():
            loss = F.cross_entropy(distiller.student(images).float(), labels)
            if with_teacher:
                teacher_forward()
        loss.backward()

    def whole(with_optimizer: bool = False):
        with autocast():
            _, terms = distiller(images, labels, epoch=100.0,
                                 indices=torch.arange(len(labels), device=images.device))
        sum(t.float() for t in terms.values()).backward()
        if with_optimizer:
            optimizer.step()

    return {"student": student_only, "teacher": lambda: student_only(True),
            "method": whole, "optimizer": lambda: whole(True)}


def time_ms(fn, optimizer, repeats: int, device) -> float:
    times = []
    for i in range(repeats + 2):          # two warm-up runs
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def bench_rows(method: str, pair: str, args, device, amp_dtype) -> list[dict]:
    """One row per `--teacher-weights` variant: the teacher's weights as fastkd keeps them (in
    the AMP dtype, cast once) and, for comparison, in fp32 (cast by autocast at every call)."""
    teacher_name, student_name = pair.split(":")
    cfg, distiller, teacher, optimizer = build_parts(method, teacher_name, student_name, args,
                                                     device)
    rows = []
    for weights in args.teacher_weights.split(","):
        if weights == "fp32":
            teacher.model.float()
        rows.append(bench_row(distiller, teacher, optimizer, method, pair, weights, args,
                              device, amp_dtype))
    return rows


def bench_row(distiller, teacher, optimizer, method: str, pair: str, weights: str, args, device,
              amp_dtype) -> dict:
    teacher_name, student_name = pair.split(":")
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    images = images.to(amp_dtype or torch.float32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    distiller.train()
    cumulative = {name: time_ms(fn, optimizer, args.repeats, device)
                  for name, fn in step_variants(distiller, teacher, optimizer, images, labels,
                                                amp_dtype).items()}
    parts, previous = {}, 0.0
    for name in PARTS:
        parts[f"{name}_ms"] = max(cumulative[name] - previous, 0.0)
        previous = cumulative[name]
    return {"method": method, "pair": f"{teacher_name} -> {student_name}",
            "teacher_weights": weights,
            "config": f"{args.img_size} px, batch {args.batch_size}, {args.amp}, channels_last",
            **parts, "step_ms": cumulative["optimizer"],
            "img/s": 1e3 * args.batch_size / cumulative["optimizer"]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pairs", default=",".join(PAIRS), help="teacher:student, comma-separated")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="128 on a GPU, 4 on a CPU")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=None, help="20 on a GPU, 3 on a CPU")
    parser.add_argument("--amp", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--teacher-weights", default="amp",
                        help="amp (cast once, as fastkd runs) and/or fp32 (cast by autocast at "
                             "every call, as before), e.g. amp,fp32 for a side-by-side")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=default_out("step"))
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings
    from fastkd.build import AMP_DTYPES
    args = _parser().parse_args(argv)
    gpu = args.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    args.batch_size = args.batch_size or (128 if gpu else 4)
    args.repeats = args.repeats or (20 if gpu else 3)
    warnings.filterwarnings("ignore", message=".*random weights.*")
    rows = []
    combos = [(m, p) for p in args.pairs.split(",") for m in args.methods.split(",")]
    with progress(len(combos), "step rows") as bar:
        for method, pair in combos:
            rows += bench_rows(method, pair, args, device, AMP_DTYPES[args.amp])
            bar.update()
    notes = ("Synthetic on-device tensors, random weights. Cumulative variants timed separately "
             "(median of the repeats after two warm-up runs); each part is the difference to the "
             "previous variant: student fwd+bwd, + teacher forward, + the method's projectors and "
             "losses, + optimizer step.")
    labels = [f"{r['method']} {r['pair'].split(' -> ')[0].split('_')[0]} {r['teacher_weights']}"
              for r in rows]
    write_report("step", rows, args.out, notes=notes, chart=lambda path: stacked_chart(
        path, labels, {part: [r[f"{part}_ms"] for r in rows] for part in PARTS},
        title=f"where a KD step's time goes ({rows[0]['config']}, {device.type})",
        ylabel="ms per step"))
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
