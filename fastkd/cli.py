"""`fastkd`: a thin command line. Each verb parses its arguments, builds a Config and calls
the engine (or another module's `main(argv)`); no training logic lives here.

    fastkd train CONFIG [key=value ...] [--resume RUN_DIR]
    fastkd train --resume RUN_DIR [key=value ...]
    fastkd eval CONFIG|RUN_DIR [key=value ...] [--checkpoint PATH|last|best]
    fastkd export RUN_DIR [--ema] [--checkpoint last|best|PATH]
    fastkd methods
    fastkd data check ROOT [...]
    fastkd cache build|verify|info [...]
    fastkd bench loader|kernels|e2e|step|all [...]
    fastkd demo [...]

A config mistake (ConfigError), an unsupported student/teacher pairing (UnsupportedPair), a
teacher head of the wrong size (TeacherHeadMismatch) or unusable data (DataError) prints one
message on stderr and exits with status 2, no traceback. A run stopped by non-finite losses
exits with 1, a run stopped by SIGTERM (checkpoint written) with 143, as the signal would.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fastkd

EXIT_USAGE, EXIT_FAILED, EXIT_PREEMPTED = 2, 1, 143
BENCHES = ("loader", "kernels", "e2e", "step", "all")


def _user_errors() -> tuple[type[BaseException], ...]:
    from fastkd.cache import CacheError
    from fastkd.checkpoint import DiskFull
    from fastkd.config import ConfigError
    from fastkd.distillers import UnsupportedPair
    from fastkd.pipelines import DataError
    from fastkd.weight_files import WeightFileError   # includes TeacherHeadMismatch
    return (ConfigError, CacheError, UnsupportedPair, WeightFileError, DataError,
            FileNotFoundError, DiskFull)


def _run_stopped() -> tuple[type[BaseException], ...]:
    from fastkd.engine import NonFiniteLoss
    return (NonFiniteLoss,)


def _split_config_and_overrides(positionals: list[str]) -> tuple[str | None, list[str]]:
    """`CONFIG key=value ...` or only `key=value ...` (with --resume): the first positional is
    the config file unless it looks like an override and is not a file."""
    if positionals and not ("=" in positionals[0] and not Path(positionals[0]).is_file()):
        return positionals[0], positionals[1:]
    return None, positionals


# ------------------------------------------------------------------------------ verbs


def cmd_train(args: argparse.Namespace) -> int:
    from fastkd.config import ConfigError, load_config
    from fastkd.distributed import is_primary_process
    from fastkd.engine import train
    config, overrides = _split_config_and_overrides(args.args)
    if config is None and args.resume is None:
        raise ConfigError("fastkd train: give a CONFIG file (or --resume RUN_DIR)")
    if config is None:   # resume with the run's own config
        config = str(Path(args.resume) / "config.yaml")
    result = train(load_config(config, overrides), resume=args.resume)
    if result.preempted:
        return EXIT_PREEMPTED
    if not is_primary_process():
        return 0
    top1 = "-" if result.final_top1 is None else f"{result.final_top1:.2f}%"
    print(f"done: {result.run_dir} (final top-1 {top1}, {result.img_per_sec:.0f} img/s)")
    if result.warning:
        print(f"fastkd: warning: {result.warning}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _run_checkpoint(run_dir: Path, choice: str | None) -> Path:
    if choice in (None, "last", "best"):
        return run_dir / f"{choice or 'last'}.pt"
    return Path(choice)


def cmd_eval(args: argparse.Namespace) -> int:
    from fastkd.config import load_config
    from fastkd.distributed import is_primary_process
    from fastkd.engine import evaluate_config
    target = Path(args.target)
    if target.is_dir():
        cfg = load_config(target / "config.yaml", args.overrides)
        checkpoint = _run_checkpoint(target, args.checkpoint)
    else:
        cfg = load_config(target, args.overrides)
        checkpoint = None if args.checkpoint is None else Path(args.checkpoint)
    if checkpoint is not None and not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    results = evaluate_config(cfg, checkpoint)
    if not is_primary_process():
        return 0
    for name in ("eval", "ema"):
        if f"{name}_top1" in results:
            label = "student" if name == "eval" else "ema"
            print(f"{label}: top-1 {results[f'{name}_top1']:.2f}%  top-5 {results[f'{name}_top5']:.2f}%")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fastkd.checkpoint import export_student
    run_dir = Path(args.run_dir)
    checkpoint = _run_checkpoint(run_dir, args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    weights = export_student(checkpoint, run_dir, ema=args.ema)
    print(f"wrote {weights} ({'EMA' if args.ema else 'student'} weights of {checkpoint.name})")
    return 0


def methods_table() -> str:
    """Every registered method and what it needs, as a markdown table."""
    from fastkd.distillers import DISTILLERS

    def features(stages, pooled: bool) -> str:
        names = [f"stage {','.join(map(str, stages))}"] if stages else []
        return " + ".join(names + (["pooled"] if pooled else [])) or "-"

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    lines = ["| method | teacher | teacher logits | student features | teacher features | "
             "teacher graph | cache | paper |", "|---|---|---|---|---|---|---|---|"]
    for name in sorted(DISTILLERS):
        cls = DISTILLERS[name]
        n = cls.needs
        lines.append(
            f"| {name} | {yes(n.teacher)} | {yes(n.teacher_logits)} | "
            f"{features(n.student_stages, n.student_pooled)} | "
            f"{features(n.teacher_stages, n.teacher_pooled)} | {yes(n.teacher_graph)} | "
            f"{yes(n.cacheable) if n.teacher else 'n/a'} | {cls.paper} |")
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    print(methods_table())
    return 0


def _optional_main(module_name: str, what: str):
    """`module.main`, or None with a message when the module is not part of this install."""
    try:
        return importlib.import_module(module_name).main
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"fastkd: error: {what} is not available in this installation ({module_name} "
              f"is missing)", file=sys.stderr)
        return None


def cmd_data(args: argparse.Namespace) -> int:
    from fastkd.pipelines import data_check_main
    return data_check_main(args.rest)


def cmd_bench(args: argparse.Namespace) -> int:
    scenario_main = _optional_main(f"fastkd.bench.{args.scenario}",
                                   f"bench scenario '{args.scenario}'")
    return EXIT_FAILED if scenario_main is None else scenario_main(args.rest) or 0


def cmd_demo(args: argparse.Namespace) -> int:
    demo_main = _optional_main("fastkd.demo", "the demo")
    return EXIT_FAILED if demo_main is None else demo_main(args.rest) or 0


def cmd_cache(args: argparse.Namespace) -> int:
    from fastkd.cache.tools import main as cache_main
    return cache_main(args.rest)


# ------------------------------------------------------------------------------ parsers
# One dispatch: the top-level parser takes VERB and hands the rest of the line to that verb's
# parser, so `fastkd VERB --help` is always the verb's own help. Verbs served by another
# module (data, cache, bench, demo) pass `rest`, the arguments after their own positionals,
# to that module's `main(argv)`, whose parser owns those options; a verb without a parser
# (cache, demo) passes all of them.


def _verb_parser(verb: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"fastkd {verb}", description=description)


def _forwarding(parser: argparse.ArgumentParser, what: str) -> argparse.ArgumentParser:
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                        help=f"options of {what} (its --help lists them)")
    return parser


def train_parser() -> argparse.ArgumentParser:
    parser = _verb_parser("train", "Train a student; key.sub=value overrides any config key.")
    parser.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]",
                        help="YAML config, then overrides (with --resume: overrides only)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue RUN_DIR from its last.pt with the run's own config; only "
                             "harmless keys may be overridden (see fastkd.checkpoint.RESUMABLE_KEYS)")
    return parser


def eval_parser() -> argparse.ArgumentParser:
    parser = _verb_parser("eval", "Evaluate the student of CONFIG or of RUN_DIR.")
    parser.add_argument("target", metavar="CONFIG|RUN_DIR")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--checkpoint", metavar="PATH|last|best",
                        help="weights: a fastkd .pt, a state dict or .safetensors file; in a "
                             "run directory 'last' (default) or 'best'")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = _verb_parser("export", "(Re)write the student-only weights of a run.")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead")
    parser.add_argument("--checkpoint", metavar="last|best|PATH", help="default: last")
    return parser


def methods_parser() -> argparse.ArgumentParser:
    return _verb_parser("methods", "List the distillation methods and what each needs.")


def data_parser() -> argparse.ArgumentParser:
    parser = _verb_parser("data", "Data tools: `fastkd data check ROOT [...]`.")
    parser.add_argument("tool", choices=["check"])
    return _forwarding(parser, "the tool")


def bench_parser() -> argparse.ArgumentParser:
    parser = _verb_parser("bench", "Throughput scenarios; each writes results.json, results.md "
                                   "and a chart.")
    parser.add_argument("scenario", choices=BENCHES)
    return _forwarding(parser, "the scenario")


@dataclass(frozen=True)
class Verb:
    summary: str
    parser: Callable[[], argparse.ArgumentParser] | None
    handler: Callable[[argparse.Namespace], int]


VERBS = {
    "train": Verb("train (or resume) a run", train_parser, cmd_train),
    "eval": Verb("top-1/top-5 of a student on the validation split", eval_parser, cmd_eval),
    "export": Verb("write RUN_DIR/student.safetensors, student.json and RUN_DIR/timm",
                   export_parser, cmd_export),
    "methods": Verb("list the distillation methods and their needs", methods_parser, cmd_methods),
    "data": Verb("data tools: `fastkd data check ROOT [...]`", data_parser, cmd_data),
    "cache": Verb("the teacher cache: `fastkd cache build|verify|info [...]`", None, cmd_cache),
    "bench": Verb(f"throughput scenarios: `fastkd bench {'|'.join(BENCHES)} [...]`", bench_parser,
                  cmd_bench),
    "demo": Verb("distillation demo on bundled data", None, cmd_demo),
}


def build_parser() -> argparse.ArgumentParser:
    verbs = "\n".join(f"  {name:<9}{verb.summary}" for name, verb in VERBS.items())
    parser = argparse.ArgumentParser(
        prog="fastkd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Knowledge distillation for image classification: every method, fast.",
        epilog=f"verbs:\n{verbs}\n\n`fastkd VERB --help` shows the options of VERB.")
    parser.add_argument("--version", action="version", version=f"fastkd {fastkd.__version__}")
    parser.add_argument("verb", choices=VERBS, metavar="VERB")
    parser.add_argument("verb_args", nargs=argparse.REMAINDER, metavar="...")
    return parser


def parse_command(argv: list[str]) -> tuple[Verb, argparse.Namespace]:
    """The verb named by `argv` and its own arguments, parsed by its own parser."""
    top = build_parser().parse_args(argv)
    verb = VERBS[top.verb]
    if verb.parser is None:
        return verb, argparse.Namespace(rest=top.verb_args)
    return verb, verb.parser().parse_args(top.verb_args)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is now (a redirected or captured stdout included)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging() -> logging.Logger:
    """The library logs through the `fastkd` logger and leaves its configuration to the
    application; the CLI is one: progress lines to stdout on rank 0, warnings only elsewhere."""
    from fastkd.distributed import is_primary_process
    logger = logging.getLogger("fastkd")
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_primary_process() else logging.WARNING)
    return logger


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm(loggers=[configure_logging()]):
        return _run(argv)


def _run(argv: list[str]) -> int:
    try:
        verb, args = parse_command(argv)
        return verb.handler(args)
    except (SystemExit, KeyboardInterrupt):
        raise   # first, so that --help and --version do not import the heavy modules below
    except _user_errors() as error:
        print(f"fastkd: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except _run_stopped() as error:
        print(f"fastkd: stopped: {error}", file=sys.stderr)
        return EXIT_FAILED
