"""The multi-node launchers and the docker compose cluster agree with each other and with the config.

There is no Docker engine here, so docker-compose.yml is read with PyYAML (as compose would, anchors
and merge keys included) and held to what launch/multi_node.sh and pipeline.train expect; the shell
launchers run against a fake `torchrun` (and fake `srun`, `scontrol`) that prints its arguments.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import compose

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
LAUNCH_ENV = ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "MAX_RESTARTS")
SAME_ON_EVERY_NODE = ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID")

# --- docker-compose.yml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def nodes(cluster) -> dict:
    return cluster["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # compose also accepts ["KEY=VALUE", ...]
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def _overrides(service: dict) -> list[str]:
    """The Hydra overrides the command hands to launch/multi_node.sh."""
    command = _command(service)
    return command[command.index("launch/multi_node.sh") + 1:]


def _bytes(size: str | int) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_nodes_are_named_node0_to_nodeN_and_are_alike_but_for_their_names(nodes):
    names = list(nodes)
    assert names == [f"node{i}" for i in range(len(names))] and len(names) >= 2
    for name, service in nodes.items():
        assert service["hostname"] == name
        assert {k: v for k, v in service.items() if k != "hostname"} == \
               {k: v for k, v in nodes["node0"].items() if k != "hostname"}


def test_every_node_joins_the_same_rendezvous_with_the_same_shape(nodes):
    envs = [_env(service) for service in nodes.values()]
    for key in SAME_ON_EVERY_NODE:
        assert len({env[key] for env in envs}) == 1, f"{key} differs between nodes"
    env = envs[0]
    assert int(env["NNODES"]) == len(nodes)
    assert int(env["NPROC_PER_NODE"]) >= 1
    host, port = env["RDZV_ENDPOINT"].rsplit(":", 1)
    assert host == "node0" and host in nodes and 0 < int(port) < 65536
    assert nodes[host]["hostname"] == host  # so node0's torchrun knows it hosts the rendezvous store


def test_world_size_is_pipeline_ranks_times_replicas_and_each_pipeline_fits_a_node(nodes):
    env = _env(nodes["node0"])
    world = len(nodes) * int(env["NPROC_PER_NODE"])
    overrides = [o for o in _overrides(nodes["node0"]) if not o.startswith("hydra.")]
    conf = compose(overrides)  # the overrides are valid: the same check pipeline.train makes
    d = conf.parallel.dp
    assert d == 2  # the example docs/multi_node.md describes: 2 nodes x 2 processes, p = 2, d = 2
    assert world % d == 0, f"world size {world} is not a multiple of parallel.dp={d}"
    p = conf.parallel.pp or conf.pipeline.ranks or world // d
    assert p * d == world == 4
    assert p == int(env["NPROC_PER_NODE"])  # global rank = replica * p + pipeline rank: one replica a node


def test_gloo_uses_the_shared_network_and_workers_get_shared_memory(cluster, nodes):
    for name, service in nodes.items():
        assert _env(service).get("GLOO_SOCKET_IFNAME"), f"{name}: GLOO_SOCKET_IFNAME is not set"
        assert service.get("ipc") in ("host", "shareable") or _bytes(service["shm_size"]) >= 1024 ** 3
        assert service["networks"] == nodes["node0"]["networks"]
    (network,) = nodes["node0"]["networks"]
    assert network in cluster["networks"]  # a user-defined network, where services resolve each other by name


def test_every_node_mounts_one_volume_and_the_run_directory_is_in_it(cluster, nodes):
    mounts = {name: tuple(service["volumes"]) for name, service in nodes.items()}
    assert len(set(mounts.values())) == 1
    (mount,) = mounts["node0"]
    volume, path = mount.split(":")[:2]
    assert volume in cluster["volumes"] and path.startswith("/")
    for name, service in nodes.items():
        command = _command(service)
        assert command[:2] == ["bash", "launch/multi_node.sh"], f"{name}: {command}"
        (run_dir,) = [o.split("=", 1)[1] for o in _overrides(service) if o.startswith("hydra.run.dir=")]
        assert Path(run_dir).is_relative_to(path) and Path(run_dir) != Path(path)


def test_the_image_pins_torch_to_its_cpu_build_and_installs_the_project():
    dockerfile = (ROOT / "Dockerfile").read_text()
    steps = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert steps[0] == "FROM python:3.11-slim"
    (ci_pin,) = re.findall(r"torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())
    torch_step = next(i for i, s in enumerate(steps) if "torch==" in s)
    assert re.search(r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu$",
                     steps[torch_step]) and ci_pin == "2.13.0"
    install = steps.index("RUN pip install -e .")
    copied = " ".join(s for s in steps[:install] if s.startswith("COPY"))
    assert torch_step < install and all(f in copied for f in ("pyproject.toml", "README.md", "pipeline/"))
    assert "COPY conf/ conf/" in steps and "COPY launch/ launch/" in steps and "WORKDIR /app" in steps
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "runs", ".venv", "venv", "**/__pycache__"} <= set(ignored)


# --- the shell launchers, against a fake torchrun ---------------------------------------------------


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A directory of stand-ins: torchrun prints its arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "torchrun", 'echo torchrun; for a in "$@"; do echo "$a"; done')
    return bin_dir


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def _run(args: list[str], fake_bin: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    clean["PATH"] = f"{fake_bin}{os.pathsep}{clean['PATH']}"
    return subprocess.run(["bash", *args], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                          timeout=30)


def test_multi_node_defaults_build_this_torchrun_command(fake_bin):
    result = _run(["launch/multi_node.sh"], fake_bin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "torchrun", "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:29400",
        "--rdzv-id=pipeline", "--max-restarts=0", "-m", "pipeline.train"]


def test_multi_node_takes_its_shape_from_the_environment_and_passes_overrides_through(fake_bin):
    overrides = ["parallel.dp=2", "hydra.run.dir=/shared/my run", "model.hidden=[64,64]"]
    result = _run(["launch/multi_node.sh", *overrides], fake_bin, NNODES="3", NPROC_PER_NODE="4",
                  RDZV_ENDPOINT="10.0.0.7:29500", RDZV_ID="job-17", MAX_RESTARTS="2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "torchrun", "--nnodes=3", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.7:29500",
        "--rdzv-id=job-17", "--max-restarts=2", "-m", "pipeline.train", *overrides]


@pytest.mark.parametrize("key, value", [("NNODES", "two"), ("NPROC_PER_NODE", "0"), ("MAX_RESTARTS", "-1"),
                                        ("RDZV_ENDPOINT", "node0"), ("RDZV_ENDPOINT", "node0:port")])
def test_multi_node_refuses_a_bad_variable_in_one_line_without_starting(fake_bin, key, value):
    result = _run(["launch/multi_node.sh"], fake_bin, **{key: value})
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {key}={value} must be") and "e.g." in line


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of launch/single_node.sh in a repository of its own, so that this checkout's .venv
    (the one .ci/run makes) never decides which torchrun runs; empty/ is a PATH with nothing on it."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "empty").mkdir()
    (repo / "launch" / "single_node.sh").write_text((LAUNCH / "single_node.sh").read_text())
    return repo


def _fake_torchrun(bin_dir: Path, label: str) -> str:
    """A torchrun that prints `label` and its arguments, one per line, needing nothing on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "torchrun"
    path.write_text(f'#!{shutil.which("bash")}\necho {label}; for a in "$@"; do echo "$a"; done\n')
    path.chmod(0o755)
    return str(bin_dir)


