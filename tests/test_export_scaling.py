"""The input scaling travels with the model: checkpoint.json and the export's OUT.scaling.json hold the
training rows' mean and std, and the exported network fed (x - mean) / std scores what the pipeline scored."""

import json

import numpy as np
import pytest
import torch

from pipeline.export import main as export_main
from pipeline.mlp.model import MLPSpec, torch_sequential
from pipeline.training import checkpoint, data
from pipeline.training.trainer import train
from tests.conftest import make_cfg

pytestmark = pytest.mark.timeout(120)
RUN = ("model.hidden=[16]", "train.steps=200", "train.batch_size=20", "train.log_every=50", "train.eval_every=200",
       "pipeline.microbatches=2")


def wine_like(path, n=200, seed=5):
    """Raw features of very different scales (one near 750, like wine's proline), three classes from a
    linear teacher of the standard-normal features underneath."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    y = np.argmax(z @ rng.normal(size=(6, 3)), axis=1).astype(np.int64)
    x = z * [1, 0.1, 3, 15, 320, 1] + [2, 0.3, 20, 100, 750, 0]
    np.savez(path, X=x, y=y)
    return path


def last_accuracy(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["test_accuracy"] for r in rows if "test_accuracy" in r][-1]


def test_the_export_with_its_scaling_reproduces_the_pipelines_test_accuracy(tmp_path, capsys):
    path = wine_like(tmp_path / "wine.npz")
    run = tmp_path / "run"
    train(make_cfg("data=npz", f"data.path={path}", "data.test_fraction=0.3", "data.standardize=true", *RUN), run)
    raw = data.npz(str(path), None, test_fraction=0.3)  # the same rows, unscaled
    mean, std = raw.x_train.mean(0), raw.x_train.std(0)
    recorded = checkpoint.read_meta(run, 200)["input_scaling"]
    assert np.array_equal(recorded["mean"], mean) and np.array_equal(recorded["std"], std)

    export_main([str(run), str(tmp_path / "model.pt")])
    printed = capsys.readouterr().out
    assert f"x' = (x - mean) / std with the mean and std in {tmp_path / 'model.scaling.json'}" in printed
    sidecar = json.loads((tmp_path / "model.scaling.json").read_text())
    assert sidecar == {"formula": "x' = (x - mean) / std", "mean": recorded["mean"], "std": recorded["std"]}

    net = torch_sequential(MLPSpec((6, 16, 3), "relu", True, "float32"))
    net.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict, as before
    x = torch.as_tensor((raw.x_test - np.array(sidecar["mean"])) / np.array(sidecar["std"]), dtype=torch.float32)
    accuracy = (net(x).argmax(1).numpy() == raw.y_test).sum() / len(raw.y_test)
    assert accuracy == last_accuracy(run) and accuracy > 0.8


def test_an_unscaled_run_exports_no_scaling_and_removes_a_stale_file(tmp_path, capsys):
    path = wine_like(tmp_path / "wine.npz")
    run = tmp_path / "run"
    train(make_cfg("data=npz", f"data.path={path}", "data.test_fraction=0.3", *RUN, "train.steps=2"), run)
    assert checkpoint.read_meta(run, 2)["input_scaling"] is None
    stale = tmp_path / "model.scaling.json"
    stale.write_text("{}")
    export_main([str(run), str(tmp_path / "model.pt")])
    assert not stale.exists() and "its inputs are used as they are" in capsys.readouterr().out
