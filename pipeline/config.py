"""A typed, validated view of the Hydra config: every bad value is refused here, before any work.

Each error names the key, the value and the fix, on one line (see errors.ConfigError).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
import torch

from pipeline.errors import ConfigError
from pipeline.mlp.layers import ACTIVATIONS
from pipeline.mlp.model import COMPUTE_DTYPES, DTYPES
from pipeline.mlp.objective import LOSSES
from pipeline.schedules.registry import SCHEDULES

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
AUTO = "auto"  # pipeline.schedule=auto: the planner picks schedule, micro-batches and virtual stages
SEARCH = "search"  # pipeline.schedule=search: a schedule built from the costs (schedules.search), not picked
FILE = "file"  # pipeline.schedule=file: the schedule written in pipeline.schedule_file (schedules.files)
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine", "linear")  # optim.schedule: the curves of training.lr, after the warm-up
DEFAULTS_FOR_ERRORS = {"optim.lr": 0.1, "loss.l2": 1e-4, "dist.timeout_s": 60, "optim.momentum": 0.9}
DATASETS = ("digits", "synthetic", "npz")
PARTITIONS = ("uniform", "params", "time")
SEARCH_COSTS = ("flops", "measured")  # pipeline.search_costs
# pipeline.transport: the names a user types; runtime.distributed.connect maps each to its transport (one place)
P2P, IN_PROCESS, SHM = "p2p", "inprocess", "shm"
TRANSPORTS = {AUTO: "one rank per process (torchrun): shm between the ranks of a host, p2p between hosts and on GPUs",
              SHM: "one rank per process (torchrun), messages through shared memory (Linux x86-64, CPU, one host)",
              P2P: "one rank per process (torchrun), torch.distributed point-to-point messages (gloo, NCCL)",
              IN_PROCESS: "every rank in this one process, messages through in-memory mailboxes"}
# The keys each data set and optimizer reads: anything else (a typo, a `+key` Hydra let through) is refused
DATA_KEYS = {"digits": ("name", "shuffle", "standardize", "test_fraction", "split_seed"),
             "synthetic": ("name", "shuffle", "standardize", "test_fraction", "n", "dim", "classes", "noise", "seed"),
             "npz": ("name", "shuffle", "standardize", "path", "test_path", "test_fraction", "split_seed")}
COMMON_OPTIM_KEYS = ("clip_norm", "schedule", "warmup_steps", "min_lr")  # every optimizer reads these
OPTIM_KEYS = {"sgd": ("name", "lr", "momentum", *COMMON_OPTIM_KEYS),
              "adam": ("name", "lr", "betas", "eps", *COMMON_OPTIM_KEYS)}


@dataclass(frozen=True)
class ModelConfig:
    in_dim: int | None
    out_dim: int | None
    hidden: tuple[int, ...]
    activation: str
    bias: bool
    dtype: str
    compute_dtype: str | None = None  # bfloat16: F, B, W and the messages from a copy of the float32 weights


@dataclass(frozen=True)
class DataConfig:
    name: str
    shuffle: bool
    standardize: bool = False  # scale each feature with the training set's mean and std (kept in Dataset.scaling)
    path: str | None = None  # npz
    test_path: str | None = None  # npz
    test_fraction: float | None = 0.2  # digits, synthetic; npz: None (no split) or a share of the file's rows
    split_seed: int = 0  # digits, npz
    n: int = 2048  # synthetic
    dim: int = 32
    classes: int = 4
    noise: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class OptimConfig:
    name: str
    lr: float
    momentum: float = 0.0  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam
    eps: float = 1e-8
    clip_norm: float | None = None  # clip ||dJ/dtheta|| over every stage to this, as clip_grad_norm_ (training.clip)
    schedule: str = "constant"  # the lr curve after the warm-up (training.lr): constant, cosine or linear
    warmup_steps: int = 0  # W: lr * t / W for t <= W; below train.steps
    min_lr: float = 0.0  # where cosine and linear end, at t = train.steps


@dataclass(frozen=True)
class PipelineConfig:
    schedule: str
    microbatches: int
    virtual_stages: int
    partition: str | tuple[int, ...]
    memory_gib: float | None = None  # per-rank budget the planner (schedule=auto) must respect
    transport: str = AUTO  # auto, shm, p2p: one rank per process (torchrun); inprocess: every rank in this process
    ranks: int | None = None  # p; with p2p it must equal the world size
    recompute: bool = False  # keep only each stage's input per micro-batch; recompute the rest in its backward
    schedule_file: str | None = None  # with schedule=file: torch's compute-only CSV (.csv) or our action lines
    search_costs: str = "flops"  # with schedule=search: flops (FLOP counts) | measured (F, B, W timed on every rank)

    @property
    def in_process(self) -> bool:
        """Does this process run every rank (no process group for the pipeline's messages)?"""
        return self.transport == IN_PROCESS


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    seed: int
    log_every: int
    eval_every: int
    resume: str | int = "auto"  # auto: the newest complete checkpoint, if any; never; or a checkpoint's step
    tensorboard: bool = False  # also write the logged scalars as TensorBoard event files under RUN_DIR/tensorboard/


@dataclass(frozen=True)
class LossConfig:
    name: str
    l2: float


@dataclass(frozen=True)
class CheckpointConfig:
    save_initial: bool
    every: int = 0  # also every N steps; 0: only at the end
    keep: int = 3  # the newest K complete checkpoints stay (step 0 always); 0: all


@dataclass(frozen=True)
class TraceConfig:
    enabled: bool = False
    step: int | None = None  # the step drawn in timeline.png (default: the last)


@dataclass(frozen=True)
class DistConfig:
    backend: str
    timeout_s: float
    device: str = "auto"
    init_timeout_s: float = 300.0


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1  # d: replicas of the whole pipeline; the world is p x d processes
    pp: int | None = None  # p: pipeline ranks per replica; null = world size / d (p2p) or pipeline.ranks
    bucket_mib: float = 25.0  # gradients all-reduced across replicas in buckets of at most this size


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    pipeline: PipelineConfig
    train: TrainConfig
    loss: LossConfig
    checkpoint: CheckpointConfig
    dist: DistConfig
    trace: TraceConfig = TraceConfig()
    parallel: ParallelConfig = ParallelConfig()


SECTIONS = tuple(f.name for f in fields(Config))
# the keys of each section (data and optim: see DATA_KEYS and OPTIM_KEYS, which depend on the option)
SECTION_KEYS = {name: tuple(f.name for f in fields(kind)) for name, kind in get_type_hints(Config).items()
                if name not in ("data", "optim")}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(key: str, value: Any, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}; set e.g. {key}={max(minimum, 1)}")
    return value


def _optional_int(key: str, value: Any) -> int | None:
    return None if value is None else _int(key, value)


def _float(key: str, value: Any, positive: bool = False, minimum: float = 0.0) -> float:
    ok = _is_number(value) and (value > 0 if positive else value >= minimum)
    if not ok or value != value or value in (float("inf"), float("-inf")):
        bound = "> 0" if positive else f">= {minimum}"
        example = DEFAULTS_FOR_ERRORS.get(key, 1 if positive else minimum)
        raise ConfigError(f"{key}={value!r} must be a finite number {bound}; set e.g. {key}={example:g}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...] | Mapping[str, Any]) -> str:
    names = tuple(choices)
    if value not in names:
        raise ConfigError(f"{key}={value!r} is unknown; pick one of {', '.join(names)}")
    return value


def _known_keys(raw: Mapping[str, Any], known: Sequence[str], prefix: str, owner: str) -> None:
    """Refuse a key nothing reads: Hydra's `+key=value` adds any name, and a silently ignored
    setting is worse than an error."""
    unknown = [key for key in raw if key not in known]
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]} is not a key of {owner} (its keys: {', '.join(known)}); "
                          "fix the spelling or remove it")


