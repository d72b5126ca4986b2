"""Every bad input is refused on the command line before any process group starts: exit code 2, one
`error:` line naming the key, the value and the fix, no traceback."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import run_cli

TINY = ("data=synthetic", "data.n=64", "data.dim=4", "model.hidden=[8]", "train.steps=2", "train.batch_size=8",
        "pipeline.microbatches=2")
# a torchrun-like environment for rank 0 of 2: the layout is refused before the group is joined
RANK_0_OF_2 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}

CASES = {
    "microbatches > batch": (["pipeline.microbatches=9"],
                             "pipeline.microbatches=9 exceeds train.batch_size=8; use at most one micro-batch per"),
    "more stages than layers": (["pipeline.transport=inprocess", "pipeline.ranks=3"],
                                "3 rank(s) x pipeline.virtual_stages=1 gives 3 stages but the model has 2 layers"),
    "unknown schedule": (["pipeline.schedule=pipedream"], "pipeline.schedule='pipedream' is unknown; pick one of"),
    "virtual stages without": (["pipeline.virtual_stages=2"],
                               "pipeline.virtual_stages=2 but pipeline.schedule=1f1b has no virtual stages"),
    "world size": (["pipeline.ranks=3"], "pipeline.ranks=3 x parallel.dp=1 needs 3 processes but the world size "
                   "is 2; launch 3 processes (e.g. --nproc-per-node=3) or drop pipeline.ranks"),
    "lr": (["optim.lr=-0.1"], "optim.lr=-0.1 must be a finite number > 0"),
    "batch": (["train.batch_size=0"], "train.batch_size=0 must be an integer >= 1"),
    "activation": (["model.activation=swish"], "model.activation='swish' is unknown; pick one of relu"),
    "optimizer": (["optim.name=rmsprop"], "optim.name='rmsprop' is unknown; pick one of sgd, adam"),
    "data file": (["data=npz", "data.path=/nonexistent/d.npz"], "/nonexistent/d.npz: no such file; set data.path"),
    "run dir under a file": (["hydra.run.dir={file}/run"], "hydra.run.dir={file}/run: {file} is a file, not a "
                                                           "directory; pick another hydra.run.dir"),
    "checkpoint.every": (["checkpoint.every=-1"], "checkpoint.every=-1 must be an integer >= 0"),
    "train.resume": (["train.resume=sometimes"], "train.resume='sometimes' must be auto, never or the step of a "
                                                 "checkpoint"),
    "npy for npz": (["data=npz", "data.path={dir}/x.npy"],
                    "{dir}/x.npy: one array (.npy), not an .npz archive; save X and y together with np.savez"),
    "test_path list": (["data=npz", "data.path={dir}/ok.npz", "data.test_path=[a]"],
                       "data.test_path=['a'] must name one .npz file with arrays X and y, or be null"),
    "path list": (["data=npz", "data.path=[a]"], "data.path=['a'] must name an .npz file with arrays X and y"),
    "complex X": (["data=npz", "data.path={dir}/complex.npz"],
                  "{dir}/complex.npz: X is complex (complex128); the network takes real features"),
    "huge hidden": (["model.hidden=[200000,200000]"], "model 4-200000-200000-4: rank 0 needs 298 GiB for parameters, "
                    "gradients and optimizer state but "),
    "huge hidden in-process": (["model.hidden=[200000,200000]", "pipeline.transport=inprocess", "pipeline.ranks=2"],
                               "rank 1 needs 298 GiB for parameters, gradients and optimizer state (298 GiB with the "
                               "other ranks in this memory) but "),
    "huge label": (["data=npz", "data.path={dir}/big_label.npz"],
                   "GiB of memory is available; model.out_dim=1000000001 was inferred from the largest label "
                   "(1000000000) of {dir}/big_label.npz; labels must be 0 .. classes-1"),
    "momentum": (["optim.momentum=2"], "optim.momentum=2 must be in [0, 1); e.g. optim.momentum=0.9"),
    "no experiment group": (["+experiment=small"], "experiment=small: conf/ has no config group 'experiment' (its "
                            "groups: data, model, optim, pipeline), so nothing reads it; pass --config-dir DIR with "
                            "DIR/experiment/small.yaml"),
    "unknown key": (["+train.step=5"], "train.step is not a key of train (its keys: steps, "),
    "test_path and test_fraction": (["data=npz", "data.path={dir}/ok.npz", "data.test_path={dir}/ok.npz",
                                     "data.test_fraction=0.3"],
                                    "data.test_path={dir}/ok.npz and data.test_fraction=0.3 both choose the test set"),
}


def write_inputs(case_dir) -> None:
    """The files the cases name: an empty file, a bare .npy, a complex X, a label of 1e9, a good .npz."""
    (case_dir / "a_file").write_text("")
    np.save(case_dir / "x.npy", np.zeros((16, 3)))
    labels = np.arange(16) % 2
    np.savez(case_dir / "complex.npz", X=np.ones((16, 3)) + 1j, y=labels)
    np.savez(case_dir / "big_label.npz", X=np.ones((16, 3)), y=np.where(labels, 10 ** 9, 0))
    np.savez(case_dir / "ok.npz", X=np.ones((16, 3)), y=labels)


def command(name: str, tmp_path) -> tuple[list[str], dict | None]:
    overrides = [o.format(file=tmp_path / "a_file", dir=tmp_path) for o in CASES[name][0]]
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides.append(f"hydra.run.dir={tmp_path / 'run'}")
    base = [o for o in TINY if not o.startswith("data")] if "data=npz" in overrides else list(TINY)
    return ["pipeline.train", *base, *overrides], RANK_0_OF_2 if name == "world size" else None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's command line, four at a time (each one is mostly importing torch)."""
    root = tmp_path_factory.mktemp("bad_input")

    def one(name):
        case_dir = root / name.replace(" ", "_").replace(">", "gt")
        case_dir.mkdir()
        write_inputs(case_dir)
        args, env = command(name, case_dir)
        return case_dir, run_cli(*args, env=env, timeout=100)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CASES, pool.map(one, CASES)))


