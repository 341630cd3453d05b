"""One writer for every `fastkd bench` scenario: a JSON file and a markdown table side by side.

Each scenario builds identical inputs for every provider and returns rows (dicts with the same
keys); this module stamps them with the device, the command and the date so a recorded figure
in `bench/results/` always says where and how it was obtained.
"""
from __future__ import annotations

import datetime as _dt
import json
import shlex
import sys
from pathlib import Path

import torch


def environment() -> dict:
    """What a figure depends on: the device, the library versions (the same record as a run's
    env.json), the command line and the date."""
    from fastkd.rundir import software_record
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            **software_record(device),
            "command": shlex.join(["fastkd", *sys.argv[1:]]) if sys.argv else ""}


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a GitHub markdown table; floats with 4 significant digits."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def default_out(name: str) -> str:
    """Where a scenario writes unless `--out` says otherwise (figures worth keeping are copied
    to the repository's `bench/results/` with the device and the date)."""
    return str(Path("runs") / "bench" / name)


def write_report(name: str, rows: list[dict], out_dir: str | Path, *, notes: str = "",
                 columns: list[str] | None = None, chart=None) -> tuple[Path, Path]:
    """Write `<out_dir>/results.json` and `results.md`, and `<out_dir>/<name>.png` when `chart`
    (a function of the PNG path) is given; returns the JSON and markdown paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps({"scenario": name, "environment": env, "rows": rows}, indent=2))
    picture = ""
    if chart is not None:
        chart(out_dir / f"{name}.png")
        picture = f"![{name}]({name}.png)\n\n"
    header = (f"# fastkd bench {name}\n\n* date: {env['date']}\n* device: {env['device']}\n"
              f"* command: `{env['command']}`\n* torch {env['torch']}, timm {env['timm']}, "
              f"triton {env['triton']}, DALI {env['dali']}\n\n")
    md_path.write_text(header + (notes + "\n\n" if notes else "") + picture
                       + markdown_table(rows, columns))
    return json_path, md_path


def _figure(title: str, ylabel: str, count: int):
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(max(5.0, 1.2 * count + 2), 4.2))
    axes.set_title(title, fontsize=10)
    axes.set_ylabel(ylabel)
    return plt, figure, axes


def bar_chart(path: Path, labels: list[str], values: list[float], *, title: str, ylabel: str,
              annotations: list[str] | None = None) -> None:
    """One bar per label, its annotation (e.g. the speed-up) written on it."""
    plt, figure, axes = _figure(title, ylabel, len(labels))
    bars = axes.bar(range(len(labels)), values, color="#4c72b0")
    axes.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
    for bar, text in zip(bars, annotations or []):
        axes.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=9, fontweight="bold")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def stacked_chart(path: Path, labels: list[str], parts: dict[str, list[float]], *, title: str,
                  ylabel: str) -> None:
    """One stacked bar per label, one colour per part."""
    plt, figure, axes = _figure(title, ylabel, len(labels))
    bottom = [0.0] * len(labels)
    for part, values in parts.items():
        axes.bar(range(len(labels)), values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def progress(total: int, desc: str):
    """The progress bar every scenario shows while it runs."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)
