"""Check the hand-written chain rule against torch.autograd over every activation, bias and loss.

    python -m pipeline.gradcheck        # prints one row per case and the worst relative error

Relative error of a gradient = max |hand - autograd| / max |autograd|, in float64 (pipeline/mlp/gradcheck.py).
"""

from __future__ import annotations

import argparse

from pipeline.mlp.gradcheck import cases, network_error
from pipeline.mlp.model import MLPSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gradcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--l2", type=float, default=0.05, help="lambda of the regulariser (default 0.05)")
    parser.add_argument("--hidden", default="7,5", help="hidden widths, comma-separated (default 7,5)")
    args = parser.parse_args(argv)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    worst = 0.0
    print(f"{'activation':<10} {'bias':<5} {'loss':<13} {'rel. error':>10}")
    for activation, bias, loss_name in cases():
        spec = MLPSpec((6, *hidden, 4), activation, bias, "float64")
        error = network_error(spec, loss_name, args.l2)
        worst = max(worst, error)
        print(f"{activation:<10} {str(bias):<5} {loss_name:<13} {error:>10.2e}")
    print(f"worst relative error: {worst:.2e}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
