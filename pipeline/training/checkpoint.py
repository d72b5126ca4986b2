"""Checkpoints: one shard per stage, everything keyed by global layer index, so any layout reads any other.

    RUN_DIR/checkpoints/step_00000600/stage_000.pt    one per stage, written by the rank that holds it:
        {"step", "stage_index", "layers": {"0": {"weight", "bias"}},
         "optimizer": {"0": {"weight": {"momentum_buffer"} or {"step", "exp_avg", "exp_avg_sq"}, "bias": ...}},
         "rng": torch.get_rng_state(), "sampler_step": 600, "fingerprint"}
                                     /checkpoint.json  {"step", "num_stages", "stage_layers", "dims", ...,
                                                        "math": {"model.activation": "relu", ...}, "fingerprint"}
                                                       written last, by rank 0, once every shard is on disk
    RUN_DIR/checkpoints/latest                         "step_00000600", replaced atomically

A step directory is complete when it has checkpoint.json. `math` is what defines the function being
trained (math_record); its fingerprint, a short hash, is in every shard too, so a shard of another run
at the same step is refused like a damaged one. Only tensors and plain values are stored;
everything is read back with weights_only=True. The batch sampler is a pure function of (seed, step),
so the step is all the data position there is.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from pipeline.errors import UserError

from pipeline.config import Config
from pipeline.mlp.model import MLPSpec

STEP_PREFIX = "step_"
META = "checkpoint.json"
Params = dict[int, dict[str, Tensor]]


class DamagedCheckpoint(UserError):
    """A shard or checkpoint.json that cannot be read or lacks what it should hold."""

    def __init__(self, message: str, shard: int | None = None):
        super().__init__(message)
        self.shard = shard  # the stage shard at fault; None: checkpoint.json


@dataclass
class State:
    """What a process reads back for the layers it holds."""

    step: int
    params: Params = field(default_factory=dict)  # {layer: {"weight", "bias"?}}
    optimizer: dict[int, dict[str, dict[str, Tensor]]] = field(default_factory=dict)  # {layer: {name: state}}
    rng: dict[int, Tensor] = field(default_factory=dict)  # {layer: the RNG state saved with its shard}


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def shard_name(stage_index: int) -> str:
    return f"stage_{stage_index:03d}.pt"


def math_record(conf: Config, spec: MLPSpec) -> dict[str, Any]:
    """What defines the function a run trains, key by key as the user writes it: a resume that changes
    any of these would continue another model's training. checkpoint.json records it."""
    d = conf.data
    held_out = {"data.test_fraction": d.test_fraction, "data.split_seed": d.split_seed} if d.test_fraction else {}
    sources = {"npz": {"data.path": str(Path(d.path).resolve()) if d.path else None, **held_out},
               "synthetic": {"data.n": d.n, "data.dim": d.dim, "data.classes": d.classes, "data.noise": d.noise,
                             "data.seed": d.seed, "data.test_fraction": d.test_fraction},
               "digits": {"data.split_seed": d.split_seed, "data.test_fraction": d.test_fraction}}
    record = {"model.activation": spec.activation, "model.dtype": spec.dtype, "model.bias": spec.bias,
              "dims": list(spec.dims), "loss.name": conf.loss.name, "loss.l2": conf.loss.l2, "data.name": d.name,
              **sources.get(d.name, {}), "data.standardize": d.standardize,
              "train.seed": conf.train.seed}
    return {k: v for k, v in record.items() if v is not None}  # None: a key this version does not have


def fingerprint(record: dict[str, Any]) -> str:
    """A short hash of a math record: every shard carries its run's, so a foreign shard is noticed."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; some file systems cannot open a directory, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Write to a temporary file, fsync it, rename it over `path`: readers see the old or the new file.

    The bytes are made in memory first: torch.save into a file on a full disk fails with an obscure
    RuntimeError, a plain write with OSError(ENOSPC). A failed write removes its .tmp and names `path`.
    """
    buffer = io.BytesIO()
    write(buffer)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:  # on a read-only file system there is no .tmp to remove
            pass
        raise OSError(err.errno, err.strerror, str(path)) from None
    _fsync_dir(path.parent)


