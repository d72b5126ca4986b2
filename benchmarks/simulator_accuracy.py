"""Does the simulator predict real step times? Predicted vs measured under torchrun at p=2, per schedule.

    python benchmarks/simulator_accuracy.py [--steps 30] [--model default|small] [--schedules ...] [--transport shm]
    python benchmarks/simulator_accuracy.py --schedules search,dualpipe_v   # the searched schedule beside the best family

Every run and prediction uses one transport (--transport, default shm). Two predictions per
schedule, both simulated from per-stage F, B, W costs:
  one-process profile  each stage's actions timed through the executor in this process, one thread, and a
                       message of the run's size timed between two processes over the transport, with the
                       all-reduce a logged step runs (python -m pipeline.simulate --measure, its logged step)
  traced-run profile   the costs seen in a short traced torchrun run (trace.enabled=true), where both
                       ranks share the machine as they do in training, message latency included
                       (pipeline.costs.from_trace)
and the measurement: the median step_time_s of a separate, untraced torchrun run after a warm-up
(every step logged, so each is a logged step, as the one-process profile predicts).
Separate torchrun runs drift by 10 % or more on a shared 2-vCPU machine, so the traced-run
prediction is also compared with the traced run's own median step (the trace costs little).
A second table puts each rank's bubble side by side: the unit-cost theory (F = B = W = 1), the
simulation with the traced costs, and the bubble the traced run measured (median over its steps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import NamedTuple

import torch

import harness
from harness import MODEL_OVERRIDES
from pipeline.config import SEARCH, TRANSPORTS, compose
from pipeline.planning.costs import from_trace
from pipeline.runtime import trace
from pipeline.schedules.registry import SCHEDULES
from pipeline.schedules.simulator import simulate
from pipeline.training.forecast import Prediction, predict
from vs_builtin import stages_per_rank


def overrides(model: str, schedule: str, m: int, transport: str = "shm") -> list[str]:
    """The run of one schedule, at the stages per rank vs_builtin.py compares it at, over `transport`
    (search: the stages per rank of the plan it builds)."""
    v = 1 if schedule == SEARCH else stages_per_rank(schedule)
    return MODEL_OVERRIDES[model] + [f"pipeline.schedule={schedule}", f"pipeline.microbatches={m}",
                                     f"pipeline.virtual_stages={v}", f"pipeline.transport={transport}"]


def torchrun(args: list[str], steps: int, run_dir: str, traced: bool) -> list[dict]:
    done = harness.torchrun_train([*args, f"train.steps={steps}", "train.log_every=1", f"train.eval_every={steps}",
                                   f"trace.enabled={str(traced).lower()}"], 2, run_dir)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: a {'traced ' if traced else ''}torchrun run failed (exit {done.returncode}): "
                         f"{' '.join(args)}\n{tail}")
    return harness.metrics(run_dir)


def median_step(rows: list[dict], warmup: int) -> float:
    return statistics.median(r["step_time_s"] for r in rows if "loss" in r and r["step"] > warmup)


def measured_bubbles(rows: list[dict], warmup: int) -> list[float]:
    """Per rank, the median over the steps after `warmup` of the bubble the traced run logged."""
    bubbles = [r["bubble"] for r in rows if isinstance(r.get("bubble"), list) and r["step"] > warmup]
    return [statistics.median(b[rank] for b in bubbles) for rank in range(len(bubbles[0]))]


class Traced(NamedTuple):
    """What a short traced run gives: the step time simulated from the costs it measured, the
    message latency it measured, the simulated and the measured bubble per rank, its own step time."""

    predicted_s: float
    latency_s: float
    simulated_bubble: dict[int, float]
    measured_bubble: list[float]
    step_s: float


def traced_prediction(args: list[str], pred: Prediction, batch_size: int, steps: int, warmup: int) -> Traced:
    """`pred` gives the plan and shapes; its costs are replaced by the traced run's."""
    with tempfile.TemporaryDirectory() as run_dir:
        logged = torchrun(args, steps, run_dir, traced=True)
        events = trace.load_ranks(run_dir)
    plan, spec = pred.plan, pred.spec
    rows = -(-batch_size // plan.num_microbatches)
    costs, update = from_trace(events, spec, list(plan.stage_layers), rows, skip_steps=warmup,
                               transport=pred.transport)
    result = simulate(plan.train_schedule, plan.placement, plan.num_microbatches, costs)
    return Traced(result.makespan + update, costs.latency_s, result.bubble, measured_bubbles(logged, warmup),
                  median_step(logged, warmup))


def unit_bubble(plan) -> dict:
    """Each rank's bubble under unit costs (F = B = W = 1, free messages): the schedule's theory."""
    return simulate(plan.train_schedule, plan.placement, plan.num_microbatches).bubble


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_OVERRIDES), default="default")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--schedules", default=",".join(SCHEDULES),
                        help=f"comma-separated, from {', '.join(SCHEDULES)} and {SEARCH} (default: every named one)")
    parser.add_argument("--transport", default="shm", choices=[t for t in TRANSPORTS if t != "inprocess"],
                        help="pipeline.transport of every run and prediction (default shm)")
    args = parser.parse_args()
    unknown = [name for name in args.schedules.split(",") if name not in (*SCHEDULES, SEARCH)]
    if unknown:
        parser.error(f"--schedules: {unknown[0]!r} is unknown; pick from {', '.join(SCHEDULES)}, {SEARCH}")
    torch.set_num_threads(1)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"model {args.model}, p=2, m={args.microbatches}, transport {args.transport}, {args.steps} steps "
          f"(medians after {args.warmup}); load average {load} at the start\n")
    print("\n".join(harness.table(["schedule", "one-process profile (ms)", "traced-run profile (ms)", "measured (ms)",
                                  "error one-process", "error traced", "traced run's own step (ms)",
                                  "error traced vs it", "message latency one-process / traced (µs)"],
                                 "lrrrrrrrr")))
    bubbles, messages = [], None
    for name in args.schedules.split(","):
        extra = overrides(args.model, name, args.microbatches, args.transport)
        conf = compose(extra)
        pred = predict(conf, ranks=2, measure=True, messages=messages)
        messages = pred.messages  # every schedule here sends messages of one size: timed once
        alone = pred.logged_step_s
        traced = traced_prediction(extra, pred, conf.train.batch_size, args.steps, args.warmup)
        bubbles.append((name, unit_bubble(pred.plan), traced.simulated_bubble, traced.measured_bubble))
        with tempfile.TemporaryDirectory() as run_dir:
            real = median_step(torchrun(extra, args.steps, run_dir, traced=False), args.warmup)
        own = traced.step_s
        print(harness.row([name, f"{alone * 1e3:.1f}", f"{traced.predicted_s * 1e3:.1f}", f"{real * 1e3:.1f}",
                           f"{(alone - real) / real:+.1%}", f"{(traced.predicted_s - real) / real:+.1%}",
                           f"{own * 1e3:.1f}", f"{(traced.predicted_s - own) / own:+.1%}",
                           f"{pred.latency_s * 1e6:.0f} / {traced.latency_s * 1e6:.0f}"]), flush=True)
    print("\nBubble per rank (r0 / r1): idle fraction of the step\n")
    print("\n".join(harness.table(
        ["schedule", "theory, unit costs", "simulated, traced costs", "measured, traced run"], "lrrr",
        ([name, *(" / ".join(f"{b:.1%}" for b in values) for values in
                  ([unit[0], unit[1]], [simulated[0], simulated[1]], measured))]
         for name, unit, simulated, measured in bubbles))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
