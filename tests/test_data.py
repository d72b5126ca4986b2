"""Datasets, the deterministic sampler, and one-line errors for bad data files."""

import numpy as np
import pytest

from pipeline import data
from pipeline.errors import DataError
from pipeline.trainer import train
from tests.conftest import make_cfg, run_cli, write_npz

pytestmark = pytest.mark.timeout(120)


def test_digits_is_standardised_and_split_the_same_way_each_time():
    a, b = data.digits(0.2, 0), data.digits(0.2, 0)
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64) and a.num_classes == 10
    assert np.array_equal(a.y_test, b.y_test)
    spread = a.x_train.std(0)
    assert np.allclose(a.x_train.mean(0), 0, atol=1e-9) and np.allclose(spread[spread > 0], 1)


def test_synthetic_is_learnable_and_sized():
    d = data.synthetic(n=400, dim=5, classes=3, noise=0.0, seed=1, test_fraction=0.25)
    assert d.x_train.shape == (300, 5) and d.x_test.shape == (100, 5)
    assert set(np.unique(d.y_train)) <= {0, 1, 2}


def test_sampler_without_shuffle_reads_consecutive_rows_drop_last():
    s = data.BatchSampler(num_rows=50, batch_size=12, seed=0, shuffle=False)
    assert s.batches_per_epoch == 4
    assert list(s.indices(0)) == list(range(0, 12))
    assert list(s.indices(3)) == list(range(36, 48))
    assert list(s.indices(5)) == list(range(12, 24))  # (5 mod 4) * 12


def test_sampler_with_shuffle_is_a_pure_function_of_seed_and_step():
    a = data.BatchSampler(100, 10, seed=3, shuffle=True)
    b = data.BatchSampler(100, 10, seed=3, shuffle=True)
    assert all(np.array_equal(a.indices(t), b.indices(t)) for t in (0, 7, 12))
    epoch = np.concatenate([a.indices(t) for t in range(10)])
    assert sorted(epoch) == list(range(100))  # one epoch visits every row once
    assert not np.array_equal(a.indices(0), data.BatchSampler(100, 10, seed=4, shuffle=True).indices(0))


def bad_file(tmp_path, kind):
    path = tmp_path / "bad.npz"
    if kind == "missing":
        return tmp_path / "nope.npz", "no such file"
    if kind == "key":
        np.savez(path, X=np.zeros((4, 2)))
        return path, "missing array 'y'"
    if kind == "nan":
        x = np.zeros((6, 3))
        x[4, 1] = np.nan
        np.savez(path, X=x, y=np.zeros(6, dtype=np.int64))
        return path, "NaN or infinite value (first in row 4)"
    if kind == "inf":
        x = np.zeros((6, 3))
        x[2, 0] = np.inf
        np.savez(path, X=x, y=np.zeros(6, dtype=np.int64))
        return path, "NaN or infinite"
    if kind == "label":
        write_npz(path, classes=3)
        return path, "label 2 is outside [0, 2) for model.out_dim=2"
    if kind == "width":
        write_npz(path, d=10)
        return path, "X has 10 columns but model.in_dim=7"
    if kind == "negative":
        np.savez(path, X=np.zeros((4, 2)), y=np.array([0, -1, 0, 1]))
        return path, "label -1 is negative"
    if kind == "garbage":
        path.write_bytes(b"not a zip")
        return path, "not a readable .npz file"
    raise AssertionError(kind)


KINDS = ["missing", "key", "nan", "inf", "label", "width", "negative", "garbage"]
EXTRA = {"label": ["model.out_dim=2"], "width": ["model.in_dim=7"]}


@pytest.mark.parametrize("kind", KINDS)
def test_bad_data_raises_a_data_error_naming_the_file(tmp_path, kind):
    path, message = bad_file(tmp_path, kind)
    cfg = make_cfg("data=npz", f"data.path={path}", "train.batch_size=2", "pipeline.microbatches=1",
                   *EXTRA.get(kind, []))
    with pytest.raises(DataError) as err:
        train(cfg, tmp_path / "run")
    assert str(err.value).startswith(str(path)) and message in str(err.value)


@pytest.mark.parametrize("kind", ["missing", "nan", "label"])
def test_bad_data_on_the_command_line_is_one_line_and_exit_2(tmp_path, kind):
    path, message = bad_file(tmp_path, kind)
    result = run_cli("pipeline.train", "data=npz", f"data.path={path}", "train.batch_size=2",
                     "pipeline.microbatches=1", f"hydra.run.dir={tmp_path / 'run'}", *EXTRA.get(kind, []))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {path}: " + result.stderr.split(f"{path}: ", 1)[1].strip()]
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_an_empty_test_split_leaves_the_classes_to_the_training_labels():
    data_ = data.synthetic(n=40, dim=3, classes=4, noise=0.1, seed=0, test_fraction=0.0)
    assert len(data_.x_test) == 0 and data_.num_classes == int(data_.y_train.max()) + 1
    data.check_model_fits(data_, 3, data_.num_classes)  # no error for the empty test labels
