"""The validator and the simulator: a schedule is checked and timed symbolically before anything runs (pure Python).

Validation replays every rank's list under unit costs: complete (each (stage, mb) has its F and
its backward), placed (each action on its stage's rank), matched (every SEND has its RECV) and
deadlock-free; a failure names the rank and the action, and prints the grid with it marked.
Simulation replays the same lists under real costs (pipeline.planning.costs) into a timeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

from pipeline.schedules.actions import BACKWARD_KINDS, COMM_KINDS, COMPUTE_KINDS, Action, Schedule, format_grid
from pipeline.schedules.placement import Placement

Costs = Union[Mapping[str, float], Callable[[Action], float], None]
Position = tuple[int, int]  # (rank, index in that rank's list)
Span = tuple[float, float, Action]  # (start, end, action)

# A transfer names the peer stage it talks to: SEND_F 2 -> stage 3, RECV_B 2 <- stage 3, ...
_PEER_OFFSET = {"SEND_F": 1, "RECV_F": -1, "SEND_B": -1, "RECV_B": 1}
_MATCHING = {"SEND_F": "RECV_F", "RECV_F": "SEND_F", "SEND_B": "RECV_B", "RECV_B": "SEND_B"}


class ScheduleError(ValueError):
    """An invalid schedule: one summary line, then the grid with the offending action marked."""

    def __init__(self, summary: str, schedule: Schedule | None = None,
                 mark: Position | None = None) -> None:
        self.summary = summary
        self.mark = mark
        grid = "" if schedule is None else "\n" + format_grid(schedule, mark)
        super().__init__(summary + grid)


@dataclass
class SimResult:
    """What a simulated run of a schedule costs, per rank."""

    makespan: float  # time from the first action's start to the last action's end
    busy: dict[int, float]  # compute time per rank
    bubble: dict[int, float]  # idle fraction per rank: 1 - busy / makespan
    peak_stash: dict[int, int]  # max (stage, mb) pairs with F done and W / BW not yet done
    timeline: dict[int, list[Span]]  # (start, end, action) per rank, in run order
    peak_awaiting_b: dict[int, int]  # max (stage, mb) pairs with F done and B / BW not yet done
    steps: int  # length of the longest rank's action list


@dataclass(frozen=True)
class _Layout:
    """The shape a schedule must have."""

    placement: Placement
    num_microbatches: int
    lowered: bool  # True when the schedule carries explicit SEND/RECV actions

    @property
    def num_ranks(self) -> int:
        return self.placement.num_ranks

    @property
    def num_stages(self) -> int:
        return self.placement.num_stages


def _check_placement(schedule: Schedule, layout: _Layout) -> None:
    """Every rank key is known and every action is well formed and on its stage's rank."""
    for rank in schedule:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < layout.num_ranks:
            raise ScheduleError(f"unknown rank {rank!r}: ranks are 0..{layout.num_ranks - 1}",
                                schedule)
    kinds, m = set(COMPUTE_KINDS + COMM_KINDS), layout.num_microbatches
    for rank in sorted(schedule):
        own = set(layout.placement.stages_of(rank))
        for position, action in enumerate(schedule[rank]):
            if type(action) is Action and type(action.stage_index) is int and action.stage_index in own \
                    and action.kind in kinds and type(action.mb_index) is int and 0 <= action.mb_index < m:
                continue  # well formed and placed: the common case, checked without building a message
            problem = _action_problem(rank, action, layout)
            if problem:
                raise ScheduleError(f"rank {rank}: {problem}", schedule, (rank, position))


def _action_problem(rank: int, action: object, layout: _Layout) -> str:
    """What is wrong with one entry of rank's list, or "" if nothing."""
    if not (isinstance(action, tuple) and len(action) == 3
            and all(isinstance(i, int) for i in (action[0], action[2]))):
        return f"{action!r} is not an Action(stage_index, kind, mb_index)"
    stage, kind, mb = action
    if kind not in COMPUTE_KINDS + COMM_KINDS:
        return f"{action} has unknown kind {kind!r}"
    if not 0 <= stage < layout.num_stages:
        return f"{action} names stage {stage}, but stages are 0..{layout.num_stages - 1}"
    if not 0 <= mb < layout.num_microbatches:
        last = layout.num_microbatches - 1
        return f"{action} names micro-batch {mb}, but micro-batches are 0..{last}"
    owner = layout.placement.rank_of(stage)
    if owner != rank:
        return f"{action} is on the wrong rank (stage {stage} lives on rank {owner})"
    return ""


def _positions(schedule: Schedule) -> list[tuple[int, int, Action]]:
    """(rank, position, action) for every action, rank by rank."""
    return [(rank, pos, a) for rank in sorted(schedule) for pos, a in enumerate(schedule[rank])]


