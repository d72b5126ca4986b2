"""Datasets, the deterministic sampler, and one-line errors for bad data files."""

import numpy as np
import pytest

from pipeline import config
from pipeline.errors import DataError
from pipeline.training import data
from pipeline.training.setup import load_data
from pipeline.training.trainer import train
from tests.conftest import make_cfg, run_cli, write_npz

pytestmark = pytest.mark.timeout(120)


def load(*overrides):
    return load_data(config.parse(make_cfg(*overrides)))


def test_digits_is_standardised_and_split_the_same_way_each_time():
    a, b = load(), load()
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64) and a.num_classes == 10
    assert np.array_equal(a.y_test, b.y_test)
    spread = a.x_train.std(0)
    assert np.allclose(a.x_train.mean(0), 0, atol=1e-9) and np.allclose(spread[spread > 0], 1)
    raw = data.digits(0.2, 0)  # the pixels 0..16; the scaling kept is theirs, constant pixels divided by 1
    mean, std = a.scaling
    assert np.array_equal(mean, raw.x_train.mean(0)) and np.array_equal(std[std != 1], raw.x_train.std(0)[std != 1])
    assert np.allclose(a.x_test, (raw.x_test - mean) / std)


def wine_like(path, n=120, seed=3):
    """Raw features like wine's or breast cancer's: most near 1, a few of scale 1e2-1e3."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)) * [1, 0.1, 3, 15, 320, 1] + [2, 0.3, 20, 100, 750, 0]
    y = (x[:, 4] > 750).astype(np.int64) + (x[:, 0] > 2)
    np.savez(path, X=x, y=y)
    return x, y


def test_npz_is_not_standardised_by_default_and_is_with_data_standardize(tmp_path):
    x, _ = wine_like(tmp_path / "wine.npz")
    test_x, _ = wine_like(tmp_path / "wine_test.npz", n=30, seed=4)
    files = ("data=npz", f"data.path={tmp_path / 'wine.npz'}", f"data.test_path={tmp_path / 'wine_test.npz'}")
    raw = load(*files)
    assert np.array_equal(raw.x_train, x) and np.array_equal(raw.x_test, test_x) and raw.scaling is None
    scaled = load(*files, "data.standardize=true")
    assert np.allclose(scaled.x_train.mean(0), 0, atol=1e-9) and np.allclose(scaled.x_train.std(0), 1)
    mean, std = scaled.scaling
    assert np.array_equal(mean, x.mean(0)) and np.array_equal(std, x.std(0))
    assert np.allclose(scaled.x_test, (test_x - x.mean(0)) / x.std(0))  # the test rows use the training statistics


def test_npz_test_fraction_holds_out_rows_in_file_order(tmp_path):
    x, y = wine_like(tmp_path / "wine.npz", n=50)
    split = load("data=npz", f"data.path={tmp_path / 'wine.npz'}", "data.test_fraction=0.3")
    assert len(split.x_train) == 35 and len(split.x_test) == 15
    rows = [int(np.flatnonzero((x == row).all(1))[0]) for row in split.x_train]
    held = [int(np.flatnonzero((x == row).all(1))[0]) for row in split.x_test]
    assert rows == sorted(rows) and held == sorted(held) and sorted(rows + held) == list(range(50))
    assert np.array_equal(split.y_train, y[rows])
    other = load("data=npz", f"data.path={tmp_path / 'wine.npz'}", "data.test_fraction=0.3", "data.split_seed=1")
    assert not np.array_equal(other.x_test, split.x_test)


def test_scale_warning_for_raw_wine_like_data_but_not_digits_or_synthetic(tmp_path):
    wine_like(tmp_path / "wine.npz")
    message = data.scale_warning(load("data=npz", f"data.path={tmp_path / 'wine.npz'}"), "data.path=W")
    assert message.startswith("warning: data.path=W: features are far from standardised (column 4 has mean 7")
    assert message.endswith("|mean| or std above 20 slows or breaks training); set data.standardize=true")
    assert "\n" not in message
    for quiet in (load(), load("data=synthetic"), data.digits(0.2, 0)):  # the raw digits too: pixels <= 16
        assert data.scale_warning(quiet, "x") is None


def test_the_warning_comes_from_local_rank_0_only_and_not_when_standardised(tmp_path, capsys, monkeypatch):
    wine_like(tmp_path / "wine.npz")
    conf = config.parse(make_cfg("data=npz", f"data.path={tmp_path / 'wine.npz'}"))
    load_data(conf, warn=True)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: data.path={tmp_path / 'wine.npz'}: features are far from standardised")
    monkeypatch.setenv("LOCAL_RANK", "1")
    load_data(conf, warn=True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    load_data(config.parse(make_cfg("data=npz", f"data.path={tmp_path / 'wine.npz'}", "data.standardize=true")),
              warn=True)
    assert capsys.readouterr().err == ""


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


def test_the_sampler_keeps_one_permutation_per_epoch_and_its_batches_do_not_depend_on_the_order_of_asking():
    visited = data.BatchSampler(100, 10, seed=3, shuffle=True)
    steps = [25, 3, 11, 3, 40, 0, 19, 10]  # back and forth across epochs 0 to 4
    got = {t: visited.indices(t) for t in steps}
    got[3][:] = -1  # a caller that changes its batch changes nothing the sampler keeps
    for t in steps:
        expected = np.random.default_rng([3, t // 10]).permutation(100)[t % 10 * 10:t % 10 * 10 + 10]
        assert np.array_equal(data.BatchSampler(100, 10, seed=3, shuffle=True).indices(t), expected)
        assert np.array_equal(visited.indices(t), expected), t


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
    if kind == "npy":
        np.save(tmp_path / "x.npy", np.zeros((4, 2)))
        return tmp_path / "x.npy", "one array (.npy), not an .npz archive; save X and y together with np.savez"
    if kind == "complex":
        np.savez(path, X=np.ones((4, 2)) + 2j, y=np.array([0, 1, 0, 1]))
        return path, "X is complex (complex128); the network takes real features"
    raise AssertionError(kind)


KINDS = ["missing", "key", "nan", "inf", "label", "width", "negative", "garbage", "npy", "complex"]
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
