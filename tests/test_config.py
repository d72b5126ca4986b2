"""Every config group composes and parses; every bad value is one clear ConfigError."""

import itertools
import re

import pytest
import torch

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.training.trainer import NonFiniteLoss, train
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
    ("optim.momentum=2", "optim.momentum=2 must be in [0, 1); e.g. optim.momentum=0.9"),
    ("optim.momentum=1", "optim.momentum=1 must be in [0, 1)"),
    ("optim.momentum=-0.5", "optim.momentum=-0.5 must be a finite number >= 0"),
    ("optim.lr=1e39", "optim.lr=1e+39 overflows model.dtype=float32 in the update (at most 3.4e+38 there); use a "
                      "value below 3.4e+38"),
    ("loss.l2=1e39", "loss.l2=1e+39 overflows model.dtype=float32 in the update (at most 3.4e+38 there)"),
    ("data.standardize=maybe", "data.standardize='maybe' must be true or false"),
    ("+experiment=small", "experiment=small: conf/ has no config group 'experiment' (its groups: data, model, optim, "
                          "pipeline), so nothing reads it; pass --config-dir DIR with DIR/experiment/small.yaml"),
    ("+extra.key=1", "extra is not a config section (the sections: model, data, optim, pipeline, train, loss,"),
    ("+train.step=5", "train.step is not a key of train (its keys: steps, batch_size, seed, log_every, eval_every, "
                      "resume, tensorboard); fix the spelling or remove it"),
    ("+model.width=5", "model.width is not a key of model"),
    ("+pipeline.stages=2", "pipeline.stages is not a key of pipeline"),
    ("+dist.port=1", "dist.port is not a key of dist"),
    ("+parallel.tp=2", "parallel.tp is not a key of parallel"),
    ("+data.path=x.npz", "data.path is not a key of data=digits (its keys: name, shuffle, standardize, "
                         "test_fraction, split_seed)"),
    ("+optim.betas=[0.9,0.99]", "optim.betas is not a key of optim=sgd (its keys: name, lr, momentum, clip_norm, "
                                "schedule, warmup_steps, min_lr)"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        config.parse(make_cfg(override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_update_scalars_are_refused_just_past_what_torch_takes_in_model_dtype(tmp_path):
    """Adam's first step divides lr by 1 - beta1; past the limit torch's optimizer raises a bare RuntimeError
    (value cannot be converted to type float without overflow) mid-step, at the limit one step trains."""
    largest = float(torch.finfo(torch.float32).max)
    tiny = ("data=synthetic", "data.n=32", "data.dim=3", "model.hidden=[4]", "train.batch_size=8", "train.steps=1",
            "checkpoint.every=0", "train.log_every=1")
    for name, limit in (("sgd", largest), ("adam", largest * (1 - 0.9))):
        with pytest.raises(ConfigError, match=re.escape(f"optim.lr={limit * 1.01:g} overflows model.dtype=float32")):
            config.parse(make_cfg(f"optim={name}", f"optim.lr={limit * 1.01!r}"))
        with pytest.raises(RuntimeError, match="without overflow"):  # what the check stands in front of
            params = [torch.nn.Parameter(torch.ones(2))]
            params[0].grad = torch.ones(2)
            (torch.optim.SGD(params, lr=limit * 1.01) if name == "sgd" else torch.optim.Adam(params, lr=limit * 1.01)).step()
        conf = config.parse(make_cfg(*tiny, f"optim={name}", f"optim.lr={limit * 0.99!r}", "loss.l2=3e38"))
        try:
            train(conf, tmp_path / name)  # no RuntimeError: the weights may overflow to inf, which the check names
        except NonFiniteLoss as err:
            assert "NaN or inf" in str(err)
    config.parse(make_cfg("model.dtype=float64", "optim.lr=1e39", "loss.l2=1e39"))  # float64 holds them


def test_standardize_defaults_per_data_set():
    assert config.parse(make_cfg()).data.standardize is True  # digits, as before
    assert config.parse(make_cfg("data=npz", "data.path=x.npz")).data.standardize is False  # old npz runs: same numbers
    assert config.parse(make_cfg("data=synthetic")).data.standardize is False  # standard normal already
    assert config.parse(make_cfg("data=npz", "data.path=x.npz", "data.standardize=true")).data.standardize is True


@pytest.mark.parametrize("overrides,message", [
    (["data.test_path=[a]"], "data.test_path=['a'] must name one .npz file with arrays X and y, or be null"),
    (["data.test_path=t.npz", "data.test_fraction=0.3"],
     "data.test_path=t.npz and data.test_fraction=0.3 both choose the test set; set only one of them"),
    (["data.test_fraction=1"], "data.test_fraction=1.0 must be below 1"),
    (["+data.n=10"], "data.n is not a key of data=npz"),
])
def test_npz_test_set_choices(overrides, message):
    with pytest.raises(ConfigError) as err:
        config.parse(make_cfg("data=npz", "data.path=x.npz", *overrides))
    assert message in str(err.value)


def test_npz_test_fraction_is_read():
    d = config.parse(make_cfg("data=npz", "data.path=x.npz", "data.test_fraction=0.3", "data.split_seed=4")).data
    assert (d.test_fraction, d.split_seed, d.test_path) == (0.3, 4, None)
    assert config.parse(make_cfg("data=npz", "data.path=x.npz")).data.test_fraction is None
    assert config.parse(make_cfg("optim=adam", "optim.lr=0.01")).optim.lr == 0.01  # no sgd key needed


def test_an_experiment_group_from_config_dir_is_read(tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "small.yaml").write_text("# @package _global_\ntrain:\n  steps: 3\n")
    result = run_cli("pipeline.train", "--config-dir", str(tmp_path / "conf"), "+experiment=small",
                     "data=synthetic", "data.n=64", "model.hidden=[8]", "train.batch_size=8",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("pipeline: done steps=3 ")


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
    with pytest.raises(ConfigError, match="train.batch_size=5000 exceeds the 1438 training rows of digits"):
        train(make_cfg("train.batch_size=5000"), tmp_path)


def test_cuda_without_a_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="dist.device=cuda but no CUDA device is visible"):
        train(make_cfg("dist.device=cuda", "train.steps=1"), tmp_path)


def test_device_and_backend_choice(monkeypatch):
    from pipeline.runtime.distributed import Env, plan_devices

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    job = Env(rank=1, world_size=2, local_rank=1, local_world_size=2, run_id="x")
    one = Env(rank=0, world_size=1, local_rank=0, local_world_size=1, run_id=None)
    dist_conf = config.parse(make_cfg()).dist
    assert plan_devices(job, False, dist_conf) == (torch.device("cpu"), "gloo")
    assert plan_devices(one, False, dist_conf) == (torch.device("cpu"), None)  # no group for one process
    assert plan_devices(job, True, dist_conf)[1] is None
    with pytest.raises(ConfigError, match="dist.backend=nccl needs CUDA tensors"):
        plan_devices(job, False, config.parse(make_cfg("dist.backend=nccl")).dist)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert plan_devices(job, False, dist_conf) == (torch.device("cuda", 1), "nccl")
    assert plan_devices(one, True, dist_conf)[0] == torch.device("cuda", 0)
