"""A traced run read back from its directory: its config, its actions and its logged step times.

    RUN_DIR/.hydra/config.yaml   the config it ran with
    RUN_DIR/trace.json           every rank's actions (a run with trace.enabled=true), Chrome's format
    RUN_DIR/metrics.jsonl        step_time_s (and, traced, bubble) of every logged step

Each problem is a UserError naming the file and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import Config, parse
from pipeline.errors import UserError
from pipeline.runtime.executor import TraceEvent
from pipeline.schedules.actions import Action
from pipeline.training.metrics import load_metrics

RERUN = "rerun with trace.enabled=true"


@dataclass(frozen=True)
class TracedRun:
    """What `python -m pipeline.simulate --from-trace RUN_DIR` needs of a run."""

    run_dir: Path
    conf: Config
    events: dict[int, list[TraceEvent]]  # pipeline rank -> its actions, in ns of one clock
    step_times: dict[int, float]  # logged step -> step_time_s
    bubbles: dict[int, list[float]]  # logged step -> each rank's measured idle fraction


def load(run_dir: str | Path) -> TracedRun:
    """Read a traced run's directory; raises UserError on a missing or damaged part."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; give the hydra.run.dir of a traced run")
    trace_path = run_dir / "trace.json"
    if not trace_path.is_file():
        raise UserError(f"{run_dir} has no trace.json, so the run was not traced; {RERUN}")
    events = read_events(trace_path)
    rows = load_metrics(run_dir).train
    return TracedRun(run_dir, read_config(run_dir), events,
                     {r["step"]: float(r["step_time_s"]) for r in rows if _is_number(r.get("step_time_s"))},
                     {r["step"]: r["bubble"] for r in rows if isinstance(r.get("bubble"), list)})


def read_config(run_dir: Path) -> Config:
    """The checked config the run wrote to .hydra/config.yaml."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} is missing; --from-trace reads the config that python -m pipeline.train wrote there")
    try:
        raw = OmegaConf.load(path)
    except (OSError, ValueError, OmegaConfBaseException) as err:  # yaml's errors are ValueErrors too
        raise UserError(f"{path}: not a readable config ({' '.join(str(err).split())})") from None
    return parse(raw)


def read_events(path: Path) -> dict[int, list[TraceEvent]]:
    """Every rank's actions from a trace.json that trace.chrome_trace wrote (its inverse, to the ns)."""
    try:
        doc = json.loads(path.read_text())
        spans = [e for e in doc["traceEvents"] if e.get("ph") == "X"]
        events: dict[int, list[TraceEvent]] = {}
        for e in spans:
            name, start = str(e["name"]), float(e["ts"])  # ts and dur: microseconds from the first event
            if name != "WAIT_SENDS":
                Action.parse(name)  # a ValueError for a name no schedule has
            events.setdefault(int(e["pid"]), []).append(
                TraceEvent(int(e["args"]["step"]), name, round(start * 1000), round((start + float(e["dur"])) * 1000)))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{path} is damaged ({type(err).__name__}: {err}); {RERUN}") from None
    if not events:
        raise UserError(f"{path} holds no actions; {RERUN}")
    return {rank: sorted(evs, key=lambda e: e.start_ns) for rank, evs in sorted(events.items())}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