def _index(schedule: Schedule) -> dict[Action, Position]:
    """Where each action sits; raises on an action listed twice."""
    index: dict[Action, Position] = {}
    for rank, position, action in _positions(schedule):
        if action in index:
            first = index[action][1]
            summary = f"rank {rank}: {action} appears twice (steps {first} and {position})"
            raise ScheduleError(summary, schedule, (rank, position))
        index[action] = (rank, position)
    return index


def _check_complete(schedule: Schedule, index: dict[Action, Position], layout: _Layout) -> None:
    """Each (stage, mb) has one F and either one BW or one B plus one W."""
    for stage in range(layout.num_stages):
        for mb in range(layout.num_microbatches):
            have = {kind for kind in COMPUTE_KINDS if Action(stage, kind, mb) in index}
            problem, culprit = _completeness_problem(have)
            if problem:
                mark = index.get(Action(stage, culprit, mb)) if culprit else None
                raise ScheduleError(f"stage {stage} mb {mb}: {problem}", schedule, mark)


def _completeness_problem(have: set[str]) -> tuple[str, str | None]:
    """Describe what is wrong with the compute kinds present for one (stage, mb), or ("", None)."""
    if "F" not in have:
        return "missing forward (F)", None
    if "BW" in have and have & {"B", "W"}:
        other = "B" if "B" in have else "W"
        return f"has both BW and {other}; use BW alone or B then W", other
    if not have & {"B", "W", "BW"}:
        return "missing backward (BW, or B and W)", None
    if "B" in have and "W" not in have:
        return "missing weight gradient (W) after its B", "B"
    if "W" in have and "B" not in have:
        return "missing input gradient (B) before its W", "W"
    return "", None


def _backward_of(stage: int, mb: int, index: Mapping[Action, Position]) -> Action:
    """The action that computes (stage, mb)'s input gradient: B if present, else BW."""
    split = Action(stage, "B", mb)
    return split if split in index else Action(stage, "BW", mb)


def _prerequisites(action: Action, index: Mapping[Action, Position],
                   layout: _Layout) -> list[Action]:
    """Actions that must have finished before `action` may start."""
    stage, kind, mb = action
    if kind in COMM_KINDS:
        return _comm_prerequisites(action, index)
    if kind == "W":
        return [Action(stage, "B", mb)]
    if kind == "F":
        if stage == 0:
            return []
        return [_feed(action, Action(stage - 1, "F", mb), "RECV_F", layout)]
    needs = [Action(stage, "F", mb)]
    if stage + 1 < layout.num_stages:
        needs.append(_feed(action, _backward_of(stage + 1, mb, index), "RECV_B", layout))
    return needs


def _feed(action: Action, producer: Action, recv_kind: str, layout: _Layout) -> Action:
    """What hands producer's tensor to action: the producer itself, or a local RECV if lowered."""
    rank_of = layout.placement.rank_of
    if layout.lowered and rank_of(producer.stage_index) != rank_of(action.stage_index):
        return Action(action.stage_index, recv_kind, action.mb_index)
    return producer


def _comm_prerequisites(action: Action, index: Mapping[Action, Position]) -> list[Action]:
    """A SEND waits for the compute that produced its tensor; a RECV for the matching SEND."""
    stage, kind, mb = action
    if kind == "SEND_F":
        return [Action(stage, "F", mb)]
    if kind == "SEND_B":
        return [_backward_of(stage, mb, index)]
    return [_peer(action)]


def _peer(action: Action) -> Action:
    """The action on the neighbouring stage that a SEND/RECV pairs with."""
    stage, kind, mb = action
    return Action(stage + _PEER_OFFSET[kind], _MATCHING[kind], mb)


def _check_comms(schedule: Schedule, index: Mapping[Action, Position], layout: _Layout) -> None:
    """Every SEND has exactly one matching RECV on the peer rank, and vice versa."""
    for rank, position, action in _positions(schedule):
        if action.kind not in COMM_KINDS:
            continue
        peer = _peer(action)
        if not 0 <= peer.stage_index < layout.num_stages:
            summary = f"rank {rank}: {action} has no peer stage {peer.stage_index} to talk to"
            raise ScheduleError(summary, schedule, (rank, position))
        if peer not in index:
            peer_rank = layout.placement.rank_of(peer.stage_index)
            summary = f"rank {rank}: {action} has no matching {peer.kind} on rank {peer_rank}"
            raise ScheduleError(summary, schedule, (rank, position))


