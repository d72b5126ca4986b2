"""Train an MLP as a pipeline: the thin Hydra entry point over `trainer.train(cfg, run_dir)`.

    python -m pipeline.train                                        # one process
    torchrun --standalone --nproc-per-node=2 -m pipeline.train      # a 2-stage pipeline
    python -m pipeline.train model=seed optim=adam pipeline.microbatches=8 train.steps=200

Every rank of a torchrun job shares one run directory (runs/DATE/torchrun-ID); rank 0 alone
writes Hydra's .hydra/ folder. A user mistake exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import signal
import sys
import traceback
from typing import NamedTuple, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline import lifecycle, rundir
from pipeline.distributed import read_env
from pipeline.errors import EXIT_FAILURE, EXIT_USER_ERROR, UserError, disk_error, exit_with, say


def run_dir_name(root: str = "runs") -> str:
    """ROOT/DATE/HH-MM-SS-PID for one process, ROOT/DATE/torchrun-ID for a torchrun job (the same on every
    rank); hydra.run.dir (ROOT=runs) and hydra.sweep.dir (ROOT=multirun) both come from it (see rundir)."""
    return rundir.default_dir(root)


OmegaConf.register_new_resolver("pipeline_run_dir", run_dir_name, replace=True)
_task_started = False


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    from pipeline.trainer import train  # imported here so `--help` stays fast

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        train(cfg, run_dir)
    except (Exception, KeyboardInterrupt) as err:
        _stop(err, run_dir)


def _stop(err: BaseException, run_dir: str) -> NoReturn:
    """Every way a run fails ends here: one line, a note for the peers where the failure is this
    rank's own, then lifecycle.leave (at once: after a lost peer an ordinary exit can hang)."""
    lifecycle.begin_stopping()  # from here on, torchrun's SIGTERM or SIGINT changes nothing
    if isinstance(err, (KeyboardInterrupt, lifecycle.Interrupted)):
        lifecycle.report_interrupt(err)
    verdict = _verdict(err, run_dir)
    if verdict.bug:
        traceback.print_exc()  # a bug: its traceback, then the line its peers will quote
    say(verdict.message, verdict.every_rank)
    if verdict.tell_peers:
        lifecycle.note_failure(read_env().rank, " ".join(verdict.message.split()))
    lifecycle.leave(verdict.code)


class Verdict(NamedTuple):
    """How a failure is reported: the line, the exit code, who prints it, whether peers get a note."""

    message: str
    code: int = EXIT_FAILURE
    every_rank: bool = True  # the rank's own failure (False: every rank found the same, local rank 0 says it)
    tell_peers: bool = True  # False where every rank already knows (a lost peer, a NaN found together)
    bug: bool = False


def _verdict(err: BaseException, run_dir: str) -> Verdict:
    """What to say about `err`, by its kind."""
    from pipeline.runtime import Stuck
    from pipeline.trainer import NonFiniteLoss
    from pipeline.transport import PeerTimeout

    rank = read_env().rank
    if isinstance(err, PeerTimeout):  # a peer died, hung or failed: say which, no traceback
        return Verdict(_lost_peer(err, run_dir), tell_peers=False)
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


def _lost_peer(err: Exception, run_dir: str) -> str:
    """The line for a rank that lost a peer or was ended by torchrun: a peer's failure note where one
    was left, else what it waited on; its entry goes into hang_report.json."""
    from pipeline.transport import Terminated
    from pipeline.watchdog import write_hang_report

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


def _on_sigterm(signum, frame) -> None:
    """torchrun ends the other ranks with SIGTERM when one fails, or when it is stopped itself."""
    from pipeline.transport import Terminated

    if lifecycle.stopping():  # already leaving (a failure or Ctrl-C): one message, one exit code
        return
    terminated = Terminated(f"rank {read_env().rank}: terminated by the launcher (SIGTERM)")
    group = sys.modules.get("torch.distributed")
    if read_env().world_size > 1 and not (group and group.is_initialized()):
        lifecycle.defer(terminated)  # still checking the config: connect raises it (distributed.connect)
        return
    raise terminated


def check_run_dir_override(argv: list[str]) -> None:
    """Hydra creates hydra.run.dir before the task runs and fails with a traceback when it cannot:
    an explicit one is checked first, so that mistake is one line too."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra.run.dir" and value:
            from pipeline.trainer import check_run_dir

            try:
                check_run_dir(value, create=False)
            except UserError as err:
                exit_with(err)


def main() -> None:
    """Run Hydra; its own errors (a bad override, an unknown key) are user errors too: exit 2."""
    lifecycle.watch_launcher()
    signal.signal(signal.SIGINT, lifecycle.on_interrupt)
    check_run_dir_override(sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _hydra_main()
    except KeyboardInterrupt as err:  # while Hydra composes, before the task runs
        lifecycle.report_interrupt(err)
    except SystemExit as stop:
        if stop.code not in (0, None) and not _task_started:
            sys.exit(EXIT_USER_ERROR)
        raise


if __name__ == "__main__":
    main()
