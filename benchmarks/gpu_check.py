"""The device check of issue #6: every schedule on one device through the in-process transport, against the CPU.

    python benchmarks/gpu_check.py                    # on cuda:0 (one line and exit 2 when CUDA is absent)
    python benchmarks/gpu_check.py --device cpu       # the same on the CPU
    python benchmarks/gpu_check.py --quick            # a tiny timing model, 3 steps (tests/test_benchmarks.py)

1. Equivalence, float64: pipeline.equivalence's small problem trained with all p ranks in one process
   on the device (p = 1, 2, 4; every schedule; m = 4; v = 2 where the schedule has virtual stages),
   its final weights against the single-device reference computed on the CPU.
2. Step time, float32: #4's benchmark model (256 -> 8 x 1024 -> 10, ReLU, batch 256, m = 8), per
   schedule and p, the median of --steps timed steps after --warmup, each step synchronised
   (torch.cuda.synchronize) so the clock sees the device's work, not just its launch.

The in-process transport hands tensors between stages on the same device: what is timed is the
runtime and the layers' kernels, without messages. It is the check a lent GPU can run in minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

from pipeline import config
from pipeline.mlp.model import MLPSpec
from pipeline.planning.planner import make_plan
from pipeline.runtime.distributed import Env, connect
from pipeline.schedules.registry import SCHEDULES, VIRTUAL
from pipeline.training.engine import Engine
from pipeline.training.equivalence import difference, pipelined, problem, reference

MODELS = {"default": ((256, *[1024] * 8, 10), 256, 8), "tiny": ((16, *[16] * 7, 4), 16, 4)}  # 9 and 8 layers


def equivalence(device: str, ranks: tuple[int, ...]) -> float:
    """Print the float64 difference from the CPU reference per schedule and p; return the worst."""
    ref, worst = reference(problem()), 0.0
    for name in SCHEDULES:
        cells = []
        for p in ranks:
            v = 2 if name in VIRTUAL else 1
            conf = problem(schedule=name, ranks=p, microbatches=4, virtual_stages=v)
            conf = replace(conf, dist=replace(conf.dist, device=device))
            with tempfile.TemporaryDirectory() as run_dir:
                params, _ = pipelined(conf, run_dir)
            diff = difference(params, ref)
            worst = max(worst, diff)
            cells.append(f"p={p} v={v}: {diff:.1e}")
        print(f"  {name:<17} " + ", ".join(cells), flush=True)
    return worst


def timing_conf(spec: MLPSpec, batch: int, name: str, p: int, m: int, device: str):
    v = 2 if name in VIRTUAL else 1
    return config.parse({
        "model": {"in_dim": spec.dims[0], "out_dim": spec.dims[-1], "hidden": list(spec.dims[1:-1]),
                  "activation": "relu", "bias": True, "dtype": "float32"},
        "data": {"name": "synthetic", "n": batch, "dim": spec.dims[0], "classes": spec.dims[-1], "noise": 0.0,
                 "seed": 0, "test_fraction": 0.0, "shuffle": False},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
        "pipeline": {"schedule": name, "microbatches": m, "virtual_stages": v, "partition": "uniform",
                     "transport": "inprocess", "ranks": p},
        "train": {"steps": 1, "batch_size": batch, "seed": 0, "log_every": 1, "eval_every": 1},
        "loss": {"name": "cross_entropy", "l2": 0.0},
        "checkpoint": {"save_initial": False},
        "dist": {"backend": "auto", "timeout_s": 60, "device": device},
    })


def step_time(conf, spec: MLPSpec, steps: int, warmup: int) -> float:
    """Median seconds of one synchronised train_step + update."""
    plan = make_plan(conf, spec, 1, eval_rows=0)
    with connect(Env(0, 1, 0, 1, None), plan.num_ranks, "inprocess", conf.dist) as comm:
        engine = Engine(conf, spec, plan, comm)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(conf.train.batch_size, spec.dims[0], generator=gen).to(comm.device)
        y = torch.randint(0, spec.dims[-1], (conf.train.batch_size,), generator=gen).to(comm.device)
        sync = torch.cuda.synchronize if comm.device.type == "cuda" else (lambda: None)
        times = []
        for i in range(warmup + steps):
            sync()
            start = time.perf_counter()
            engine.train_step(x, y, i + 1)
            engine.update(i + 1)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def timings(device: str, model: str, ranks: tuple[int, ...], steps: int, warmup: int) -> None:
    dims, batch, m = MODELS[model]
    spec = MLPSpec(dims, "relu", True, "float32")
    print(f"\nstep time, float32, model {'-'.join(map(str, dims))}, batch {batch}, m = {m}, "
          f"median of {steps} steps after {warmup} warm-up ({device}):")
    print(f"  {'schedule':<17} " + "  ".join(f"{f'p={p} ms':>9}" for p in ranks))
    for name in SCHEDULES:
        ms = [step_time(timing_conf(spec, batch, name, p, m, device), spec, steps, warmup) * 1e3 for p in ranks]
        print(f"  {name:<17} " + "  ".join(f"{t:>9.2f}" for t in ms), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--ranks", default="1,2,4", help="pipeline ranks p, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the tiny timing model, 3 steps, 1 warm-up")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; run on a GPU machine or pass --device cpu",
              file=sys.stderr)
        return 2
    ranks = tuple(int(r) for r in args.ranks.split(","))
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {where}\n\nequivalence, float64, m = 4 (difference from the CPU "
          f"single-device reference):", flush=True)
    worst = equivalence(args.device, ranks)
    print(f"  worst relative difference: {worst:.2e}", flush=True)
    if args.quick:
        args.steps, args.warmup = 3, 1
    timings(args.device, "tiny" if args.quick else "default", ranks, args.steps, args.warmup)
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
