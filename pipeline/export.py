"""Export a run's checkpoint as a plain torch.nn.Sequential state_dict.

    python -m pipeline.export RUN_DIR OUT.pt [--step N]

Layer i becomes index 2*i of nn.Sequential(Linear, activation, Linear, ...); a run that standardised
its inputs also gets OUT.scaling.json (see pipeline/training/export.py).
"""

from __future__ import annotations

import argparse

from pipeline.errors import UserError, exit_with
from pipeline.training.export import export, scaling_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run directory (hydra.run.dir) of a training run")
    parser.add_argument("out", help="where to write the state_dict (.pt)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    args = parser.parse_args(argv)
    try:
        step = export(args.run_dir, args.out, args.step)
    except UserError as err:
        exit_with(err)
    sidecar = scaling_path(args.out)
    scaled = (f"; its inputs are standardised: x' = (x - mean) / std with the mean and std in {sidecar}"
              if sidecar.exists() else "; its inputs are used as they are (the run did not standardise them)")
    print(f"exported step {step} of {args.run_dir} to {args.out}{scaled}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
