"""Predict with a trained run as a pipeline: logits and labels of X, the accuracy when y is there, and the memory.

    python -m pipeline.predict RUN_DIR --data X.npz --out P.npz [--step N] [--batch-size B]
    python -m pipeline.predict RUN_DIR --data X.npz --out P.npz --ranks 2             # 2 ranks in this process
    torchrun --standalone --nproc-per-node=2 -m pipeline.predict RUN_DIR --data X.npz --out P.npz

The checkpoint (the newest complete one, or --step N) is resharded onto the ranks this runs on; X is
standardised as the run's training rows were; P.npz holds logits (float32, n x q) and labels (their
argmax). Each rank's memory for prediction is printed beside what training the same model holds
(see pipeline/training/predict.py).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import run_command
from pipeline.training.predict import predict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run directory (hydra.run.dir) of a training run")
    parser.add_argument("--data", required=True, help="an .npz with X (n x d) and, optionally, labels y")
    parser.add_argument("--out", required=True, help="where to write logits and labels (.npz)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per pass, cut into pipeline.microbatches micro-batches (default: train.batch_size)")
    parser.add_argument("--ranks", type=int, default=None,
                        help="pipeline ranks in this one process (default 1; under torchrun the processes are the ranks)")
    return run_command(_predict_command, parser.parse_args(argv))


def _predict_command(args: argparse.Namespace) -> int:
    summary = predict(args.run_dir, args.data, args.out, args.step, args.batch_size, args.ranks)
    if summary is None:  # this process holds no last stage: the one that does prints
        return 0
    print(f"pipeline: predicted {summary['rows']} rows of {args.data} with the checkpoint of step {summary['step']} "
          f"of {args.run_dir} on {summary['ranks']} rank(s); {summary['out']} holds logits "
          f"({summary['rows']} x {summary['classes']}, float32) and labels", flush=True)
    if "accuracy" in summary:
        print(f"pipeline: accuracy {summary['accuracy']:.4f} ({summary['correct']} of {summary['rows']} rows "
              "predicted as their label y)", flush=True)
    for line in summary["memory"]:
        print(f"pipeline: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
