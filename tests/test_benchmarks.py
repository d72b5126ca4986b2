"""benchmarks/vs_builtin.py --quick: two processes, a tiny model, every schedule against the built-in."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v", "dualpipe_v")  # the ones vs_builtin compares


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The first Markdown table's data rows, keyed by schedule."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in SCHEDULES and cells[0] not in rows:
            rows[cells[0]] = cells
    return rows


def test_quick_run_compares_every_schedule(tmp_path):
    out = tmp_path / "raw.json"
    result = subprocess.run([sys.executable, "benchmarks/vs_builtin.py", "--quick", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert sorted(rows) == sorted(SCHEDULES), result.stdout
    for schedule, cells in rows.items():
        ours, builtin = float(cells[3]), float(cells[4])
        ratio = float(cells[5].split()[0].strip("*"))
        for value in (ours, builtin, ratio):
            assert math.isfinite(value) and value > 0, (schedule, cells)
    raw = json.loads(out.read_text())
    assert {c["schedule"] for c in raw["configs"]} == set(SCHEDULES)
    for c in raw["configs"]:
        # one step from the same weights on the same batch: the same gradient, the same parameters (float32)
        assert c["grad_rel_diff"] < 1e-5 and c["param_abs_diff"] < 1e-5, c
        assert all(b > 0 for b in c["stash_ours"] + c["stash_builtin"]), c
        assert c["ours_s"] > 0 and c["builtin_s"] > 0 and c["seq_s"] > 0
    assert raw["overhead"]["ratio"] > 0
    assert "### Targets" in result.stdout


def test_bad_microbatches_are_refused():
    result = subprocess.run([sys.executable, "benchmarks/vs_builtin.py", "--quick", "--microbatches", "3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "must divide the batch" in result.stderr


def test_workers_are_killed_on_timeout():
    result = subprocess.run([sys.executable, "benchmarks/vs_builtin.py", "--quick", "--timeout", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "timed out after 1 s" in result.stderr and "killed every worker" in result.stderr


def test_the_device_check_runs_every_schedule_and_p_on_the_cpu():
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    worst = [line for line in lines if "worst relative difference" in line]
    assert len(worst) == 1 and float(worst[0].split(":")[1]) <= 1e-6
    for name in SCHEDULES:
        equivalence, timing = [line.split() for line in lines if line.strip().startswith(name + " ")]
        assert len([cell for cell in equivalence if cell.startswith("p=")]) == 3  # p = 1, 2, 4
        assert len(timing) == 4 and all(float(ms) > 0 for ms in timing[1:])


def test_the_device_check_says_so_when_cuda_is_missing():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --device cuda but torch sees no CUDA device; run on a GPU machine or pass --device cpu"]


def load(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package). Its folder is on sys.path
    while it loads, as it is for `python benchmarks/NAME.py`, so that `import harness` works."""
    folder = str(ROOT / "benchmarks")
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def rank_work(vs_builtin, model: str) -> list[int]:
    m = vs_builtin.MODELS[model]
    work = vs_builtin.stage_work([m["in_dim"], *m["hidden"], m["classes"]], 2)
    return [sum(f + b + w for f, b, w in work[r::2]) for r in range(2)]  # stage s on rank s mod 2


def test_the_balanced_model_gives_both_ranks_the_same_work_and_the_default_does_not():
    vs_builtin = load("vs_builtin")
    r0, r1 = rank_work(vs_builtin, "balanced")
    assert abs(r1 - r0) / r1 < 0.005  # 12 : 12.03 layers of 1024 x 1024
    r0, r1 = rank_work(vs_builtin, "default")
    assert r1 / r0 > 1.25  # 9.5 : 12.03, the cut README.md charges E's shortfall to


def test_stage_work_counts_every_product_and_skips_the_datas_gradient():
    work = load("vs_builtin").stage_work([3, 5, 7, 2], 2)  # uniform: [1 | 2] layers
    assert work == [(15, 0, 15), (35 + 14, 35 + 14, 35 + 14)]


def test_measured_bubbles_are_per_rank_medians_after_the_warmup():
    rows = [{"step": 1, "loss": 1.0, "bubble": [0.9, 0.9]},  # warm-up: left out
            {"step": 2, "loss": 1.0, "bubble": [0.1, 0.4]},
            {"step": 2, "test_loss": 1.0},  # an evaluation row carries no bubble
            {"step": 3, "loss": 1.0, "bubble": [0.3, 0.2]},
            {"step": 4, "loss": 1.0, "bubble": [0.2, 0.3]}]
    assert load("simulator_accuracy").measured_bubbles(rows, warmup=1) == [0.2, 0.3]


def test_latency_compares_gloo_a_bare_socket_and_shm():
    result = subprocess.run([sys.executable, "benchmarks/latency.py", "--sizes-kib", "2,128", "--iters", "20",
                             "--repeats", "1", "--busy-trials", "5"], cwd=ROOT, capture_output=True, text=True,
                            timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {cells[0]: cells[1:] for line in result.stdout.splitlines() if line.startswith("| ")
            and (cells := [c.strip() for c in line.strip("|").split("|")])[0] in ("gloo", "socket", "shm")}
    assert list(rows) == ["gloo", "socket", "shm"], result.stdout
    for link, cells in rows.items():
        for size in range(2):  # 2 KiB, then 128 KiB: idle, busy median, busy p90, busy mean
            idle, median, p90, mean = map(float, cells[4 * size:4 * size + 4])
            assert idle > 0 and 0 < median <= p90 and mean > 0, (link, cells)
    assert "target shm 2 KiB idle <= 20 µs: " in result.stdout


@pytest.mark.parametrize("argv", [["--sizes-kib", "2,x"], ["--sizes-kib", "0"], ["--iters", "0"]])
def test_latency_bad_input_is_one_line_and_exit_code_2(argv):
    result = subprocess.run([sys.executable, "benchmarks/latency.py", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("python benchmarks/latency.py: error: ")
