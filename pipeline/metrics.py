"""What a run reports: rows of metrics.jsonl, a progress bar on a terminal, and the summary line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLog:
    """Appends one JSON object per line; only the rank that holds the loss writes one.

    A fresh run starts an empty file; a resumed one (`keep_until` = the checkpoint's step) keeps the
    rows up to that step and appends after them.
    """

    def __init__(self, path: str | Path, enabled: bool, keep_until: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._start(keep_until)

    def _start(self, keep_until: int | None) -> None:
        """Rows after the resumed step were logged by a run that died before its next checkpoint: they go."""
        kept = []
        if keep_until is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short when the process was killed
                if isinstance(row, dict) and row.get("step", 0) <= keep_until:
                    kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as err:  # a failed write names no file: say which (see errors.disk_error)
                raise OSError(err.errno, err.strerror, str(self.path)) from None


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
