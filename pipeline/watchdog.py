"""What ranks leave behind when a peer stops answering: hang_report.json, one entry per rank.

Every rank that can still speak adds what it was waiting on, its last completed actions and its
pending sends. Ranks cannot talk to each other any more, so each one merges its entry into the
shared file under a file lock instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from pipeline.transport import PeerTimeout

REPORT = "hang_report.json"


def write_hang_report(run_dir: str | Path, error: PeerTimeout) -> Path:
    """Add this rank's entry (error.report and the message) to RUN_DIR/hang_report.json."""
    path = Path(run_dir) / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {**error.report, "message": str(error), "time": time.time()}
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(path.read_text()) if path.exists() else {"ranks": {}}
        report["ranks"][str(entry.get("rank", "?"))] = entry
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return path
