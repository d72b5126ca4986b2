"""Pipeline schedules: actions, GPipe/1F1B/interleaved/ZB-H1 generators, lowering and a CLI."""

from __future__ import annotations

import argparse
import re
import sys
from collections import deque
from typing import Callable, NamedTuple, Sequence

COMPUTE_KINDS = ("F", "B", "W", "BW")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
BACKWARD_KINDS = ("B", "BW")

_NUMBER = r"(0|[1-9][0-9]*)"  # no leading zeros, so parse stays the exact inverse of __str__
_ACTION_PATTERN = re.compile(_NUMBER + r"(SEND_F|RECV_F|SEND_B|RECV_B|BW|F|B|W)" + _NUMBER)


class Action(NamedTuple):
    """One entry of a rank's program: compute or a transfer for one (stage, micro-batch)."""

    stage_index: int
    kind: str
    mb_index: int

    def __str__(self) -> str:
        return f"{self.stage_index}{self.kind}{self.mb_index}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Read back what __str__ wrote, e.g. "1F0", "0BW3", "2SEND_F1"."""
        match = _ACTION_PATTERN.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected <stage><kind><mb> such as '1F0' or "
                f"'2SEND_B13', with kind one of {', '.join(COMPUTE_KINDS + COMM_KINDS)}"
            )
        return cls(int(match.group(1)), match.group(2), int(match.group(3)))


Schedule = dict[int, list[Action]]  # rank -> its actions, in the order it runs them


def stage_to_rank(stage_index: int, num_ranks: int) -> int:
    """Looped placement: stage s lives on rank s % num_ranks."""
    return stage_index % num_ranks


def stages_of_rank(rank: int, num_ranks: int, virtual_stages: int) -> list[int]:
    """The stages rank holds, in model order: rank, rank + p, rank + 2p, ..."""
    return [rank + chunk * num_ranks for chunk in range(virtual_stages)]


