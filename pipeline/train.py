"""Train an MLP as a pipeline: the thin Hydra entry point over `training.trainer.train(cfg, run_dir)`.

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
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONF_DIR
from pipeline.errors import EXIT_USER_ERROR, UserError, exit_with, say
from pipeline.runtime import lifecycle
from pipeline.runtime.distributed import read_env
from pipeline.runtime.transport import Terminated
from pipeline.training import failure, rundir
from pipeline.training.setup import check_run_dir
from pipeline.training.trainer import train


def run_dir_name(root: str = "runs") -> str:
    """ROOT/DATE/HH-MM-SS-PID for one process, ROOT/DATE/torchrun-ID for a torchrun job (the same on every
    rank); hydra.run.dir (ROOT=runs) and hydra.sweep.dir (ROOT=multirun) both come from it (see rundir)."""
    return rundir.default_dir(root)


OmegaConf.register_new_resolver("pipeline_run_dir", run_dir_name, replace=True)
_task_started = False


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")  # absolute: pipeline-train works too
def _hydra_main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
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
    verdict = failure.verdict(err, run_dir)
    if verdict.bug:
        traceback.print_exc()  # a bug: its traceback, then the line its peers will quote
    say(verdict.message, verdict.every_rank)
    if verdict.tell_peers:
        lifecycle.note_failure(read_env().rank, " ".join(verdict.message.split()))
    lifecycle.leave(verdict.code)


def _on_sigterm(signum, frame) -> None:
    """torchrun ends the other ranks with SIGTERM when one fails, or when it is stopped itself."""
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
