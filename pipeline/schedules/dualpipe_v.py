"""DualPipeV: DeepSeek's DualPipe folded into a V (rank r holds stages r and 2p-1-r), in torch 2.13's order."""

from __future__ import annotations

from collections import Counter, deque

from pipeline.schedules.actions import Action, Schedule
from pipeline.schedules.builders import check_numbers
from pipeline.schedules.placement import v_shape

NAME = "dualpipe_v"


class _Writer:
    """One rank's list as it is written: the next micro-batch of each stage's F and backward, the Ws owed."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self._next: Counter[tuple[int, str]] = Counter()
        self._owed: deque[Action] = deque()  # Ws of split backwards, oldest first

    def _take(self, stage: int, kind: str) -> int:
        mb = self._next[stage, kind]
        self._next[stage, kind] += 1
        return mb

    def forward(self, stage: int) -> None:
        self.actions.append(Action(stage, "F", self._take(stage, "F")))

    def backward(self, stage: int, split: bool = False) -> None:
        """BW, or B with its W owed to a later `weight()`."""
        mb = self._take(stage, "B")
        self.actions.append(Action(stage, "B" if split else "BW", mb))
        if split:
            self._owed.append(Action(stage, "W", mb))

    def weight(self) -> None:
        """The oldest owed W, if any is owed."""
        if self._owed:
            self.actions.append(self._owed.popleft())


# DualPipeV (DeepSeek-V3's DualPipe, cut in half and folded: https://arxiv.org/abs/2412.19437), ordered
# as torch 2.13's ScheduleDualPipeV. Rank r holds the V's down stage d = r and up stage u = 2p-1-r; the
# loss is on rank 0, beside the first stage. Rank r's list, in phases:
#   1. 2(p-1-r) forwards of d                  5. p-1-r times: BW u, then the pair F u + BW d
#   2. r+1 times: F d, F u                     6. r+1 times: backward u, backward d; the last r+1
#   3. p-1-r times: B u, its W, F u               of these 2(r+1) backwards are B with W deferred
#   4. m-2p+1+r times: the pair F d + BW u,    7. p-1-r times: a deferred W, then B d
#      then the pair F u + BW d                8. r+1 deferred Ws
# The overlap pairs are phase 4's two and phase 5's second: torch runs each as one OVERLAP_F_B action,
# (F;B)OVERLAP_F_B in its CSV (the forward of one micro-batch hiding the backward of another, on the
# rank's other stage). Here each is its two halves back to back, the F then the BW; their messages
# are posted together because the runtime posts every receive of a step up front and sends never
# block. (torch does not overlap phase 4's first pair on rank p-1; split, the two are the same.)
# torch needs m >= 2p; the same phases are valid from m = 2p-1 (where phase 4 is empty on rank 0).
# A smaller m runs them too, phase 4 empty wherever its count is not positive and the actions of
# micro-batches past m dropped: complete and deadlock-free (tests/test_dualpipe_v.py: every p <= 8).
# Simulated with F=B=W=1, p=2, m=4 (stages 0 and 3 on rank 0, 1 and 2 on rank 1):
#
#   time   0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23  24
#   rank 0 0F0 0F1 0F2 3F0 3B0 3W0 3F1 0F3 3BW1    3F2 0BW0    3BW2    3F3 .   0BW1    3BW3    0B2 0W2 0B3 0W3
#   rank 1 .   1F0 2F0 1F1 2F1 1F2 2BW0    2F2 1BW0    1F3 2BW1    2F3 1BW1    2BW2    1BW2    2B3 1B3 2W3 1W3
#
# Makespan 25 for 24 units of work per rank: each rank idles 1 (4%); ZB-H1 on one stage per rank of
# twice the size idles 2(p-1) = 2. Rank 0's overlap pairs here: 0F3+3BW1, 3F2+0BW0, then 3F3+0BW1.
def dualpipe_v(num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """DualPipeV on the V placement (two stages per rank); any m >= 1, virtual_stages must be 2."""
    check_numbers(NAME, num_ranks, num_microbatches, virtual_stages, has_virtual=True)
    if virtual_stages != 2:
        raise ValueError(f"{NAME}: runs 2 stages per rank (a V), so virtual_stages must be 2, got {virtual_stages}")
    return {rank: [a for a in _rank(rank, num_ranks, num_microbatches) if a.mb_index < num_microbatches]
            for rank in range(num_ranks)}


def _rank(rank: int, num_ranks: int, num_microbatches: int) -> list[Action]:
    """Rank `rank`'s list for m >= 2p - 1: the eight phases above."""
    down, up = v_shape(num_ranks).stages_of(rank)
    ahead, behind = num_ranks - 1 - rank, rank + 1  # ranks below and (with this one) above the turn of the V
    writer = _Writer()
    for _ in range(2 * ahead):
        writer.forward(down)
    for _ in range(behind):
        writer.forward(down)
        writer.forward(up)
    for _ in range(ahead):
        writer.backward(up, split=True)
        writer.weight()
        writer.forward(up)
    for _ in range(num_microbatches - 2 * num_ranks + behind):
        _pair(writer, down, up)
        _pair(writer, up, down)
    for _ in range(ahead):
        writer.backward(up)
        _pair(writer, up, down)
    for i in range(2 * behind):
        writer.backward(up if i % 2 == 0 else down, split=i >= behind)
    for _ in range(ahead):
        writer.weight()
        writer.backward(down, split=True)
    for _ in range(behind):
        writer.weight()
    return writer.actions


def _pair(writer: _Writer, forward_stage: int, backward_stage: int) -> None:
    """An overlap pair (torch's OVERLAP_F_B), run as its halves: forward one stage, then BW the other."""
    writer.forward(forward_stage)
    writer.backward(backward_stage)
