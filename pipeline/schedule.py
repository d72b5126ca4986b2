"""Print a pipeline schedule as a step x rank grid and its simulated cost.

    python -m pipeline.schedule --schedule 1f1b --stages 3 --microbatches 4 [--virtual-stages V] [--comms] [--costs F,B,W]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipeline.schedules.actions import format_grid
from pipeline.schedules.lowering import lower
from pipeline.schedules.registry import SCHEDULES, build_schedule
from pipeline.schedules.simulator import format_summary, simulate


def _parse_costs(text: str | None) -> dict[str, float] | None:
    """--costs "F,B,W" or "F,B,W,COMM" -> a cost mapping for the simulator."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (3, 4) or any(v < 0 for v in values):
        raise ValueError(f"--costs must be F,B,W or F,B,W,COMM, non-negative numbers; got {text!r}")
    return dict(zip(("F", "B", "W", "comm"), values))


def _parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.schedule",
        description="Print a pipeline schedule as a step x rank grid and its simulated cost.")
    parser.add_argument("--schedule", required=True, choices=sorted(SCHEDULES))
    parser.add_argument("--stages", type=int, required=True,
                        help="number of ranks p (num_stages = p * virtual stages)")
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument("--virtual-stages", type=int, default=1, dest="virtual_stages")
    parser.add_argument("--comms", action="store_true", help="show the lowered schedule")
    parser.add_argument("--costs", help="F,B,W[,COMM] unit costs (default 1,1,1,0; BW = B + W)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for bad arguments)."""
    args = _parser().parse_args(argv)
    try:
        costs = _parse_costs(args.costs)
        schedule, placement = build_schedule(args.schedule, args.stages, args.microbatches, args.virtual_stages)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shown = lower(schedule, placement) if args.comms else schedule
    result = simulate(shown, placement, args.microbatches, costs)
    print(format_grid(shown))
    print()
    print(_describe(args, costs, placement.num_stages))
    print(format_summary(result))
    return 0


def _describe(args: argparse.Namespace, costs: dict[str, float] | None, num_stages: int) -> str:
    """One line naming the schedule, its shape and the costs it was simulated with."""
    unit = {"F": 1.0, "B": 1.0, "W": 1.0, "comm": 0.0, **(costs or {})}
    return (f"{args.schedule}: {args.stages} ranks, {num_stages} stages, "
            f"{args.microbatches} micro-batches; costs F={unit['F']:g} B={unit['B']:g} "
            f"W={unit['W']:g} BW={unit['B'] + unit['W']:g} comm={unit['comm']:g}")


if __name__ == "__main__":
    raise SystemExit(main())
