"""W.grad += dJ/dz x^T as one addmm (the layer's own kernel) against the same sum in 32-row blocks, by width and rows.

    python benchmarks/weight_grad.py                                  # widths 256,1024,2048 x rows 32..128
    python benchmarks/weight_grad.py --widths 64 --rows 48 --repeats 2 --iters 2   # a smoke run (the tests)

Why: on the default benchmark model a zb_v or dualpipe_v step at m = 4 (64-row micro-batches) spends more of
rank 1's time in W than at m = 8 (32 rows, twice as many calls). This times the layer's own operation
(`Layer.accumulate_grad_weight`: one `addmm_`, the inner dimension being the micro-batch's rows) against the
same sum in blocks of 32 rows, on `--layers` width x width layers cycled through so that each gradient comes
back cold, as it does between a stage's micro-batches. One thread, as a pipeline rank runs; the order of the
two alternates per repeat. Printed: per width and row count, both times per layer and blocked / one call
(median of the repeats' ratios; < 1: the blocks are faster), and the largest difference between the two sums.
The project keeps the single call: which shapes gain depends on the BLAS and the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import harness
from pipeline.mlp.layers import Layer, Saved

BLOCK = 32


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/weight_grad.py", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=_int_list, default=[256, 1024, 2048], help="layer widths (square W)")
    parser.add_argument("--rows", type=_int_list, default=[32, 48, 64, 96, 128], help="micro-batch rows")
    parser.add_argument("--layers", type=int, default=8, help="layers cycled through per timed pass")
    parser.add_argument("--iters", type=int, default=10, help="timed passes per repeat and kernel")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; the kernels' order alternates")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--json", type=Path, default=None, help="save every shape's figures here")
    args = parser.parse_args(argv)
    if min(args.layers, args.iters, args.repeats) < 1:
        parser.error("--layers, --iters and --repeats must be >= 1")
    return args


def _in_blocks(layer: Layer, saved: Saved) -> None:
    """W.grad += dJ/dz x^T summed 32 rows at a time (the probe; the layer's own operation is one call)."""
    for start in range(0, saved.x.shape[0], BLOCK):
        rows = slice(start, start + BLOCK)
        layer.weight.grad.addmm_(saved.dz[rows].T, saved.x[rows])


def _timer(layers: list[Layer], saved: Saved, kernel, iters: int):
    def timed() -> list[float]:
        kernel_pass = lambda: [kernel(layer, saved) for layer in layers]  # noqa: E731
        kernel_pass()  # warm the code path, not the gradients: the next pass finds them cold again
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            kernel_pass()
            times.append((time.perf_counter() - start) / len(layers))
        return times
    return timed


def one_shape(width: int, rows: int, args: argparse.Namespace) -> dict:
    """Both kernels on `args.layers` width x width layers at `rows` rows: seconds per layer and their ratio."""
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(width * 1000 + rows)
    layers = [Layer(i, torch.randn(width, width, dtype=dtype, generator=g), None, "relu") for i in range(args.layers)]
    for layer in layers:
        layer.weight.grad = torch.zeros_like(layer.weight)
    x, dz = (torch.randn(rows, width, dtype=dtype, generator=g) for _ in range(2))
    saved = Saved(x, dz=dz)
    one, blocked = Layer.accumulate_grad_weight, _in_blocks
    times, ratios = harness.alternate({"blocked": _timer(layers, saved, blocked, args.iters),
                                       "one call": _timer(layers, saved, one, args.iters)}, args.repeats)
    reference, probe = torch.zeros(width, width, dtype=dtype), torch.zeros(width, width, dtype=dtype)
    reference.addmm_(saved.dz.T, saved.x)
    layers[0].weight.grad = probe
    _in_blocks(layers[0], saved)
    return {"width": width, "rows": rows, "one_call_s": statistics.median(times["one call"]),
            "blocked_s": statistics.median(times["blocked"]), "ratio": statistics.median(ratios["blocked"]),
            "ratio_range": [min(ratios["blocked"]), max(ratios["blocked"])],
            "difference": float((probe - reference).abs().max() / reference.abs().max())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for width in args.widths:
        for rows in args.rows:
            results.append(one_shape(width, rows, args))
            print(f"[weight_grad] {width} x {rows}: blocked / one call {results[-1]['ratio']:.2f}", file=sys.stderr,
                  flush=True)
    print(f"## W.grad += dJ/dz x^T: one addmm against {BLOCK}-row blocks; {args.dtype}, {args.layers} layers "
          f"cycled, 1 thread, {args.repeats} x {args.iters} passes; torch {torch.__version__}\n")
    print("| width | rows | one call ms/layer | blocked ms/layer | blocked / one call (range) | max relative difference |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['width']} | {r['rows']} | {r['one_call_s'] * 1e3:.3f} | {r['blocked_s'] * 1e3:.3f} | "
              f"**{r['ratio']:.2f}** ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) | {r['difference']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps({"dtype": args.dtype, "torch": torch.__version__, "shapes": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
