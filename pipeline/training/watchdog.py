"""What ranks leave behind when a peer stops answering: hang_report.json, one entry per rank.

Every rank that can still speak adds what it was waiting on, its last completed actions and its
pending sends, under its global rank. Ranks cannot talk to each other any more, so each one merges
its entry into the shared file under a lock on the run directory itself (no lock file is left).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.runtime.distributed import read_env
from pipeline.runtime.transport import PeerTimeout
from pipeline.training.checkpoint import atomic_write_bytes

REPORT = "hang_report.json"
LOCK_WAIT_S = 5.0  # a hang report must never hang: past this, merge without the lock


def write_hang_report(run_dir: str | Path, error: PeerTimeout, message: str | None = None) -> Path:
    """Add this rank's entry (error.report and the message) to RUN_DIR/hang_report.json.

    The entry is keyed by this process's global rank (read_env), whatever the report holds: a
    rank ended by SIGTERM has no report, and the runtime's `rank` is the pipeline rank.
    """
    path = Path(run_dir) / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    rank = read_env().rank
    entry = {**error.report, "rank": rank, "message": message or str(error), "time": time.time()}
    if error.report.get("rank", rank) != rank:
        entry["pipeline_rank"] = error.report["rank"]
    with _locked(path.parent):
        report = json.loads(path.read_text()) if path.exists() else {"ranks": {}}
        report["ranks"][str(rank)] = entry
        text = json.dumps(report, indent=1, sort_keys=True).encode()
        atomic_write_bytes(path, lambda f: f.write(text))  # a failed write leaves no .tmp and names the file
    return path


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on an O_RDONLY descriptor of the directory; closing it releases the lock."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)