def check_in_order(schedule: Schedule, placement: Placement) -> None:
    """Raise ScheduleError unless, between any two ranks, messages are received in the order they are sent.

    gloo matches messages by tag, so `validate` does not ask for this; NCCL's point-to-point ignores
    tags and pairs the k-th send from a rank with the k-th receive from it, so a lowered schedule run
    over NCCL must have it (every built-in schedule does).
    """
    index = _index(schedule)
    latest: dict[tuple[int, int], tuple[int, Action]] = {}  # (src, dst) -> receive of the latest send
    for rank, position, action in _positions(schedule):
        if not action.kind.startswith("SEND"):
            continue
        recv = _peer(action)
        dst, recv_position = placement.rank_of(recv.stage_index), index[recv][1]
        previous = latest.get((rank, dst))
        if previous is not None and recv_position < previous[0]:
            summary = (f"rank {rank}: {action} is sent after the message of {previous[1]}, but rank {dst} runs "
                       f"{recv} first; NCCL pairs messages in order: reorder the sends or the receives")
            raise ScheduleError(summary, schedule, (rank, position))
        latest[(rank, dst)] = (recv_position, recv)


def _check_local_order(schedule: Schedule, index: Mapping[Action, Position], layout: _Layout,
                       needs: Mapping[Action, list[Action]]) -> None:
    """Prerequisites on the same rank come earlier in that rank's list; none are missing."""
    for rank, position, action in _positions(schedule):
        for need in needs[action]:
            where = index.get(need)
            if where is None:
                summary = f"rank {rank}: {action} needs {need}, which is not in the schedule"
                raise ScheduleError(summary, schedule, (rank, position))
            if where[0] == rank and where[1] > position:
                summary = f"rank {rank}: {action} runs before {need}"
                raise ScheduleError(summary, schedule, (rank, position))


def _layout(schedule: Schedule, placement: Placement, num_microbatches: int) -> _Layout:
    """Check the counts and note whether the schedule is lowered."""
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a schedules.placement.Placement, got {placement!r}")
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    kinds = {getattr(a, "kind", None) for actions in schedule.values() for a in actions}
    lowered = bool(kinds & set(COMM_KINDS))
    return _Layout(placement, num_microbatches, lowered)


def _static_checks(schedule: Schedule, layout: _Layout) -> dict[Action, list[Action]]:
    """All checks short of running the schedule; returns each action's prerequisites."""
    _check_placement(schedule, layout)
    index = _index(schedule)
    _check_complete(schedule, index, layout)
    if layout.lowered:
        _check_comms(schedule, index, layout)
    needs = {a: _prerequisites(a, index, layout) for a in index}
    _check_local_order(schedule, index, layout, needs)
    return needs


def _cost_model(costs: Costs) -> tuple[Callable[[Action], float], Callable[[Action], float]]:
    """(duration of an action, delay from a producer finishing to its output reaching another rank)."""
    if hasattr(costs, "duration") and hasattr(costs, "transfer"):  # a costs.Costs: per stage, per message
        return costs.duration, costs.transfer
    if callable(costs):
        return costs, lambda producer: 0.0
    table = dict(costs or {})
    unknown = set(table) - set(COMPUTE_KINDS + COMM_KINDS + ("comm",))
    if unknown:
        raise ValueError(f"unknown cost keys {sorted(unknown)}; use F, B, W, BW, comm, SEND_F, ...")
    if any(value < 0 for value in table.values()):
        raise ValueError(f"costs must be non-negative, got {table}")
    latency = float(table.pop("comm", 0.0))
    kinds = {"F": 1.0, "B": 1.0, "W": 1.0, **{k: 0.0 for k in COMM_KINDS}, **table}
    kinds.setdefault("BW", kinds["B"] + kinds["W"])
    return (lambda action: kinds[action.kind]), (lambda producer: latency)


@dataclass
class _Executor:
    """Runs ranks' lists in order, remembering when each action finished."""

    needs: Mapping[Action, list[Action]]
    placement: Placement
    duration: Callable[[Action], float]
    transfer: Callable[[Action], float]  # added when an input comes from another rank
    finished: dict[Action, float] = field(default_factory=dict)

    def ready_at(self, action: Action, rank: int) -> float | None:
        """When action's inputs are available on rank, or None if one has not been produced."""
        ready = 0.0
        for need in self.needs[action]:
            end = self.finished.get(need)
            if end is None:
                return None
            remote = self.placement.rank_of(need.stage_index) != rank
            ready = max(ready, end + self.transfer(need) if remote else end)
        return ready

    def advance(self, rank: int, actions: list[Action], run: list[Span]) -> bool:
        """Run rank's next actions while their inputs are ready; True if any ran."""
        ran = False
        while len(run) < len(actions):
            action = actions[len(run)]
            ready = self.ready_at(action, rank)
            if ready is None:
                break
            start = max(ready, run[-1][1] if run else 0.0)
            run.append((start, start + _duration(self.duration, action), action))
            self.finished[action] = run[-1][1]
            ran = True
        return ran


