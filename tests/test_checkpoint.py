"""Checkpoint shards: what they hold, when they are written and kept, damaged ones, and no pickle anywhere."""

import json
import os
import re
import shutil

import pytest
import torch

from pipeline import config
from pipeline.errors import ConfigError, UserError
from pipeline.runtime.distributed import Env, _bind_loopback
from pipeline.training import checkpoint
from pipeline.training.metrics import MetricsLog
from tests.conftest import make_cfg
from tests.conftest import ROOT
from tests.test_resume import ADAM, SGD, final, identical, layout, run, uninterrupted_runs

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return uninterrupted_runs(tmp_path_factory)


def test_a_shard_holds_weights_optimizer_state_rng_and_step_by_global_layer(tmp_path):
    run(tmp_path, *ADAM, *layout(2, 2), "train.steps=3")
    directory = checkpoint.step_dir(tmp_path, 3)
    meta = json.loads((directory / "checkpoint.json").read_text())
    assert meta["stage_layers"] == [[0, 2], [2, 4], [4, 6], [6, 8]] and meta["num_ranks"] == 2
    assert meta["dims"] == [5, 6, 5, 6, 5, 6, 5, 6, 3] and meta["optimizer"] == "adam"
    shard = torch.load(directory / "stage_002.pt", weights_only=True)
    assert shard["step"] == shard["sampler_step"] == 3 and shard["stage_index"] == 2
    assert sorted(shard["layers"]) == sorted(shard["optimizer"]) == ["4", "5"]
    assert sorted(shard["layers"]["4"]) == ["bias", "weight"]
    state = shard["optimizer"]["4"]["weight"]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"] and float(state["step"]) == 3.0
    assert state["exp_avg"].shape == shard["layers"]["4"]["weight"].shape == (6, 5)
    assert shard["rng"].dtype == torch.uint8


def test_sgd_momentum_is_stored_per_parameter(tmp_path):
    run(tmp_path, *SGD, "train.steps=2")
    shard = torch.load(checkpoint.step_dir(tmp_path, 2) / "stage_000.pt", weights_only=True)
    assert sorted(shard["optimizer"]["7"]["bias"]) == ["momentum_buffer"]


@pytest.mark.parametrize("keep,expected", [(2, [0, 9, 12]), (0, [0, 3, 6, 9, 12]), (1, [0, 12])])
def test_every_n_steps_and_the_newest_k_are_kept(keep, expected, tmp_path):
    run(tmp_path, *SGD, "train.steps=12", "checkpoint.every=3", f"checkpoint.keep={keep}",
        "checkpoint.save_initial=true")
    assert checkpoint.complete_steps(tmp_path) == expected
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000012"
    assert not list((tmp_path / "checkpoints").rglob("*.tmp"))


def test_an_unfinished_step_directory_is_ignored_and_cleaned_up(tmp_path):
    run(tmp_path, *SGD, "train.steps=4", "checkpoint.every=2")
    leftover = checkpoint.step_dir(tmp_path, 6)  # a run killed while writing step 6's shards
    leftover.mkdir()
    (leftover / "stage_000.pt").write_bytes(b"half a shard")
    assert checkpoint.complete_steps(tmp_path) == [2, 4]
    run(tmp_path, *SGD, "train.steps=8", "checkpoint.every=2")
    assert checkpoint.complete_steps(tmp_path) == [4, 6, 8]
    assert torch.load(leftover / "stage_000.pt", weights_only=True)["step"] == 6  # rewritten whole


def damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif how == "no optimizer state":
        shard = torch.load(path, weights_only=True)
        del shard["optimizer"]["5"]
        torch.save(shard, path)
    elif how == "no layer":
        shard = torch.load(path, weights_only=True)
        del shard["layers"]["4"]
        torch.save(shard, path)
    elif how == "NaN weights":
        shard = torch.load(path, weights_only=True)
        shard["layers"]["6"]["weight"][0, 0] = float("nan")
        torch.save(shard, path)
    elif how == "inf momentum":
        shard = torch.load(path, weights_only=True)
        shard["optimizer"]["7"]["bias"]["momentum_buffer"][1] = float("inf")
        torch.save(shard, path)


DAMAGES = [("stage_001.pt", "truncated", "cannot be read ("),
           ("stage_001.pt", "garbage", "cannot be read (UnpicklingError"),
           ("stage_001.pt", "no optimizer state", "the optimizer state of layer 5 is missing"),
           ("stage_001.pt", "no layer", "layer 4 is missing"),
           ("stage_001.pt", "NaN weights", "layer 6 holds NaN or inf weights"),
           ("stage_001.pt", "inf momentum", "the optimizer state of layer 7 holds NaN or inf"),
           ("checkpoint.json", "garbage", "cannot be read (JSONDecodeError")]


