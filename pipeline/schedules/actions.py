"""Actions, the words of a schedule: "1F0" is stage 1's forward of micro-batch 0; a schedule maps each rank to its list."""

from __future__ import annotations

import re
from typing import NamedTuple

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
