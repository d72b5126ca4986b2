"""Plot a run's metrics.jsonl as PNGs: `python -m pipeline.report RUN_DIR [--out DIR]` (starts without torch)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.errors import UserError, exit_with
from pipeline.training.charts import write_report
from pipeline.training.metrics import load_metrics


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report",
                                     description="Draw a run's metrics.jsonl as PNG plots.")
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default RUN_DIR)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: one printed line per PNG written; a user mistake exits 2 with one line."""
    args = _parser().parse_args(argv)
    try:
        metrics = load_metrics(args.run_dir)
        out = args.out or args.run_dir
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a directory")
        written = write_report(metrics, out, title=str(args.run_dir))
    except UserError as err:
        exit_with(err)
    except OSError as err:  # an unwritable --out, a full disk: the user's to fix
        exit_with(UserError(f"{err.filename or args.out}: {err.strerror or err}"))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
