"""Setting a run up from its config: the data, the model's shape, and the checks made before any work.

Every command that needs the configured data or model (train, plan, simulate, memory, graph, hvp,
equivalence) gets them here, so each refuses a bad batch, file or directory with the same line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.mlp.model import MLPSpec
from pipeline.planning import memory
from pipeline.planning.plan import Plan
from pipeline.runtime.distributed import Env
from pipeline.training import data as datasets


def load_data(conf: Config, warn: bool = False) -> datasets.Dataset:
    """The configured data set, standardised with data.standardize; with `warn`, local rank 0 says on
    stderr when it is not and its features are far from standardised (see data.scale_warning)."""
    d = conf.data
    if d.name == "digits":
        data = datasets.digits(d.test_fraction, d.split_seed)
    elif d.name == "synthetic":
        data = datasets.synthetic(d.n, d.dim, d.classes, d.noise, d.seed, d.test_fraction)
    else:
        data = datasets.npz(d.path, d.test_path, d.test_fraction, d.split_seed)
    if d.standardize:
        return datasets.standardised(data)
    if warn and os.environ.get("LOCAL_RANK", "0") == "0":  # the other commands load the data without it
        warning = datasets.scale_warning(data, f"data.path={d.path}" if d.name == "npz" else f"data={d.name}")
        if warning:
            print(warning, file=sys.stderr, flush=True)
    return data


def model_spec(conf: Config, data: datasets.Dataset) -> MLPSpec:
    """The network's shape, with in_dim and out_dim inferred from the data where null."""
    m = conf.model
    in_dim = m.in_dim or data.in_dim
    out_dim = m.out_dim or data.num_classes
    datasets.check_model_fits(data, in_dim, out_dim)
    return MLPSpec((in_dim, *m.hidden, out_dim), m.activation, m.bias, m.dtype, m.compute_dtype)


def check_batch(conf: Config, data: datasets.Dataset) -> None:
    rows = len(data.x_train)
    if conf.train.batch_size > rows:
        raise ConfigError(f"train.batch_size={conf.train.batch_size} exceeds the {rows} training rows of "
                          f"{data.source}; use a smaller batch")


def check_memory(conf: Config, env: Env, plan: Plan, spec: MLPSpec, data: datasets.Dataset,
                 device: torch.device) -> None:
    """Refuse a model whose parameters, gradients and optimizer state cannot fit, before any is allocated."""
    hint = "use smaller model.hidden widths or more pipeline ranks"
    if conf.model.out_dim is None and spec.dims[-1] == max(spec.dims):
        hint = (f"model.out_dim={spec.dims[-1]} was inferred from the largest label ({spec.dims[-1] - 1}) of "
                f"{data.source}; labels must be 0 .. classes-1, or set model.out_dim")
    first = env.rank - env.local_rank  # torchrun numbers a machine's processes consecutively
    pools = memory.memory_pools(plan, conf.pipeline.in_process, device, range(first, first + env.local_world_size))
    memory.check_fits(conf, plan, spec, pools, device, hint)


def as_tensors(x, y, spec: MLPSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(x, dtype=spec.torch_dtype, device=device),
            torch.as_tensor(y, dtype=torch.long, device=device))


def check_run_dir(run_dir: str | Path, create: bool = True) -> None:
    """hydra.run.dir must be a directory this process can write; refused before any work.

    Walking up to the first existing ancestor catches a path under a regular file, which stops even
    root; with `create`, making the directory and a probe file in it catches the rest.
    """
    path = Path(run_dir).absolute()
    ancestor = next(a for a in (path, *path.parents) if a.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"hydra.run.dir={run_dir}: {ancestor} is a file, not a directory; "
                          "pick another hydra.run.dir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"hydra.run.dir={run_dir}: {ancestor} is not writable; pick a writable hydra.run.dir")
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"hydra.run.dir={run_dir} cannot be written ({err.strerror}); "
                          "pick a writable hydra.run.dir") from None
