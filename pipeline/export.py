"""Export a run's checkpoint as a plain torch.nn.Sequential state_dict.

    python -m pipeline.export RUN_DIR OUT.pt [--step N]

Layer i of the MLP becomes index 2*i of nn.Sequential(Linear, activation, Linear, ...), so the
keys are 0.weight, 0.bias, 2.weight, ... whatever the number of stages that trained it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline import checkpoint
from pipeline.errors import UserError, exit_with


def sequential_state_dict(layers: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{global layer index: params} -> nn.Sequential keys (Linear i sits at index 2*i)."""
    return {f"{2 * i}.{name}": tensor for i in sorted(layers) for name, tensor in sorted(layers[i].items())}


def export(run_dir: str, out_path: str, step: int | None = None) -> int:
    """Write the state_dict of checkpoint `step` (default: the latest); returns the step exported."""
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    step, layers = checkpoint.load_layers(run_dir, step)
    out = Path(out_path)
    if out.parent and not out.parent.is_dir():
        raise UserError(f"{out_path}: directory {out.parent} does not exist; create it first")
    torch.save(sequential_state_dict(layers), out)
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run directory (hydra.run.dir) of a training run")
    parser.add_argument("out", help="where to write the state_dict (.pt)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    args = parser.parse_args(argv)
    try:
        step = export(args.run_dir, args.out, args.step)
    except UserError as err:
        exit_with(err)
    print(f"exported step {step} of {args.run_dir} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