def _check_numbers(name: str, num_ranks: int, num_microbatches: int,
                   virtual_stages: int) -> None:
    """Raise ValueError unless the counts are positive integers this schedule supports."""
    for label, value in (("num_ranks", num_ranks), ("num_microbatches", num_microbatches),
                         ("virtual_stages", virtual_stages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {label} must be an integer >= 1, got {value!r}")
    if virtual_stages > 1 and name not in VIRTUAL:
        raise ValueError(
            f"{name}: virtual_stages must be 1, got {virtual_stages} "
            f"(schedules with virtual stages: {', '.join(sorted(VIRTUAL))})"
        )


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
    _check_numbers("gpipe", num_ranks, num_microbatches, virtual_stages)
    schedule: Schedule = {}
    for rank in range(num_ranks):
        stages = stages_of_rank(rank, num_ranks, virtual_stages)
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
    _check_numbers("1f1b", num_ranks, num_microbatches, virtual_stages)
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
    _check_numbers("interleaved_1f1b", num_ranks, num_microbatches, virtual_stages)
    if virtual_stages == 1:
        return one_f_one_b(num_ranks, num_microbatches)
    padded = -(-num_microbatches // num_ranks) * num_ranks
    forward_order = _interleaved_order(num_ranks, padded, virtual_stages, backward=False)
    backward_order = _interleaved_order(num_ranks, padded, virtual_stages, backward=True)
    schedule: Schedule = {}
    for rank in range(num_ranks):
        forwards = [Action(rank + chunk * num_ranks, "F", mb) for chunk, mb in forward_order]
        backwards = [Action(rank + chunk * num_ranks, "BW", mb) for chunk, mb in backward_order]
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
    _check_numbers("zb_h1", num_ranks, num_microbatches, virtual_stages)
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


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zb_h1": zb_h1,
}
VIRTUAL: frozenset[str] = frozenset({"gpipe", "interleaved_1f1b"})


def build_schedule(name: str, num_ranks: int, num_microbatches: int,
                   virtual_stages: int = 1) -> Schedule:
    """The compute-only schedule called `name`; ValueError for unknown names or bad counts."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](num_ranks, num_microbatches, virtual_stages)


def _is_remote(stage_index: int, peer_stage: int, num_stages: int, num_ranks: int) -> bool:
    """True when peer_stage exists and lives on another rank than stage_index."""
    if not 0 <= peer_stage < num_stages:
        return False
    return stage_to_rank(peer_stage, num_ranks) != stage_to_rank(stage_index, num_ranks)


def _lower_action(action: Action, num_ranks: int, num_stages: int) -> list[Action]:
    """The action with the receives it waits on before it and the sends it feeds after it."""
    s, kind, mb = action
    before: list[Action] = []
    after: list[Action] = []
    if kind == "F" and _is_remote(s, s - 1, num_stages, num_ranks):
        before.append(Action(s, "RECV_F", mb))
    if kind == "F" and _is_remote(s, s + 1, num_stages, num_ranks):
        after.append(Action(s, "SEND_F", mb))
    if kind in BACKWARD_KINDS and _is_remote(s, s + 1, num_stages, num_ranks):
        before.append(Action(s, "RECV_B", mb))
    if kind in BACKWARD_KINDS and _is_remote(s, s - 1, num_stages, num_ranks):
        after.append(Action(s, "SEND_B", mb))
    return before + [action] + after


def lower(schedule: Schedule, num_ranks: int) -> Schedule:
    """Add SEND/RECV actions around compute that crosses ranks (num_stages = max stage + 1)."""
    if any(a.kind in COMM_KINDS for actions in schedule.values() for a in actions):
        raise ValueError("lower() takes a compute-only schedule; this one already has SEND/RECV")
    num_stages = 1 + max((a.stage_index for acts in schedule.values() for a in acts), default=-1)
    lowered: Schedule = {}
    for rank, actions in schedule.items():
        lowered[rank] = [out for a in actions for out in _lower_action(a, num_ranks, num_stages)]
    return lowered


def fuse_backward(schedule: Schedule) -> Schedule:
    """Merge a B directly followed by the W of the same stage and micro-batch into one BW.

    The order of work is unchanged, but BW takes each layer's weight gradient as soon as its
    dJ/dz is known and frees it, so less is held (ZB-H1's rank 0 runs W right after B).
    """
    fused: Schedule = {}
    for rank, actions in schedule.items():
        out: list[Action] = []
        for action in actions:
            if out and action.kind == "W" and out[-1] == Action(action.stage_index, "B", action.mb_index):
                out[-1] = Action(action.stage_index, "BW", action.mb_index)
            else:
                out.append(action)
        fused[rank] = out
    return fused


def _grid_cell(text: str, marked: bool, width: int) -> str:
    """One column entry: the text padded, wrapped in >...< when marked."""
    return (f">{text}<" if marked else f" {text} ").ljust(width + 2)


def format_grid(schedule: Schedule, mark: tuple[int, int] | None = None) -> str:
    """Step x rank table of the actions; mark=(rank, position) wraps that action as >1F3<."""
    ranks = sorted(schedule)
    steps = max((len(schedule[r]) for r in ranks), default=0)
    texts = {r: [str(a) for a in schedule[r]] for r in ranks}
    width = max([len(f"rank {r}") for r in ranks] + [len(t) for r in ranks for t in texts[r]],
                default=0)
    step_width = max(4, len(str(steps - 1)))
    header = [_grid_cell(f"rank {r}", False, width) for r in ranks]
    lines = ["step".rjust(step_width) + " " + "".join(header)]
    for pos in range(steps):
        cells = [_grid_cell(texts[r][pos] if pos < len(texts[r]) else "", mark == (r, pos), width)
                 for r in ranks]
        lines.append(str(pos).rjust(step_width) + " " + "".join(cells))
    return "\n".join(line.rstrip() for line in lines)


def _parse_costs(text: str | None) -> dict[str, float] | None:
    """--costs "F,B,W" or "F,B,W,COMM" -> a cost mapping for the simulator."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (3, 4) or any(v < 0 for v in values):
        raise ValueError(f"--costs must be F,B,W or F,B,W,COMM, non-negative numbers; got {text!r}")
    return dict(zip(("F", "B", "W", "comm"), values))


def _parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.schedule",
        description="Print a pipeline schedule as a step x rank grid and its simulated cost.")
    parser.add_argument("--schedule", required=True, choices=sorted(SCHEDULES))
    parser.add_argument("--stages", type=int, required=True,
                        help="number of ranks p (num_stages = p * virtual stages)")
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument("--virtual-stages", type=int, default=1, dest="virtual_stages")
    parser.add_argument("--comms", action="store_true", help="show the lowered schedule")
    parser.add_argument("--costs", help="F,B,W[,COMM] unit costs (default 1,1,1,0; BW = B + W)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for bad arguments)."""
    args = _parser().parse_args(argv)
    try:
        costs = _parse_costs(args.costs)
        schedule = build_schedule(args.schedule, args.stages, args.microbatches,
                                  args.virtual_stages)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from pipeline.simulate import format_summary, simulate  # late: simulate imports this module

    shown = lower(schedule, args.stages) if args.comms else schedule
    result = simulate(shown, args.stages, args.microbatches, args.virtual_stages, costs)
    print(format_grid(shown))
    print()
    print(_describe(args, costs))
    print(format_summary(result))
    return 0


def _describe(args: argparse.Namespace, costs: dict[str, float] | None) -> str:
    """One line naming the schedule, its shape and the costs it was simulated with."""
    unit = {"F": 1.0, "B": 1.0, "W": 1.0, "comm": 0.0, **(costs or {})}
    num_stages = args.stages * args.virtual_stages
    return (f"{args.schedule}: {args.stages} ranks, {num_stages} stages, "
            f"{args.microbatches} micro-batches; costs F={unit['F']:g} B={unit['B']:g} "
            f"W={unit['W']:g} BW={unit['B'] + unit['W']:g} comm={unit['comm']:g}")


if __name__ == "__main__":
    raise SystemExit(main())
