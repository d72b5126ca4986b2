"""benchmarks/split_vs_accumulate.py: the gradient check, the measured table, the plot, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_benchmarks import load

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "split_vs_accumulate.py"
QUICK_ROWS = {"pipeline p=2": ("2", "4"), "accumulate m=4": ("1", "4")}  # name: (processes, micro-batch rows)


def load_study():
    return load("split_vs_accumulate")


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The Markdown table's data rows, keyed by configuration."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in QUICK_ROWS:
            rows[cells[0]] = cells
    return rows


@pytest.mark.timeout(240)
def test_quick_study_checks_gradients_and_measures_every_configuration(tmp_path):
    plot, raw = tmp_path / "study.png", tmp_path / "raw.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--plot", str(plot), "--json", str(raw)],
                            cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the float64 gradient check ran, compared the pipeline with accumulation, and passed
    check = json.loads(raw.read_text())["gradient_check"]
    assert set(check["diffs"]) == {"pipeline p=2"} and check["passed"]
    assert all(0 <= d <= 1e-12 for d in check["diffs"].values()), check
    assert "pipeline p=2 vs accumulate: max relative difference" in result.stdout and "-> passed" in result.stdout
    # one table row per configuration, with measured step times and memory
    rows = table_rows(result.stdout)
    assert set(rows) == set(QUICK_ROWS), result.stdout
    for name, cells in rows.items():
        assert (cells[1], cells[2]) == QUICK_ROWS[name], cells
        assert math.isfinite(float(cells[3])) and float(cells[3]) > 0, cells  # step time ms
        peaks = [float(v) for v in cells[5].split(" / ")]  # measured per process
        tensors = [float(v) for v in cells[6].split(" / ")]
        assert len(peaks) == len(tensors) == int(cells[1]), cells
        assert all(t > 0 for t in tensors), cells
        assert cells[7].split()[0] in ("yes", "no"), cells
    by_name = {row["name"]: row for row in json.loads(raw.read_text())["rows"]}
    pipe, acc = by_name["pipeline p=2"], by_name["accumulate m=4"]
    # the two stages split the parameters of the one process between them
    assert sum(pipe["parts_mib"]["param_bytes"]) == pytest.approx(acc["parts_mib"]["param_bytes"][0])
    assert all(row["hwm_mib"][r] > row["baseline_mib"][r] for row in (pipe, acc) for r in range(row["processes"]))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_relative_difference_tells_a_wrong_gradient():
    study = load_study()
    f64 = torch.float64
    reference = {"0.weight": torch.tensor([[1.0, -2.0]], dtype=f64), "0.bias": torch.tensor([0.5], dtype=f64)}
    same = {k: v.clone() for k, v in reference.items()}
    assert study.relative_difference(same, reference) == 0.0
    off = {**same, "0.bias": torch.tensor([0.5 + 1e-9], dtype=f64)}
    assert study.relative_difference(off, reference) == pytest.approx(1e-9 / 2.0)
    assert study.relative_difference({"0.weight": same["0.weight"]}, reference) == math.inf  # a stage missing


@pytest.mark.parametrize("argv, names", [(["--cap-mib", "0"], "--cap-mib"), (["--stages", "1"], "--stages"),
                                         (["--microbatches", "300"], "--microbatches")])
def test_bad_input_is_one_line_and_exit_code_2(argv, names):
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}"), result.stderr


def _plotted_row(name: str, kind: str, processes: int, peak_mib: float) -> dict:
    """One configuration as summarise() reports it, with only what the plot reads."""
    parts = {key: [0.05] * processes for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "stash_bytes")}
    return {"name": name, "kind": kind, "processes": processes, "m": 4, "rows": "4", "step_ms": 20.0,
            "training_mib": [peak_mib] * processes, "tensor_mib": [0.2] * processes, "parts_mib": parts}


@pytest.mark.parametrize("cap, on_chart", [(160.0, False), (5.0, True)])  # --quick's peaks are ~5 MiB
def test_the_legend_names_the_cap_only_where_the_chart_shows_it(cap, on_chart):
    import matplotlib.pyplot as plt

    study = load_study()
    args = study.parse_args(["--quick", "--cap-mib", str(cap)])
    res = {"rows": [_plotted_row("pipeline p=2", "pipeline", 2, 5.4),
                    _plotted_row("accumulate m=4", "accumulate", 1, 4.6)], "cpus": 2}
    fig = study.figure_of(args, res)
    try:
        for ax in fig.axes:
            legend = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
            assert any(text.startswith("cap ") for text in legend) == on_chart, legend
            low, high = ax.get_ylim()
            caps = [line for line in ax.get_lines() if line.get_label().startswith("cap ")]
            assert len(caps) == on_chart and all(low <= line.get_ydata()[0] <= high for line in caps)
            notes = [t.get_text() for t in ax.texts if "above the chart" in t.get_text()]
            assert notes == ([] if on_chart else [f"cap {cap:g} MiB: above the chart"])
    finally:
        plt.close(fig)
