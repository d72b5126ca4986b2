"""The README's quickstart training in one process against the 2-process pipeline, over shm and over p2p.

    python benchmarks/quickstart.py                        # digits, 600 steps: p=1 (twice), p=2 shm, p=2 p2p, 3 rounds
    python benchmarks/quickstart.py --repeats 5            # more rounds
    python benchmarks/quickstart.py --steps 20 --repeats 1 # a smoke run (tests/test_benchmarks.py)
    python benchmarks/quickstart.py --json raw.json -- pipeline.schedule=gpipe   # overrides for every run

Each round runs, in alternating order (then reversed), what a user types, each in a fresh run directory:
`python -m pipeline.train` (one process, torch's default threads: one per core), the same with
OMP_NUM_THREADS=1 (the one thread per process that torchrun sets), and
`python -m torch.distributed.run --standalone --nproc-per-node=2 -m pipeline.train pipeline.transport=T`
for T = shm and p2p. Read from each run: the
training time, `time_s` of its summary line (the training loop, evaluation and the final checkpoint
included), and the wall time of the command (interpreter and torch start-up, the process group
too). Reported: per run, the median of the rounds, and p=2 / p=1 for each transport and each p=1
run with its range over the rounds. Target (issue #15): p=2 over shm at most 1.25x p=1 in training
time, held against the faster of the two p=1 runs. On a machine whose cores are busy with other work,
p=1 with a thread per core can be many times slower than with one (OpenMP's threads wait for each other).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

RUNS = ("p=1", "p=1 1 thread", "p=2 shm", "p=2 p2p")  # the p=1 runs are the references of the ratios
REFERENCES = RUNS[:2]
TARGET = 1.25  # p=2 over shm / the faster p=1, training time, at most


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/quickstart.py", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="train.steps of every run (default 600, the README's)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs p=1, p=2 shm, p=2 p2p once")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take before it is killed")
    parser.add_argument("--json", type=Path, default=None, help="save every run's figures here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.timeout <= 0:
        parser.error("--steps and --repeats must be >= 1, --timeout > 0")
    return args


def command(run: str, steps: int, overrides: list[str], run_dir: str) -> list[str]:
    train = ["-m", "pipeline.train", f"train.steps={steps}", *overrides, f"hydra.run.dir={run_dir}"]
    if run in REFERENCES:
        return [sys.executable, *train]
    transport = run.split()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *train,
            f"pipeline.transport={transport}"]


def summary(stdout: str) -> dict[str, str]:
    """The key=value pairs of the run's `pipeline: done ...` line."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("pipeline: done ")), None)
    if line is None:
        raise ValueError("no 'pipeline: done' line")
    return dict(part.split("=", 1) for part in line[len("pipeline: done "):].split() if "=" in part)


def one_run(run: str, args: argparse.Namespace) -> dict:
    """Train once; the summary's time_s, the command's wall time and the line naming the links."""
    env = harness.project_env()
    if run == "p=1 1 thread":  # "p=1" keeps the caller's environment: torch's default threads unless it sets some
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="quickstart_") as run_dir:
        cmd = command(run, args.steps, args.overrides, run_dir)
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=harness.ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"quickstart: error: {run} ran past --timeout {args.timeout:g} s: {' '.join(cmd)}") from None
        wall = time.perf_counter() - start
    try:
        if done.returncode != 0:
            raise ValueError(f"exit code {done.returncode}")
        figures = summary(done.stdout)
    except ValueError as err:
        print((done.stdout + done.stderr)[-3000:], file=sys.stderr)
        raise SystemExit(f"quickstart: error: {run} failed ({err}): {' '.join(cmd)}") from None
    links = next((ln for ln in done.stdout.splitlines() if ln.startswith("pipeline: messages ")), "")
    return {"train_s": float(figures["time_s"]), "wall_s": wall, "ranks": int(figures["ranks"]),
            "links": links.removeprefix("pipeline: messages "), "loss": float(figures.get("loss", "nan"))}


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> list[str]:
    med = {run: {k: statistics.median(r[k] for r in rs) for k in ("train_s", "wall_s")} for run, rs in results.items()}
    lines = [f"## quickstart: python -m pipeline.train (digits, train.steps={args.steps}) in one process vs the "
             f"2-process pipeline; {args.repeats} round(s), alternating; {os.cpu_count()} CPU(s)", ""]
    lines += harness.table(
        ["run", "messages", "training time_s (per round)", "median s", "wall s (per round)", "median s"], "llrrrr",
        ([run, rs[0]["links"] or f"in this process, {threads(run)}", " ".join(f"{r['train_s']:.2f}" for r in rs),
          f"{med[run]['train_s']:.2f}", " ".join(f"{r['wall_s']:.2f}" for r in rs), f"{med[run]['wall_s']:.2f}"]
         for run, rs in results.items()))
    lines += ["", *harness.table(["ratio", "training time (range over rounds)", "wall time (range over rounds)"], "lrr", (
        [f"{run} / {ref}", *(f"**{med[run][k] / med[ref][k]:.2f}** ({range_of(results, run, ref, k)})"
                             for k in ("train_s", "wall_s"))] for run in RUNS[2:] for ref in REFERENCES))]
    ref = min(REFERENCES, key=lambda r: med[r]["train_s"])
    shm = med["p=2 shm"]["train_s"] / med[ref]["train_s"]
    lines += ["", f"- target: p=2 over shm ≤ {TARGET}× p=1 (training time, against the faster p=1 run: {ref}): "
                  f"{shm:.2f}, " + ("met" if shm <= TARGET else "MISSED")]
    return lines


def threads(run: str) -> str:
    count = "1" if run == "p=1 1 thread" else os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={count}" if count else f"torch's default threads ({os.cpu_count()} CPUs)"


def range_of(results: dict[str, list[dict]], run: str, ref: str, key: str) -> str:
    ratios = [r[key] / base[key] for r, base in zip(results[run], results[ref])]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = harness.in_rounds(RUNS, args.repeats, lambda run: one_run(run, args),
                                lambda r: f"time_s {r['train_s']:.2f} wall {r['wall_s']:.2f} s", "quickstart")
    print("\n".join(report(args, results)))
    if args.json:
        harness.write_json(args.json, {"args": harness.plain(args), "runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
