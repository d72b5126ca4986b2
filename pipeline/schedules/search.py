"""A schedule built from costs rather than picked from a family: greedy list scheduling over F, B and W (pure Python).

Every rank, whenever it is free, runs the most urgent action whose inputs are there, as the Zero Bubble
paper's heuristic does:

    1. B (the input gradient): it is on the critical path, a peer waits for it;
    2. F of the next micro-batch, while the rank holds fewer than `limit` micro-batches (one is held from
       the F of the rank's first stage until the W of its last);
    3. W (the weight gradient): nothing waits for it, so it fills what would be idle time.

A rank with nothing ready waits for the earliest input to arrive (a W ready meanwhile runs first). The
costs are the simulator's (a duration per action, a delay per message that crosses ranks), so the order
fits the measured F, B and W of uneven stages. `candidates` builds one schedule per stash limit and per
placement; the planner keeps the fastest that fits the memory budget (planning.planner.search).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipeline.schedules.actions import Action, Schedule
from pipeline.schedules.placement import Placement

Duration = Callable[[Action], float]


@dataclass
class _Rank:
    """What one rank has run so far."""

    stages: list[int]
    free_at: float = 0.0
    actions: list[Action] = field(default_factory=list)
    next_f: dict[int, int] = field(default_factory=dict)  # stage -> next micro-batch to forward
    next_b: dict[int, int] = field(default_factory=dict)  # stage -> next micro-batch to take B of
    pending_w: dict[Action, float] = field(default_factory=dict)  # B done, W not yet: W -> when its B ended
    held: dict[int, int] = field(default_factory=dict)  # micro-batch -> its stages here whose W is still to come


@dataclass
class _State:
    placement: Placement
    num_microbatches: int
    duration: Duration
    transfer: Duration
    done: dict[Action, float] = field(default_factory=dict)  # action -> end time
    last_stage: int = field(init=False)  # the loss's stage: its B needs no gradient from downstream

    def __post_init__(self) -> None:
        self.last_stage = self.placement.num_stages - 1

    def arrival(self, producer: Action, consumer_stage: int) -> float | None:
        """When producer's output is usable by consumer_stage (None: not produced yet)."""
        end = self.done.get(producer)
        if end is None:
            return None
        remote = self.placement.rank_of(producer.stage_index) != self.placement.rank_of(consumer_stage)
        return end + self.transfer(producer) if remote else end

    def ready(self, action: Action) -> float | None:
        """When `action`'s inputs are all there (None: some input is not produced yet)."""
        s, kind, mb = action
        if kind == "F":
            return 0.0 if s == 0 else self.arrival(Action(s - 1, "F", mb), s)
        if kind == "B":
            own = self.done.get(Action(s, "F", mb))
            if own is None:
                return None
            if s == self.last_stage:
                return own
            upstream = self.arrival(Action(s + 1, "B", mb), s)
            return None if upstream is None else max(own, upstream)
        return self.done.get(Action(s, "B", mb))  # W


def _choices(rank: _Rank, state: _State, limit: int) -> list[tuple[float, int, Action]]:
    """(ready time, priority, action) of every action the rank could run next whose ready time is known."""
    m, found = state.num_microbatches, []
    for s in rank.stages:
        if rank.next_b[s] < m:
            b = Action(s, "B", rank.next_b[s])
            if (t := state.ready(b)) is not None:
                found.append((t, 0, b))
        admits = s == rank.stages[0]  # the micro-batch enters the rank here: it counts against the limit
        if rank.next_f[s] < m and (not admits or len(rank.held) < limit):
            f = Action(s, "F", rank.next_f[s])
            if (t := state.ready(f)) is not None:
                found.append((t, 1, f))
    found += [(ready, 2, w) for w, ready in rank.pending_w.items()]
    return found


def _pick(rank: _Rank, choices: list[tuple[float, int, Action]]) -> tuple[float, Action]:
    """(start, action): the most urgent action ready when the rank is free, else the first to become ready;
    the later stage first among equals (a V's way back toward the loss)."""
    now = rank.free_at
    ready_now = [c for c in choices if c[0] <= now]
    if ready_now:
        _, _, action = min(ready_now, key=lambda c: (c[1], -c[2].stage_index, c[2].mb_index))
        return now, action
    start, _, action = min(choices, key=lambda c: (c[0], c[1], -c[2].stage_index))
    return start, action


def _run(rank: _Rank, state: _State, start: float, action: Action) -> None:
    s, kind, mb = action
    end = start + state.duration(action)
    state.done[action] = end
    rank.free_at = end
    rank.actions.append(action)
    if kind == "F":
        rank.next_f[s] += 1
        if s == rank.stages[0]:
            rank.held[mb] = len(rank.stages)
    elif kind == "B":
        rank.next_b[s] += 1
        rank.pending_w[Action(s, "W", mb)] = end
    else:
        del rank.pending_w[action]
        rank.held[mb] -= 1
        if not rank.held[mb]:
            del rank.held[mb]


def greedy(placement: Placement, num_microbatches: int, duration: Duration, transfer: Duration,
           limit: int) -> Schedule:
    """The list schedule of every stage's F, B and W under these costs, each rank holding at most `limit`
    micro-batches at once (limit >= 1)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an integer >= 1 micro-batch per rank, got {limit!r}")
    state = _State(placement, num_microbatches, duration, transfer)
    ranks = {r: _Rank(placement.stages_of(r)) for r in range(placement.num_ranks)}
    for rank in ranks.values():
        rank.next_f = {s: 0 for s in rank.stages}
        rank.next_b = {s: 0 for s in rank.stages}
    options = {r: _choices(rank, state, limit) for r, rank in ranks.items()}
    earliest = {r: min(c[0] for c in opts) for r, opts in options.items() if opts}  # rank -> first ready time
    for _ in range(3 * num_microbatches * placement.num_stages):  # every action runs once
        if not earliest:  # cannot happen: a rank holding `limit` micro-batches always has one to move on
            raise RuntimeError(f"greedy: no rank can move (limit {limit}); this is a bug")
        _, r = min((max(ranks[r].free_at, t), r) for r, t in earliest.items())
        start, action = _pick(ranks[r], options[r])
        _run(ranks[r], state, start, action)
        for touched in _touched(placement, r, action):  # the only ranks whose choices that action changed
            options[touched] = _choices(ranks[touched], state, limit)
            earliest.pop(touched, None)
            if options[touched]:
                earliest[touched] = min(c[0] for c in options[touched])
    return {r: rank.actions for r, rank in ranks.items()}


def _touched(placement: Placement, rank: int, action: Action) -> set[int]:
    """The ranks whose choices can change when `rank` runs `action`: its own, and those of the stages its
    output feeds (F feeds the next stage's F, B the previous stage's B; W feeds nothing)."""
    s, kind = action.stage_index, action.kind
    feeds = s + 1 if kind == "F" else s - 1 if kind == "B" else -1
    return {rank} | ({placement.rank_of(feeds)} if 0 <= feeds < placement.num_stages else set())


def limits(placement: Placement, num_microbatches: int) -> range:
    """The limits worth trying: from one micro-batch held per rank to all of them."""
    return range(1, num_microbatches + 1)


def candidates(placements: dict[str, Placement], num_microbatches: int, duration: Duration,
               transfer: Duration) -> list[tuple[str, Placement, Schedule]]:
    """(label, placement, schedule) for every named placement and stash limit, labelled e.g. "looped, limit 3"."""
    return [(f"{name}, limit {limit}", placement, greedy(placement, num_microbatches, duration, transfer, limit))
            for name, placement in placements.items() for limit in limits(placement, num_microbatches)]
