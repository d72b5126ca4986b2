"""TensorBoard event files beside metrics.jsonl (train.tensorboard): every number of a logged row, as a scalar.

    RUN_DIR/tensorboard/events.out.tfevents.*    one file per run segment, written by the rank that
                                                 writes metrics.jsonl (the last stage of replica 0)

A row {"step": 10, "loss": 0.31, "lr": 0.1, "bubble": [0.25, 0.1]} becomes the scalars loss, lr,
bubble/rank_0 and bubble/rank_1 at global step 10, in double precision, so each one equals its
metrics.jsonl value. Every run segment starts a new file from the rows metrics.jsonl keeps (none for
a fresh run; up to the resumed step for a resumed one, whose later rows a dead segment logged) and
removes the older files, so the event files always say what metrics.jsonl says. Only this module touches the optional package, imported when a writer opens (torch is not imported
before: pipeline.report reads metrics without it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

DIRECTORY = "tensorboard"
INSTALL = "pip install -e '.[tensorboard]'"


def scalars(row: dict[str, Any]) -> list[tuple[str, float]]:
    """(tag, value) of every number in a row but its step; a list of numbers gives one tag per rank."""
    found = []
    for key, value in row.items():
        if key == "step" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            found.append((key, float(value)))
        elif isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            found += [(f"{key}/rank_{rank}", float(v)) for rank, v in enumerate(value)]
    return found


class EventLog:
    """A SummaryWriter under RUN_DIR/tensorboard/ that takes metrics.jsonl's rows."""

    def __init__(self, run_dir: str | Path, kept: list[dict[str, Any]] = ()):
        try:
            from torch.utils.tensorboard import SummaryWriter  # the optional extra: only when asked for
        except ImportError:
            raise ConfigError(f"train.tensorboard=true needs the tensorboard package, which is not installed; "
                              f"{INSTALL} or set train.tensorboard=false") from None
        directory = Path(run_dir) / DIRECTORY
        old = sorted(directory.glob("events.out.tfevents.*")) if directory.is_dir() else []
        self.writer = SummaryWriter(log_dir=str(directory))
        for row in kept:  # the rows metrics.jsonl keeps, into the new file
            self.write(row)
        for path in old:  # only once the new file holds them: a crash here loses no curve
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        """The row's scalars at its step, flushed at once (a killed run keeps what it logged)."""
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return  # every row the trainer logs has its step; anything else has no place on a curve
        for tag, value in scalars(row):
            self.writer.add_scalar(tag, value, global_step=step, new_style=True, double_precision=True)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
