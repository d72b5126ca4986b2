"""The configured MLP's computational graph, drawn like the D2L chapter's figure, with the stage cuts.

    python -m pipeline.graph [--backward] [--ranks N] [--out PREFIX] [OVERRIDES]

writes PREFIX.svg and PREFIX.png (default prefix: graph). Variables are squares, operators
circles ((*) is the product W_i h_{i-1}); x enters lower left, the objective J leaves upper right:

    z_i = W_i h_{i-1} (+ b_i)    h_i = phi(z_i)    (h_0 = x; the last layer's z is o)
    L = l(o, y)    s = lambda/2 (||W_1||^2 + ... + ||W_n||^2)    J = L + s

              stage 0 / rank 0          :   stage 1 / rank 1
             +--------------------------:----+-----------> (l2) -> [s] -> (+) -> [J]
             |                          :    |                             ^
           [W1]                         :  [W2]           [y]              |
             v                          :    v             v               |
     [x] -> (*) -> [z] -> (phi) -> [h] -:-> (*) -> [o] -> (l) -> [L] ------+

A dashed line cuts the graph where one pipeline stage ends and the next begins, using the partition
the trainer would use (pipeline.planning.planner.make_plan): h_i crosses it forward (SEND_F), dJ/dh_i backward
(SEND_B). `--backward` adds every variable's gradient below the forward graph, its edges pointing
the way the gradient flows. The graph as data and its picture: pipeline.planning.graph (build_graph, draw).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pipeline.config import Config, compose
from pipeline.errors import ConfigError, UserError, exit_with
from pipeline.planning.graph import Graph, build_graph, draw, save, stage_plan
from pipeline.training.setup import load_data, model_spec


def _ranks(flag: int | None, conf: Config) -> int:
    """--ranks N, else pipeline.ranks, else 1; the two must agree when both are given."""
    configured = conf.pipeline.ranks
    if flag is not None and flag < 1:
        raise ConfigError(f"--ranks {flag} must be >= 1; e.g. --ranks 2")
    if flag is not None and configured is not None and flag != configured:
        raise ConfigError(f"--ranks {flag} and pipeline.ranks={configured} disagree; give only one of them")
    return flag or configured or 1


def graph_for(overrides: Sequence[str] = (), ranks: int | None = None, backward: bool = False) -> tuple[Graph, str]:
    """The configured model's graph and a title naming its shape and its cut."""
    conf = compose(overrides)
    p = _ranks(ranks, conf)
    spec = model_spec(conf, load_data(conf))
    plan = stage_plan(conf, spec, p)
    graph = build_graph(spec.num_layers, spec.bias, plan.stage_layers, plan.placement, backward)
    shape = "-".join(map(str, spec.dims))
    title = (f"MLP {shape} ({spec.activation}{', bias' if spec.bias else ', no bias'}): {plan.num_stages} "
             f"stage{'s' * (plan.num_stages > 1)} on {p} rank{'s' * (p > 1)}, "
             f"partition={_partition_name(conf.pipeline.partition)}")
    return graph, title


def _partition_name(partition: str | tuple[int, ...]) -> str:
    return partition if isinstance(partition, str) else "[" + ",".join(map(str, partition)) + "]"


def _check_out(prefix: str) -> None:
    """--out must lie under a directory (made if missing), not under a regular file."""
    parent = Path(prefix).absolute().parent
    ancestor = next(a for a in (parent, *parent.parents) if a.exists())
    if not ancestor.is_dir():
        raise UserError(f"--out {prefix}: {ancestor} is a file, not a directory; pick another prefix")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.graph", description=__doc__.splitlines()[0])
    parser.add_argument("--backward", action="store_true", help="add the gradient graph below the forward one")
    parser.add_argument("--ranks", type=int, default=None, help="pipeline ranks p (default: pipeline.ranks or 1)")
    parser.add_argument("--out", default="graph", help="output prefix: writes PREFIX.svg and PREFIX.png")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=seed or model.hidden=[64,64]")
    args = parser.parse_args(argv)
    try:
        _check_out(args.out)
        graph, title = graph_for(args.overrides, args.ranks, args.backward)
        written = save(draw(graph, title), args.out)
    except UserError as err:
        exit_with(err)
    except OSError as err:  # an unwritable --out: the user's to fix
        where = f"cannot write {err.filename}" if err.filename else "cannot write"
        exit_with(UserError(f"--out {args.out}: {where} ({err.strerror or err}); pick a writable prefix"))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
