"""Where this project's pipeline spends a step: our side of vs_builtin.py alone, traced and sampled.

    python benchmarks/profile_ours.py --schedule 1f1b --microbatches 8 --steps 30
    python benchmarks/profile_ours.py --schedule 1f1b --microbatches 8 --py-spy /tmp/prof   # + py-spy per rank

Two worker processes (p = 2, gloo, one thread each, as in vs_builtin.py) train the same model with
our Engine, the runtime's action spans on (trace.enabled). Printed per rank: ms per step in each
action kind, the rest of train_step and update(). With --py-spy DIR each worker runs under
`py-spy record --native --idle` and the samples of its main thread are summed by category (matrix
multiply, other tensor kernels, waiting in gloo, Python) and by the innermost line of pipeline/.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import harness
import vs_builtin as vb
from harness import median, ms
from pipeline.schedules.registry import SCHEDULES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/profile_ours.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(vb.MODELS), default="default")
    parser.add_argument("--schedule", choices=tuple(SCHEDULES), default="1f1b")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--py-spy", type=Path, default=None, help="record each worker with py-spy into this folder")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.breakdown, args.no_refs = True, True  # what vs_builtin.Bench reads
    return args


def work(args: argparse.Namespace, rank: int) -> dict:
    """One worker's run (in harness.worker_main): our side traced at p = 2, then at p = 1 on rank 0."""
    bench = vb.Bench(args, rank)
    v = vb.stages_per_rank(args.schedule)
    ours = bench.ours(args.schedule, args.microbatches, v)
    bench.timed(ours, args.warmup)
    bench.timed_steps.clear()
    times = bench.timed(ours, args.steps)
    events = [(e.name, (e.end_ns - e.start_ns) / 1e6) for r in ours.engine.runtimes.values()
              for e in r.events if e.step in bench.timed_steps]
    result = {"breakdown": harness.all_gather(ours.breakdown(bench.timed_steps)), "times": times,
              "events": harness.all_gather(events)}
    ours.close()
    seq_events: list = []

    def alone():  # the same stages at p = 1 on rank 0, while rank 1 waits idle at a barrier
        seq = bench.ours(args.schedule, args.microbatches, v, single=True)
        bench.timed(seq, args.warmup, distributed=False, record=False)
        bench.timed_steps.clear()
        result["seq_times"] = bench.timed(seq, args.steps, distributed=False)
        seq_events.extend((e.name, (e.end_ns - e.start_ns) / 1e6) for r in seq.engine.runtimes.values()
                          for e in r.events if e.step in bench.timed_steps)
        seq.close()

    harness.alone(alone)
    result["seq_events"] = seq_events
    return result


def stage_compute(events: list, steps: int) -> dict[int, float]:
    """ms per step of F, B, W and BW per stage, from (action name, ms) pairs."""
    out: dict[int, float] = collections.defaultdict(float)
    for name, dur in events:
        match = re.fullmatch(r"(\d+)(F|B|W|BW)(\d+)", name)
        if match:
            out[int(match.group(1))] += dur / steps
    return dict(out)


# --- py-spy's collapsed stacks ---------------------------------------------------------------

MATMUL = re.compile(r"gemm|addmm|aten::mm|at::native::(mm|addmm|bmm)|_mm_|mkl|dnnl|blas|matmul", re.I)
WAIT = re.compile(r"wait \(torch|_wait \(pipeline|gloo|pthread_cond|futex|epoll|poll\b|nanosleep|do_wait|wait_for", re.I)
KERNEL = re.compile(r"at::|aten|c10::|torch::|libtorch|\.so\)|\(lib", re.I)


