"""ZB-H2, the Zero Bubble schedule that spends memory instead of time: extra warm-up forwards, W passes in the tail."""

from __future__ import annotations

from collections import deque

from pipeline.schedules.actions import Action, Schedule
from pipeline.schedules.builders import check_numbers


# ZB-H2 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024). Rank r warms up with
# 2(p-1-r)+1 forwards, enough to reach the moment its first B arrives. Then every B is followed by
# a gap: while m - (2p-1) gaps remain to be filled it gets two slots, the oldest pending W and the
# next F; after that one slot, the next F while any is left, else a W. The W passes left over run
# in the tail, where 1F1B's cooldown idles. Simulated with F=B=W=1; p=3, m=6:
#
#   time   0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19
#   rank 0 F0 F1 F2 F3 F4 B0 W0 F5 B1 W1 B2 W2 B3 W3 B4 W4 B5 W5
#   rank 1 .  F0 F1 F2 B0 W0 F3 B1 F4 B2 F5 B3 W1 B4 W2 B5 W3 W4 W5
#   rank 2 .  .  F0 B0 W0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 W1 W2 W3 W4 W5
#
# The trapezoid of 1F1B becomes a parallelogram: rank r starts r units late and is never idle
# until its end, r + 3m (makespan 3m+p-1). Each rank holds up to 2p-1 micro-batches whose W is
# pending, twice ZB-H1's p. With m < 2p-1 the warm-up runs all m forwards (no two-slot gaps).
def zb_h2(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Zero Bubble ZB-H2 with separate B and W; virtual_stages must be 1."""
    check_numbers("zb_h2", num_ranks, num_microbatches, virtual_stages)
    return {rank: _zb_h2_rank(rank, num_ranks, num_microbatches) for rank in range(num_ranks)}


def _zb_h2_rank(rank: int, num_ranks: int, num_microbatches: int) -> list[Action]:
    """One rank of ZB-H2: warm-up forwards, then each B with its gap, then the W passes left."""
    forwards = deque(Action(rank, "F", mb) for mb in range(num_microbatches))
    weights: deque[Action] = deque()
    actions = [forwards.popleft() for _ in range(min(2 * (num_ranks - rank) - 1, num_microbatches))]
    wide_gaps = num_microbatches - (2 * num_ranks - 1)
    for mb in range(num_microbatches):
        actions.append(Action(rank, "B", mb))
        weights.append(Action(rank, "W", mb))
        if mb < wide_gaps:
            actions += [weights.popleft(), forwards.popleft()]
        elif forwards:
            actions.append(forwards.popleft())
        elif mb < num_microbatches - 1:
            actions.append(weights.popleft())
    return actions + list(weights)
