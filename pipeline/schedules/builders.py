"""The schedule builders: GPipe, 1F1B, interleaved 1F1B and ZB-H1, each a pure function of (p, m, v) -> per-rank actions.

Each assumes the looped placement (stage s on rank s % p, see placement.looped); the registry pairs a
builder with the placement it assumes.
"""

from __future__ import annotations

from collections import deque

from pipeline.schedules.actions import Action, Schedule
from pipeline.schedules.placement import Placement, looped


def check_numbers(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int,
                   has_virtual: bool = False) -> None:
    """Raise ValueError unless the counts are positive integers this schedule supports."""
    for label, value in (("num_ranks", num_ranks), ("num_microbatches", num_microbatches),
                         ("virtual_stages", virtual_stages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {label} must be an integer >= 1, got {value!r}")
    if virtual_stages > 1 and not has_virtual:
        raise ValueError(f"{name}: virtual_stages must be 1, got {virtual_stages}")


def _merge_one_f_one_b(forwards: list[Action], backwards: list[Action],
                       warmup: int) -> list[Action]:
    """Warm-up forwards, then alternate one forward / one backward, then the remaining backwards."""
    warmup = min(warmup, len(forwards))
    actions = forwards[:warmup]
    for step, forward in enumerate(forwards[warmup:]):
        actions += [forward, backwards[step]]
    return actions + backwards[len(forwards) - warmup:]


# GPipe (fill-drain). Every rank runs all its forwards, then all its backwards (BW, mb order).
# With virtual stages (breadth-first "looped" GPipe) a rank runs its chunks in model order
# forwards and in reverse order backwards. Simulated with F=1, BW=2; p=3, m=4:
#
#   time   0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17
#   rank 0 F0 F1 F2 F3 .  .  .  .  .  .  BW0   BW1   BW2   BW3
#   rank 1 .  F0 F1 F2 F3 .  .  .  BW0   BW1   BW2   BW3   .  .
#   rank 2 .  .  F0 F1 F2 F3 BW0   BW1   BW2   BW3   .  .  .  .
#
# Each rank idles 3(p-1) of 3(m+p-1) units, a bubble of (p-1)/(m+p-1), and stashes all m.
def gpipe(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Fill-drain schedule: all forwards, then all combined backwards (BW)."""
    check_numbers("gpipe", num_ranks, num_microbatches, virtual_stages, has_virtual=True)
    schedule: Schedule = {}
    placement = looped(num_ranks, virtual_stages)
    for rank in range(num_ranks):
        stages = placement.stages_of(rank)
        forwards = [Action(s, "F", mb) for s in stages for mb in range(num_microbatches)]
        backwards = [Action(s, "BW", mb)
                     for s in reversed(stages) for mb in range(num_microbatches)]
        schedule[rank] = forwards + backwards
    return schedule


# 1F1B (PipeDream-Flush). Rank r runs w = min(p-1-r, m) warm-up forwards, then alternates one
# forward with one backward (BW) and ends with w cooldown backwards, so it never holds more than
# min(p-r, m) stashed micro-batches. Simulated with F=1, BW=2; p=3, m=4:
#
#   time   0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17
#   rank 0 F0 F1 F2 .  .  .  .  BW0   F3 BW1   .  BW2   .  BW3
#   rank 1 .  F0 F1 .  .  BW0   F2 BW1   F3 BW2   .  BW3   .  .
#   rank 2 .  .  F0 BW0   F1 BW1   F2 BW2   F3 BW3   .  .  .  .
#
# Same makespan 3(m+p-1) and bubble (p-1)/(m+p-1) as GPipe, with far less memory.
def one_f_one_b(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """PipeDream-Flush 1F1B with combined backwards (BW); virtual_stages must be 1."""
    check_numbers("1f1b", num_ranks, num_microbatches, virtual_stages)
    schedule: Schedule = {}
    for rank in range(num_ranks):
        forwards = [Action(rank, "F", mb) for mb in range(num_microbatches)]
        backwards = [Action(rank, "BW", mb) for mb in range(num_microbatches)]
        schedule[rank] = _merge_one_f_one_b(forwards, backwards, num_ranks - 1 - rank)
    return schedule


def _interleaved_order(num_ranks: int, num_microbatches: int, virtual_stages: int,
                       backward: bool) -> list[tuple[int, int]]:
    """(chunk, mb_index) in run order: groups of p micro-batches, each group through every chunk."""
    chunks = range(virtual_stages - 1, -1, -1) if backward else range(virtual_stages)
    order: list[tuple[int, int]] = []
    for first in range(0, num_microbatches, num_ranks):
        order += [(chunk, first + i) for chunk in chunks for i in range(num_ranks)]
    return order


# Interleaved 1F1B (Megatron-LM). Rank r holds v chunks (stages r, r+p, ...). Micro-batches go in
# groups of p: a group runs through chunk 0, then chunk 1, ... (backwards: chunk v-1 first).
# Rank r warms up with 2(p-1-r) + (v-1)p forwards, then alternates F and BW. Megatron needs
# m % p == 0; other m are padded up to the next multiple of p and the padding micro-batches'
# actions dropped, which keeps the order deadlock-free. Order for p=2, v=2, m=4:
#
#   rank 0 0F0 0F1 2F0 2F1 0F2 2BW0 0F3 2BW1 2F2 0BW0 2F3 0BW1 2BW2 2BW3 0BW2 0BW3
#   rank 1 1F0 1F1 3F0 3BW0 3F1 3BW1 1F2 1BW0 1F3 1BW1 3F2 3BW2 3F3 3BW3 1BW2 1BW3
#
# With F=1, BW=2 per chunk this takes 27 units for 24 of work per rank. When p divides m the
# bubble is (p-1)/(v*m+p-1): the same 3(p-1) idle units as 1F1B, each 1/v of a stage's work.
# With v=1 this is plain 1F1B.
def interleaved_1f1b(num_ranks: int, num_microbatches: int, virtual_stages: int) -> Schedule:
    """Megatron interleaved 1F1B with virtual_stages chunks per rank; any m >= 1."""
    check_numbers("interleaved_1f1b", num_ranks, num_microbatches, virtual_stages, has_virtual=True)
    if virtual_stages == 1:
        return one_f_one_b(num_ranks, num_microbatches)
    padded = -(-num_microbatches // num_ranks) * num_ranks
    forward_order = _interleaved_order(num_ranks, padded, virtual_stages, backward=False)
    backward_order = _interleaved_order(num_ranks, padded, virtual_stages, backward=True)
    placement = looped(num_ranks, virtual_stages)
    schedule: Schedule = {}
    for rank in range(num_ranks):
        chunks = placement.stages_of(rank)  # chunk c of rank r is stage r + c p
        forwards = [Action(chunks[chunk], "F", mb) for chunk, mb in forward_order]
        backwards = [Action(chunks[chunk], "BW", mb) for chunk, mb in backward_order]
        warmup = 2 * (num_ranks - 1 - rank) + (virtual_stages - 1) * num_ranks
        merged = _merge_one_f_one_b(forwards, backwards, warmup)
        schedule[rank] = [a for a in merged if a.mb_index < num_microbatches]
    return schedule


# ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024). The backward is split into
# B (input gradient, on the critical path) and W (weight gradient, free to move). Same warm-up
# as 1F1B; then F and B alternate, but rank r lets its W run r micro-batches behind its B, and
# those late Ws fill the cooldown where 1F1B idles. Simulated with F=B=W=1; p=3, m=4:
#
#   time   0  1  2  3  4  5  6  7  8  9  10 11 12 13
#   rank 0 F0 F1 F2 .  .  B0 W0 F3 B1 W1 B2 W2 B3 W3
#   rank 1 .  F0 F1 .  B0 F2 B1 W0 F3 B2 W1 B3 W2 W3
#   rank 2 .  .  F0 B0 F1 B1 F2 B2 W0 F3 B3 W1 W2 W3
#
# Makespan 3m+p-1 and bubble (p-1)/(3m+p-1): a third of 1F1B's 3(p-1) idle units. As in the
# paper, every rank may then hold min(p, m) micro-batches whose W is pending (rank 0's 1F1B
# peak), while those still waiting for B stay at 1F1B's min(p-r, m).
def zb_h1(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Zero Bubble ZB-H1 with separate B and W; virtual_stages must be 1."""
    check_numbers("zb_h1", num_ranks, num_microbatches, virtual_stages)
    return {rank: _zb_h1_rank(rank, num_ranks, num_microbatches) for rank in range(num_ranks)}


def _zb_h1_rank(rank: int, num_ranks: int, num_microbatches: int) -> list[Action]:
    """One rank of ZB-H1: 1F1B order over F and B, W running `rank` micro-batches behind B."""
    warmup = min(num_ranks - 1 - rank, num_microbatches)
    actions = [Action(rank, "F", mb) for mb in range(warmup)]
    lagging: deque[int] = deque()
    for mb in range(num_microbatches):
        if warmup + mb < num_microbatches:
            actions.append(Action(rank, "F", warmup + mb))
        actions.append(Action(rank, "B", mb))
        lagging.append(mb)
        if len(lagging) > rank:
            actions.append(Action(rank, "W", lagging.popleft()))
    return actions + [Action(rank, "W", mb) for mb in lagging]


def forward_only(placement: Placement, num_microbatches: int) -> Schedule:
    """Evaluation: every micro-batch forward through every stage, in (micro-batch, stage) order, on any placement."""
    return {rank: [Action(s, "F", mb) for mb in range(num_microbatches) for s in placement.stages_of(rank)]
            for rank in range(placement.num_ranks)}
