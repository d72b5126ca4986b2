"""What bfloat16 compute costs or saves: the same training with model.compute_dtype null (float32) and bfloat16.

    python benchmarks/mixed_precision.py                         # 8 x 1024 model, 1f1b, m=8: one process, then p=2
    python benchmarks/mixed_precision.py --steps 20 --repeats 3  # shorter
    python benchmarks/mixed_precision.py --model small           # 8 x 64, where bfloat16's small kernels dominate

One process: two engines (p = 1, one thread) live in this process, one per compute dtype, built from
the same seed; they take turns step by step on the same batches (which goes first alternates), so a
machine that gets busier slows both alike. A step is train_step and update (the bfloat16 side's update
includes rounding the weights' copy). The ratio is the median over steps of bfloat16 / float32.
p = 2: torchrun runs of 2 processes (one thread each, messages over shared memory), float32 and bfloat16
runs alternating, each run's median step_time_s after the warm-up, and the median over the runs.
Bytes: the p = 2 runs' measured sent_bytes (activations and gradients each rank sends per step),
peak_stash_bytes and param_bytes from metrics.jsonl, beside what pipeline.memory predicts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

import harness
from harness import MODEL_OVERRIDES, alternating
from pipeline.config import compose
from pipeline.planning.planner import make_plan
from pipeline.runtime.distributed import connect, read_env
from pipeline.training import data as datasets
from pipeline.training.engine import Engine
from pipeline.training.footprint import calculate
from pipeline.training.setup import as_tensors, load_data, model_spec

DTYPES = ("null", "bfloat16")  # model.compute_dtype: null computes in model.dtype, float32
NAMES = {"null": "float32", "bfloat16": "bfloat16"}


def run_args(args: argparse.Namespace, compute: str) -> list[str]:
    return [*MODEL_OVERRIDES[args.model], "pipeline.microbatches=8", *args.overrides, f"train.steps={args.steps}",
            "train.log_every=1", f"train.eval_every={args.steps}", f"model.compute_dtype={compute}"]


def one_process(args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of every step after the warm-up, both engines (p = 1) stepping in turn in this process."""
    confs = {c: compose([*run_args(args, c), "pipeline.transport=inprocess", "pipeline.ranks=1"]) for c in DTYPES}
    data = load_data(confs["null"])
    specs = {c: model_spec(conf, data) for c, conf in confs.items()}
    plan = make_plan(confs["null"], specs["null"], 1, eval_rows=0)  # the compute dtype changes nothing in the plan
    t = confs["null"].train
    sampler = datasets.BatchSampler(len(data.x_train), t.batch_size, t.seed, confs["null"].data.shuffle)
    x_train, y_train = as_tensors(data.x_train, data.y_train, specs["null"])
    times: dict[str, list[float]] = {c: [] for c in DTYPES}
    with connect(read_env(), 1, "inprocess", confs["null"].dist) as comm_a, \
            connect(read_env(), 1, "inprocess", confs["null"].dist) as comm_b:
        engines = {"null": Engine(confs["null"], specs["null"], plan, comm_a),
                   "bfloat16": Engine(confs["bfloat16"], specs["bfloat16"], plan, comm_b)}
        for step in range(1, args.steps + 1):
            rows = torch.as_tensor(sampler.indices(step - 1))
            for c in alternating(DTYPES, step - 1):
                start = time.perf_counter()
                engines[c].train_step(x_train[rows], y_train[rows], step)
                engines[c].update(step)
                times[c].append(time.perf_counter() - start)
    return {c: t[args.warmup:] for c, t in times.items()}


def two_processes(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Each p = 2 run's median step time (after the warm-up), runs alternating; the last run's byte figures."""
    medians: dict[str, list[float]] = {c: [] for c in DTYPES}
    figures: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for c in alternating(DTYPES, repeat):
            with tempfile.TemporaryDirectory() as run_dir:
                result = harness.torchrun_train(run_args(args, c), 2, run_dir)
                if result.returncode != 0:
                    raise SystemExit(f"the {NAMES[c]} run failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
                rows = harness.metrics(run_dir)
            medians[c].append(statistics.median(r["step_time_s"] for r in rows
                                                if "step_time_s" in r and r["step"] > args.warmup))
            figures[c] = next(r for r in rows if "sent_bytes" in r)
    return medians, figures


def kib(values: list[int]) -> str:
    return " / ".join(harness.kib(v) for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_OVERRIDES), default="default")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="p = 2: torchrun runs per compute dtype (default 3)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. pipeline.schedule=gpipe")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    torch.set_num_threads(1)  # as torchrun gives each of the p = 2 ranks
    started = time.perf_counter()
    alone = one_process(args)
    medians, figures = two_processes(args)
    calc = {c: calculate(compose(run_args(args, c)), 2) for c in DTYPES}
    plan, spec = calc["null"].plan, calc["null"].spec
    print(f"model {args.model} ({'-'.join(map(str, spec.dims))}), batch {calc['null'].conf.train.batch_size}, "
          f"{plan.schedule} m={plan.num_microbatches}, float32 weights, 1 thread per process; "
          f"commit {harness.source_state()}; {time.perf_counter() - started:.0f} s")
    print("| compute | one process: median step (ms) | p = 2: median step (ms) | sent KiB/step, rank 0 / 1 "
          "(predicted) | peak stash KiB, rank 0 / 1 (predicted) | params KiB, rank 0 / 1 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for c in DTYPES:
        f, ranks = figures[c], calc[c].ranks
        print(f"| {NAMES[c]} | {statistics.median(alone[c]) * 1e3:.1f} | {statistics.median(medians[c]) * 1e3:.1f} | "
              f"{kib(f['sent_bytes'])} ({kib(calc[c].sent)}) | {kib(f['peak_stash_bytes'])} "
              f"({kib([m.stash for m in ranks])}) | {kib(f['param_bytes'])} |")
    step_ratio = statistics.median(b / a for a, b in zip(alone["null"], alone["bfloat16"]))
    run_ratio = statistics.median(medians["bfloat16"]) / statistics.median(medians["null"])
    sent = sum(figures["bfloat16"]["sent_bytes"]) / sum(figures["null"]["sent_bytes"])
    print(f"bfloat16 / float32: one process {step_ratio:.2f} (median over {len(alone['null'])} steps in turns), "
          f"p = 2 {run_ratio:.2f} (medians of {args.repeats} runs each); bytes sent {sent:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
