"""Bytes per rank: what prediction holds against what training holds (the chapter's exercise 3).

    python -m pipeline.memory --ranks 2 [OVERRIDES]                  # predicted, per rank
    python -m pipeline.memory --ranks 2 --measure [--steps 2] [...]  # and measured in a short in-process run
    python -m pipeline.memory --ranks 1 --predict-rows 64 model=seed pipeline.microbatches=1  # the chapter's model

What each column counts is written in pipeline/planning/memory.py.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import compose
from pipeline.errors import ConfigError, run_command
from pipeline.training.footprint import calculate, format_table, measure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="pipeline ranks p (default 2)")
    parser.add_argument("--measure", action="store_true",
                        help="also train a few steps in this process and print the bytes the ranks really held")
    parser.add_argument("--steps", type=int, default=2, help="steps of the measuring run (default 2)")
    parser.add_argument("--predict-rows", type=int, default=None,
                        help="rows predicted at once (default: the trainer's eval micro-batch)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. pipeline.schedule=gpipe")
    args = parser.parse_args(argv)
    return run_command(_memory_command, args)


def _memory_command(args: argparse.Namespace) -> int:
    if args.ranks < 1:
        raise ConfigError(f"--ranks={args.ranks} must be at least 1")
    if args.steps < 1:
        raise ConfigError(f"--steps={args.steps} must be at least 1")
    if args.predict_rows is not None and args.predict_rows < 1:
        raise ConfigError(f"--predict-rows={args.predict_rows} must be at least 1")
    conf = compose(args.overrides)
    calc = calculate(conf, args.ranks, args.predict_rows)
    measured = measure(conf, args.ranks, args.steps) if args.measure else None
    print(format_table(calc, measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
