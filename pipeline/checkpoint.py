"""Checkpoints: one shard per stage, layers keyed by global index, so any split reads any other.

    RUN_DIR/checkpoints/step_00000600/stage_000.pt   {"step", "stage_index", "layers": {"0": {"weight", "bias"}}}
                                     /checkpoint.json {"step", "num_stages", "num_layers"}  (written last)
    RUN_DIR/checkpoints/latest                       "step_00000600"  (atomically replaced)

Only tensors and plain values are stored; everything is read back with weights_only=True.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from pipeline.errors import UserError
from pipeline.stage import Stage

STEP_PREFIX = "step_"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_shards(run_dir: str | Path, step: int, stages: Iterable[Stage]) -> None:
    """Write each of this rank's stages as its own shard of checkpoint `step`."""
    directory = step_dir(run_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        layers = {str(layer.index): {"weight": layer.weight, **({"bias": layer.bias} if layer.bias is not None else {})}
                  for layer in stage.layers}
        shard = {"step": step, "stage_index": stage.stage_index, "layers": layers}
        _atomic_write_bytes(directory / f"stage_{stage.stage_index:03d}.pt", lambda f: torch.save(shard, f))


def commit(run_dir: str | Path, step: int, num_stages: int, num_layers: int) -> None:
    """Mark checkpoint `step` complete (call once every shard is written) and point `latest` at it."""
    directory = step_dir(run_dir, step)
    meta = json.dumps({"step": step, "num_stages": num_stages, "num_layers": num_layers}).encode()
    _atomic_write_bytes(directory / "checkpoint.json", lambda f: f.write(meta))
    _atomic_write_bytes(directory.parent / "latest", lambda f: f.write(directory.name.encode()))


def complete_steps(run_dir: str | Path) -> list[int]:
    """Steps of the run's complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = [int(d.name[len(STEP_PREFIX):]) for d in root.glob(f"{STEP_PREFIX}*") if (d / "checkpoint.json").is_file()]
    return sorted(steps)


def load_layers(run_dir: str | Path, step: int | None = None) -> tuple[int, dict[int, dict[str, torch.Tensor]]]:
    """(step, {global layer index: {"weight", "bias"?}}) of a complete checkpoint; the latest by default."""
    steps = complete_steps(run_dir)
    if not steps:
        raise UserError(f"{run_dir}: no complete checkpoint found under checkpoints/; is this a run directory?")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserError(f"{run_dir}: no checkpoint for step {step}; available steps: {steps}")
    directory = step_dir(run_dir, step)
    meta = json.loads((directory / "checkpoint.json").read_text())
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for shard_path in sorted(directory.glob("stage_*.pt")):
        shard = torch.load(shard_path, map_location="cpu", weights_only=True)
        layers.update({int(i): params for i, params in shard["layers"].items()})
    if sorted(layers) != list(range(meta["num_layers"])):
        raise UserError(f"{directory}: shards hold layers {sorted(layers)}, expected 0..{meta['num_layers'] - 1}")
    return step, layers
