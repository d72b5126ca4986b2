"""Every bad input is refused on the command line before any process group starts: exit code 2, one
`error:` line naming the key, the value and the fix, no traceback."""

from concurrent.futures import ThreadPoolExecutor

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
}


def command(name: str, tmp_path) -> tuple[list[str], dict | None]:
    overrides = [o.format(file=tmp_path / "a_file") for o in CASES[name][0]]
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
        (case_dir / "a_file").write_text("")
        args, env = command(name, case_dir)
        return case_dir, run_cli(*args, env=env, timeout=100)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CASES, pool.map(one, CASES)))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_one_line_and_exit_2(name, results):
    case_dir, result = results[name]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert CASES[name][1].format(file=case_dir / "a_file") in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (case_dir / "run" / "checkpoints").exists()
