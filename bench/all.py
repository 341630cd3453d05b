"""`fastkd bench all`: every scenario at settings that fit the device, one folder each.

On a CPU the settings are small enough for the whole suite to finish in about a quarter of an
hour on two cores; on a GPU they are the recorded settings (224 px, ImageNet-sized batches).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastkd.bench.report import default_out

# scenario -> (CPU arguments, GPU arguments)
SETTINGS = {
    "loader": (["--images", "256", "--epochs", "2", "--batch-size", "32", "--img-size", "112"],
               ["--images", "2000", "--epochs", "3", "--batch-size", "256"]),
    "kernels": (None, ["--repeats", "20"]),
    "e2e": (["--steps", "6", "--repeats", "3", "--images", "400"],
            ["--steps", "20", "--repeats", "3", "--images", "4000", "--project", "imagenet"]),
    "step": (["--batch-size", "4", "--repeats", "2"], ["--repeats", "20"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd bench all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=default_out("all"))
    args = parser.parse_args(argv)
    gpu = args.device != "cpu" and torch.cuda.is_available()
    failed = []
    for scenario, (cpu, on_gpu) in SETTINGS.items():
        settings = on_gpu if gpu else cpu
        if settings is None:
            print(f"fastkd bench all: {scenario} needs a CUDA GPU; skipped")
            continue
        device = [] if scenario in ("loader", "kernels") else ["--device", "cuda" if gpu else "cpu"]
        module = __import__(f"fastkd.bench.{scenario}", fromlist=["main"])
        print(f"\n=== fastkd bench {scenario} ===", flush=True)
        status = module.main(settings + device + ["--out", str(Path(args.out) / scenario)])
        if status:
            failed.append(scenario)
    if failed:
        print(f"fastkd bench all: failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
