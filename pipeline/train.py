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

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline import rundir
from pipeline.distributed import read_env
from pipeline.errors import EXIT_FAILURE, EXIT_USER_ERROR, UserError, exit_with


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
    from pipeline.runtime import Stuck
    from pipeline.trainer import NonFiniteLoss, train  # imported here so `--help` stays fast
    from pipeline.transport import PeerTimeout

    from pipeline.watchdog import write_hang_report

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        train(cfg, run_dir)
    except UserError as err:
        exit_with(err)
    except NonFiniteLoss as err:  # every rank learns it in the same collective: local rank 0 says it
        exit_with(err, EXIT_FAILURE)
    except PeerTimeout as err:  # a peer died or hung: say who waited on what, no traceback
        write_hang_report(run_dir, err)
        exit_with(err, EXIT_FAILURE, every_rank=True)
    except Stuck as err:
        exit_with(err, EXIT_FAILURE, every_rank=True)


def _on_sigterm(signum, frame) -> None:
    """torchrun ends the other ranks with SIGTERM when one fails: report it like a lost peer."""
    from pipeline.transport import Terminated

    raise Terminated(f"rank {read_env().rank}: terminated by the launcher (SIGTERM), most likely because "
                     "another rank failed; see its message above")


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
    check_run_dir_override(sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _hydra_main()
    except SystemExit as stop:
        if stop.code not in (0, None) and not _task_started:
            sys.exit(EXIT_USER_ERROR)
        raise


if __name__ == "__main__":
    main()
