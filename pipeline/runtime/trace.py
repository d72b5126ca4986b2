"""Per-rank action traces: files, a merged Chrome/Perfetto trace, measured bubbles, and the timeline picture."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.runtime.executor import TraceEvent
from pipeline.schedules.actions import COMPUTE_KINDS, Action

Spans = dict[int, list[tuple[float, float, str]]]  # rank -> (start, end, action name)
EventsByRank = Mapping[int, Iterable[TraceEvent]]

COMPUTE_TID, COMM_TID = 0, 1
_RANK_FILE = re.compile(r"rank_(\d+)\.json")

# One colour per compute kind (Okabe-Ito: colour-blind safe).
KIND_COLOURS = {"F": "#56B4E9", "B": "#E69F00", "W": "#009E73", "BW": "#CC79A7"}
# Communication is drawn muted so it never competes with compute for attention.
COMM_COLOURS = {"SEND": "#6E6E6E", "RECV": "#B8B8B8", "WAIT": "#D98880"}
LABEL_SIZE = 8.0  # points, micro-batch numbers inside the boxes


# --- events -------------------------------------------------------------------------------

@lru_cache(maxsize=4096)  # a run repeats the same few hundred names many thousand times
def is_compute(name: str) -> bool:
    """True for F, B, W and BW actions; transfers and WAIT_SENDS are communication."""
    try:
        return Action.parse(name).kind in COMPUTE_KINDS
    except ValueError:
        return False


def _trace_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "trace"


def write_rank(run_dir: str | Path, rank: int, events: list[TraceEvent]) -> Path:
    """Write run_dir/trace/rank_RRR.json: a JSON list of [step, name, start_ns, end_ns]."""
    path = _trace_dir(run_dir) / f"rank_{rank:03d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([list(event) for event in events]))
    return path


def _read_rank_file(path: Path) -> list[TraceEvent]:
    """One rank file's events; a malformed file is the user's problem, named in the error."""
    try:
        rows = json.loads(path.read_text())
        return [TraceEvent(int(step), str(name), int(start), int(end)) for step, name, start, end in rows]
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{path}: not a trace file of [step, name, start_ns, end_ns] rows ({err})") from err


def load_ranks(run_dir: str | Path) -> dict[int, list[TraceEvent]]:
    """Every rank file under run_dir/trace, keyed by rank (empty when there are none)."""
    found = {}
    for path in sorted(_trace_dir(run_dir).glob("rank_*.json")):
        match = _RANK_FILE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = _read_rank_file(path)
    return dict(sorted(found.items()))


def _step_events(events_by_rank: EventsByRank, step: int) -> dict[int, list[TraceEvent]]:
    """Each rank's events of one step (ranks without any keep an empty list)."""
    return {rank: [e for e in events if e.step == step] for rank, events in events_by_rank.items()}


# --- Chrome / Perfetto trace ----------------------------------------------------------------

def _metadata(rank: int) -> list[dict[str, Any]]:
    """Name the rank's process and its two threads, and sort processes by rank."""
    meta = {"ph": "M", "pid": rank, "ts": 0}
    return [
        {**meta, "tid": 0, "name": "process_name", "args": {"name": f"rank {rank}"}},
        {**meta, "tid": 0, "name": "process_sort_index", "args": {"sort_index": rank}},
        {**meta, "tid": COMPUTE_TID, "name": "thread_name", "args": {"name": "compute"}},
        {**meta, "tid": COMM_TID, "name": "thread_name", "args": {"name": "communication"}},
        {**meta, "tid": COMPUTE_TID, "name": "thread_sort_index", "args": {"sort_index": 0}},
        {**meta, "tid": COMM_TID, "name": "thread_sort_index", "args": {"sort_index": 1}},
    ]


def _complete(rank: int, event: TraceEvent, origin_ns: int) -> dict[str, Any]:
    """One "X" event; ts and dur in microseconds from origin_ns (Chrome's unit)."""
    compute = is_compute(event.name)
    return {"name": event.name, "cat": "compute" if compute else "communication",
            "ph": "X", "pid": rank, "tid": COMPUTE_TID if compute else COMM_TID,
            "ts": (event.start_ns - origin_ns) / 1000, "dur": (event.end_ns - event.start_ns) / 1000,
            "args": {"step": event.step}}


def chrome_trace(events_by_rank: EventsByRank) -> dict[str, Any]:
    """A trace for chrome://tracing or ui.perfetto.dev: one process per rank, compute and comm threads."""
    events = {rank: sorted(evs, key=lambda e: e.start_ns) for rank, evs in sorted(events_by_rank.items())}
    origin = min((e.start_ns for evs in events.values() for e in evs), default=0)
    trace: list[dict[str, Any]] = []
    for rank, evs in events.items():
        trace += _metadata(rank) + [_complete(rank, e, origin) for e in evs]
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