def _execute(schedule: Schedule, needs: Mapping[Action, list[Action]], layout: _Layout,
             costs: Costs) -> dict[int, list[Span]]:
    """Run every rank's list in order; each action starts once its rank is free and inputs ready."""
    duration, transfer = _cost_model(costs)
    executor = _Executor(needs, layout.placement, duration, transfer)
    runs: dict[int, list[Span]] = {rank: [] for rank in schedule}
    progress = True
    while progress:
        progress = any([executor.advance(rank, schedule[rank], runs[rank]) for rank in schedule])
    _check_finished(schedule, runs)
    return runs


def _duration(duration: Callable[[Action], float], action: Action) -> float:
    """The action's cost, refusing negative values."""
    value = duration(action)
    if value < 0:
        raise ValueError(f"cost of {action} must be non-negative, got {value}")
    return value


def _check_finished(schedule: Schedule, runs: Mapping[int, list]) -> None:
    """Raise a deadlock error naming where each stuck rank waits."""
    stuck = [(rank, len(runs[rank])) for rank in sorted(schedule)
             if len(runs[rank]) < len(schedule[rank])]
    if stuck:
        waiting = ", ".join(f"rank {rank} at {schedule[rank][pos]}" for rank, pos in stuck)
        summary = f"deadlock: no rank can progress; waiting: {waiting}"
        raise ScheduleError(summary, schedule, stuck[0])


def validate(schedule: Schedule, placement: Placement, num_microbatches: int) -> None:
    """Raise ScheduleError unless the schedule is complete, ordered, matched and deadlock-free.

    Compute-only schedules wait on the producing compute across ranks directly; once any
    SEND/RECV is present every cross-rank hand-off must go through them: a RECV blocks until
    its SEND has run, a SEND never blocks (isend).
    """
    layout = _layout(schedule, placement, num_microbatches)
    needs = _static_checks(schedule, layout)
    _execute(schedule, needs, layout, None)


def _peaks(actions: list[Action], opening: str, closing: tuple[str, ...]) -> int:
    """Max number of (stage, mb) opened by `opening` and not yet closed by a `closing` kind."""
    live = peak = 0
    for action in actions:
        if action.kind == opening:
            live += 1
            peak = max(peak, live)
        elif action.kind in closing:
            live -= 1
    return peak


def simulate(schedule: Schedule, placement: Placement, num_microbatches: int, costs: Costs = None) -> SimResult:
    """Validate the schedule, then time it under `costs`.

    costs: None (F=B=W=1, BW=B+W, transfers free); a mapping overriding any of F, B, W, BW,
    SEND_F/RECV_F/SEND_B/RECV_B (time the rank spends on that action) and "comm" (latency added
    to every cross-rank hand-off); a callable Action -> duration (no latency), e.g. for
    per-stage costs; or a `pipeline.planning.costs.Costs` (per-stage times, per-message transfer times).
    """
    layout = _layout(schedule, placement, num_microbatches)
    runs = _execute(schedule, _static_checks(schedule, layout), layout, costs)
    makespan = max((run[-1][1] for run in runs.values() if run), default=0.0)
    busy = {rank: sum(end - start for start, end, a in run if a.kind in COMPUTE_KINDS)
            for rank, run in runs.items()}
    return SimResult(
        makespan=makespan,
        busy=busy,
        bubble={rank: 1.0 - busy[rank] / makespan if makespan else 0.0 for rank in runs},
        peak_stash={rank: _peaks(acts, "F", ("W", "BW")) for rank, acts in schedule.items()},
        timeline={rank: [t for t in run if t[2].kind in COMPUTE_KINDS or t[1] > t[0]]
                  for rank, run in runs.items()},
        peak_awaiting_b={r: _peaks(acts, "F", BACKWARD_KINDS) for r, acts in schedule.items()},
        steps=max((len(acts) for acts in schedule.values()), default=0),
    )


def format_summary(result: SimResult) -> str:
    """A small table: makespan and steps, then per rank busy time, bubble and peak stashes."""
    lines = [f"makespan {result.makespan:g}, {result.steps} steps",
             "rank  busy  bubble  peak_stash  peak_awaiting_b"]
    for rank in sorted(result.busy):
        lines.append(f"{rank:4d}  {result.busy[rank]:4g}  {result.bubble[rank]:6.1%}  "
                     f"{result.peak_stash[rank]:10d}  {result.peak_awaiting_b[rank]:15d}")
    return "\n".join(lines)