def _check_top_level(raw: Mapping[str, Any]) -> None:
    """Every top-level name must be a section this module parses; a `+group=option` for a group
    that conf/ lacks arrives here as a plain string, which nothing would read."""
    for key, value in raw.items():
        if key in SECTIONS or key == "hydra":
            continue
        if isinstance(value, str):
            groups = ", ".join(sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()))
            raise ConfigError(f"{key}={value}: conf/ has no config group {key!r} (its groups: {groups}), so nothing "
                              f"reads it; pass --config-dir DIR with DIR/{key}/{value}.yaml (starting with "
                              "'# @package _global_') to provide one, or remove it")
        raise ConfigError(f"{key} is not a config section (the sections: {', '.join(SECTIONS)}); "
                          "fix the spelling or remove it")


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = raw.get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(f"config section {name!r} is missing; compose the config from conf/config.yaml")
    if name in SECTION_KEYS:
        _known_keys(section, SECTION_KEYS[name], name, name)
    return section


def _optional_section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return _section(raw, name) if raw.get(name) is not None else {}


def _model(raw: Mapping[str, Any]) -> ModelConfig:
    hidden = raw.get("hidden")
    if not isinstance(hidden, (list, tuple)) or not hidden:
        raise ConfigError(f"model.hidden={hidden!r} must be a non-empty list of widths, e.g. model.hidden=[64]")
    widths = tuple(_int(f"model.hidden[{i}]", w) for i, w in enumerate(hidden))
    return ModelConfig(
        in_dim=_optional_int("model.in_dim", raw.get("in_dim")),
        out_dim=_optional_int("model.out_dim", raw.get("out_dim")),
        hidden=widths,
        activation=_choice("model.activation", raw.get("activation"), ACTIVATIONS),
        bias=_bool("model.bias", raw.get("bias")),
        dtype=_choice("model.dtype", raw.get("dtype"), DTYPES),
        compute_dtype=_compute_dtype(raw.get("compute_dtype"), raw.get("dtype")),
    )


