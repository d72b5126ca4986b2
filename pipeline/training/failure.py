"""How a failed run is reported: for each kind of failure the one line, the exit code, who says it, who is told.

`python -m pipeline.train` sends every exception of a run here (train._stop), then leaves at once.
"""

from __future__ import annotations

from typing import NamedTuple

from pipeline.errors import EXIT_FAILURE, EXIT_USER_ERROR, UserError, disk_error
from pipeline.runtime import lifecycle
from pipeline.runtime.distributed import read_env
from pipeline.runtime.executor import Stuck
from pipeline.runtime.transport import PeerTimeout, Terminated
from pipeline.training.trainer import NonFiniteLoss
from pipeline.training.watchdog import write_hang_report


class Verdict(NamedTuple):
    """How a failure is reported: the line, the exit code, who prints it, whether peers get a note."""

    message: str
    code: int = EXIT_FAILURE
    every_rank: bool = True  # the rank's own failure (False: every rank found the same, local rank 0 says it)
    tell_peers: bool = True  # False where every rank already knows (a lost peer, a NaN found together)
    bug: bool = False


def verdict(err: BaseException, run_dir: str) -> Verdict:
    """What to say about `err`, by its kind."""
    rank = read_env().rank
    if isinstance(err, PeerTimeout):  # a peer died, hung or failed: say which, no traceback
        return Verdict(lost_peer(err, run_dir), tell_peers=False)
    if isinstance(err, UserError):  # before connect every rank finds it; after, a peer may not: tell it
        return Verdict(str(err), EXIT_USER_ERROR, every_rank=False)
    if isinstance(err, NonFiniteLoss):  # every rank learns it in the same collective
        return Verdict(str(err), every_rank=False, tell_peers=False)
    disk = disk_error(err, run_dir) if isinstance(err, OSError) else None
    if disk:  # the world's doing, not the config's: exit 1
        return Verdict(f"rank {rank}: {disk}")
    if isinstance(err, Stuck):
        return Verdict(str(err))
    return Verdict(f"rank {rank}: {type(err).__name__}: {err}", bug=True)


def lost_peer(err: Exception, run_dir: str) -> str:
    """The line for a rank that lost a peer or was ended by torchrun: a peer's failure note where one
    was left, else what it waited on; its entry goes into hang_report.json."""
    env = read_env()
    gone = lifecycle.launcher_gone()  # its peer most likely noticed first and left; the store went with torchrun
    failed = [] if gone else lifecycle.failed_peers(env.rank, env.world_size)
    if gone:
        message = gone
    elif failed:
        message = f"rank {env.rank}: stopped because rank {failed[0][0]} failed: {failed[0][1]}"
    elif isinstance(err, Terminated):
        message = (f"{err}; no rank reported a failure, so the launcher itself was stopped "
                   "(or a rank was killed without a word)")
    else:
        message = str(err)
    try:
        write_hang_report(run_dir, err, message)
    except OSError as disk:  # a full or read-only run directory: the line says so, briefly
        message += f" (hang_report.json not written: {(disk.strerror or str(disk)).lower()})"
    return message