@pytest.mark.timeout(300)  # the first case waits for the whole table: ~24 runs of about 4 CPU-seconds on 2 cores
@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_one_line_and_exit_2(name, results):
    case_dir, result = results[name]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert CASES[name][1].format(file=case_dir / "a_file", dir=case_dir) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (case_dir / "run" / "checkpoints").exists()


@pytest.mark.timeout(60)
def test_the_memory_check_counts_every_rank_that_shares_one_memory(tmp_path, monkeypatch):
    """Between one rank's state and all ranks' state: refused where one memory holds every rank
    (in-process, or two processes on this machine), accepted where each process has its own GPU."""
    import torch

    from pipeline import config
    from pipeline.errors import ConfigError
    from pipeline.planning import memory
    from pipeline.planning.planner import make_plan
    from pipeline.runtime.distributed import Env
    from pipeline.training.setup import check_memory, load_data, model_spec
    from tests.conftest import make_cfg

    def layout(transport, world):
        conf = config.parse(make_cfg(*TINY, "model.hidden=[64,64]", f"pipeline.transport={transport}",
                                     "pipeline.ranks=2", "optim=adam"))
        data = load_data(conf)
        spec = model_spec(conf, data)
        return conf, make_plan(conf, spec, world, eval_rows=8), spec, data

    conf, plan, spec, data = layout("inprocess", 1)
    need = [sum(memory.state_bytes(conf, plan, spec, r)) for r in range(2)]
    params = [spec.layer_params(i) * 4 for i in range(3)]  # rank 0: layer 0; rank 1: layers 1, 2 (uniform)
    assert need == [4 * params[0] + 8, 4 * (params[1] + params[2]) + 16]  # Adam: 2 states + a step per tensor
    monkeypatch.setattr(memory, "available_bytes", lambda device: max(need) + 1)
    one, two = Env(0, 1, 0, 1, None), Env(1, 2, 1, 2, "x")
    shared = r"rank 1 needs .* GiB for parameters, gradients and optimizer state \(.* GiB with the other ranks in this "
    with pytest.raises(ConfigError, match=shared + r"memory\) but .* GiB of memory is available"):
        check_memory(conf, one, plan, spec, data, torch.device("cpu"))
    conf, plan, spec, data = layout("p2p", 2)
    with pytest.raises(ConfigError, match="rank 1 needs"):
        check_memory(conf, two, plan, spec, data, torch.device("cpu"))  # both processes on this machine
    check_memory(conf, two, plan, spec, data, torch.device("cuda", 1))  # a device each: each fits
    monkeypatch.setattr(memory, "available_bytes", lambda device: max(need) - 1)
    with pytest.raises(ConfigError, match="rank 1 needs"):
        check_memory(conf, two, plan, spec, data, torch.device("cuda", 1))
