"""What recompute costs in time and saves in memory: the same training with pipeline.recompute off and on.

    python benchmarks/recompute.py                                   # 8 x 1024 model, 1f1b, p=2, m=8, in-process
    python benchmarks/recompute.py pipeline.schedule=gpipe --steps 20
    python benchmarks/recompute.py --torchrun --repeats 5            # p processes, separate runs
    python benchmarks/recompute.py --model small                     # 8 x 64, a quick look

In-process (the default) two engines live in this process, one with recompute off and one with it
on, built from the same seed; they take turns, step by step, on the same batches (which of the two
goes first alternates), so a machine that gets busier or quieter slows both alike. Each step's time
is its train_step and optimizer update; the ratio is the median over steps (after the warm-up) of
on / off of the same step. One process runs every rank in turn, so this is the ratio of the total
work. --torchrun instead starts p processes (one thread each) per run, alternating off and on runs,
and compares the medians of their step_time_s: the pipeline's critical path, with more noise. The
stash columns are the measured peak_stash_bytes per rank next to what pipeline.memory predicts.
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


def run_args(args: argparse.Namespace, recompute: bool) -> list[str]:
    """The overrides of one side: the model, the user's overrides, the run's length, recompute."""
    return [*MODEL_OVERRIDES[args.model], "pipeline.microbatches=8", *args.overrides, f"train.steps={args.steps}",
            "train.log_every=1", f"train.eval_every={args.steps}", f"pipeline.recompute={str(recompute).lower()}"]


def in_process(args: argparse.Namespace) -> tuple[dict[bool, list[float]], dict[bool, list[int]]]:
    """Seconds of every step and the peak stash per rank, of both engines stepping in turn."""
    inprocess = ["pipeline.transport=inprocess", f"pipeline.ranks={args.ranks}"]
    confs = {flag: compose([*run_args(args, flag), *inprocess]) for flag in (False, True)}
    conf = confs[False]
    data = load_data(conf)
    spec = model_spec(conf, data)
    plan = make_plan(conf, spec, 1, eval_rows=0)  # recompute changes nothing in the plan
    sampler = datasets.BatchSampler(len(data.x_train), conf.train.batch_size, conf.train.seed, conf.data.shuffle)
    x_train, y_train = as_tensors(data.x_train, data.y_train, spec)
    times: dict[bool, list[float]] = {False: [], True: []}
    with connect(read_env(), args.ranks, "inprocess", conf.dist) as comm_off, \
            connect(read_env(), args.ranks, "inprocess", conf.dist) as comm_on:
        engines = {False: Engine(confs[False], spec, plan, comm_off), True: Engine(confs[True], spec, plan, comm_on)}
        for step in range(1, args.steps + 1):
            rows = torch.as_tensor(sampler.indices(step - 1))
            for flag in alternating((False, True), step - 1):
                start = time.perf_counter()
                engines[flag].train_step(x_train[rows], y_train[rows], step)
                engines[flag].update(step)
                times[flag].append(time.perf_counter() - start)
        stash = {flag: engine.stash_figures()["peak_stash_bytes"] for flag, engine in engines.items()}
    return {flag: t[args.warmup:] for flag, t in times.items()}, stash


def under_torchrun(args: argparse.Namespace) -> tuple[dict[bool, list[float]], dict[bool, list[int]]]:
    """Each run's median step time (after the warm-up) and the peak stash per rank, runs alternating off and on."""
    medians: dict[bool, list[float]] = {False: [], True: []}
    stash: dict[bool, list[int]] = {}
    for repeat in range(args.repeats):
        for flag in alternating((False, True), repeat):
            with tempfile.TemporaryDirectory() as run_dir:
                harness.torchrun_train(run_args(args, flag), args.ranks, run_dir).check_returncode()
                rows = harness.metrics(run_dir)
            medians[flag].append(statistics.median(r["step_time_s"] for r in rows
                                                   if "step_time_s" in r and r["step"] > args.warmup))
            stash[flag] = next(r["peak_stash_bytes"] for r in rows if "peak_stash_bytes" in r)
    return medians, stash


def kib(values: list[int]) -> str:
    return " ".join(harness.kib(v) for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_OVERRIDES), default="default")
    parser.add_argument("--ranks", type=int, default=2, help="pipeline ranks p (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="steps per side (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians (default 3)")
    parser.add_argument("--torchrun", action="store_true", help="one process per rank, separate runs")
    parser.add_argument("--repeats", type=int, default=5, help="--torchrun: runs per side (default 5)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. pipeline.schedule=gpipe")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    torch.set_num_threads(1)  # as torchrun gives each rank
    times, stash = under_torchrun(args) if args.torchrun else in_process(args)
    if args.torchrun:
        ratio = statistics.median(times[True]) / statistics.median(times[False])
        how = f"torchrun, {args.ranks} processes: median step of each run, median of {args.repeats} runs"
    else:
        ratio = statistics.median(on / off for on, off in zip(times[True], times[False]))
        how = f"in-process, steps {args.warmup + 1}-{args.steps} in turns; ratio: median over steps of on/off"
    calc = {flag: calculate(compose(run_args(args, flag)), args.ranks) for flag in (False, True)}
    plan = calc[False].plan
    print(f"model {args.model}, {plan.schedule} p={args.ranks} m={plan.num_microbatches} v={plan.virtual_stages}, "
          f"1 thread per process; {how}")
    print(f"{'recompute':<10} {'median step (ms)':>16}  {'peak stash KiB/rank: measured':<30} predicted")
    for flag in (False, True):
        print(f"{'on' if flag else 'off':<10} {statistics.median(times[flag]) * 1e3:>16.1f}  {kib(stash[flag]):<30} "
              f"{kib([m.stash for m in calc[flag].ranks])}")
    saved = 1 - sum(stash[True]) / sum(stash[False])
    print(f"time ratio on/off: {ratio:.2f}; measured stash saved: {saved:.0%} (sum over ranks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
