"""The memory calculator (python -m pipeline.memory) against the bytes the ranks really hold.

Every schedule at p = 2 and p = 4 trains two steps in one process; the parameters, gradients,
optimizer state and peak stash that Engine.stash_figures counts on the tensors must be within 10%
of what pipeline.memory predicts for the same plan, rank by rank.
"""

from dataclasses import replace

import pytest
import torch

from pipeline import memory
from pipeline.config import compose
from pipeline.mlp import microbatch
from pipeline.planning.memory import held_bytes, stash_bytes
from pipeline.schedules.registry import SCHEDULES
from pipeline.training.equivalence import problem
from pipeline.training.footprint import MEASURED, calculate, measure
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(120)
TOL = 0.10
VIRTUAL_STAGES = {name: 2 if entry.virtual else 1 for name, entry in SCHEDULES.items()}  # every schedule of the registry


def predicted(calc) -> dict[str, list[int]]:
    """The calculator's figures under the names metrics.jsonl uses."""
    return {"param_bytes": [m.params for m in calc.ranks], "grad_bytes": [m.grads for m in calc.ranks],
            "optimizer_bytes": [m.optimizer for m in calc.ranks], "peak_stash_bytes": [m.stash for m in calc.ranks]}


def assert_close(pred: dict[str, list[int]], meas: dict[str, list[int]]) -> None:
    for key in MEASURED:
        for rank, (p, m) in enumerate(zip(pred[key], meas[key])):
            assert abs(p - m) <= TOL * m, f"{key} on rank {rank}: predicted {p}, measured {m}"
    for rank in range(len(pred["param_bytes"])):
        total_p, total_m = (sum(figures[k][rank] for k in MEASURED) for figures in (pred, meas))
        assert abs(total_p - total_m) <= TOL * total_m, f"rank {rank}: predicted {total_p}, measured {total_m}"


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("schedule", list(VIRTUAL_STAGES))
def test_prediction_matches_measurement(schedule, ranks):
    conf = problem(schedule=schedule, microbatches=4, virtual_stages=VIRTUAL_STAGES[schedule])  # SGD with momentum
    meas = measure(conf, ranks)
    assert all(v > 0 for key in MEASURED for v in meas[key])  # momentum buffers and stashes were really counted
    assert_close(predicted(calculate(conf, ranks)), meas)


def test_adam_gelu_without_bias_matches_too():
    base = problem(schedule="zb_h1", microbatches=3)
    conf = replace(base, optim=replace(base.optim, name="adam", lr=0.01),
                   model=replace(base.model, bias=False, activation="gelu"))
    calc, meas = calculate(conf, 3), measure(conf, 3)
    assert_close(predicted(calc), meas)
    for mem in calc.ranks:  # two buffers per parameter and a step count per weight matrix
        assert mem.optimizer > 2 * mem.params


def test_plain_sgd_keeps_no_optimizer_state():
    base = problem(schedule="1f1b", microbatches=4)
    conf = replace(base, optim=replace(base.optim, momentum=0.0))
    assert measure(conf, 2)["optimizer_bytes"] == [0, 0]
    assert [m.optimizer for m in calculate(conf, 2).ranks] == [0, 0]


def test_held_bytes_counts_the_real_tensors():
    params = [torch.zeros(3, 4, dtype=torch.float64, requires_grad=True), torch.zeros(5, requires_grad=True)]
    optimizer = torch.optim.Adam(params)
    assert held_bytes(params, optimizer) == (3 * 4 * 8 + 5 * 4, 0, 0)  # no gradient, no state yet
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    step = optimizer.state[params[0]]["step"]
    assert held_bytes(params, optimizer) == (116, 116, 2 * 116 + 2 * step.numel() * step.element_size())


def test_training_holds_more_than_prediction_and_the_gpipe_stash_grows_with_m():
    five, ten = (calculate(problem(schedule="gpipe", microbatches=m), 2) for m in (5, 10))
    for mem in five.ranks + ten.ranks:
        assert mem.training > mem.prediction
    # GPipe stashes every micro-batch: the same 10 rows whether cut in 5 or 10, so the same bytes
    assert [m.stash for m in five.ranks] == [m.stash for m in ten.ranks]
    one_f_one_b = calculate(problem(schedule="1f1b", microbatches=10), 2)
    assert all(a.stash < g.stash for a, g in zip(one_f_one_b.ranks, ten.ranks))  # 1F1B holds at most p - rank


