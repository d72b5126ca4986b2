"""ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, section 6): two stages per rank in a V, B and W split."""

from __future__ import annotations

from pipeline.schedules.actions import Action, Schedule
from pipeline.schedules.builders import check_numbers
from pipeline.schedules.placement import Placement, v_shape

# Which ready kind a rank runs first; the builder keeps the order that finishes sooner (the first on a tie).
# They tie for most p and m; B first wins where m is a little above p, F first where m is large and p >= 5.
_PREFERENCES = ("FBW", "BFW")


# ZB-V. Rank r holds stages r and 2p-1-r (placement.v_shape), so the last stage and the loss sit on
# rank 0 beside the first, and a micro-batch's backward starts on the rank where its forward began.
# The order is built slot by slot under unit costs: in every slot each rank runs one action whose
# inputs are done, preferring one kind (F, then B, then W; or B, then F, then W), the oldest
# micro-batch first, and it starts no forward while it holds 2p (stage, micro-batch) pairs between
# F and W: p whole-rank activations (a pair is half a rank's layers), 1F1B's peak. So W runs when
# nothing else may, and fills the bubbles. Simulated with F=B=W=1; p=2, m=4:
#
#   time   0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23  24
#   rank 0 0F0 0F1 0F2 3F0 3B0 3W0 3F1 0B0 3B1 0W0 0F3 0B1 0W1 3F2 3B2 3W1 3W2 0B2 0W2 3F3 3B3 3W3 .   0B3 0W3
#   rank 1 .   1F0 2F0 1F1 2F1 2B0 1B0 1W0 1F2 2B1 1B1 2W0 2F2 1W1 1F3 2B2 1B2 2W1 2F3 1W2 2W2 2B3 1B3 1W3 2W3
#
# 25 units for 24 of work per rank. Rank r cannot start before its first input has come r stages
# down the V, so the makespan is at least 6m+p-1 and the bubble at least (p-1)/(6m+p-1); this order
# and torch's ScheduleZBVZeroBubble both reach that once m >= 2p-1 (51 units at p = 4, m = 8). Below
# it torch pads m up to 2p-1, and this order is mostly shorter (checked for p <= 8, m <= 16: shorter
# in 44 cases, a unit longer at p = 7, m = 10). Every rank holds 2 min(p, m) pairs at its peak.
def zb_v(num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """Zero Bubble ZB-V on the V placement; virtual_stages must be 2 (the registry passes it)."""
    check_numbers("zb_v", num_ranks, num_microbatches, 1)
    if virtual_stages != 2:
        raise ValueError(f"zb_v: runs exactly 2 stages per rank (a V), so virtual_stages must be 2, "
                         f"got {virtual_stages!r}")
    placement = v_shape(num_ranks)
    built = [_greedy(placement, num_microbatches, preference) for preference in _PREFERENCES]
    return min(built, key=lambda pair: pair[1])[0]


def _inputs(action: Action, num_stages: int) -> list[Action]:
    """The compute actions whose results `action` reads."""
    stage, kind, mb = action
    if kind == "F":
        return [Action(stage - 1, "F", mb)] if stage else []
    if kind == "W":
        return [Action(stage, "B", mb)]
    return [Action(stage, "F", mb)] + ([Action(stage + 1, "B", mb)] if stage + 1 < num_stages else [])


def _greedy(placement: Placement, num_microbatches: int, preference: str) -> tuple[Schedule, int]:
    """Fill unit-time slots, each rank one ready action per slot; returns the order and its makespan."""
    ranks = range(placement.num_ranks)
    pending = {r: [Action(s, kind, mb) for s in placement.stages_of(r) for kind in "FBW"
                   for mb in range(num_microbatches)] for r in ranks}
    done: dict[Action, int] = {}  # action -> the slot after it ran
    schedule: Schedule = {r: [] for r in ranks}
    stashed = dict.fromkeys(ranks, 0)
    slot = 0
    while any(pending.values()):
        ready = {r: [a for a in pending[r] if all(done.get(i, slot + 1) <= slot for i in
                                                  _inputs(a, placement.num_stages))] for r in ranks}
        picks = _picks(ready, stashed, 2 * placement.num_ranks, preference) or _picks(ready, stashed, None, preference)
        for rank, action in picks.items():
            pending[rank].remove(action)
            schedule[rank].append(action)
            done[action] = slot + 1
            stashed[rank] += {"F": 1, "B": 0, "W": -1}[action.kind]
        slot += 1
    return schedule, slot


def _picks(ready: dict[int, list[Action]], stashed: dict[int, int], cap: int | None,
           preference: str) -> dict[int, Action]:
    """Each rank's choice among its ready actions; no F on a rank holding `cap` pairs (None: no cap).
    The builder lifts the cap for a slot where no rank could move under it, so it always finishes."""
    picks = {}
    for rank, actions in ready.items():
        allowed = [a for a in actions if cap is None or a.kind != "F" or stashed[rank] < cap]
        if allowed:
            picks[rank] = min(allowed, key=lambda a: (preference.index(a.kind), a.mb_index, a.stage_index))
    return picks
