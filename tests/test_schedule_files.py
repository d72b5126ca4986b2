"""Schedules from files: torch's compute-only CSV and our action lines, read, validated, exported, trained exactly.

torch's side is reached without process groups or stage objects: a schedule object made with
`__new__`, given the few counts its `_calculate_single_rank_operations` reads, yields torch's own
order; `PipelineScheduleMulti._dump_csv` writes it and `PipelineScheduleMulti._load_csv` reads ours.
"""

from __future__ import annotations

import json

import pytest

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.planning.plan import file_program
from pipeline.planning.planner import make_plan
from pipeline.schedule import main
from pipeline.schedules import files
from pipeline.schedules.actions import Action
from pipeline.schedules.placement import looped, v_shape
from pipeline.schedules.registry import SCHEDULES, build_schedule
from pipeline.schedules.simulator import simulate, validate
from pipeline.training.equivalence import difference, grid, pipelined, problem, reference
from pipeline.training.setup import load_data, model_spec
from tests.conftest import make_cfg, run_cli

pytestmark = pytest.mark.timeout(120)
TOL = 1e-6
CASES = list(grid(ranks=(1, 2, 3), microbatches=(1, 3, 4)))


def _case_id(case: dict) -> str:
    return "{schedule}-p{ranks}-m{microbatches}-v{virtual_stages}".format(**case)


def _write(path, text: str):
    path.write_text(text)
    return path


def _torch_order(cls_name: str, p: int, m: int, **counts) -> dict:
    """torch's own per-rank order for one of its schedule classes, without stages or a process group."""
    from torch.distributed.pipelining import schedules as torch_schedules

    cls = getattr(torch_schedules, cls_name)
    made = cls.__new__(cls)
    made.pp_group_size, made._n_microbatches = p, m
    for key, value in counts.items():
        setattr(made, key, value)
    made.pipeline_order = {rank: made._calculate_single_rank_operations(rank) for rank in range(p)}
    return made


