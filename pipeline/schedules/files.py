"""Schedule files: torch.distributed.pipelining's compute-only CSV and our own action lines, read and written.

Two formats, told apart by the file's name:

- `NAME.csv`: torch's compute-only CSV (what its `_dump_csv` writes and `_load_csv` reads). Row r is
  rank r, one cell per action in run order, an empty cell for an idle slot. Its kinds F (forward),
  I (input gradient), W (weight gradient) and B (full backward) are our F, B, W and BW; an overlap
  cell `(0F3;3B1)OVERLAP_F_B` is its halves run back to back (0F3, then 3BW1); any other cell
  that is not compute (UNSHARD, RESHARD, REDUCE_GRAD, SEND_F, ...) is skipped.
- any other name (e.g. `NAME.txt`): our own action strings. Line r is rank r, actions separated by
  spaces or commas ("0F0 0F1 0BW0"), kinds F, B (input gradient), W and BW; `#` starts a comment
  and blank lines are skipped.

A stage lives on the rank whose row runs its actions (placement_of); the validator checks the rest.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import NamedTuple

from pipeline.schedules.actions import COMPUTE_KINDS, Action, Schedule
from pipeline.schedules.placement import Placement
from pipeline.schedules.registry import Program
from pipeline.schedules.simulator import ScheduleError, validate

TORCH_KIND = {"F": "F", "B": "I", "W": "W", "BW": "B"}  # our kind -> torch's
OUR_KIND = {torch: ours for ours, torch in TORCH_KIND.items()}
_TORCH_COMPUTE = re.compile(r"(\d+)(F|I|W|B)(\d+)")
_TORCH_OTHER = re.compile(r"(\d+)(UNSHARD|RESHARD|REDUCE_GRAD|SEND_F|RECV_F|SEND_B|RECV_B)(\d*)")
_TORCH_OVERLAP = re.compile(r"\(([^()]*)\)OVERLAP_F_B")


class ScheduleFile(NamedTuple):
    """A schedule read from a file, and where each action came from (for error messages)."""

    path: str
    actions: Schedule  # rank -> compute actions, in run order
    cells: dict[int, list[tuple[int, str]]]  # rank -> (column, cell text) of each action

    def where(self, rank: int, position: int) -> str:
        """'row 2, column 5 ('1F3')': the cell that gave rank's action at `position`."""
        column, text = self.cells[rank][position]
        return f"row {rank + 1}, column {column + 1} ({text!r})"


def is_torch_csv(path: str | Path) -> bool:
    """Is `path` in torch's CSV format (its name ends in .csv)? Any other name holds our action lines."""
    return str(path).lower().endswith(".csv")


def _bad_cell(path: str, row: int, column: int, text: str, expected: str) -> ValueError:
    return ValueError(f"{path}: row {row + 1} (rank {row}), column {column + 1}: cannot read {text!r}; {expected}")


def _torch_cell(text: str) -> list[Action] | None:
    """The compute actions of one torch cell ([] for an idle or non-compute cell), None if it is not torch's."""
    if not text or _TORCH_OTHER.fullmatch(text):
        return []
    overlap = _TORCH_OVERLAP.fullmatch(text)
    if overlap:
        halves = [_torch_cell(part.strip()) for part in overlap.group(1).split(";")]
        return None if None in halves else [a for half in halves for a in half]
    match = _TORCH_COMPUTE.fullmatch(text)
    if match is None:
        return None
    return [Action(int(match.group(1)), OUR_KIND[match.group(2)], int(match.group(3)))]


_TORCH_EXPECTED = ("torch's CSV cells are <stage><F|I|W|B><mb> such as '1F0' or '0I3', an overlap such as "
                   "'(0F3;3B1)OVERLAP_F_B', or empty (our own kinds BW, B = input gradient go in a .txt file)")
_OURS_EXPECTED = ("our action lines hold <stage><F|B|W|BW><mb> such as '1F0' or '0BW3' (compute only; torch's "
                  "CSV with kinds I and B = full backward goes in a .csv file)")