def _compute_dtype(value: Any, dtype: str) -> str | None:
    """model.compute_dtype: null (compute in model.dtype) or bfloat16, which keeps float32 weights."""
    if value is None:
        return None
    if value not in COMPUTE_DTYPES:
        raise ConfigError(f"model.compute_dtype={value!r} is unknown; pick null (compute in model.dtype) or "
                          f"{', '.join(COMPUTE_DTYPES)}")
    if dtype != "float32":
        raise ConfigError(f"model.compute_dtype={value} computes from a copy of float32 weights, but model.dtype="
                          f"{dtype}; set model.dtype=float32 or model.compute_dtype=null")
    return value


def _data(raw: Mapping[str, Any]) -> DataConfig:
    name = _choice("data.name", raw.get("name"), DATASETS)
    _known_keys(raw, DATA_KEYS[name], "data", f"data={name}")
    common = dict(name=name, shuffle=_bool("data.shuffle", raw.get("shuffle")),
                  standardize=_bool("data.standardize", raw.get("standardize", name == "digits")))
    if name == "npz":
        return _npz(raw, common)
    fraction = _test_fraction(raw.get("test_fraction"))
    if name == "digits":
        return DataConfig(**common, test_fraction=fraction,
                          split_seed=_int("data.split_seed", raw.get("split_seed"), 0))
    return DataConfig(
        **common, test_fraction=fraction,
        n=_int("data.n", raw.get("n"), 2), dim=_int("data.dim", raw.get("dim")),
        classes=_int("data.classes", raw.get("classes"), 2),
        noise=_float("data.noise", raw.get("noise")), seed=_int("data.seed", raw.get("seed"), 0),
    )


def _test_fraction(value: Any) -> float:
    fraction = _float("data.test_fraction", value)
    if fraction >= 1:
        raise ConfigError(f"data.test_fraction={fraction} must be below 1; e.g. data.test_fraction=0.2")
    return fraction


def _npz(raw: Mapping[str, Any], common: dict[str, Any]) -> DataConfig:
    """A user's file: a second file for testing (data.test_path), or a share of its rows (data.test_fraction)."""
    path, test_path, fraction = raw.get("path"), raw.get("test_path"), raw.get("test_fraction")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"data.path={path!r} must name an .npz file with arrays X and y; set data.path=FILE")
    if test_path is not None and (not isinstance(test_path, str) or not test_path):
        raise ConfigError(f"data.test_path={test_path!r} must name one .npz file with arrays X and y, or be null; "
                          "set data.test_path=FILE")
    if test_path is not None and fraction is not None:
        raise ConfigError(f"data.test_path={test_path} and data.test_fraction={fraction} both choose the test set; "
                          "set only one of them")
    return DataConfig(**common, path=path, test_path=test_path,
                      test_fraction=None if fraction is None else _test_fraction(fraction),
                      split_seed=_int("data.split_seed", raw.get("split_seed", 0), 0))


