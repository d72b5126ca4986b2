"""pipeline.recompute=true: F keeps only each stage's input, B rebuilds the rest, and nothing changes but memory.

A stage with recompute gives bit-for-bit the same output, input gradient and weight gradients as
one without; every schedule trains to single-device training's weights to the same 1e-6 as
without recompute; the runtime's stash bytes shrink to what the predictor says (within 10%).
"""

from dataclasses import replace

import pytest
import torch

from pipeline.mlp.microbatch import sizes
from pipeline.mlp.model import MLPSpec, build_layers
from pipeline.mlp.stage import Stage
from pipeline.planning.memory import peak_stash_bytes, stash_bytes
from pipeline.training.equivalence import difference, grid, pipelined, problem, reference
from pipeline.training.footprint import calculate, measure

pytestmark = pytest.mark.timeout(120)
TOL = 1e-6  # as tests/test_pipeline.py, without recompute
SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zb_h1": 1}


def stage_pair(activation: str, layers: range, num_stages: int = 3, stage_index: int = 1):
    spec = MLPSpec((7, 9, 8, 9, 5), activation, True, "float64")
    layers_of = lambda: build_layers(spec, 4, layers)  # noqa: E731  the same weights for both
    return spec, [Stage(stage_index, num_stages, layers_of(), recompute=flag) for flag in (False, True)]


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "gelu"])
@pytest.mark.parametrize("fused", [False, True], ids=["B then W", "BW"])
def test_a_recomputing_stage_is_bit_for_bit_the_same(activation, fused):
    spec, (plain, recomputing) = stage_pair(activation, range(1, 4))
    x = torch.randn(6, spec.dims[1], dtype=torch.float64)
    dy = torch.randn(6, spec.dims[4], dtype=torch.float64)
    out = []
    for stage in (plain, recomputing):
        y, stash = stage.forward(x)
        kept = Stage.stash_nbytes(stash)
        if fused:
            dx = stage.backward(dy, stash)
        else:
            dx = stage.backward_input(dy, stash)
            after_b = Stage.stash_nbytes(stash)
            stage.backward_weight(stash)
            assert after_b == stash_bytes(spec, range(1, 4), 6, after_b=True)  # x and dJ/dz per layer, as today
        out.append((y, dx, [p.grad.clone() for p in stage.parameters()], kept))
    (y0, dx0, g0, kept0), (y1, dx1, g1, kept1) = out
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert kept1 == x.numel() * x.element_size() == stash_bytes(spec, range(1, 4), 6, recompute=True)
    assert kept0 == stash_bytes(spec, range(1, 4), 6) > kept1


def test_the_first_stage_keeps_the_data_micro_batch_itself():
    spec, (_, first) = stage_pair("relu", range(0, 2), stage_index=0)
    x = torch.randn(4, spec.dims[0], dtype=torch.float64)
    _, stash = first.forward(x)
    assert len(stash) == 1 and stash[0].x is x and stash[0].z is None and stash[0].h is None
    assert first.backward(torch.randn(4, spec.dims[2], dtype=torch.float64), stash) is None and stash == []


@pytest.fixture(scope="module")
def ref():
    return reference(problem())


@pytest.mark.parametrize("case", list(grid(ranks=(2, 3, 4), microbatches=(3, 8))),
                         ids=lambda c: "{schedule}-p{ranks}-m{microbatches}-v{virtual_stages}".format(**c))
def test_every_schedule_with_recompute_equals_single_device_training(case, ref, tmp_path):
    params, _ = pipelined(problem(recompute=True, **case), tmp_path)
    assert difference(params, ref) <= TOL


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1"])
def test_adam_mse_gelu_without_bias_with_recompute_is_exact_too(schedule, tmp_path):
    base = problem()
    conf = replace(base, optim=replace(base.optim, name="adam", lr=0.01),
                   loss=replace(base.loss, name="mse"), model=replace(base.model, bias=False, activation="gelu"))
    piped = replace(conf, pipeline=replace(conf.pipeline, schedule=schedule, ranks=3, microbatches=4, recompute=True))
    params, _ = pipelined(piped, tmp_path)
    assert difference(params, reference(conf)) <= TOL


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_measured_stash_shrinks_as_predicted(schedule, ranks):
    conf = problem(schedule=schedule, microbatches=8, virtual_stages=SCHEDULES[schedule])
    on = replace(conf, pipeline=replace(conf.pipeline, recompute=True))
    kept_on, kept_off = (measure(c, ranks)["peak_stash_bytes"] for c in (on, conf))
    calc = calculate(on, ranks)
    plan = calc.plan
    predicted = peak_stash_bytes(plan.train_schedule, calc.spec, list(plan.stage_layers), sizes(10, 8), recompute=True)
    for r in range(ranks):
        assert abs(predicted[r] - kept_on[r]) <= 0.10 * kept_on[r], f"rank {r}: {predicted[r]} vs {kept_on[r]}"
        assert calc.ranks[r].stash == predicted[r]
        if schedule != "zb_h1":  # zb_h1's deferred W still holds x and dJ/dz per layer after B, as without
            assert kept_on[r] < kept_off[r]
    assert sum(kept_on) < sum(kept_off)


def test_the_calculator_shows_the_saving_and_the_rebuild():
    conf = problem(schedule="gpipe", ranks=2, microbatches=8)
    off, on = (calculate(replace(conf, pipeline=replace(conf.pipeline, recompute=flag)), 2) for flag in (False, True))
    for r, (a, b) in enumerate(zip(off.ranks, on.ranks)):
        assert a.rebuild == 0 < b.rebuild
        assert b.stash + b.rebuild < a.stash and b.training < a.training
        assert (b.params, b.grads, b.optimizer, b.in_flight) == (a.params, a.grads, a.optimizer, a.in_flight)
