"""What a run reports: rows of metrics.jsonl, a progress bar on a terminal, and the summary line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLog:
    """Appends one JSON object per line; only the rank that holds the loss writes one."""

    def __init__(self, path: str | Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def progress_bar(total: int, enabled: bool) -> tqdm:
    """A tqdm bar on stderr, shown only on a terminal (CI logs and pipes stay clean)."""
    return tqdm(total=total, disable=not enabled or not sys.stderr.isatty(), unit="step", dynamic_ncols=True)


def summary_line(summary: dict[str, Any]) -> str:
    """One line with the run's final figures, e.g. for a README or an issue note."""
    parts = []
    for key, value in summary.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return "pipeline: done " + " ".join(parts)