def _single_node(cwd: Path, path: str, *args: str, script: str = "launch/single_node.sh") -> subprocess.CompletedProcess:
    """Run the copied script with exactly this PATH."""
    return subprocess.run([shutil.which("bash"), script, *args], cwd=cwd, env={"PATH": path},
                          capture_output=True, text=True, timeout=30)


def test_single_node_runs_a_standalone_torchrun(checkout):
    on_path = _fake_torchrun(checkout / "bin", "torchrun")
    result = _single_node(checkout, on_path, "3", "pipeline.schedule=gpipe", "train.steps=5")
    assert result.stdout.splitlines() == ["torchrun", "--standalone", "--nproc-per-node=3", "-m", "pipeline.train",
                                          "pipeline.schedule=gpipe", "train.steps=5"]
    result = _single_node(checkout, on_path)
    assert result.stdout.splitlines() == ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "pipeline.train"]


def test_single_node_prefers_the_quickstarts_venv_over_path(checkout):
    _fake_torchrun(checkout / ".venv" / "bin", "venv-torchrun")
    on_path = _fake_torchrun(checkout / "bin", "torchrun")
    for path in (str(checkout / "empty"), on_path):  # found without torchrun on PATH, and chosen over one there
        result = _single_node(checkout, path, "2", "train.steps=5")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["venv-torchrun", "--standalone", "--nproc-per-node=2", "-m",
                                              "pipeline.train", "train.steps=5"]
    result = _single_node(checkout / "launch", str(checkout / "empty"), script="single_node.sh")
    assert result.stdout.splitlines()[0] == "venv-torchrun", result.stderr  # started from inside launch/


def test_single_node_without_any_torchrun_says_what_to_do(checkout):
    result = _single_node(checkout, str(checkout / "empty"), "2")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: torchrun not found: no {checkout}/.venv/bin/torchrun and none on PATH; run the quickstart's "
        "first command (it installs .venv) or activate the environment that has torch"]


def test_slurm_script_parses():
    result = subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_script_points_every_node_at_the_first_host_of_the_job(fake_bin):
    _script(fake_bin / "scontrol", '[[ "$1 $2 $3" == "show hostnames cn[07-08]" ]] && printf "cn07\\ncn08\\n"')
    # srun prints its options, then runs the per-node command (here: once, standing for every node)
    _script(fake_bin / "srun", 'while [[ $1 == --* ]]; do echo "srun $1"; shift; done; exec "$@"')
    result = _run(["launch/slurm.sbatch", "parallel.dp=2"], fake_bin, SLURM_JOB_NUM_NODES="2",
                  SLURM_JOB_NODELIST="cn[07-08]", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "srun --nodes=2" in lines and "srun --ntasks-per-node=1" in lines
    assert lines[lines.index("torchrun"):] == [
        "torchrun", "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=cn07:29400",
        "--rdzv-id=4242", "--max-restarts=0", "-m", "pipeline.train",
        f"hydra.run.dir={ROOT}/runs/slurm-4242", "parallel.dp=2"]
