"""Rank every schedule x micro-batch count x virtual stages by predicted step time among those that fit a memory budget.

    python -m pipeline.plan --ranks 2 --memory-gib 1 [--measure] [OVERRIDES]

`pipeline.schedule=auto` trains with the first line's choice (made from FLOP counts, so every rank
makes the same choice without talking); --measure times each stage here instead.
"""

from __future__ import annotations

import argparse
import sys

import torch

from pipeline.config import compose
from pipeline.errors import ConfigError, run_command
from pipeline.planning.costs import add_arguments, flop_costs, measured_costs
from pipeline.planning.planner import format_options, options
from pipeline.training.setup import load_data, model_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--memory-gib", type=float, default=None, help="memory budget per rank in GiB")
    parser.add_argument("--top", type=int, default=25, help="rows to print")
    args = parser.parse_args(argv)
    return run_command(_plan_command, args)


def _plan_command(args: argparse.Namespace) -> int:
    if args.ranks < 1 or (args.memory_gib is not None and args.memory_gib <= 0):
        raise ConfigError("--ranks must be >= 1 and --memory-gib > 0")
    conf = compose(args.overrides)
    spec = model_spec(conf, load_data(conf))
    torch.set_num_threads(args.threads)
    cost_of = ((lambda stages, rows: measured_costs(spec, stages, rows, conf.train.seed)) if args.measure
               else (lambda stages, rows: flop_costs(spec, stages, rows)))
    ranked = options(conf, spec, args.ranks, cost_of, args.memory_gib)
    budget = "no budget" if args.memory_gib is None else f"{args.memory_gib:g} GiB per rank"
    print(f"model {'-'.join(map(str, spec.dims))} {spec.precision}, batch {conf.train.batch_size}, p={args.ranks}, "
          f"{budget}, costs {'measured here' if args.measure else 'from FLOP counts'}")
    print(format_options(ranked, args.top))
    best = ranked[0] if ranked and ranked[0].fits else None
    print("choice: " + (f"pipeline.schedule={best.schedule} pipeline.microbatches={best.microbatches} "
                        f"pipeline.virtual_stages={best.virtual_stages}" if best else "none fits the budget"))
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
