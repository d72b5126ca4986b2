"""pipeline.partition=time against uniform on a model whose layers are uneven: the cut each makes, and step time.

    python benchmarks/partition.py                    # 3 rounds of 24 steps, each rule once per round, alternating
    python benchmarks/partition.py --rounds 1 --steps 8 --json raw.json   # a smoke run (tests/test_distributed.py)

The model: four 16 x 16 layers, a 16 -> 768 one, four 768 x 768 ones and the output layer. A uniform cut
by layer count puts all four large layers on rank 1 (layers 0-4 | 5-9); `partition=time` measures every
layer's F + B + W on this machine and puts two on each rank (0-6 | 7-9). Each round launches
`torchrun --standalone --nproc-per-node=2 -m pipeline.train` once per rule, the order reversing every
round; a run's step time is the fastest logged step after the first three (train.log_every=1), what the
cut allows when the shared machine leaves the ranks alone. Reported per rule: the cut (from the final
checkpoint's stage shards), the step times per round, and time / uniform per round and its median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import harness

RULES = ("uniform", "time")
MODEL = ["data=synthetic", "data.dim=16", "data.n=1024", "model.hidden=[16,16,16,16,768,768,768,768,768]",
         "train.batch_size=512", "pipeline.microbatches=8", "train.log_every=1", "optim.lr=0.01"]
WARMUP = 3  # logged steps left out of the fastest step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/partition.py", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help=f"train.steps of every run (> {WARMUP})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every rule once")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take before it is killed")
    parser.add_argument("--json", type=Path, default=None, help="save every run's figures here")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP or args.rounds < 1 or args.timeout <= 0:
        parser.error(f"--steps must be > {WARMUP}, --rounds >= 1, --timeout > 0")
    return args


def one_run(rule: str, args: argparse.Namespace) -> dict:
    """Train once under `rule`: the fastest step after warm-up and each rank's layers."""
    env = harness.project_env()
    with tempfile.TemporaryDirectory(prefix="partition_") as tmp:
        run = Path(tmp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "pipeline.train", *MODEL, f"train.steps={args.steps}", f"train.eval_every={args.steps}",
               f"pipeline.partition={rule}", f"hydra.run.dir={run}"]
        try:
            done = subprocess.run(cmd, cwd=harness.ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"partition: error: {rule} ran past --timeout {args.timeout:g} s: {' '.join(cmd)}") from None
        if done.returncode != 0:
            print((done.stdout + done.stderr)[-3000:], file=sys.stderr)
            raise SystemExit(f"partition: error: {rule} failed (exit code {done.returncode}): {' '.join(cmd)}")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step_time_s"] for r in rows if "loss" in r and r["step"] > WARMUP]
        final = run / "checkpoints" / f"step_{args.steps:08d}"
        cut = [sorted(int(i) for i in torch.load(final / f"stage_{s:03d}.pt", weights_only=True)["layers"])
               for s in (0, 1)]
    return {"fastest_s": min(steps), "median_s": statistics.median(steps), "cut": cut}


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> list[str]:
    ratios = [t["fastest_s"] / u["fastest_s"] for t, u in zip(results["time"], results["uniform"])]
    lines = [f"## pipeline.partition=time vs uniform: p=2, 1f1b, m=8, {args.rounds} round(s) of {args.steps} steps, "
             f"alternating; {os.cpu_count()} CPU(s)", ""]
    lines += harness.table(["rule", "layers per rank", "fastest step ms (per round)", "median step ms (per round)"],
                           "llrr", ([rule, " / ".join(",".join(map(str, c)) for c in rs[0]["cut"]),
                                     " ".join(f"{1e3 * r['fastest_s']:.1f}" for r in rs),
                                     " ".join(f"{1e3 * r['median_s']:.1f}" for r in rs)] for rule, rs in results.items()))
    lines += ["", f"- time / uniform, fastest step: **{statistics.median(ratios):.2f}** "
                  f"(per round {min(ratios):.2f}-{max(ratios):.2f})"]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = harness.in_rounds(RULES, args.rounds, lambda rule: one_run(rule, args),
                                lambda r: f"fastest step {1e3 * r['fastest_s']:.1f} ms", "partition")
    print("\n".join(report(args, results)))
    if args.json:
        harness.write_json(args.json, {"args": harness.plain(args), "runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
