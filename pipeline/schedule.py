"""Print a pipeline schedule as a step x rank grid and its simulated cost; read one from a file or export one.

    python -m pipeline.schedule --schedule 1f1b --ranks 3 --microbatches 4 [--virtual-stages V] [--comms] [--costs F,B,W]
    python -m pipeline.schedule --file PATH --microbatches 4            # torch's CSV (.csv) or our action lines
    python -m pipeline.schedule ... --json                              # one JSON object instead of the tables
    python -m pipeline.schedule --schedule zb_h1 --ranks 2 --microbatches 4 --export-csv zb_h1.csv  # torch's format
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pipeline.schedules import files
from pipeline.schedules.actions import format_grid
from pipeline.schedules.lowering import lower
from pipeline.schedules.placement import Placement
from pipeline.schedules.registry import SCHEDULES, Program, build_schedule
from pipeline.schedules.simulator import SimResult, format_summary, simulate


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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--schedule", choices=sorted(SCHEDULES))
    source.add_argument("--file", help="a schedule file: torch's compute-only CSV (NAME.csv) or our action lines")
    parser.add_argument("--ranks", "--stages", type=int, dest="ranks",
                        help="number of ranks p (num_stages = p * virtual stages); with --file, the file's rows")
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument("--virtual-stages", type=int, default=1, dest="virtual_stages")
    parser.add_argument("--comms", action="store_true", help="show the lowered schedule")
    parser.add_argument("--costs", help="F,B,W[,COMM] unit costs (default 1,1,1,0; BW = B + W)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--export-csv", dest="export_csv", metavar="PATH",
                        help="also write the schedule in torch's compute-only CSV (F/I/W/B) to PATH.csv")
    return parser


def _program(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Program:
    """The schedule asked for: built from the registry or read from --file (ValueError in one line)."""
    if args.file is None:
        if args.ranks is None:
            parser.error("--schedule needs --ranks P")
        return build_schedule(args.schedule, args.ranks, args.microbatches, args.virtual_stages)
    if args.virtual_stages != 1:
        raise ValueError(f"--virtual-stages={args.virtual_stages}: with --file the file places the stages; drop it")
    program = files.load(args.file, args.microbatches)
    rows = program.placement.num_ranks
    if args.ranks is not None and args.ranks != rows:
        raise ValueError(f"{args.file} has {rows} rows (one per rank) but --ranks={args.ranks}; drop --ranks or "
                         f"set --ranks={rows}")
    return program


def _export(path: str, program: Program) -> None:
    """Write the compute-only schedule as torch's CSV (ValueError in one line)."""
    if not files.is_torch_csv(path):
        raise ValueError(f"--export-csv={path}: torch's CSV must be named NAME.csv (a file of any other name is read "
                         "back as our own action lines); add .csv")
    try:
        Path(path).write_text(files.to_torch_csv(program.actions))
    except OSError as err:
        raise ValueError(f"--export-csv={path}: cannot write it ({err.strerror}); pick a writable path") from None


def figures(result: SimResult, program: Program) -> dict:
    """The machine-readable figures of a simulated schedule (what --json prints)."""
    ranks = range(program.placement.num_ranks)
    return {"makespan": result.makespan,
            "bubble": [result.bubble[r] for r in ranks],
            "peak_stash": [result.peak_stash[r] for r in ranks],
            "stages_per_rank": [program.placement.stages_of(r) for r in ranks],
            "placement": list(program.placement.ranks)}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        costs = _parse_costs(args.costs)
        program = _program(args, parser)
        if args.export_csv:
            _export(args.export_csv, program)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    schedule, placement = program
    shown = lower(schedule, placement) if args.comms else schedule
    result = simulate(shown, placement, args.microbatches, costs)
    if args.json:
        print(json.dumps(figures(result, program)))
        return 0
    print(format_grid(shown))
    print()
    print(_describe(args, placement, costs))
    print(format_summary(result))
    if args.export_csv:
        print(f"wrote {args.export_csv} (torch's compute-only CSV)")
    return 0


def _describe(args: argparse.Namespace, placement: Placement, costs: dict[str, float] | None) -> str:
    """One line naming the schedule, its shape and the costs it was simulated with."""
    unit = {"F": 1.0, "B": 1.0, "W": 1.0, "comm": 0.0, **(costs or {})}
    return (f"{args.schedule or args.file}: {placement.num_ranks} ranks, {placement.num_stages} stages, "
            f"{args.microbatches} micro-batches; costs F={unit['F']:g} B={unit['B']:g} "
            f"W={unit['W']:g} BW={unit['B'] + unit['W']:g} comm={unit['comm']:g}")


if __name__ == "__main__":
    raise SystemExit(main())
