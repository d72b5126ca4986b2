"""Pipelined training equals single-device training: the check, and the table, as a command.

    python -m pipeline.equivalence                       # every schedule, p 1-4, m 1,3,4,8, v 1-2, in-process
    python -m pipeline.equivalence --ranks 4 --schedules zb_h1

The problem, the reference and the difference are in pipeline/training/equivalence.py.
"""

from __future__ import annotations

import argparse
import tempfile

from pipeline.schedules.registry import SCHEDULES
from pipeline.training.equivalence import difference, grid, pipelined, problem, reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.equivalence", description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="from the registry: " + ", ".join(SCHEDULES))
    parser.add_argument("--ranks", default="1,2,3,4")
    parser.add_argument("--microbatches", default="1,3,4,8")
    parser.add_argument("--virtual-stages", default="1,2")
    args = parser.parse_args(argv)
    ints = lambda text: tuple(int(t) for t in text.split(","))  # noqa: E731
    ref = reference(problem())
    worst = 0.0
    print(f"{'schedule':<17} {'p':>2} {'m':>2} {'v':>2}  {'difference':>10}")
    for case in grid(args.schedules.split(","), ints(args.ranks), ints(args.microbatches), ints(args.virtual_stages)):
        with tempfile.TemporaryDirectory() as run_dir:
            params, _ = pipelined(problem(**case), run_dir)
        diff = difference(params, ref)
        worst = max(worst, diff)
        print(f"{case['schedule']:<17} {case['ranks']:>2} {case['microbatches']:>2} {case['virtual_stages']:>2}  {diff:>10.2e}")
    print(f"worst relative difference: {worst:.2e}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
