"""Where this process sits in a torchrun job: rank, world size, local rank (one process without torchrun)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    run_id: str | None


def read_env() -> Env:
    """Read torchrun's variables; without them this is rank 0 of a world of one."""
    return Env(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
    )
