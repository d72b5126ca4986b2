"""The one registry of schedules: name -> builder, whether it takes virtual stages, the placement it assumes.

Config validation, the commands, the planner, the equivalence check, the tests and the benchmarks read
it; to add a schedule, write its builder and add its line here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from pipeline.schedules import builders
from pipeline.schedules.actions import Schedule
from pipeline.schedules.dualpipe_v import dualpipe_v
from pipeline.schedules.placement import Placement, looped, v_shape
from pipeline.schedules.zb_h2 import zb_h2
from pipeline.schedules.zb_v import zb_v


class Entry(NamedTuple):
    """What the registry knows of one schedule."""

    build: Callable[[int, int, int], Schedule]  # (num_ranks, num_microbatches, virtual_stages) -> actions
    placement: Callable[[int, int], Placement]  # (num_ranks, virtual_stages) -> stage -> rank
    virtual: bool  # takes virtual_stages > 1
    fixed_stages: int | None = None  # the stages per rank it always runs (a V: 2); None: virtual_stages says


class Program(NamedTuple):
    """A built schedule: each rank's actions and the placement they assume."""

    actions: Schedule
    placement: Placement


SCHEDULES: dict[str, Entry] = {
    "gpipe": Entry(builders.gpipe, looped, virtual=True),
    "1f1b": Entry(builders.one_f_one_b, looped, virtual=False),
    "interleaved_1f1b": Entry(builders.interleaved_1f1b, looped, virtual=True),
    "zb_h1": Entry(builders.zb_h1, looped, virtual=False),
    "zb_h2": Entry(zb_h2, looped, virtual=False),
    "zb_v": Entry(zb_v, v_shape, virtual=False, fixed_stages=2),
    "dualpipe_v": Entry(dualpipe_v, v_shape, virtual=False, fixed_stages=2),
}
VIRTUAL: frozenset[str] = frozenset(name for name, entry in SCHEDULES.items() if entry.virtual)


def stages_per_rank(name: str, virtual_stages: int = 1) -> int:
    """The stages per rank schedule `name` runs when asked for `virtual_stages`: that number where the schedule
    takes any, else its fixed count (which `virtual_stages` may name, or leave at its default of 1)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    entry = SCHEDULES[name]
    fixed = entry.fixed_stages
    if fixed is not None and virtual_stages not in (1, fixed):
        raise ValueError(f"{name}: always runs {fixed} stages per rank, so virtual_stages must be {fixed} or left "
                         f"at 1; got {virtual_stages}")
    if fixed is None and isinstance(virtual_stages, int) and virtual_stages > 1 and not entry.virtual:
        raise ValueError(f"{name}: virtual_stages must be 1, got {virtual_stages} "
                         f"(schedules with virtual stages: {', '.join(sorted(VIRTUAL))})")
    return virtual_stages if fixed is None else fixed


def build_schedule(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Program:
    """The compute-only schedule called `name` and its placement; ValueError for unknown names or bad counts."""
    v = stages_per_rank(name, virtual_stages)
    entry = SCHEDULES[name]
    return Program(entry.build(num_ranks, num_microbatches, v), entry.placement(num_ranks, v))
