"""A run's checkpoint as a plain torch.nn.Sequential state_dict (`python -m pipeline.export`).

Layer i of the MLP becomes index 2*i of nn.Sequential(Linear, activation, Linear, ...), so the
keys are 0.weight, 0.bias, 2.weight, ... whatever the number of stages that trained it. When the
run standardised its inputs (data.standardize), OUT.scaling.json beside it holds the training
set's per-feature mean and std: the exported network expects x' = (x - mean) / std, not x.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.training import checkpoint


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
