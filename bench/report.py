"""One writer for every `fastkd bench` scenario: a JSON file and a markdown table side by side.

Each scenario builds identical inputs for every provider and returns rows (dicts with the same
keys); this module stamps them with the device, the command and the date so a recorded figure
in `bench/results/` always says where and how it was obtained.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

import torch


def environment() -> dict:
    """What a figure depends on: the device, the library versions, the command line."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(["fastkd", *sys.argv[1:]]) if sys.argv else "",
    }
    for module in ("timm", "triton", "nvidia.dali"):
        try:
            env[module] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            env[module] = None
    return env


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a GitHub markdown table; floats with 4 significant digits."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0].keys())

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(name: str, rows: list[dict], out_dir: str | Path, *, notes: str = "",
                 columns: list[str] | None = None) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>-<date>.json` and `.md`; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    stem = f"{name}-{env['date'][:10]}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({"scenario": name, "environment": env, "rows": rows}, indent=2))
    header = (f"# fastkd bench {name}\n\n* date: {env['date']}\n* device: {env['device']}\n"
              f"* command: `{env['command']}`\n* torch {env['torch']}, timm {env['timm']}, "
              f"triton {env['triton']}, DALI {env['nvidia.dali']}\n\n")
    md_path.write_text(header + (notes + "\n\n" if notes else "") + markdown_table(rows, columns))
    return json_path, md_path