@pytest.mark.parametrize("name,how,what", DAMAGES, ids=[f"{n}-{h}" for n, h, _ in DAMAGES])
def test_a_damaged_checkpoint_is_reported_in_one_line_and_the_previous_one_is_used(name, how, what, tmp_path,
                                                                                     capsys, uninterrupted):
    whole, _ = uninterrupted(*SGD, *layout(2, 1), "train.steps=14")
    parts = tmp_path
    run(parts, *SGD, *layout(2, 1), "train.steps=10", "checkpoint.every=5")
    path = checkpoint.step_dir(parts, 10) / name
    damage(path, how)
    capsys.readouterr()
    summary = run(parts, *SGD, *layout(2, 1), "train.steps=14")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {path}: {what}"), lines
    assert lines[0].endswith("; trying the previous checkpoint")
    assert summary["resumed_from"] == 5 and checkpoint.complete_steps(parts) == [5, 14]
    assert identical(final(parts), whole)


def test_a_same_step_shard_of_another_run_is_skipped_like_a_damaged_one(tmp_path, capsys, uninterrupted):
    whole, _ = uninterrupted(*SGD, *layout(2, 1), "train.steps=14")
    parts, other = tmp_path / "parts", tmp_path / "seed1"
    run(parts, *SGD, *layout(2, 1), "train.steps=10", "checkpoint.every=5")
    run(other, *SGD, *layout(2, 1), "train.steps=10", "checkpoint.every=5", "train.seed=1")
    path = checkpoint.step_dir(parts, 10) / "stage_001.pt"
    shutil.copyfile(checkpoint.step_dir(other, 10) / "stage_001.pt", path)  # the right step, the wrong run
    ours, theirs = (json.loads((checkpoint.step_dir(d, 10) / "checkpoint.json").read_text())["fingerprint"]
                    for d in (parts, other))
    capsys.readouterr()
    summary = run(parts, *SGD, *layout(2, 1), "train.steps=14")
    lines = capsys.readouterr().err.strip().splitlines()
    print(*lines)
    assert lines == [f"warning: {path}: written by another run (fingerprint {theirs}, checkpoint.json has {ours}); "
                     "trying the previous checkpoint"]
    assert summary["resumed_from"] == 5 and identical(final(parts), whole)


def test_resuming_a_named_step_that_is_damaged_is_an_error(tmp_path, capsys):
    run(tmp_path, *SGD, "train.steps=4", "checkpoint.every=2")
    damage(checkpoint.step_dir(tmp_path, 4) / "stage_000.pt", "garbage")
    with pytest.raises(UserError, match="train.resume=4: that checkpoint is damaged"):
        run(tmp_path, *SGD, "train.steps=6", "train.resume=4")
    assert "stage_000.pt: cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("checkpoint.every=-1", "checkpoint.every=-1 must be an integer >= 0"),
    ("checkpoint.keep=-2", "checkpoint.keep=-2 must be an integer >= 0"),
    ("checkpoint.keep=two", "checkpoint.keep='two' must be an integer >= 0"),
    ("train.resume=-1", "train.resume=-1 must be auto, never or the step of a checkpoint"),
    ("train.resume=latest", "train.resume='latest' must be auto, never or the step of a checkpoint"),
    ("train.resume=700", "train.resume=700 is after the last step (train.steps=600)"),
])
def test_bad_checkpoint_and_resume_keys_are_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        config.parse(make_cfg(override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_new_keys_have_their_defaults():
    conf = config.parse(make_cfg())
    assert (conf.checkpoint.every, conf.checkpoint.keep, conf.train.resume) == (0, 3, "auto")


def test_a_resumed_metrics_log_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1}\n{"step": 10, "loss": 2}\n{"step": 12, "lo')  # killed mid-line
    log = MetricsLog(path, enabled=True, keep_until=10)
    log.write({"step": 11, "loss": 3})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10, 11]
    MetricsLog(path, enabled=True)  # a fresh run starts an empty file
    assert path.read_text() == ""


FORBIDDEN = re.compile(r"weights_only\s*=\s*False|\bpickle\b|allow_pickle\s*=\s*True|broadcast_object_list|"
                       r"all_gather_object|gather_object|scatter_object_list")


def test_the_package_never_unpickles_or_sends_python_objects():
    sources = {path: path.read_text() for path in (ROOT / "pipeline").rglob("*.py")}
    hits = [f"{path.name}: {m.group(0)}" for path, text in sources.items() for m in FORBIDDEN.finditer(text)]
    assert hits == []
    for path, text in sources.items():
        for call in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            assert "weights_only=True" in call.group(0), f"{path.name}: {call.group(0)}"
        for call in re.finditer(r"np\.load\(([^()]|\([^()]*\))*\)", text):
            assert "allow_pickle=False" in call.group(0), f"{path.name}: {call.group(0)}"


def test_single_node_jobs_bind_gloo_to_loopback(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    _bind_loopback(Env(rank=0, world_size=2, local_rank=0, local_world_size=2, run_id=None))
    assert os.environ.get("GLOO_SOCKET_IFNAME") == "lo"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    _bind_loopback(Env(rank=0, world_size=4, local_rank=0, local_world_size=2, run_id=None))  # multi-node
    assert "GLOO_SOCKET_IFNAME" not in os.environ