# --- bubbles ------------------------------------------------------------------------------

def _step_window(events_by_rank: EventsByRank, step: int) -> tuple[int, int]:
    """(earliest start, latest end) in ns over every rank's events of `step`."""
    events = [e for evs in _step_events(events_by_rank, step).values() for e in evs]
    if not events:
        raise ValueError(f"no trace events for step {step}")
    return min(e.start_ns for e in events), max(e.end_ns for e in events)


def step_span_s(events_by_rank: EventsByRank, step: int) -> float:
    """Seconds from the step's first action start to its last action end, over all ranks."""
    start, end = _step_window(events_by_rank, step)
    return (end - start) / 1e9


def step_bubbles(events_by_rank: EventsByRank, step: int) -> dict[int, float]:
    """Per rank, the idle fraction of the step: 1 - compute time / step span (span over all ranks)."""
    start, end = _step_window(events_by_rank, step)
    span = end - start
    bubbles = {}
    for rank, events in _step_events(events_by_rank, step).items():
        busy = sum(e.end_ns - e.start_ns for e in events if is_compute(e.name))
        bubbles[rank] = 1.0 - busy / span if span else 0.0
    return bubbles


def measured_spans(events_by_rank: EventsByRank, step: int) -> Spans:
    """One step's events as (start, end, name) in ms from the step's start, for draw_timeline."""
    origin, _ = _step_window(events_by_rank, step)
    return {rank: [((e.start_ns - origin) / 1e6, (e.end_ns - origin) / 1e6, e.name)
                   for e in sorted(events, key=lambda e: e.start_ns)]
            for rank, events in sorted(_step_events(events_by_rank, step).items())}


# --- the timeline picture -------------------------------------------------------------------

def figure(width: float, height: float):
    """A matplotlib Figure that renders headless (Agg), without touching a notebook's pyplot."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:  # a GUI backend would need a display
        matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _mix(colour: str, other: str, amount: float) -> tuple[float, float, float]:
    """colour moved `amount` of the way towards `other` (white lightens, black darkens)."""
    from matplotlib.colors import to_rgb
    a, b = to_rgb(colour), to_rgb(other)
    return tuple(x + (y - x) * amount for x, y in zip(a, b))


def _shade(kind: str, chunk: int, chunks: int) -> tuple[float, float, float]:
    """The kind's colour, light for a rank's first stage and darker for each later one."""
    t = chunk / (chunks - 1) if chunks > 1 else 0.5  # 0.5: the plain colour
    if t < 0.5:
        return _mix(KIND_COLOURS[kind], "white", 0.9 * (0.5 - t))
    return _mix(KIND_COLOURS[kind], "black", 0.9 * (t - 0.5))


def _text_colour(rgb: tuple[float, float, float]) -> str:
    """Black on light boxes, white on dark ones (relative luminance)."""
    return "black" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.5 else "white"


def _comm_colour(name: str) -> str:
    return COMM_COLOURS["WAIT" if name == "WAIT_SENDS" else "SEND" if "SEND" in name else "RECV"]


def _rank_stages(spans: list[tuple[float, float, str]]) -> list[int]:
    """The stages a rank ran compute for, in model order."""
    return sorted({Action.parse(name).stage_index for _, _, name in spans if is_compute(name)})


def _draw_compute(ax, y: float, spans, points_per_unit: float) -> None:
    """The rank's compute boxes, shaded by stage, with the micro-batch written inside when it fits."""
    stages = _rank_stages(spans)
    for start, end, name in spans:
        if not is_compute(name):
            continue
        action = Action.parse(name)
        colour = _shade(action.kind, stages.index(action.stage_index), len(stages))
        ax.broken_barh([(start, end - start)], (y - 0.34, 0.56), facecolors=[colour],
                       edgecolors="white", linewidth=0.6)
        label = str(action.mb_index)
        # one text size for the whole picture; a box too narrow for it keeps just its colour
        if (end - start) * points_per_unit >= 0.62 * LABEL_SIZE * len(label) + 2:
            ax.text((start + end) / 2, y - 0.06, label, ha="center", va="center",
                    fontsize=LABEL_SIZE, color=_text_colour(colour))


def _draw_comm(ax, y: float, spans) -> None:
    """Transfers and the end-of-step wait as a thin band under the rank's compute row."""
    comm = [(start, end - start, _comm_colour(name)) for start, end, name in spans
            if not is_compute(name) and end > start]
    if comm:
        ax.broken_barh([(s, d) for s, d, _ in comm], (y + 0.26, 0.12),
                       facecolors=[c for _, _, c in comm], linewidth=0)


def _extent(spans_by_rank: Spans) -> tuple[float, float]:
    """(first start, last end) over every span drawn."""
    times = [t for spans in spans_by_rank.values() for s, e, _ in spans for t in (s, e)]
    return (min(times), max(times)) if times else (0.0, 1.0)


