"""End to end on one process: metrics.jsonl, checkpoints, export into nn.Sequential, the CLI."""

import json

import pytest
import torch

from pipeline.export import main as export_main
from pipeline.mlp.model import MLPSpec, torch_sequential
from pipeline.training import checkpoint
from pipeline.training.export import export
from pipeline.training.trainer import train
from tests.conftest import make_cfg, run_cli

pytestmark = pytest.mark.timeout(180)
SMALL = ("data=synthetic", "data.n=300", "data.dim=6", "data.classes=3", "model.hidden=[8,5]",
         "train.steps=12", "train.batch_size=20", "train.log_every=5", "train.eval_every=6")


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_rows_and_summary(tmp_path):
    summary = train(make_cfg(*SMALL), tmp_path)
    logged = rows(tmp_path)
    train_rows = [r for r in logged if "loss" in r]
    eval_rows = [r for r in logged if "test_accuracy" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 12]
    assert [r["step"] for r in eval_rows] == [6, 12]
    assert set(train_rows[0]) == {"step", "loss", "reg", "objective", "lr", "grad_norm", "step_time_s", "samples_per_s"}
    assert set(eval_rows[0]) == {"step", "test_loss", "test_accuracy"}
    for r in train_rows:
        assert r["objective"] == pytest.approx(r["loss"] + r["reg"]) and r["reg"] > 0 and r["lr"] == 0.1
    assert summary["steps"] == 12 and summary["test_accuracy"] == eval_rows[-1]["test_accuracy"]


def test_training_learns_the_synthetic_task(tmp_path):
    summary = train(make_cfg(*SMALL, "train.steps=150", "optim=adam", "optim.lr=0.01"), tmp_path)
    assert summary["test_accuracy"] >= 0.9


def test_checkpoints_at_start_and_end_and_export_matches_the_model(tmp_path):
    train(make_cfg(*SMALL, "checkpoint.save_initial=true", "model.dtype=float64"), tmp_path)
    assert checkpoint.complete_steps(tmp_path) == [0, 12]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000012"
    out = tmp_path / "final.pt"
    assert export(str(tmp_path), str(out)) == 12
    state = torch.load(out, weights_only=True)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    net = torch_sequential(MLPSpec((6, 8, 5, 3), "relu", True, "float64"))
    net.load_state_dict(state)  # strict: same keys and shapes
    _, layers = checkpoint.load_layers(tmp_path)
    x = torch.randn(7, 6, dtype=torch.float64)
    ours = x
    for i in sorted(layers):
        ours = ours @ layers[i]["weight"].T + layers[i]["bias"]
        ours = ours.relu() if i < 2 else ours
    torch.testing.assert_close(net(x), ours, rtol=0, atol=1e-12)
    assert export(str(tmp_path), str(tmp_path / "init.pt"), step=0) == 0
    initial = torch.load(tmp_path / "init.pt", weights_only=True)
    assert not torch.equal(initial["0.weight"], state["0.weight"])  # training moved the weights


def test_export_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        export_main([str(tmp_path / "nope"), str(tmp_path / "o.pt")])
    assert stop.value.code == 2 and "no such run directory" in capsys.readouterr().err
    train(make_cfg(*SMALL), tmp_path)
    with pytest.raises(SystemExit) as stop:
        export_main([str(tmp_path), str(tmp_path / "o.pt"), "--step", "3"])
    assert stop.value.code == 2 and "no checkpoint for step 3; available steps: [12]" in capsys.readouterr().err


def test_cli_trains_under_python_and_torchrun(tmp_path):
    result = run_cli("pipeline.train", *SMALL, f"hydra.run.dir={tmp_path / 'a'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("pipeline: done steps=12")
    assert (tmp_path / "a" / ".hydra" / "config.yaml").is_file() and len(rows(tmp_path / "a")) == 6
    # one micro-batch of 5 rows stashed at a time: each layer's input (relu' comes from the next
    # layer's input h), 5 x (6 + 8 + 5) float32
    # and 8 x (6 + 1) + 5 x (8 + 1) + 3 x (5 + 1) = 119 parameters, as many gradients, no state (plain SGD)
    assert rows(tmp_path / "a")[-1] == {"step": 12, "peak_stash": [1], "peak_awaiting_b": [1],
                                        "peak_stash_bytes": [5 * 19 * 4], "param_bytes": [119 * 4],
                                        "grad_bytes": [119 * 4], "optimizer_bytes": [0], "sent_bytes": [0]}
    result = run_cli("torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "pipeline.train",
                     *SMALL, f"hydra.run.dir={tmp_path / 'b'}")
    assert result.returncode == 0, result.stderr
    assert "pipeline: done steps=12" in result.stdout
    a = torch.load(tmp_path / "a/checkpoints/step_00000012/stage_000.pt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/step_00000012/stage_000.pt", weights_only=True)
    assert torch.equal(a["layers"]["0"]["weight"], b["layers"]["0"]["weight"])  # deterministic


def test_the_console_script_trains_from_any_directory(tmp_path):
    """`pipeline-train` (pyproject's [project.scripts]) is `python -m pipeline.train`: Hydra finds conf/ from
    outside the checkout too."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "pipeline-train"
    assert script.is_file(), f"{script} missing: install the project (pip install -e .)"
    result = subprocess.run([str(script), *SMALL, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pipeline: done steps=12 ranks=1 schedule=1f1b"), result.stdout
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
