"""Placement: which rank holds each stage, the data every layer above reads (torch's stage_index_to_group_rank).

A schedule is written for one placement; the registry names it beside the schedule's builder. The
lowering, the validator and simulator, the runtime, the planner, the memory accounting, the graph
and checkpoint resharding all ask the placement, so a new shape (a V, say) is one function here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """`ranks[s]` is the rank of stage s; every rank 0 .. p-1 holds at least one stage."""

    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.ranks or sorted(set(self.ranks)) != list(range(max(self.ranks) + 1)):
            raise ValueError(f"a placement must put stages on every rank 0..p-1, got {self.ranks}")

    @property
    def num_stages(self) -> int:
        return len(self.ranks)

    @property
    def num_ranks(self) -> int:
        return max(self.ranks) + 1

    def rank_of(self, stage_index: int) -> int:
        return self.ranks[stage_index]

    def stages_of(self, rank: int) -> list[int]:
        """The stages `rank` holds, in model order."""
        return [s for s, r in enumerate(self.ranks) if r == rank]

    @property
    def last_rank(self) -> int:
        """The rank of the last stage: the loss, the metrics and the progress bar live there."""
        return self.ranks[-1]


# Looped: stage s on rank s % p, so rank r holds r, r + p, r + 2p, ... (p = 3, v = 2):
#
#   stage  0 1 2 3 4 5
#   rank   0 1 2 0 1 2
def looped(num_ranks: int, virtual_stages: int = 1) -> Placement:
    """The placement of GPipe, 1F1B, interleaved 1F1B and ZB-H1: p ranks, v stages each, round-robin."""
    return Placement(tuple(s % num_ranks for s in range(num_ranks * virtual_stages)))


# V: two stages per rank, down the ranks and back up, so the last stage sits beside the first (ZB-V, DualPipeV).
# p = 3:
#
#   stage  0 1 2 3 4 5
#   rank   0 1 2 2 1 0
def v_shape(num_ranks: int, virtual_stages: int = 2) -> Placement:
    """Rank r holds stages r and 2p - 1 - r; the V has exactly two stages per rank."""
    if virtual_stages != 2:
        raise ValueError(f"a V places 2 stages on each rank, not {virtual_stages}")
    return Placement(tuple(range(num_ranks)) + tuple(reversed(range(num_ranks))))
