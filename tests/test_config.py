"""Every config group composes and parses; every bad value is one clear ConfigError."""

import itertools
from pathlib import Path

import pytest
import torch

from pipeline import config
from pipeline.errors import ConfigError
from tests.conftest import CONF, make_cfg, run_cli

pytestmark = pytest.mark.timeout(120)


def group_options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_option_composes_and_parses(tmp_path):
    for model, optim, pipe in itertools.product(group_options("model"), group_options("optim"), group_options("pipeline")):
        conf = config.parse(make_cfg(f"model={model}", f"optim={optim}", f"pipeline={pipe}"))
        assert conf.model.hidden and conf.optim.name == optim
    for data in group_options("data"):
        extra = [f"data.path={tmp_path / 'x.npz'}"] if data == "npz" else []
        assert config.parse(make_cfg(f"data={data}", *extra)).data.name == data


def test_defaults():
    conf = config.parse(make_cfg())
    assert conf.data.name == "digits" and conf.optim.name == "sgd" and conf.optim.momentum == 0.0
    assert conf.pipeline.schedule == "1f1b" and conf.pipeline.virtual_stages == 1
    assert conf.model.dtype == "float32" and conf.loss.name == "cross_entropy"


def test_seed_preset_is_the_chapters_network():
    conf = config.parse(make_cfg("model=seed"))
    assert len(conf.model.hidden) == 1 and conf.model.bias is False


@pytest.mark.parametrize("override,message", [
    ("model.activation=swish", "model.activation='swish' is unknown; pick one of relu, sigmoid, tanh, gelu"),
    ("model.hidden=[]", "model.hidden=[] must be a non-empty list"),
    ("model.hidden=[4,0]", "model.hidden[1]=0 must be an integer >= 1"),
    ("model.dtype=float16", "model.dtype='float16' is unknown"),
    ("model.bias=maybe", "model.bias='maybe' must be true or false"),
    ("optim.lr=0", "optim.lr=0 must be a finite number > 0"),
    ("optim.lr=-1", "optim.lr=-1 must be a finite number > 0"),
    ("optim.name=rmsprop", "optim.name='rmsprop' is unknown; pick one of sgd, adam"),
    ("train.steps=0", "train.steps=0 must be an integer >= 1"),
    ("train.batch_size=-3", "train.batch_size=-3 must be an integer >= 1"),
    ("train.steps=ten", "train.steps='ten' must be an integer >= 1"),
    ("pipeline.schedule=pipedream", "pipeline.schedule='pipedream' is unknown; pick one of gpipe, 1f1b"),
    ("pipeline.microbatches=0", "pipeline.microbatches=0 must be an integer >= 1"),
    ("pipeline.microbatches=65", "pipeline.microbatches=65 exceeds train.batch_size=64"),
    ("pipeline.partition=greedy", "pipeline.partition='greedy' is unknown"),
    ("loss.name=hinge", "loss.name='hinge' is unknown; pick one of cross_entropy, mse"),
    ("loss.l2=-0.1", "loss.l2=-0.1 must be a finite number >= 0"),
    ("data.test_fraction=1.0", "data.test_fraction=1.0 must be below 1"),
    ("dist.timeout_s=0", "dist.timeout_s=0 must be a finite number > 0"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        config.parse(make_cfg(override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_npz_without_path_is_refused():
    with pytest.raises(ConfigError, match="data.path is required but not set"):
        config.parse(make_cfg("data=npz"))


def test_cli_config_errors_exit_2_without_traceback(tmp_path):
    for override in ("train.steps=0", "model.no_such_key=1"):
        result = run_cli("pipeline.train", override, f"hydra.run.dir={tmp_path}")
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
    assert result.stderr.strip()  # hydra said which key


def test_batch_larger_than_the_data_is_refused(tmp_path):
    from pipeline.trainer import train

    with pytest.raises(ConfigError, match="train.batch_size=5000 exceeds the 1438 training rows of digits"):
        train(make_cfg("train.batch_size=5000"), tmp_path)


def test_cuda_without_a_gpu_is_refused(tmp_path, monkeypatch):
    from pipeline.trainer import train

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="dist.device=cuda but no CUDA device is visible"):
        train(make_cfg("dist.device=cuda", "train.steps=1"), tmp_path)


def test_device_and_backend_choice(monkeypatch):
    from pipeline.distributed import Env, plan_devices

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    job = Env(rank=1, world_size=2, local_rank=1, local_world_size=2, run_id="x")
    one = Env(rank=0, world_size=1, local_rank=0, local_world_size=1, run_id=None)
    dist_conf = config.parse(make_cfg()).dist
    assert plan_devices(job, "p2p", dist_conf) == (torch.device("cpu"), "gloo")
    assert plan_devices(one, "p2p", dist_conf) == (torch.device("cpu"), None)  # no group for one process
    assert plan_devices(job, "inprocess", dist_conf)[1] is None
    with pytest.raises(ConfigError, match="dist.backend=nccl needs CUDA tensors"):
        plan_devices(job, "p2p", config.parse(make_cfg("dist.backend=nccl")).dist)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert plan_devices(job, "p2p", dist_conf) == (torch.device("cuda", 1), "nccl")
    assert plan_devices(one, "inprocess", dist_conf)[0] == torch.device("cuda", 0)
