"""Export a run's checkpoint as a plain torch.nn.Sequential state_dict.

    python -m pipeline.export RUN_DIR OUT.pt [--step N]

Layer i of the MLP becomes index 2*i of nn.Sequential(Linear, activation, Linear, ...), so the
keys are 0.weight, 0.bias, 2.weight, ... whatever the number of stages that trained it. When the
run standardised its inputs (data.standardize), OUT.scaling.json beside it holds the training
set's per-feature mean and std: the exported network expects x' = (x - mean) / std, not x.
"""

from __future__ import annotations

import argparse
import json
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
    write_scaling(checkpoint.read_meta(run_dir, step).get("input_scaling"), scaling_path(out))
    return step


def scaling_path(out_path: str | Path) -> Path:
    """Where the input scaling of the export `out_path` goes: OUT.pt -> OUT.scaling.json."""
    return Path(out_path).with_suffix(".scaling.json")


def write_scaling(scaling: dict | None, path: Path) -> None:
    """The run's standardisation beside the export; without one, no file (a stale one is removed,
    so the file never describes another run's inputs)."""
    if scaling is None:
        path.unlink(missing_ok=True)
        return
    record = {"formula": "x' = (x - mean) / std", "mean": scaling["mean"], "std": scaling["std"]}
    path.write_text(json.dumps(record, indent=1) + "\n")


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
    sidecar = scaling_path(args.out)
    scaled = (f"; its inputs are standardised: x' = (x - mean) / std with the mean and std in {sidecar}"
              if sidecar.exists() else "; its inputs are used as they are (the run did not standardise them)")
    print(f"exported step {step} of {args.run_dir} to {args.out}{scaled}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