def test_the_chapters_model_by_hand():
    """Exercise 3 for z = W1 x, h = relu(z), o = W2 h on the digits (d = 64, 64 hidden, q = 10), 64 rows, float32."""
    conf = compose(["model=seed", "pipeline.microbatches=1", "optim.momentum=0.9"])
    n, d, h, q, four = 64, 64, 64, 10, 4
    calc = calculate(conf, 1, predict_rows=n)
    mem, meas = calc.ranks[0], measure(conf, 1)
    params = (h * d + q * h) * four  # W1 and W2, no bias
    assert (mem.params, mem.grads, mem.optimizer) == (params, params, params)  # dJ/dW1, dJ/dW2, momentum
    assert mem.stash == n * (d + h) * four  # x and h: relu'(z) = [h > 0], and h is W2's input too
    assert mem.in_flight == n * max(d, h, q) * four  # prediction keeps one activation at a time
    assert [meas[k][0] for k in MEASURED] == [params, params, params, mem.stash]


TINY = ("data=synthetic", "data.n=64", "data.dim=4", "model.hidden=[8,8,8]", "train.batch_size=8",
        "pipeline.microbatches=2")


def test_command_prints_predicted_and_measured_per_rank():
    result = run_cli("pipeline.memory", "--ranks", "2", "--measure", *TINY, "pipeline.schedule=gpipe")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("gpipe: p=2 m=2 v=1 recompute=off; model 4-8-8-8-4 relu float32, batch 8, predicting")
    labels = [line[:18].strip() for line in lines[2:]]
    assert labels == ["rank 0 predicted", "rank 0 measured", "rank 1 predicted", "rank 1 measured"]
    for pred_line, meas_line in zip(lines[2::2], lines[3::2]):  # params, grads, optimizer, stash agree
        assert pred_line.split()[3:7] == meas_line.split()[3:7]


@pytest.mark.parametrize("args,message", [
    (["--ranks", "0"], "error: --ranks=0 must be at least 1"),
    (["--steps", "0", "--measure"], "error: --steps=0 must be at least 1"),
    (["--ranks", "5"], "error: 5 rank(s) x pipeline.virtual_stages=1 gives 5 stages but the model has 4 layers"),
    (["--predict-rows", "0"], "error: --predict-rows=0 must be at least 1"),
    (["optim.name=rmsprop"], "error: optim.name='rmsprop' is unknown; pick one of sgd, adam"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        memory.main([*args, *TINY])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_an_activation_handed_to_the_next_stage_on_the_same_rank_counts_once(activation):
    """At p = 1 every stage is on the one rank, and a stage's output h is the next stage's input x in both
    stashes: cut into 2 stages (v = 2), GPipe holds exactly the bytes it holds uncut (v = 1), measured and
    predicted alike. Counted once per stash (the old way), v = 2 would hold one more activation per
    micro-batch under relu, whose layers keep h; gelu keeps z instead, and shares nothing."""
    base = problem(schedule="gpipe", microbatches=4)
    base = replace(base, model=replace(base.model, activation=activation))
    figures = {}
    for v in (1, 2):
        conf = replace(base, pipeline=replace(base.pipeline, virtual_stages=v))
        figures[v] = (measure(conf, 1)["peak_stash_bytes"], [m.stash for m in calculate(conf, 1).ranks])
    assert figures[1][0] == figures[1][1] == figures[2][0] == figures[2][1], figures


def test_the_v_turn_rank_holds_the_activation_its_two_stages_share_once():
    """DualPipeV at p = 2: rank 1 holds stages 1 and 2, and stage 1's output is stage 2's input. The
    measured peak equals the prediction exactly, and is below what counting each stash on its own gives."""
    conf = problem(schedule="dualpipe_v", microbatches=4, virtual_stages=2)
    meas, calc = measure(conf, 2), calculate(conf, 2)
    assert meas["peak_stash_bytes"] == [m.stash for m in calc.ranks]
    plan, spec, stages = calc.plan, calc.spec, list(calc.plan.stage_layers)
    mb_sizes = microbatch.sizes(conf.train.batch_size, plan.num_microbatches)
    live, peak = 0, 0  # each (stage, micro-batch) stash counted on its own, the shared activation twice
    for a in plan.train_schedule[1]:
        rows, layers = mb_sizes[a.mb_index], stages[a.stage_index]
        before, after = stash_bytes(spec, layers, rows), stash_bytes(spec, layers, rows, after_b=True)
        live += {"F": before, "B": after - before, "W": -after, "BW": -before}.get(a.kind, 0)
        peak = max(peak, live)
    assert meas["peak_stash_bytes"][1] < peak