def stage_shard(step: int, stage, optimizer: torch.optim.Optimizer,
                fingerprint: str | None = None) -> dict[str, Any]:
    """A stage's shard: weights and optimizer state per (global layer index, parameter name), and the
    fingerprint of the run's math record."""
    layers, state = {}, {}
    for layer in stage.layers:
        named = layer.named_parameters()
        layers[str(layer.index)] = dict(named)
        state[str(layer.index)] = {name: {k: v for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
                                   for name, p in named}
    shard = {"step": step, "stage_index": stage.stage_index, "layers": layers, "optimizer": state,
             "rng": torch.get_rng_state(), "sampler_step": step}
    return {**shard, "fingerprint": fingerprint} if fingerprint else shard


def save_shards(run_dir: str | Path, step: int, shards: Iterable[dict[str, Any]]) -> None:
    """Write this process's shards of checkpoint `step` (not complete until `commit`)."""
    directory = step_dir(run_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        atomic_write_bytes(directory / shard_name(shard["stage_index"]), lambda f: torch.save(shard, f))


def commit(run_dir: str | Path, step: int, meta: dict[str, Any]) -> None:
    """Mark checkpoint `step` complete (once every shard is written) and point `latest` at it."""
    directory = step_dir(run_dir, step)
    text = json.dumps({"step": step, **meta}).encode()
    atomic_write_bytes(directory / META, lambda f: f.write(text))
    point_latest(run_dir, step)


def point_latest(run_dir: str | Path, step: int) -> None:
    directory = step_dir(run_dir, step)
    atomic_write_bytes(directory.parent / "latest", lambda f: f.write(directory.name.encode()))


def _step_dirs(run_dir: str | Path) -> dict[int, Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return {}
    found = {}
    for d in root.glob(f"{STEP_PREFIX}*"):
        suffix = d.name[len(STEP_PREFIX):]
        if d.is_dir() and suffix.isdigit():
            found[int(suffix)] = d
    return found


def complete_steps(run_dir: str | Path) -> list[int]:
    """Steps of the run's complete checkpoints, oldest first."""
    return sorted(s for s, d in _step_dirs(run_dir).items() if (d / META).is_file())


def any_checkpoint(run_dir: str | Path) -> bool:
    return bool(_step_dirs(run_dir))


def _remove(directory: Path) -> None:
    """checkpoint.json goes first, so a removal cut short never leaves a 'complete' checkpoint with holes."""
    (directory / META).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def prune(run_dir: str | Path, keep: int, current: int) -> None:
    """Keep the `keep` newest complete checkpoints up to `current` (0: all); step 0 is always kept.

    Step directories before `current` that never completed (a run that was killed) go too.
    """
    dirs = _step_dirs(run_dir)
    complete = [s for s in sorted(dirs) if 0 < s <= current and (dirs[s] / META).is_file()]
    kept = set(complete[-keep:] if keep else complete) | {0, current}
    for s, directory in dirs.items():
        if s < current and s not in kept:
            _remove(directory)


def discard_after(run_dir: str | Path, step: int) -> list[int]:
    """Remove the checkpoints after `step` (a history being replaced, or damaged); returns their steps."""
    gone = [s for s in sorted(_step_dirs(run_dir)) if s > step]
    for s in gone:
        _remove(step_dir(run_dir, s))
    return gone


def read_meta(run_dir: str | Path, step: int) -> dict[str, Any]:
    path = step_dir(run_dir, step) / META
    try:
        meta = json.loads(path.read_text())
        stage_layers = [range(first, stop) for first, stop in meta["stage_layers"]]
        if meta["step"] != step or len(stage_layers) != meta["num_stages"]:
            raise ValueError("step or stage count does not match")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpoint(f"{path}: cannot be read ({type(err).__name__}: {_first_line(err)})") from None
    return {**meta, "stage_layers": stage_layers}


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no detail"


def _load_shard(path: Path, step: int, stage_index: int) -> dict[str, Any]:
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise DamagedCheckpoint(f"{path}: cannot be read ({type(err).__name__}: {_first_line(err)})",
                                stage_index) from None
    if not isinstance(shard, dict) or shard.get("step") != step or shard.get("stage_index") != stage_index:
        raise DamagedCheckpoint(f"{path}: not the shard of stage {stage_index} at step {step}", stage_index)
    return shard


def _check_fingerprint(path: Path, shard: dict, meta: dict[str, Any]) -> None:
    """A shard of another run (another seed, model or data) at the same step is not this checkpoint's."""
    expected = meta.get("fingerprint")
    if expected is not None and shard.get("fingerprint") != expected:  # older checkpoints record none
        raise DamagedCheckpoint(f"{path}: written by another run (fingerprint {shard.get('fingerprint')}, "
                                f"checkpoint.json has {expected})", shard["stage_index"])


def _check_layer(path: Path, shard: dict, index: int, meta: dict[str, Any], optimizer: bool) -> None:
    """The layer's weight (and bias) have the shapes of the model in checkpoint.json; its state is there."""
    def damaged(what: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"{path}: {what}", shard["stage_index"])

    dims, key = meta.get("dims"), str(index)
    params = _entry(shard, "layers", key)
    expected = {"weight": (dims[index + 1], dims[index])} if dims else {}
    if dims and meta.get("bias"):
        expected["bias"] = (dims[index + 1],)
    if not isinstance(params, dict) or "weight" not in params:
        raise damaged(f"layer {index} is missing")
    for name, shape in expected.items():
        if not torch.is_tensor(params.get(name)) or tuple(params[name].shape) != shape:
            raise damaged(f"layer {index} {name} is missing or not of shape {list(shape)}")
    if not _finite(params):
        raise damaged(f"layer {index} holds NaN or inf weights")
    if optimizer:
        state = _entry(shard, "optimizer", key)
        if not isinstance(state, dict) or set(state) != set(params):
            raise damaged(f"the optimizer state of layer {index} is missing")
        if not all(isinstance(v, dict) and _finite(v) for v in state.values()):
            raise damaged(f"the optimizer state of layer {index} holds NaN or inf")
        if not torch.is_tensor(shard.get("rng")):
            raise damaged("the RNG state is missing")


def _finite(tensors: dict) -> bool:
    """No NaN or inf in any floating-point tensor of `tensors` (a NaN weight would only fail steps later)."""
    floats = [t for t in tensors.values() if torch.is_tensor(t) and t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in floats)


def _entry(shard: dict, section: str, key: str) -> Any:
    part = shard.get(section)
    return part.get(key) if isinstance(part, dict) else None


def shards_for(meta: dict[str, Any], layers: Iterable[int]) -> list[int]:
    """The stage shards of a checkpoint that hold any of `layers`."""
    wanted = set(layers)
    return [s for s, r in enumerate(meta["stage_layers"]) if wanted.intersection(r)]


def read_state(run_dir: str | Path, step: int, layers: Iterable[int], meta: dict[str, Any] | None = None,
               optimizer: bool = True) -> State:
    """Weights (and optimizer and RNG state) of `layers` from checkpoint `step`, whichever shards hold them.

    Raises DamagedCheckpoint naming the first file that cannot be read or lacks a key.
    """
    meta = meta or read_meta(run_dir, step)
    wanted, state = set(layers), State(step)
    for s in shards_for(meta, wanted):
        path = step_dir(run_dir, step) / shard_name(s)
        shard = _load_shard(path, step, s)
        _check_fingerprint(path, shard, meta)
        for index in wanted.intersection(meta["stage_layers"][s]):
            _check_layer(path, shard, index, meta, optimizer)
            state.params[index] = shard["layers"][str(index)]
            if optimizer:
                state.optimizer[index] = shard["optimizer"][str(index)]
                state.rng[index] = shard["rng"]
    missing = sorted(wanted - set(state.params))
    if missing:
        raise DamagedCheckpoint(f"{step_dir(run_dir, step) / META}: no shard holds layers {missing}")
    return state


def load_layers(run_dir: str | Path, step: int | None = None) -> tuple[int, Params]:
    """(step, {global layer index: {"weight", "bias"?}}) of a complete checkpoint; the latest by default."""
    steps = complete_steps(run_dir)
    if not steps:
        raise UserError(f"{run_dir}: no complete checkpoint found under checkpoints/; is this a run directory?")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserError(f"{run_dir}: no checkpoint for step {step}; available steps: {steps}")
    meta = read_meta(run_dir, step)
    return step, read_state(run_dir, step, range(meta["num_layers"]), meta, optimizer=False).params
