"""Predict a run before it runs: step time, each rank's bubble, peak stash, and the predicted timeline.

    python -m pipeline.simulate --ranks 2 [--measure] [--transport T] [--latency-us US] [--png timeline.png] [OVERRIDES]
    python -m pipeline.simulate --from-trace RUN_DIR [--warmup 5]

predicts, for the configured model and schedule, the step time, each rank's bubble and its
peak stashed micro-batches and bytes, and draws the predicted timeline like a measured trace.
The costs come from FLOP counts, from each stage timed here through the executor and a message
timed between two processes over the run's transport (--measure), or from a traced run, whose
measured step time is printed beside. The transport is the config's pipeline.transport unless
--transport names another; auto is shm on a CPU host that can run it, else p2p.
"""

from __future__ import annotations

import argparse

import torch

from pipeline.config import TRANSPORTS, compose
from pipeline.errors import ConfigError, UserError, run_command
from pipeline.planning.costs import add_arguments
from pipeline.runtime.trace import draw_timeline
from pipeline.training.forecast import predict, predict_traced
from pipeline.training.traced_run import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.simulate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--from-trace", metavar="RUN_DIR", help="take p, the config and the costs of a traced run "
                        "(trace.enabled=true) and compare the prediction with its measured step time")
    parser.add_argument("--warmup", type=int, default=5, help="--from-trace: the first steps left out (default 5)")
    parser.add_argument("--latency-us", type=float, default=None, help="per-message latency in us; default: "
                        "measured between two processes (--measure), from the trace (--from-trace), else 50")
    parser.add_argument("--transport", default=None, help=f"whose messages to simulate: {', '.join(TRANSPORTS)} "
                        "(default: the config's pipeline.transport; auto is shm on a CPU host, else p2p)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="link bandwidth in GB/s (default: "
                        "infinite where the latency was measured on the run's messages, else 2)")
    parser.add_argument("--png", default="timeline_predicted.png", help="where to draw the predicted timeline")
    args = parser.parse_args(argv)
    return run_command(_predict_command, args)


def _predict_command(args) -> int:
    """Predict the configured run (FLOP counts or --measure), or a traced one (--from-trace)."""
    if args.from_trace is not None:
        return _traced_command(args)
    if args.ranks < 1:
        raise ConfigError(f"--ranks={args.ranks} must be >= 1")
    if args.latency_us is not None and args.latency_us < 0:
        raise UserError(f"--latency-us={args.latency_us:g} must be >= 0")
    _check_link(args)
    conf = compose(args.overrides)
    torch.set_num_threads(args.threads)
    latency = None if args.latency_us is None else args.latency_us * 1e-6
    pred = predict(conf, args.ranks, args.measure, latency, _bandwidth(args), args.transport)
    _print_header(pred, conf, "measured here" if args.measure else "from FLOP counts")
    print(f"predicted step time {pred.step_s * 1e3:.2f} ms "
          f"(schedule {pred.result.makespan * 1e3:.2f} ms + optimizer step {pred.update_s * 1e3:.2f} ms)")
    if args.measure:
        print(f"a logged step (a metrics.jsonl row) {pred.logged_step_s * 1e3:.2f} ms: {pred.logged_s * 1e3:.2f} ms "
              "more for s, the NaN check and their all-reduce")
    _print_ranks(pred, args.png)
    return 0


def _check_link(args) -> None:
    """--transport names a pipeline.transport; --bandwidth-gbs is positive."""
    if args.transport is not None and args.transport not in TRANSPORTS:
        raise ConfigError(f"--transport={args.transport!r} is unknown; pick one of {', '.join(TRANSPORTS)}")
    if args.bandwidth_gbs is not None and not args.bandwidth_gbs > 0:
        raise UserError(f"--bandwidth-gbs={args.bandwidth_gbs:g} must be > 0")


def _bandwidth(args) -> float | None:
    return None if args.bandwidth_gbs is None else args.bandwidth_gbs * 1e9


def _traced_command(args) -> int:
    """--from-trace RUN_DIR: the run's own costs, its prediction beside its measured step time."""
    if args.measure:
        raise UserError("--from-trace takes the costs from the run's trace, --measure times them here; "
                        "give one of the two")
    if args.overrides:
        raise UserError(f"--from-trace simulates the run as its .hydra/config.yaml says; drop the overrides "
                        f"({' '.join(args.overrides)})")
    if args.transport is not None:
        raise UserError("--from-trace simulates the run over the transport it ran on (its pipeline.transport); "
                        "drop --transport, or give --latency-us US")
    if args.warmup < 0:
        raise UserError(f"--warmup={args.warmup} must be >= 0")
    _check_link(args)
    run = load(args.from_trace)
    traced = predict_traced(run, args.warmup, None if args.latency_us is None else args.latency_us * 1e-6,
                            _bandwidth(args))
    _print_traced(traced, run, args.warmup)
    _print_ranks(traced.pred, args.png, traced.measured_bubble)
    return 0


def _print_traced(traced, run, warmup: int) -> None:
    """The header, the prediction, the measured step time and the error of a traced run."""
    pred, first = traced.pred, min(s for s in run.step_times if s > warmup)
    _print_header(pred, run.conf, f"from the trace of {run.run_dir} (steps after {warmup})")
    unlogged = traced.unlogged_update_s
    other = "" if unlogged is None else f"; {unlogged * 1e3:.2f} ms after an unlogged one"
    print(f"predicted step time {pred.step_s * 1e3:.2f} ms (schedule {pred.result.makespan * 1e3:.2f} ms + "
          f"{pred.update_s * 1e3:.2f} ms between schedules, the median after a logged step{other})")
    print(f"measured step time {traced.measured_s * 1e3:.2f} ms (median step_time_s of the {traced.measured_steps} "
          f"logged steps from step {first} on, metrics.jsonl)")
    print(f"error {traced.error:+.1%}")


def _print_header(pred, conf, costs: str) -> None:
    """The first line: schedule, model, batch, where the costs and the message latency came from."""
    plan, spec = pred.plan, pred.spec
    print(f"{plan.schedule}: p={plan.num_ranks} m={plan.num_microbatches} v={plan.virtual_stages}, model "
          f"{'-'.join(map(str, spec.dims))} {spec.precision}, batch {conf.train.batch_size}, costs {costs}, "
          f"transport {pred.transport}, message latency {pred.latency_s * 1e3:.3f} ms ({pred.latency_source})")


def _print_ranks(pred, png: str, measured_bubble: list[float] | None = None) -> None:
    """Per rank: the predicted bubble (and the measured one), peak stash; then draw the timeline."""
    plan, result = pred.plan, pred.result
    print("rank  bubble  peak_stash  peak_stash_bytes" + ("  measured_bubble" if measured_bubble else ""))
    for r in range(plan.num_ranks):
        measured = f"  {measured_bubble[r]:15.1%}" if measured_bubble else ""
        print(f"{r:4d}  {result.bubble[r]:6.1%}  {result.peak_stash[r]:10d}  {pred.stash_bytes[r]:16d}{measured}")
    spans = {r: [(a * 1e3, b * 1e3, str(act)) for a, b, act in run] for r, run in result.timeline.items()}
    print(f"timeline: {draw_timeline(spans, png, title=f'predicted: {plan.schedule}', unit='ms')}")


if __name__ == "__main__":
    raise SystemExit(main())