def _torch_dump(tmp_path, cls_name: str, p: int, m: int, **counts):
    """torch's _dump_csv of that order, as a file."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti

    path = tmp_path / f"{cls_name}.csv"
    PipelineScheduleMulti._dump_csv(_torch_order(cls_name, p, m, **counts), str(path))
    return path


# --- ours -> file -> ours ----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_registry_schedule_survives_both_formats(case, tmp_path):
    built = build_schedule(case["schedule"], case["ranks"], case["microbatches"], case["virtual_stages"])
    for path, text in ((tmp_path / "s.csv", files.to_torch_csv(built.actions)),
                       (tmp_path / "s.txt", files.to_lines(built.actions))):
        back = files.read(_write(path, text))
        assert back.actions == built.actions
        assert files.placement_of(back) == built.placement
        assert files.load(path, case["microbatches"]) == built


def test_the_export_writes_torch_kinds():
    built = build_schedule("zb_h1", 2, 2)
    assert files.to_torch_csv(built.actions) == "0F0,0F1,0I0,0W0,0I1,0W1\n1F0,1I0,1F1,1I1,1W0,1W1\n"
    assert files.to_torch_csv(build_schedule("1f1b", 2, 2).actions) == "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n"


@pytest.mark.parametrize("name,p,m,v", [("zb_h1", 3, 4, 1), ("interleaved_1f1b", 2, 4, 2), ("gpipe", 2, 3, 2)])
def test_torch_load_csv_reads_our_export_as_the_same_actions(name, p, m, v, tmp_path):
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti

    built = build_schedule(name, p, m, v)
    path = _write(tmp_path / "ours.csv", files.to_torch_csv(built.actions))
    loader = PipelineScheduleMulti.__new__(PipelineScheduleMulti)
    loader.pp_group_size, loader._num_stages, loader._n_microbatches = p, p * v, m
    loader._stages, loader.pipeline_order = [], {}
    PipelineScheduleMulti._load_csv(loader, str(path))  # torch's parser and its _validate_schedule
    theirs = {rank: [Action(a.stage_index, files.OUR_KIND[a.computation_type.value], a.microbatch_index)
                     for a in actions] for rank, actions in loader.pipeline_order.items()}
    assert theirs == built.actions
    assert loader.stage_index_to_group_rank == dict(enumerate(built.placement.ranks))


# --- torch's own dumps --------------------------------------------------------------------


def test_torch_interleaved_1f1b_dump_is_read_and_equals_our_order(tmp_path):
    path = _torch_dump(tmp_path, "ScheduleInterleaved1F1B", 2, 4, n_local_stages=2, number_of_rounds=2,
                       microbatches_per_round=2)
    assert ",," in path.read_text()  # torch pads idle slots with empty cells
    program = files.load(path, 4)
    assert program == build_schedule("interleaved_1f1b", 2, 4, 2)  # the same Megatron order as ours
    assert program.placement == looped(2, 2)


def test_torch_zbv_dump_is_read_placed_as_a_v_and_validates(tmp_path):
    path = _torch_dump(tmp_path, "ScheduleZBVZeroBubble", 2, 4, num_stages=4)
    assert path.read_text().startswith("0F0,0F1,0F2,3F0,3I0,3W0")
    program = files.load(path, 4)
    assert program.placement == v_shape(2)
    assert program.actions[1][:3] == [Action(1, "F", 0), Action(2, "F", 0), Action(1, "F", 1)]
    validate(program.actions, program.placement, 4)
    result = simulate(program.actions, program.placement, 4)
    assert (result.makespan, result.busy) == (25, {0: 24, 1: 24})  # 2 stages x 4 mbs x 3 units, one idle unit


def test_torch_dualpipev_overlap_cells_run_their_halves_back_to_back(tmp_path):
    path = _torch_dump(tmp_path, "ScheduleDualPipeV", 2, 4, num_stages=4, _num_stages=4)
    assert "(0F3;3B1)OVERLAP_F_B" in path.read_text()
    program = files.load(path, 4)
    rank0 = program.actions[0]
    at = rank0.index(Action(0, "F", 3))
    assert rank0[at + 1] == Action(3, "BW", 1)
    assert program.placement == v_shape(2)


def test_non_compute_cells_are_skipped(tmp_path):
    path = _write(tmp_path / "fsdp.csv", "0UNSHARD,0F0,0SEND_F0,0I0,0W0,0RESHARD,0REDUCE_GRAD\n"
                                         "1RECV_F0,1F0,1B0\n")
    assert files.read(path).actions == {0: [Action(0, "F", 0), Action(0, "B", 0), Action(0, "W", 0)],
                                        1: [Action(1, "F", 0), Action(1, "BW", 0)]}


def test_our_lines_take_spaces_commas_and_comments(tmp_path):
    path = _write(tmp_path / "mine.txt", "# a 2-rank 1F1B\n0F0, 0F1 0BW0  0BW1\n\n1F0 1BW0 1F1 1BW1  # rank 1\n")
    assert files.load(path, 2) == build_schedule("1f1b", 2, 2)


# --- refused in one line ------------------------------------------------------------------


@pytest.mark.parametrize("name,text,m,message", [
    ("a.csv", "0F0,0X1\n", 1, "row 1 (rank 0), column 2: cannot read '0X1'; torch's CSV cells are"),
    ("a.csv", "0F0,0BW0\n", 1, "cannot read '0BW0'"),
    ("a.txt", "0F0 0I0\n", 1, "row 1 (rank 0), column 2: cannot read '0I0'; our action lines hold"),
    ("a.txt", "0F0 0SEND_F0\n", 1, "cannot read '0SEND_F0'"),
    ("a.txt", "# nothing\n\n", 1, "holds no schedule"),
    ("a.csv", "0F0,0B0\n0F1,0B1\n", 2, "rank 1 runs 0F1 at row 2, column 1 ('0F1'), but stage 0 is on rank 0"),
    ("a.csv", "0F0,0B0\n\n1F0,1B0\n", 1, "rank 1 (row 2) runs nothing"),
    ("a.csv", "0F0,0B0\n2F0,2B0\n", 1, "no rank runs stage 1, but stages go up to 2"),
    ("a.csv", "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n", 4,
     "runs 2 micro-batches but --microbatches=4; set --microbatches=2"),
    ("a.csv", "0F0,0B0\n1F0\n", 1, "stage 1 mb 0: missing backward"),
    ("a.csv", "0F0,0B0\n1B0,1F0\n", 1, "rank 1: 1BW0 runs before 1F0 (row 2, column 1 ('1B0'))"),
    ("a.csv", "0B0,0F0,0F1,0B1\n1F0,1B0,1F1,1B1\n", 2, "rank 0: 0BW0 runs before 0F0"),
    ("a.csv", "0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n", 2,
     "deadlock: no rank can progress; waiting: rank 0 at 0BW0, rank 1 at 1F1 (row 1, column 2 ('0B0'))"),
    ("a.txt", "0F0 0BW0 0F5 0BW5\n1F0 1BW0 1F5 1BW5\n", 2,
     "rank 0: 0F5 names micro-batch 5, but micro-batches are 0..1 (row 1, column 3 ('0F5'))"),
    ("a.txt", "0F0 0BW0 0F0\n1F0 1BW0\n", 1, "rank 0: 0F0 appears twice (steps 0 and 2) (row 1, column 3 ('0F0'))"),
])
def test_a_bad_file_is_refused_in_one_line(name, text, m, message, tmp_path):
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError) as err:
        files.load(path, m)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_unreadable_files_are_one_line(tmp_path):
    for path, reason in ((tmp_path / "none.csv", "No such file or directory"), (tmp_path, "Is a directory")):
        with pytest.raises(ValueError, match=rf"{path}: cannot read it \({reason}\); give the path"):
            files.read(path)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe0F0")
    with pytest.raises(ValueError, match="UnicodeDecodeError"):
        files.read(binary)


# --- config and planning ------------------------------------------------------------------


def test_schedule_file_is_required_with_file_and_refused_without(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline.schedule=file needs pipeline.schedule_file=PATH"):
        config.parse(make_cfg("pipeline.schedule=file"))
    with pytest.raises(ConfigError, match=r"pipeline.schedule_file=x.csv is read only with pipeline.schedule=file, "
                                          r"not pipeline.schedule=1f1b"):
        config.parse(make_cfg("pipeline.schedule_file=x.csv"))
    conf = config.parse(make_cfg("pipeline.schedule=file", "pipeline.schedule_file=x.csv"))
    assert (conf.pipeline.schedule, conf.pipeline.schedule_file) == ("file", "x.csv")
    assert config.parse(make_cfg()).pipeline.schedule_file is None
    assert "file" not in SCHEDULES  # the planner's auto walks the registry only


def _file_conf(path, **pipeline):
    return problem(schedule="file", schedule_file=str(path), **pipeline)


def test_the_plan_takes_stages_and_placement_from_the_file(tmp_path):
    path = _torch_dump(tmp_path, "ScheduleZBVZeroBubble", 2, 4, num_stages=4)
    conf = _file_conf(path, ranks=2, microbatches=4)
    plan = make_plan(conf, model_spec(conf, load_data(conf)), 1, eval_rows=2)
    assert (plan.schedule, plan.num_stages, plan.virtual_stages) == ("file", 4, 2)
    assert plan.placement == v_shape(2)
    assert [len(r) for r in plan.stage_layers] == [2, 2, 2, 2]  # the 8 layers, cut into the file's 4 stages


@pytest.mark.parametrize("pipeline,message", [
    ({"ranks": 3, "microbatches": 4}, "has 2 rows (one per rank) but the run has 3 ranks; run 2 ranks"),
    ({"ranks": 2, "microbatches": 8}, "runs 4 micro-batches but pipeline.microbatches=8; set pipeline.microbatches=4"),
    ({"ranks": 2, "microbatches": 4, "virtual_stages": 3}, "pipeline.virtual_stages=3 but pipeline.schedule_file="),
    ({"ranks": 2, "microbatches": 4, "partition": (4, 4)}, "pipeline.partition=[4, 4] must list 4 layer counts"),
])
def test_a_file_that_does_not_fit_the_run_is_a_config_error(pipeline, message, tmp_path):
    path = _write(tmp_path / "il.csv", files.to_torch_csv(build_schedule("interleaved_1f1b", 2, 4, 2).actions))
    conf = _file_conf(path, **pipeline)
    with pytest.raises(ConfigError) as err:
        make_plan(conf, model_spec(conf, load_data(conf)), 1, eval_rows=2)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_validation_failure_names_the_key_the_rank_and_the_action(tmp_path):
    path = _write(tmp_path / "bad.csv", "0F0,0B0\n1B0,1F0\n")
    with pytest.raises(ConfigError, match=rf"^pipeline.schedule_file={path}: rank 1: 1BW0 runs before 1F0 \(row 2, column 1 \('1B0'\)\)$"):
        file_program(str(path), 2, 1)


@pytest.mark.timeout(120)
def test_the_trainer_exits_2_with_one_line_before_any_process_group(tmp_path):
    path = _write(tmp_path / "bad.csv", "0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n")
    done = run_cli("pipeline.train", "pipeline.schedule=file", f"pipeline.schedule_file={path}",
                   "pipeline.microbatches=2", "pipeline.transport=inprocess", "pipeline.ranks=2",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "deadlock: no rank can progress; waiting: rank 0 at 0BW0" in done.stderr
    assert not any((tmp_path / "run").iterdir())  # Hydra made the directory; nothing was written in it


# --- training through a file is exact -----------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    return reference(problem())


@pytest.mark.parametrize("name,p,m,v", [("1f1b", 3, 4, 1), ("interleaved_1f1b", 2, 4, 2), ("zb_h1", 2, 3, 1)])
def test_training_through_an_exported_file_equals_single_device(name, p, m, v, ref, tmp_path):
    path = _write(tmp_path / f"{name}.csv", files.to_torch_csv(build_schedule(name, p, m, v).actions))
    params, summary = pipelined(_file_conf(path, ranks=p, microbatches=m), tmp_path / "run")
    assert summary["schedule"] == "file"
    assert difference(params, ref) <= TOL


def test_training_through_torchs_zbv_order_equals_single_device(ref, tmp_path):
    path = _torch_dump(tmp_path, "ScheduleZBVZeroBubble", 2, 4, num_stages=4)
    params, _ = pipelined(_file_conf(path, ranks=2, microbatches=4), tmp_path / "run")
    assert difference(params, ref) <= TOL


# --- the command --------------------------------------------------------------------------


def test_json_figures_of_a_registry_schedule(capsys):
    assert main(["--schedule", "1f1b", "--ranks", "3", "--microbatches", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures == {"makespan": 18.0, "bubble": [pytest.approx(6 / 18)] * 3, "peak_stash": [3, 2, 1],
                       "stages_per_rank": [[0], [1], [2]], "placement": [0, 1, 2]}


def test_json_with_costs_and_the_stages_alias(capsys):
    assert main(["--schedule", "interleaved_1f1b", "--stages", "2", "--microbatches", "4", "--virtual-stages", "2",
                 "--costs", "1,2,2", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["stages_per_rank"] == [[0, 2], [1, 3]] and figures["placement"] == [0, 1, 0, 1]
    assert figures["makespan"] == 45.0 and len(figures["bubble"]) == 2


def test_export_then_file_prints_the_same_grid_and_figures(capsys, tmp_path):
    path = str(tmp_path / "zb.csv")
    assert main(["--schedule", "zb_h1", "--ranks", "3", "--microbatches", "4", "--export-csv", path]) == 0
    exported = capsys.readouterr().out
    assert f"wrote {path} (torch's compute-only CSV)" in exported
    assert main(["--file", path, "--microbatches", "4"]) == 0
    from_file = capsys.readouterr().out
    grid_of = lambda out: out.split("\n\n")[0]  # noqa: E731
    assert grid_of(from_file) == grid_of(exported) and "   0  0F0     1F0     2F0" in from_file
    assert f"{path}: 3 ranks, 3 stages, 4 micro-batches" in from_file
    assert main(["--file", path, "--microbatches", "4", "--json"]) == 0
    by_file = json.loads(capsys.readouterr().out)
    assert main(["--schedule", "zb_h1", "--ranks", "3", "--microbatches", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_file == {**by_file, "makespan": 14.0}


@pytest.mark.parametrize("argv,message", [
    (["--schedule", "1f1b", "--ranks", "2", "--microbatches", "2", "--export-csv", "x.txt"],
     "error: --export-csv=x.txt: torch's CSV must be named NAME.csv"),
    (["--file", "NOFILE.csv", "--microbatches", "2"], "error: NOFILE.csv: cannot read it (No such file or directory)"),
    (["--file", "GOOD", "--microbatches", "2", "--ranks", "3"], "has 2 rows (one per rank) but --ranks=3"),
    (["--file", "GOOD", "--microbatches", "2", "--virtual-stages", "2"], "with --file the file places the stages"),
    (["--file", "GOOD", "--microbatches", "3"], "runs 2 micro-batches but --microbatches=3"),
])
def test_cli_refuses_in_one_line(argv, message, capsys, tmp_path):
    good = _write(tmp_path / "good.csv", "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n")
    assert main([str(good) if a == "GOOD" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_needs_a_source_and_ranks_for_a_schedule(capsys):
    for argv in (["--microbatches", "2"], ["--schedule", "1f1b", "--microbatches", "2"],
                 ["--schedule", "1f1b", "--file", "x.csv", "--ranks", "2", "--microbatches", "2"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
    assert "--schedule needs --ranks P" in capsys.readouterr().err
