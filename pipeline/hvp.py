"""Hessian-vector products H v of J = L + s, by the R-operator through the layers, checked and timed.

    python -m pipeline.hvp                               # the default model on its first training batch
    python -m pipeline.hvp model=seed loss.name=mse      # any training override

checks H v (pipeline/mlp/hvp.py) against central finite differences of the hand-written gradient
and against autograd's double backward (the oracle), both in float64, and times one H v against one gradient.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace

import torch

from pipeline.config import compose
from pipeline.errors import ConfigError, run_command
from pipeline.mlp import microbatch
from pipeline.mlp.hvp import (autograd_hvp, check_supported, finite_difference_hvp, hvp, median_times,
                              random_direction, relative_error)
from pipeline.mlp.model import MLPSpec, build_layers
from pipeline.mlp.stage import Stage
from pipeline.training.data import BatchSampler
from pipeline.training.setup import as_tensors, check_batch, load_data, model_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.hvp", description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=1e-5, help="finite-difference step along the unit v (1e-5)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds after the warm-up (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="threads while timing (default 1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=seed loss.name=mse")
    args = parser.parse_args(argv)
    return run_command(_hvp_command, args)


def _hvp_command(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.eps) and args.eps > 0) or args.repeats < 1 or args.threads < 1:
        raise ConfigError(f"--eps={args.eps} --repeats={args.repeats} --threads={args.threads}: "
                          "use a finite --eps > 0 and --repeats, --threads >= 1")
    conf = compose(args.overrides)
    data = load_data(conf)
    spec = model_spec(conf, data)
    check_batch(conf, data)
    check_supported(spec.activation)
    rows = BatchSampler(len(data.x_train), conf.train.batch_size, conf.train.seed, conf.data.shuffle).indices(0)
    name, l2 = conf.loss.name, conf.loss.l2
    print(f"model {'-'.join(map(str, spec.dims))} {spec.activation} {'bias' if spec.bias else 'no bias'}, "
          f"{name}, lambda={l2:g}, batch {len(rows)} of {data.source}")
    spec64 = replace(spec, dtype="float64", compute_dtype=None)
    layers = build_layers(spec64, conf.train.seed, range(spec.num_layers))
    x, y = as_tensors(data.x_train[rows], data.y_train[rows], spec64)
    v = random_direction(layers, conf.train.seed)
    ours = hvp(layers, x, y, name, l2, v)
    err_autograd = relative_error(ours, autograd_hvp(spec64, layers, x, y, name, l2, v))
    err_fd = relative_error(ours, finite_difference_hvp(layers, x, y, name, l2, v, args.eps))
    print(f"hvp vs autograd double backward (float64): relative error {err_autograd:.2e}")
    print(f"hvp vs finite differences of the gradient (float64, eps={args.eps:g}): relative error {err_fd:.2e}")
    _print_timing(spec, conf.train.seed, data, rows, name, l2, args)
    return 0 if err_autograd <= 1e-10 and err_fd <= 1e-6 else 1


def _print_timing(spec: MLPSpec, seed: int, data, rows, name: str, l2: float, args: argparse.Namespace) -> None:
    layers = build_layers(spec, seed, range(spec.num_layers))
    x, y = as_tensors(data.x_train[rows], data.y_train[rows], spec)
    v = random_direction(layers, seed)
    stage = Stage(0, 1, layers)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        times = median_times({"gradient": lambda: microbatch.accumulate(stage, x, y, 1, name, l2),
                              "hvp": lambda: hvp(layers, x, y, name, l2, v)}, args.repeats)
    finally:
        torch.set_num_threads(threads)  # as it was: main() may run inside another program (the tests)
    print(f"time ({spec.precision}, {args.threads} thread(s), median of {args.repeats} after a warm-up): "
          f"gradient {times['gradient'] * 1e3:.3f} ms, hvp {times['hvp'] * 1e3:.3f} ms, "
          f"hvp/gradient {times['hvp'] / times['gradient']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
