"""What a configured run holds per rank: predicted (planning.memory) for prediction and training, and measured in a short run.

`python -m pipeline.memory` prints the table; prediction's rows are the trainer's eval micro-batch
(test rows / eval micro-batches) unless given.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass, field, replace

from pipeline.config import Config, in_process
from pipeline.mlp.microbatch import sizes
from pipeline.mlp.model import MLPSpec
from pipeline.planning.memory import RankMemory, rank_memory, sent_bytes
from pipeline.planning.plan import Plan, replica_batch, retime
from pipeline.planning.planner import make_plan
from pipeline.training.setup import load_data, model_spec
from pipeline.training.trainer import train

KIB = 1024
MEASURED = ("param_bytes", "grad_bytes", "optimizer_bytes", "peak_stash_bytes")  # as Engine.stash_figures names them


@dataclass(frozen=True)
class Calculation:
    """The plan the trainer would make and what each of its ranks holds."""

    conf: Config
    plan: Plan
    spec: MLPSpec
    predict_rows: int  # rows predicted at once (the eval micro-batch by default)
    ranks: list[RankMemory]
    sent: list[int] = field(default_factory=list)  # bytes each rank sends per training step (not memory)


def measure(conf: Config, ranks: int, steps: int = 2) -> dict[str, list[int]]:
    """Train `steps` steps in this process (pipeline.transport=inprocess) and return what the ranks
    held: Engine.stash_figures' per-rank lists, named as in metrics.jsonl."""
    train_conf = replace(conf.train, steps=steps, log_every=steps, eval_every=steps, resume="never")
    conf = replace(_inprocess(conf, ranks), train=train_conf,
                   checkpoint=replace(conf.checkpoint, save_initial=False, every=0),
                   trace=replace(conf.trace, enabled=False))
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        summary = train(conf, run_dir)
    return {key: summary[key] for key in (*MEASURED, "sent_bytes")}


def _inprocess(conf: Config, ranks: int) -> Config:
    """One replica's pipeline in this process: with parallel.dp = d, each replica trains on its share
    of the batch, and every replica's ranks hold the same bytes."""
    one_replica = replace(conf.train, batch_size=replica_batch(conf))
    return replace(in_process(conf, ranks), train=one_replica, parallel=replace(conf.parallel, dp=1))


def calculate(conf: Config, ranks: int, predict_rows: int | None = None) -> Calculation:
    """Per rank, predicted bytes for prediction (of `predict_rows` rows at once, by default the trainer's
    eval micro-batch) and for training under the plan the trainer would make."""
    conf = _inprocess(conf, ranks)
    data = load_data(conf)
    spec = model_spec(conf, data)
    test_rows = 0 if data.x_test is None else len(data.x_test)
    plan = make_plan(conf, spec, 1, eval_rows=test_rows)
    if conf.pipeline.partition == "time":
        plan = retime(plan, spec, conf, list)  # measured here, as the trainer's ranks would
    predict_rows = predict_rows or sizes(test_rows or conf.train.batch_size, plan.eval_microbatches)[0]
    mb_sizes = sizes(conf.train.batch_size, plan.num_microbatches)
    return Calculation(conf, plan, spec, predict_rows,
                       [rank_memory(conf, plan, spec, r, mb_sizes, predict_rows) for r in range(plan.num_ranks)],
                       [sent_bytes(plan, spec, mb_sizes, r) for r in range(plan.num_ranks)])


# --- the table ----------------------------------------------------------------------------------

COLUMNS = ("params", "grads", "optimizer", "stash", "rebuild", "training", "in flight", "prediction", "ratio",
           "sent/step")  # the last: what the rank sends per training step (activations and gradients), not memory


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / KIB:.1f}"


def _row(label: str, values: list[str]) -> str:
    return f"{label:<18}" + "".join(f"{v:>11}" for v in values)


def header(calc: Calculation) -> str:
    c, plan, spec = calc.conf, calc.plan, calc.spec
    optim = "adam" if c.optim.name == "adam" else f"sgd momentum {c.optim.momentum:g}"
    return (f"{plan.schedule}: p={plan.num_ranks} m={plan.num_microbatches} v={plan.virtual_stages} "
            f"recompute={'on' if c.pipeline.recompute else 'off'}; model {'-'.join(map(str, spec.dims))} "
            f"{spec.activation} {spec.precision}, batch {c.train.batch_size}, predicting {calc.predict_rows} rows at "
            f"once, {optim}")


def format_table(calc: Calculation, measured: dict[str, list[int]] | None = None) -> str:
    """Per rank the predicted bytes (KiB) and, when given, the measured ones beneath them."""
    lines = [header(calc), _row("KiB per rank", list(COLUMNS))]
    for r, mem in enumerate(calc.ranks):
        values = [mem.params, mem.grads, mem.optimizer, mem.stash, mem.rebuild, mem.training,
                  mem.in_flight, mem.prediction]
        lines.append(_row(f"rank {r}" + (" predicted" if measured else ""),
                          [_kib(v) for v in values] + [f"{mem.training / mem.prediction:.2f}",
                                                          _kib(calc.sent[r] if calc.sent else None)]))
        if measured:
            held = [measured[key][r] for key in MEASURED]
            lines.append(_row(f"rank {r} measured", [_kib(v) for v in held] + ["-", _kib(sum(held))] + ["-"] * 3
                              + [_kib(measured["sent_bytes"][r])]))
    return "\n".join(lines)
