"""Tests for pipeline.report: the PNGs drawn from metrics.jsonl and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from pipeline.report import main
from pipeline.training.metrics import load_metrics

pytestmark = pytest.mark.timeout(60)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train_row(step: int, bubble: bool = False) -> dict:
    loss = 2.0 / step
    row = {"step": step, "loss": loss, "reg": 0.01, "objective": loss + 0.01, "lr": 0.1,
           "step_time_s": 0.010 + 0.001 * (step % 3), "samples_per_s": 6400.0}
    return {**row, "bubble": [0.25, 0.2]} if bubble else row


def _write(run: Path, rows: list[dict], extra: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + extra)
    return path


@pytest.fixture
def run(tmp_path) -> Path:
    """A run directory with 6 training rows, 2 evaluation rows and the final stash row."""
    rows = [_train_row(step) for step in range(10, 70, 10)]
    rows.insert(3, {"step": 30, "test_loss": 0.9, "test_accuracy": 0.7})
    rows += [{"step": 60, "test_loss": 0.5, "test_accuracy": 0.85}, {"step": 60, "peak_stash": [2, 1]}]
    _write(tmp_path / "run", rows)
    return tmp_path / "run"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000  # something was drawn, not an empty canvas


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


def test_rows_are_sorted_and_unknown_rows_ignored(run):
    metrics = load_metrics(run)
    assert [row["step"] for row in metrics.train] == [10, 20, 30, 40, 50, 60]
    assert [row["test_accuracy"] for row in metrics.evals] == [0.7, 0.85]


def test_report_writes_every_png_into_the_run_dir(run, capsys):
    assert main([str(run)]) == 0
    names = ["loss.png", "accuracy.png", "step_time.png", "throughput.png", "report.png"]
    assert capsys.readouterr().out.splitlines() == [str(run / name) for name in names]
    for name in names:
        _assert_png(run / name)


def test_report_out_dir_and_bubble_panel(tmp_path, capsys):
    _write(tmp_path / "run", [_train_row(step, bubble=True) for step in (1, 2, 3)])
    out = tmp_path / "pictures" / "new"
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 0
    written = capsys.readouterr().out.splitlines()
    # no evaluation rows: no accuracy.png; bubble rows replace the throughput panel
    assert [Path(p).name for p in written] == ["loss.png", "step_time.png", "bubble.png", "report.png"]
    assert all(Path(p).parent == out for p in written)
    _assert_png(out / "bubble.png")
    assert not (tmp_path / "run" / "loss.png").exists()


def test_missing_run_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    assert "nowhere: no such run directory" in _error_line(capsys)


def test_missing_metrics_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2
    assert "metrics.jsonl: missing" in _error_line(capsys)


@pytest.mark.parametrize("text", ["", "\n\n", json.dumps({"step": 1, "peak_stash": [1]}) + "\n"])
def test_empty_metrics_file(tmp_path, capsys, text):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2
    assert "metrics.jsonl: empty" in _error_line(capsys)


@pytest.mark.parametrize("bad, problem", [('{"step": 3, "loss": ', "line 3: not valid JSON"),
                                          ("[1, 2]", "line 3: expected a JSON object, got list")])
def test_malformed_line_names_file_and_line(tmp_path, capsys, bad, problem):
    _write(tmp_path, [_train_row(1), _train_row(2)], extra=bad + "\n")
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2
    line = _error_line(capsys)
    assert str(tmp_path / "metrics.jsonl") in line and problem in line


def test_out_that_is_a_file(run, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as stop:
        main([str(run), "--out", str(tmp_path / "taken")])
    assert stop.value.code == 2
    assert "is not a directory" in _error_line(capsys)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    done = run_cli("pipeline.report", str(tmp_path / "absent"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'absent'}: no such run directory\n"


def test_the_readme_names_every_png_the_report_can_write(run, tmp_path, capsys):
    _write(tmp_path / "traced", [_train_row(step, bubble=True) for step in (1, 2, 3)])
    assert main([str(run)]) == 0 and main([str(tmp_path / "traced")]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.splitlines()}
    assert written >= {"throughput.png", "bubble.png", "report.png"}
    report = next(line for line in (Path(__file__).resolve().parents[1] / "README.md").read_text().split("\n- ")
                  if line.startswith("**Report.**"))
    assert sorted(name for name in written if f"`{name}`" not in report) == []