def _optim(raw: Mapping[str, Any]) -> OptimConfig:
    name = _choice("optim.name", raw.get("name"), OPTIMIZERS)
    _known_keys(raw, OPTIM_KEYS[name], "optim", f"optim={name}")
    lr = _float("optim.lr", raw.get("lr"), positive=True)
    common = _clip_and_lr(raw, lr)
    if name == "sgd":
        momentum = _float("optim.momentum", raw.get("momentum", 0.0))
        if momentum >= 1:  # the velocity then grows without bound: the run ends in NaN
            raise ConfigError(f"optim.momentum={momentum:g} must be in [0, 1); e.g. optim.momentum=0.9")
        return OptimConfig(name, lr, momentum=momentum, **common)
    betas = raw.get("betas", [0.9, 0.999])
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optim.betas={betas!r} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.999]")
    return OptimConfig(name, lr, betas=(float(betas[0]), float(betas[1])),
                       eps=_float("optim.eps", raw.get("eps", 1e-8), positive=True), **common)


def _clip_and_lr(raw: Mapping[str, Any], lr: float) -> dict[str, Any]:
    """optim.clip_norm, optim.schedule, optim.warmup_steps and optim.min_lr (warmup_steps < train.steps: see parse)."""
    clip_norm = raw.get("clip_norm")
    if clip_norm is not None and not (_is_number(clip_norm) and 0 < clip_norm < float("inf")):
        raise ConfigError(f"optim.clip_norm={clip_norm!r} must be null (no clipping) or a finite number > 0; "
                          "e.g. optim.clip_norm=1.0")
    schedule = _choice("optim.schedule", raw.get("schedule", "constant"), LR_SCHEDULES)
    min_lr = _float("optim.min_lr", raw.get("min_lr", 0.0))
    if min_lr > lr:
        raise ConfigError(f"optim.min_lr={min_lr:g} is above optim.lr={lr:g}; the schedule decays from optim.lr "
                          f"down to optim.min_lr: set e.g. optim.min_lr={lr / 10:g}")
    if min_lr and schedule == "constant":
        raise ConfigError(f"optim.min_lr={min_lr:g} is read only with optim.schedule=cosine or linear, not constant; "
                          "pick one of them or drop optim.min_lr")
    return dict(clip_norm=None if clip_norm is None else float(clip_norm), schedule=schedule,
                warmup_steps=_int("optim.warmup_steps", raw.get("warmup_steps", 0), 0), min_lr=min_lr)