def _rows(path: str) -> list[list[tuple[int, str]]]:
    """The file's rows of (column, cell text): torch's CSV rows, or our non-blank lines split on spaces / commas."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ValueError(f"{path}: cannot read it ({reason}); give the path of a readable schedule file") from None
    if is_torch_csv(path):
        rows = [[(c, cell.strip()) for c, cell in enumerate(row)] for row in csv.reader(io.StringIO(text))]
        while rows and not rows[-1]:
            rows.pop()
        return rows
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    return [list(enumerate(re.split(r"[\s,]+", line.strip()))) for line in lines if line.strip()]


def _our_cell(text: str) -> list[Action] | None:
    """The action of one of our cells ([] for an empty one), None if it is not one of ours."""
    if not text:
        return []
    try:
        action = Action.parse(text)
    except ValueError:
        return None
    return [action] if action.kind in COMPUTE_KINDS else None


def read(path: str | Path) -> ScheduleFile:
    """Read a schedule file (its format from its name, see the module docstring); ValueError in one line."""
    path = str(path)
    torch = is_torch_csv(path)
    parse, expected = (_torch_cell, _TORCH_EXPECTED) if torch else (_our_cell, _OURS_EXPECTED)
    rows = _rows(path)
    if not rows:
        raise ValueError(f"{path}: holds no schedule; write one row of actions per rank")
    actions: Schedule = {}
    cells: dict[int, list[tuple[int, str]]] = {}
    for rank, row in enumerate(rows):
        actions[rank], cells[rank] = [], []
        for column, text in row:
            found = parse(text)
            if found is None:
                raise _bad_cell(path, rank, column, text, expected)
            actions[rank] += found
            cells[rank] += [(column, text)] * len(found)
    return ScheduleFile(path, actions, cells)


def placement_of(schedule: ScheduleFile) -> Placement:
    """Stage -> rank from which row runs each stage's actions; ValueError for a stage on two ranks or on none."""
    owner: dict[int, int] = {}
    for rank, actions in schedule.actions.items():
        for position, action in enumerate(actions):
            first = owner.setdefault(action.stage_index, rank)
            if first != rank:
                raise ValueError(f"{schedule.path}: rank {rank} runs {action} at {schedule.where(rank, position)}, "
                                 f"but stage {action.stage_index} is on rank {first}; a stage lives on one rank")
    idle = [rank for rank, actions in schedule.actions.items() if not actions]
    if idle:
        raise ValueError(f"{schedule.path}: rank {idle[0]} (row {idle[0] + 1}) runs nothing; every rank needs a stage")
    missing = [s for s in range(max(owner) + 1) if s not in owner]
    if missing:
        raise ValueError(f"{schedule.path}: no rank runs stage {missing[0]}, but stages go up to {max(owner)}; "
                         f"stages are numbered 0, 1, ... with none left out")
    return Placement(tuple(owner[s] for s in range(len(owner))))


def microbatches_of(schedule: ScheduleFile) -> int | None:
    """How many micro-batches the file runs when it names exactly 0 .. n-1; None when it skips one (the
    validator then names the action)."""
    named = {a.mb_index for actions in schedule.actions.values() for a in actions}
    return len(named) if named == set(range(len(named))) else None


def load(path: str | Path, num_microbatches: int, key: str = "--microbatches") -> Program:
    """Read, place and validate a schedule file for `num_microbatches` (`key` names that count in the fix);
    ValueError in one line naming the rank, the action and its cell."""
    schedule = read(path)
    placement = placement_of(schedule)
    found = microbatches_of(schedule)
    if found is not None and found != num_microbatches:
        raise ValueError(f"{schedule.path}: runs {found} micro-batches but {key}={num_microbatches}; set "
                         f"{key}={found} or write the file for {num_microbatches}")
    try:
        validate(schedule.actions, placement, num_microbatches)
    except ScheduleError as err:
        cell = f" ({schedule.where(*err.mark)})" if err.mark else ""
        raise ValueError(f"{schedule.path}: {err.summary}{cell}") from None
    return Program(schedule.actions, placement)


def to_torch_csv(schedule: Schedule) -> str:
    """A compute-only schedule as torch's CSV text: row r is rank r, our F/B/W/BW written as torch's F/I/W/B."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for rank in range(len(schedule)):
        for action in schedule[rank]:
            if action.kind not in COMPUTE_KINDS:
                raise ValueError(f"rank {rank}: {action} is not compute; export the schedule before lowering it")
        writer.writerow([f"{a.stage_index}{TORCH_KIND[a.kind]}{a.mb_index}" for a in schedule[rank]])
    return out.getvalue()


def to_lines(schedule: Schedule) -> str:
    """A compute-only schedule in our own format: one line of action strings per rank."""
    return "".join(" ".join(str(a) for a in schedule[rank]) + "\n" for rank in range(len(schedule)))
