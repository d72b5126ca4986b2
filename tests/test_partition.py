"""Cutting layers into stages: uniform, by parameters, explicit lists; clear errors when impossible."""

import pytest

from pipeline.errors import ConfigError
from pipeline.mlp.model import MLPSpec
from pipeline.planning.partition import balance, layer_counts, stage_layers, uniform

pytestmark = pytest.mark.timeout(30)
SPEC = MLPSpec((64, 512, 16, 16, 16, 10), "relu", True, "float32")  # 5 layers, the first one heavy


def test_uniform_gives_later_stages_the_extra_layers():
    assert uniform(7, 3) == [2, 2, 3]
    assert uniform(8, 4) == [2, 2, 2, 2]
    assert uniform(5, 5) == [1] * 5


def test_balance_minimises_the_heaviest_stage():
    assert balance([10, 1, 1, 1, 10, 1], 3) == [1, 3, 2]
    counts = layer_counts(SPEC, 2, "params", "test")
    assert counts == [1, 4]  # 33,280 parameters alone, then the four small layers
    loads = [sum(SPEC.layer_params(i) for i in r) for r in stage_layers(counts)]
    assert max(loads) == SPEC.layer_params(0)


def test_explicit_counts_and_stage_ranges():
    assert layer_counts(SPEC, 3, (1, 1, 3), "test") == [1, 1, 3]
    assert stage_layers([1, 1, 3]) == [range(0, 1), range(1, 2), range(2, 5)]


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ConfigError, match="gives 6 stages but the model has 5 layers; add layers"):
        layer_counts(SPEC, 6, "uniform", "3 rank(s) x pipeline.virtual_stages=2")


@pytest.mark.parametrize("counts", [(2, 2), (1, 1, 1), (5, 0, 0)])
def test_explicit_counts_that_do_not_add_up_are_refused(counts):
    with pytest.raises(ConfigError, match=r"must list 3 layer counts .*, each at least 1, adding up to the model's 5 layers"):
        layer_counts(SPEC, 3, counts, "3 rank(s)")