def _partition(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(_int(f"pipeline.partition[{i}]", n) for i, n in enumerate(value))
    if value not in PARTITIONS:
        raise ConfigError(f"pipeline.partition={value!r} is unknown; use uniform, params, time, "
                          "or a list of layer counts per stage, e.g. pipeline.partition=[2,2]")
    return value


def _schedule_file(schedule: str, path: Any) -> str | None:
    """pipeline.schedule_file: required with pipeline.schedule=file, refused without it."""
    if schedule == FILE and (not isinstance(path, str) or not path):
        raise ConfigError(f"pipeline.schedule=file needs pipeline.schedule_file=PATH (torch's CSV as .csv, or our "
                          f"action lines), got {path!r}; set pipeline.schedule_file=PATH")
    if schedule != FILE and path is not None:
        raise ConfigError(f"pipeline.schedule_file={path} is read only with pipeline.schedule=file, not "
                          f"pipeline.schedule={schedule}; add pipeline.schedule=file or drop pipeline.schedule_file")
    return path


def _pipeline(raw: Mapping[str, Any]) -> PipelineConfig:
    schedule = _choice("pipeline.schedule", raw.get("schedule"), (*SCHEDULES, AUTO, SEARCH, FILE))
    return PipelineConfig(
        schedule=schedule,
        schedule_file=_schedule_file(schedule, raw.get("schedule_file")),
        memory_gib=None if raw.get("memory_gib") is None else _float("pipeline.memory_gib", raw.get("memory_gib"),
                                                                       positive=True),
        microbatches=_int("pipeline.microbatches", raw.get("microbatches")),
        virtual_stages=_int("pipeline.virtual_stages", raw.get("virtual_stages")),
        partition=_partition(raw.get("partition", "uniform")),
        transport=_choice("pipeline.transport", raw.get("transport", AUTO), TRANSPORTS),
        ranks=_optional_int("pipeline.ranks", raw.get("ranks")),
        recompute=_bool("pipeline.recompute", raw.get("recompute", False)),
        search_costs=_choice("pipeline.search_costs", raw.get("search_costs", "flops"), SEARCH_COSTS),
    )


def _train(raw: Mapping[str, Any]) -> TrainConfig:
    return TrainConfig(
        steps=_int("train.steps", raw.get("steps")),
        batch_size=_int("train.batch_size", raw.get("batch_size")),
        seed=_int("train.seed", raw.get("seed"), 0),
        log_every=_int("train.log_every", raw.get("log_every")),
        eval_every=_int("train.eval_every", raw.get("eval_every")),
        resume=_resume(raw.get("resume", "auto")),
        tensorboard=_tensorboard(raw.get("tensorboard", False)),
    )


def _tensorboard(value: Any) -> bool:
    """train.tensorboard needs the optional tensorboard package (torch.utils.tensorboard writes through it)."""
    wanted = _bool("train.tensorboard", value)
    if wanted and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard=true needs the tensorboard package, which is not installed; "
                          "pip install -e '.[tensorboard]' or set train.tensorboard=false")
    return wanted


def _resume(value: Any) -> str | int:
    if value in ("auto", "never") or (_is_int(value) and value >= 0):
        return value
    raise ConfigError(f"train.resume={value!r} must be auto, never or the step of a checkpoint (an integer >= 0); "
                      "e.g. train.resume=auto")


def _checkpoint(raw: Mapping[str, Any]) -> CheckpointConfig:
    return CheckpointConfig(
        save_initial=_bool("checkpoint.save_initial", raw.get("save_initial", False)),
        every=_int("checkpoint.every", raw.get("every", 0), 0),
        keep=_int("checkpoint.keep", raw.get("keep", 3), 0),
    )


