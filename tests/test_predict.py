"""python -m pipeline.predict: a checkpoint resharded onto any number of ranks predicts the same logits, bit for bit;
the accuracy and each rank's prediction-against-training memory are printed; bad input is one line and exit 2."""

import json
import re

import numpy as np
import pytest
import torch

from pipeline.predict import main
from pipeline.training import data
from pipeline.training.trainer import train
from tests.conftest import make_cfg, run_cli

pytestmark = pytest.mark.timeout(120)
RUN = ("model.hidden=[32,24]", "optim=adam", "optim.lr=0.01", "train.steps=40", "train.log_every=20", "train.eval_every=40", "checkpoint.every=20",
       "pipeline.microbatches=4", "pipeline.transport=inprocess", "pipeline.ranks=2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits run trained on 2 ranks (data.standardize is on for digits), and its test rows, raw, in X.npz."""
    root = tmp_path_factory.mktemp("predict")
    train(make_cfg(*RUN), root / "run")
    held_out = data.digits(0.2, 0)
    np.savez(root / "X.npz", X=held_out.x_test, y=held_out.y_test)
    return root


def predicted(capsys, *args):
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def last_test_accuracy(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["test_accuracy"] for r in rows if "test_accuracy" in r][-1]


def memory_lines(out, ranks):
    """{rank: (prediction predicted, measured, training predicted, measured)} in KiB from the printed lines."""
    found = re.findall(r"rank (\d+): prediction predicted ([\d.]+) measured ([\d.]+) .*\| training predicted "
                       r"([\d.]+) measured ([\d.]+) \|", out)
    assert [int(r) for r, *_ in found] == list(range(ranks))
    return {int(r): tuple(map(float, figures)) for r, *figures in found}


def test_one_two_and_three_ranks_predict_the_same_logits_bit_for_bit(run, capsys):
    outs = {}
    for ranks in (1, 2, 3):
        out = predicted(capsys, run / "run", "--data", run / "X.npz", "--out", run / f"p{ranks}.npz", "--ranks", ranks)
        outs[ranks] = out
        assert f"on {ranks} rank(s); {run / f'p{ranks}.npz'} holds logits (359 x 10, float32) and labels" in out
    files = {ranks: np.load(run / f"p{ranks}.npz") for ranks in outs}
    logits = files[1]["logits"]
    assert logits.dtype == np.float32 and logits.shape == (359, 10)
    for ranks in (2, 3):
        assert np.array_equal(files[ranks]["logits"], logits)
        assert np.array_equal(files[ranks]["labels"], files[1]["labels"])
    assert np.array_equal(files[1]["labels"], logits.argmax(1))
    y = np.load(run / "X.npz")["y"]
    accuracy = (files[1]["labels"] == y).mean()
    assert accuracy > 0.8
    for out in outs.values():
        assert f"pipeline: accuracy {accuracy:.4f} ({(files[1]['labels'] == y).sum()} of 359 rows" in out


def test_the_memory_lines_put_prediction_beside_training_predicted_and_measured(run, capsys):
    out = predicted(capsys, run / "run", "--data", run / "X.npz", "--out", run / "p.npz", "--ranks", 2)
    assert "predicting 16 rows at once (forward only) against one training step of 1f1b m=4 on batches of 64" in out
    for rank, (pred_p, meas_p, pred_t, meas_t) in memory_lines(out, 2).items():
        assert pred_p == meas_p and pred_t == meas_t, rank  # the model counts what the tensors hold
        assert meas_t > 1.5 * meas_p  # gradients and the stash come on top of the parameters
    per_rank = memory_lines(predicted(capsys, run / "run", "--data", run / "X.npz", "--out", run / "q.npz",
                                      "--ranks", 2, "--batch-size", 8), 2)
    assert all(per_rank[r][1] < figures[1] for r, figures in memory_lines(out, 2).items())  # 2 rows in flight, not 16


def test_a_pass_as_the_trainers_evaluation_scores_what_it_scored(run, capsys):
    """All 359 test rows in one pass: the trainer's evaluation micro-batches, so its accuracy exactly."""
    out = predicted(capsys, run / "run", "--data", run / "X.npz", "--out", run / "p.npz", "--batch-size", 359)
    assert f"pipeline: accuracy {last_test_accuracy(run / 'run'):.4f}" in out


def test_an_older_checkpoint_and_inputs_without_labels(run, capsys):
    x = np.load(run / "X.npz")["X"][:50]
    np.savez(run / "x_only.npz", X=x)
    out = predicted(capsys, run / "run", "--data", run / "x_only.npz", "--out", run / "old.npz", "--step", 20)
    assert "with the checkpoint of step 20" in out and "accuracy" not in out
    old, new = np.load(run / "old.npz")["logits"], np.load(run / "p1.npz")["logits"][:50]
    assert old.shape == (50, 10) and not np.array_equal(old, new)


@pytest.mark.timeout(180)
def test_torchrun_two_processes_equal_one_process_at_one_thread(run):
    """torchrun gives each process one thread; one process at one thread computes the same bits."""
    args = ["pipeline.predict", str(run / "run"), "--data", str(run / "X.npz")]
    two = run_cli("torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", *args, "--out",
                  str(run / "t2.npz"), timeout=170)
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(memory_lines(two.stdout, 2)) == 2 and "pipeline: accuracy" in two.stdout
    one = run_cli(*args, "--out", str(run / "t1.npz"), env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-2000:]
    assert np.array_equal(np.load(run / "t2.npz")["logits"], np.load(run / "t1.npz")["logits"])


def test_a_bfloat16_run_predicts_in_bfloat16_as_its_evaluation_did(tmp_path, capsys):
    """model.compute_dtype=bfloat16: prediction computes from the weights' bfloat16 copy, as the run's evaluation
    did, so one pass of the test rows scores exactly what the run scored; the copies are counted as held."""
    train(make_cfg(*RUN, "model.compute_dtype=bfloat16"), tmp_path / "run")
    held_out = data.digits(0.2, 0)
    np.savez(tmp_path / "X.npz", X=held_out.x_test, y=held_out.y_test)
    out = predicted(capsys, tmp_path / "run", "--data", tmp_path / "X.npz", "--out", tmp_path / "p.npz",
                    "--batch-size", 359, "--ranks", 2)
    assert f"pipeline: accuracy {last_test_accuracy(tmp_path / 'run'):.4f}" in out
    logits = np.load(tmp_path / "p.npz")["logits"]
    assert logits.dtype == np.float32
    assert torch.equal(torch.from_numpy(logits).bfloat16().float(), torch.from_numpy(logits))  # bfloat16 values
    for rank, (pred_p, meas_p, pred_t, meas_t) in memory_lines(out, 2).items():
        assert pred_p == meas_p and pred_t == meas_t, rank


def test_a_v_schedule_run_predicts_with_the_loss_on_rank_0(tmp_path, capsys):
    train(make_cfg("model.hidden=[16,16,16]", "train.steps=3", "pipeline.schedule=zb_v", "pipeline.microbatches=4",
                   "pipeline.transport=inprocess", "pipeline.ranks=2"), tmp_path / "run")
    np.savez(tmp_path / "X.npz", X=data.digits(0.2, 0).x_test[:30])
    out = predicted(capsys, tmp_path / "run", "--data", tmp_path / "X.npz", "--out", tmp_path / "v2.npz", "--ranks", 2)
    assert "one training step of zb_v" in out and len(memory_lines(out, 2)) == 2
    predicted(capsys, tmp_path / "run", "--data", tmp_path / "X.npz", "--out", tmp_path / "v1.npz")
    assert np.array_equal(np.load(tmp_path / "v2.npz")["logits"], np.load(tmp_path / "v1.npz")["logits"])


def _bad_inputs(root):
    x = np.load(root / "X.npz")["X"]
    nan = x[:5].copy()
    nan[3, 7] = np.nan
    files = {"wide": {"X": np.ones((4, 65))}, "nan": {"X": nan}, "no_rows": {"X": np.ones((0, 64))},
             "no_x": {"features": x[:4]}, "bad_y": {"X": x[:4], "y": np.array([0, 1, 2, 10])}}
    for name, arrays in files.items():
        np.savez(root / f"{name}.npz", **arrays)
    (root / "empty.npz").write_bytes(b"")
    (root / "nothing").mkdir(exist_ok=True)


REFUSALS = [
    (("missing_run", "X.npz"), "missing_run: no such run directory"),
    (("nothing", "X.npz"), "nothing: no complete checkpoint under checkpoints/; is this a run directory"),
    (("run", "wide.npz"), "wide.npz: X has 65 columns but the model of"),
    (("run", "nan.npz"), "nan.npz: X has a NaN or infinite value (first in row 3); clean the data"),
    (("run", "empty.npz"), "empty.npz: the file is empty; save the rows with np.savez(path, X=...)"),
    (("run", "no_rows.npz"), "no_rows.npz: X holds no rows; nothing to predict"),
    (("run", "no_x.npz"), "no_x.npz: missing array 'X' (found ['features'])"),
    (("run", "bad_y.npz"), "bad_y.npz: label 10 is outside [0, 10), the model's classes"),
    (("run", "missing.npz"), "missing.npz: no such file"),
    (("run", "X.npz", "--step", "7"), "--step=7: "),
    (("run", "X.npz", "--batch-size", "0"), "--batch-size=0 must be at least 1"),
    (("run", "X.npz", "--ranks", "4"), "4 rank(s) x pipeline.virtual_stages=1 gives 4 stages but the model has 3"),
]


@pytest.mark.parametrize("args, message", REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_bad_input_is_one_line_and_exit_2(run, capsys, args, message):
    _bad_inputs(run)
    run_dir, data_file, *rest = args
    with pytest.raises(SystemExit) as stop:
        main([str(run / run_dir), "--data", str(run / data_file), "--out", str(run / "bad.npz"), *rest])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (run / "bad.npz").exists()
