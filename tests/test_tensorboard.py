"""train.tensorboard=true: the event files under RUN_DIR/tensorboard/, read back with TensorBoard's own
EventAccumulator, hold every scalar of metrics.jsonl under its tag, at its step, with its value; a resumed run's
files say what its metrics.jsonl says; without the package the config refuses in one line."""

import json
import shutil
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
from tensorboard.util import tensor_util

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.training import checkpoint
from pipeline.training.tensorboard import EventLog, scalars
from pipeline.training.trainer import train
from tests.conftest import make_cfg

pytestmark = pytest.mark.timeout(120)
RUN = ("model.hidden=[16,16]", "train.steps=20", "train.log_every=5", "train.eval_every=10", "train.tensorboard=true",
       "pipeline.microbatches=4", "pipeline.transport=inprocess", "pipeline.ranks=2")


def read_events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard reads RUN_DIR/tensorboard/ (every event kept)."""
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={TENSORS: 0})
    accumulator.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"]}


def expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The same from metrics.jsonl: every number of a row but its step, a list's entries per rank."""
    found: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for tag, value in scalars(row):
            found.setdefault(tag, []).append((row["step"], value))
    return found


def test_the_event_files_hold_metrics_jsonl_tag_for_tag_and_value_for_value(tmp_path):
    train(make_cfg(*RUN, "trace.enabled=true"), tmp_path)
    events = read_events(tmp_path)
    for tag in ("loss", "objective", "reg", "lr", "step_time_s", "samples_per_s", "test_loss", "test_accuracy",
                "bubble/rank_0", "bubble/rank_1", "peak_stash_bytes/rank_1"):
        assert tag in events, tag
    assert [step for step, _ in events["loss"]] == [5, 10, 15, 20]
    assert [step for step, _ in events["test_accuracy"]] == [10, 20]
    assert events == expected(tmp_path)  # double precision: each value is metrics.jsonl's, exactly
    print("tags read back:", sorted(events))


def test_a_resumed_run_rewrites_the_events_as_metrics_jsonl_keeps_them(tmp_path):
    """A run that died after logging step 20 but before its checkpoint: the resumed segment drops the dead rows,
    in metrics.jsonl and in the event files alike (one file, no step twice)."""
    train(make_cfg(*RUN, "checkpoint.every=10"), tmp_path)
    shutil.rmtree(checkpoint.step_dir(tmp_path, 20))  # as if killed before the last checkpoint
    first = read_events(tmp_path)["step_time_s"]
    train(make_cfg(*RUN, "checkpoint.every=10"), tmp_path)  # resumes from step 10
    events = read_events(tmp_path)
    assert events == expected(tmp_path)
    assert [step for step, _ in events["step_time_s"]] == [5, 10, 15, 20]
    assert events["step_time_s"][:2] == first[:2] and events["step_time_s"][2:] != first[2:]  # kept, then new
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_list_gives_one_tag_per_rank_and_step_is_the_axis():
    row = {"step": 7, "loss": 0.5, "bubble": [0.25, 0.125], "note": "text", "flag": True}
    assert scalars(row) == [("loss", 0.5), ("bubble/rank_0", 0.25), ("bubble/rank_1", 0.125)]


def test_without_the_package_the_config_says_how_to_install_it(monkeypatch, tmp_path):
    for name in ("tensorboard", "torch.utils.tensorboard"):  # their imports fail, as when it is not installed
        monkeypatch.setitem(sys.modules, name, None)
    cfg = make_cfg(*RUN)
    with pytest.raises(ConfigError) as refused:
        config.parse(cfg)
    message = str(refused.value)
    assert "\n" not in message and message == ("train.tensorboard=true needs the tensorboard package, which is not "
                                               "installed; pip install -e '.[tensorboard]' or set "
                                               "train.tensorboard=false")
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tensorboard\]'"):
        train(cfg, tmp_path / "run")  # refused before any work
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tensorboard\]'"):
        EventLog(tmp_path)  # the writer's own import, should the package vanish after the check
    assert config.parse(make_cfg(*RUN, "train.tensorboard=false")).train.tensorboard is False


def test_train_tensorboard_takes_true_or_false_only():
    with pytest.raises(ConfigError, match="train.tensorboard='yes' must be true or false"):
        config.parse(make_cfg(*RUN, "train.tensorboard=yes"))