def _resolve(cfg: DictConfig) -> Mapping[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is required but not set; add {err.full_key}=VALUE") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"the config does not resolve: {str(err).splitlines()[0]}") from None


def parse(cfg: DictConfig | Mapping[str, Any]) -> Config:
    """Check every value and return the typed config; raises ConfigError on the first bad one."""
    raw = _resolve(cfg) if isinstance(cfg, DictConfig) else cfg
    _check_top_level(raw)
    loss, checkpoint, dist = _section(raw, "loss"), _section(raw, "checkpoint"), _section(raw, "dist")
    conf = Config(
        model=_model(_section(raw, "model")),
        data=_data(_section(raw, "data")),
        optim=_optim(_section(raw, "optim")),
        pipeline=_pipeline(_section(raw, "pipeline")),
        train=_train(_section(raw, "train")),
        loss=LossConfig(_choice("loss.name", loss.get("name"), LOSSES), _float("loss.l2", loss.get("l2"))),
        checkpoint=_checkpoint(checkpoint),
        dist=DistConfig(_choice("dist.backend", dist.get("backend"), ("auto", "gloo", "nccl")),
                        _float("dist.timeout_s", dist.get("timeout_s"), positive=True),
                        _choice("dist.device", dist.get("device", "auto"), ("auto", "cpu", "cuda")),
                        _float("dist.init_timeout_s", dist.get("init_timeout_s", 300), positive=True)),
    )
    trace = _optional_section(raw, "trace")
    conf = replace(conf, trace=TraceConfig(_bool("trace.enabled", trace.get("enabled", False)),
                                           _optional_int("trace.step", trace.get("step"))))
    conf = replace(conf, parallel=_parallel(_optional_section(raw, "parallel"), conf.pipeline))
    if conf.trace.step is not None and conf.trace.step > conf.train.steps:
        raise ConfigError(f"trace.step={conf.trace.step} is after the last step ({conf.train.steps}); "
                          "pick a step in range or leave it null")
    if conf.optim.warmup_steps >= conf.train.steps:
        raise ConfigError(f"optim.warmup_steps={conf.optim.warmup_steps} must be below train.steps={conf.train.steps} "
                          f"(the schedule needs a step after the warm-up); e.g. optim.warmup_steps="
                          f"{conf.train.steps // 10}")
    if _is_int(conf.train.resume) and conf.train.resume > conf.train.steps:
        raise ConfigError(f"train.resume={conf.train.resume} is after the last step (train.steps={conf.train.steps}); "
                          "raise train.steps or resume from an earlier checkpoint")
    if conf.pipeline.microbatches > conf.train.batch_size:
        raise ConfigError(f"pipeline.microbatches={conf.pipeline.microbatches} exceeds train.batch_size="
                          f"{conf.train.batch_size}; use at most one micro-batch per example")
    _check_replica_rows(conf)
    _check_update_scalars(conf)
    return conf


def _check_update_scalars(conf: Config) -> None:
    """The optimizer and the L2 term's gradient hand optim.lr and loss.l2 to torch as scalars in model.dtype,
    which refuses one past that dtype's largest number with a bare RuntimeError mid-step. Adam's first step
    divides lr by 1 - beta1 (its bias correction), so its limit is that much lower."""
    largest = float(torch.finfo(DTYPES[conf.model.dtype]).max)
    room = 1 - conf.optim.betas[0] if conf.optim.name == "adam" else 1.0
    for key, value, limit in (("optim.lr", conf.optim.lr, largest * room), ("loss.l2", conf.loss.l2, largest)):
        if value > limit:
            raise ConfigError(f"{key}={value:g} overflows model.dtype={conf.model.dtype} in the update (at most "
                              f"{limit:.3g} there); use a value below {limit:.3g}")


def _parallel(raw: Mapping[str, Any], pipeline: PipelineConfig) -> ParallelConfig:
    conf = ParallelConfig(dp=_int("parallel.dp", raw.get("dp", 1)), pp=_optional_int("parallel.pp", raw.get("pp")),
                          bucket_mib=_float("parallel.bucket_mib", raw.get("bucket_mib", 25.0), positive=True))
    if conf.pp is not None and pipeline.ranks is not None and conf.pp != pipeline.ranks:
        raise ConfigError(f"parallel.pp={conf.pp} and pipeline.ranks={pipeline.ranks} disagree (both are p); "
                          "set only one of them")
    if conf.dp > 1 and pipeline.in_process:
        raise ConfigError(f"parallel.dp={conf.dp} needs one process per rank: use pipeline.transport=p2p under "
                          "torchrun, or parallel.dp=1 with the in-process transport")
    return conf


def _check_replica_rows(conf: Config) -> None:
    """Each of the d replicas trains on its share of the global batch, split into m micro-batches."""
    d, m, batch = conf.parallel.dp, conf.pipeline.microbatches, conf.train.batch_size
    if d > 1 and batch // d < m:
        raise ConfigError(f"train.batch_size={batch} split over parallel.dp={d} replicas leaves {batch // d} rows "
                          f"per replica, fewer than pipeline.microbatches={m}; raise train.batch_size to at least "
                          f"{d * m} or lower pipeline.microbatches")


def in_process(conf: Config, ranks: int) -> Config:
    """The same run with all `ranks` ranks in this one process (how the planning commands measure and predict)."""
    return replace(conf, pipeline=replace(conf.pipeline, transport=IN_PROCESS, ranks=ranks))


def compose(overrides: Sequence[str] = ()) -> Config:
    """The checked config that `python -m pipeline.train OVERRIDES` would run (for the other commands)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return parse(hydra_compose(config_name="config", overrides=list(overrides)))
    except HydraException as err:
        raise ConfigError(" ".join(str(err).split())) from None
