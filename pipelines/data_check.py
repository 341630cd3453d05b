"""`fastkd data check ROOT`: what a training run would see in a data root, without training.

It builds (or reuses) the same index the loaders use, so it reports exactly the files a run
would exclude. Exit statuses:

* 0: every split found is usable and clean;
* 1: usable, but some files are excluded (listed, with the reason for each);
* 2: unusable: the root or a split is missing, empty, has an empty class folder, or a file
  list points outside the root.
"""
from __future__ import annotations

import argparse
import os

from .datasets import DataError, load_index

EXIT_CLEAN, EXIT_EXCLUDED, EXIT_UNUSABLE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd data check",
        description="Index a data root the way training does and report unusable files. "
                    "Exit status: 0 clean, 1 usable with excluded files, 2 unusable.")
    parser.add_argument("root", help="data root (ImageFolder splits or *.txt file lists)")
    parser.add_argument("--splits", nargs="+", default=None,
                        help="splits to check (default: train and val where present)")
    parser.add_argument("--index-dir", default=None, help="where to cache the index")
    parser.add_argument("--full", action="store_true",
                        help="also decode every image (slow; catches corrupt pixel data)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rebuild", action="store_true",
                        help="probe every file again and replace the cached index")
    return parser


def _default_splits(root: str) -> list[str]:
    found = [s for s in ("train", "val", "train.txt", "val.txt")
             if os.path.exists(os.path.join(root, s))]
    return found or ["."]


def check_split(root: str, split: str, args) -> int:
    try:
        index = load_index(root, split, index_dir=args.index_dir, workers=args.workers,
                           full_check=args.full, rebuild=args.rebuild)
    except (DataError, OSError) as err:
        print(f"[{split}] UNUSABLE: {err}")
        return EXIT_UNUSABLE
    print(f"[{split}] {len(index)} usable images in {len(index.classes)} classes "
          f"({index.base})")
    if not index.bad_files:
        return EXIT_CLEAN
    print(index.bad_files_message(limit=None))
    return EXIT_EXCLUDED


def data_check_main(argv: list[str]) -> int:
    """Print the report for `fastkd data check ROOT [...]`; returns the exit status above."""
    args = _parser().parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"UNUSABLE: data root {args.root!r} is not a directory")
        return EXIT_UNUSABLE
    return max(check_split(args.root, split, args) for split in (args.splits or _default_splits(args.root)))