def _idle_fraction(spans, begin: float, end: float) -> float:
    busy = sum(e - s for s, e, name in spans if is_compute(name))
    return 1.0 - busy / (end - begin) if end > begin else 0.0


def _rank_label(rank: int, spans) -> str:
    stages = _rank_stages(spans)
    if len(stages) > 1:  # name the stages so the shades can be read
        return f"rank {rank}\nstages {','.join(map(str, stages))}"
    return f"rank {rank}"


def _legend(ax, spans_by_rank: Spans) -> None:
    """Kinds present (all four compute kinds always), plus the comm colours when drawn."""
    from matplotlib.patches import Patch
    handles = [Patch(facecolor=c, label=k) for k, c in KIND_COLOURS.items()]
    names = {name for spans in spans_by_rank.values() for _, _, name in spans if not is_compute(name)}
    for key, label in (("SEND", "send"), ("RECV", "recv"), ("WAIT", "wait sends")):
        if any(_comm_colour(n) == COMM_COLOURS[key] for n in names):
            handles.append(Patch(facecolor=COMM_COLOURS[key], label=label))
    if any(len(_rank_stages(s)) > 1 for s in spans_by_rank.values()):
        note = "light \u2192 dark: the rank's stages in order"
        handles.append(Patch(facecolor="none", edgecolor="none", label=note))
    # above the plot, right-aligned, so the title keeps the left and no row is covered
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(handles),
              frameon=False, fontsize=8, handlelength=1.4, columnspacing=1.2)


def _layout_figure(spans_by_rank: Spans):
    """A figure wide enough for the busiest rank's boxes and tall enough for every rank."""
    most = max((sum(is_compute(n) for _, _, n in s) for s in spans_by_rank.values()), default=1)
    width = min(26.0, max(9.0, 3.0 + 0.32 * most))
    height = 1.3 + 0.62 * max(len(spans_by_rank), 1)
    return figure(width, height), width


def draw_timeline(spans_by_rank: Spans, path: str | Path, title: str = "", unit: str = "ms") -> Path:
    """Draw a pipeline timeline PNG: a row per rank, a box per compute action, white where idle."""
    fig, width = _layout_figure(spans_by_rank)
    ax = fig.add_subplot()
    begin, end = _extent(spans_by_rank)
    points_per_unit = 0.8 * width * 72 / (end - begin) if end > begin else 0.0
    ranks = sorted(spans_by_rank)
    for row, rank in enumerate(ranks):
        _draw_compute(ax, row, spans_by_rank[rank], points_per_unit)
        _draw_comm(ax, row, spans_by_rank[rank])
        ax.text(1.005, row, f"{_idle_fraction(spans_by_rank[rank], begin, end):.0%} idle",
                transform=ax.get_yaxis_transform(), va="center", fontsize=8, color="#555555")
    _style_axes(ax, ranks, spans_by_rank, (begin, end), title, unit)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="white")
    return path


def _style_axes(ax, ranks: list[int], spans_by_rank: Spans, window: tuple[float, float],
                title: str, unit: str) -> None:
    """Rank 0 on top, time on x, light vertical grid, no box around the plot."""
    ax.set_xlim(window[0], window[1])
    ax.set_ylim(max(len(ranks), 1) - 0.5, -0.5)  # rank 0 on top
    ax.set_yticks(range(len(ranks)), [_rank_label(r, spans_by_rank[r]) for r in ranks], fontsize=9)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel(f"time ({unit})" if unit else "time", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#e6e6e6", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=11, loc="left")
    _legend(ax, spans_by_rank)


# --- end of a run -------------------------------------------------------------------------

def finish(run_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """Merge every rank file into run_dir/trace.json and draw run_dir/timeline.png for `step`."""
    run_dir = Path(run_dir)
    events = load_ranks(run_dir)
    steps = sorted({e.step for evs in events.values() for e in evs})
    if not steps:
        raise UserError(f"{_trace_dir(run_dir)}: no trace events to merge (was trace.enabled on?)")
    step = steps[-1] if step is None else step
    if step not in steps:
        traced = f"{steps[0]}..{steps[-1]}"
        raise UserError(f"{_trace_dir(run_dir)}: no events for step {step}; traced steps {traced}")
    trace_path = run_dir / "trace.json"
    trace_path.write_text(json.dumps(chrome_trace(events)))
    bubble = step_bubbles(events, step)
    mean = sum(bubble.values()) / len(bubble)
    timeline = draw_timeline(measured_spans(events, step), run_dir / "timeline.png",
                             title=f"step {step}: {len(events)} ranks, mean bubble {mean:.0%}")
    return {"trace": trace_path, "timeline": timeline, "step": step, "bubble": bubble}
