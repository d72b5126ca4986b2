"""What a run reports: rows of metrics.jsonl (written and read back), a progress bar on a terminal, the summary line."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.training.tensorboard import EventLog

TRAIN_KEYS = ("step", "loss")
EVAL_KEYS = ("step", "test_accuracy")


class MetricsLog:
    """Appends one JSON object per line; only the rank that holds the loss writes one.

    A fresh run starts an empty file; a resumed one (`keep_until` = the checkpoint's step) keeps the
    rows up to that step and appends after them. With `tensorboard` (train.tensorboard) every row
    also goes to RUN_DIR/tensorboard/ (see training.tensorboard).
    """

    def __init__(self, path: str | Path, enabled: bool, keep_until: int | None = None, tensorboard: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self.events: EventLog | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = self._start(keep_until)
            self.events = EventLog(self.path.parent, kept) if tensorboard else None

    def _start(self, keep_until: int | None) -> list[dict[str, Any]]:
        """Rows after the resumed step were logged by a run that died before its next checkpoint: they go.
        Returns the rows kept."""
        kept, rows = [], []
        if keep_until is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short when the process was killed
                if isinstance(row, dict) and row.get("step", 0) <= keep_until:
                    kept.append(line + "\n")
                    rows.append(row)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)
        return rows

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as err:  # a failed write names no file: say which (see errors.disk_error)
                raise OSError(err.errno, err.strerror, str(self.path)) from None
            if self.events is not None:
                self.events.write(row)

    def close(self) -> None:
        """Close the TensorBoard file (metrics.jsonl is closed after every row)."""
        if self.events is not None:
            self.events.close()


def progress_bar(total: int, enabled: bool, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr, shown only on a terminal (CI logs and pipes stay clean)."""
    return tqdm(total=total, initial=initial, disable=not enabled or not sys.stderr.isatty(), unit="step",
                dynamic_ncols=True)


def summary_line(summary: dict[str, Any]) -> str:
    """One line with the run's final figures, e.g. for a README or an issue note."""
    parts = []
    for key, value in summary.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return "pipeline: done " + " ".join(parts)


@dataclass
class Metrics:
    """The rows of one metrics.jsonl that this report draws; any other row is ignored."""

    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    """One JSON object per line; anything else is a malformed file."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} line {number}: not valid JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise UserError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
    return row


def load_metrics(run_dir: str | Path) -> Metrics:
    """Read RUN_DIR/metrics.jsonl into training and evaluation rows; UserError names what is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: missing; is {run_dir} a run directory of python -m pipeline.train?")
    metrics = Metrics()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            _sort_row(metrics, _parse_line(path, number, line))
    if not metrics.train and not metrics.evals:
        raise UserError(f"{path}: empty (no training or evaluation rows)")
    return metrics


def _sort_row(metrics: Metrics, row: dict[str, Any]) -> None:
    if all(key in row for key in TRAIN_KEYS):
        metrics.train.append(row)
    elif all(key in row for key in EVAL_KEYS):
        metrics.evals.append(row)