def categorise(stack: list[str]) -> str:
    """The category of one sample from its frames (outermost first)."""
    leafward = list(reversed(stack))
    python = [f for f in leafward if re.search(r"\(.+\.py:\d+\)", f)]
    innermost_py = python[0] if python else ""
    if any(WAIT.search(f) for f in leafward[:12]) or re.search(r"\bwait \(|_wait \(|flush \(|barrier", innermost_py):
        return "waiting (gloo wait / recv / flush)"
    if any(MATMUL.search(f) for f in leafward[:25]):
        return "matrix multiply"
    if any(KERNEL.search(f) for f in leafward[:3]) and not re.search(r"\.py:\d+", leafward[0]):
        return "other tensor kernels + allocation"
    return "Python (interpreter, runtime bookkeeping)"


def summarise(path: Path, top: int = 15) -> str:
    """Categories and the innermost pipeline/ lines of a py-spy raw (collapsed) file."""
    categories: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    total = 0
    for row in path.read_text().splitlines():
        stack_text, _, count_text = row.rpartition(" ")
        if not count_text.isdigit():
            continue
        count, stack = int(count_text), stack_text.split(";")
        if not any("train_step" in f or "update (" in f for f in stack):  # only the timed loop's samples
            continue
        total += count
        category = categorise(stack)
        categories[category] += count
        inner = next((f for f in reversed(stack) if "pipeline/" in f), None)
        if inner:
            lines[f"{inner}  [{category.split(' (')[0]}]"] += count
    if not total:
        return f"{path}: no samples inside train_step"
    out = [f"{path.name}: {total} samples inside train_step/update"]
    out += [f"  {n / total:6.1%}  {c}" for c, n in categories.most_common()]
    out.append("  innermost pipeline/ frame (function (file:line)) [category]:")
    out += [f"  {n / total:6.1%}  {f}" for f, n in lines.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker_result is not None:
        return harness.worker_main(args.timeout, args.worker_result, lambda rank: work(args, rank))
    wrap = None
    if args.py_spy:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        args.py_spy.mkdir(parents=True, exist_ok=True)
        wrap = lambda rank: [spy, "record", "--native", "--idle", "-r", str(args.rate), "-f", "raw",  # noqa: E731
                             "-o", str(args.py_spy / f"rank{rank}.txt"), "--"]
    with tempfile.TemporaryDirectory(prefix="profile_ours_") as workdir:
        # its errors have always been worded as vs_builtin's, whose workers it runs
        res = harness.launch(Path(__file__), argv, vb.P, Path(workdir), args.timeout, "vs_builtin", wrap=wrap)
    print(f"## ours: model={args.model} schedule={args.schedule} m={args.microbatches} p={vb.P}, "
          f"{args.steps} traced steps; median step {ms(median(res['times']))} ms\n")
    print(vb.breakdown_table({"configs": [{"schedule": args.schedule, "m": args.microbatches,
                                           "breakdown": res["breakdown"]}]}))
    print("\nper action kind: count per step, median / 90th percentile / max ms")
    for rank, events in enumerate(res["events"]):
        kinds = collections.defaultdict(list)
        for name, dur in events:
            kinds[name.strip("0123456789")].append(dur)
        print(f"  rank {rank}: " + "; ".join(
            f"{k} {len(d) / args.steps:g}x {statistics.median(d):.2f}/{sorted(d)[int(0.9 * (len(d) - 1))]:.2f}/{max(d):.2f}"
            for k, d in sorted(kinds.items())))
    p1 = sum(stage_compute(res["seq_events"], args.steps).values())
    p2 = [sum(stage_compute(events, args.steps).values()) for events in res["events"]]
    print(f"\ncompute (F+B+W+BW), ms per step: p=2 rank 0 {p2[0]:.1f} + rank 1 {p2[1]:.1f} = {sum(p2):.1f} "
          f"(both processes busy) vs p=1 {p1:.1f} (one process, the other core idle): {sum(p2) / p1:.2f}x; "
          f"median step p=1 (T_seq) {ms(median(res['seq_times']))} ms")
    if args.py_spy:
        for rank in range(vb.P):
            print()
            print(summarise(args.py_spy / f"rank{rank}.txt"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
