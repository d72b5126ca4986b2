"""Tests for pipeline.graph: the chapter's computational graph as data, its stage cuts, and the CLI."""

from __future__ import annotations

from itertools import combinations

import pytest

from pipeline.graph import graph_for, main
from pipeline.planning.graph import BACKWARD, BUS, FORWARD, OPERATOR, VARIABLE, Graph, _half_size, build_graph
from pipeline.schedules.placement import looped
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The chapter's figure, with its operators as explicit nodes: z = W1 x, h = phi(z), o = W2 h,
# L = l(o, y), s = lambda/2 (||W1||^2 + ||W2||^2), J = L + s.
SEED_VARIABLES = {"x", "W1", "z", "h", "W2", "o", "y", "L", "s", "J"}
SEED_OPERATORS = {"mul1", "phi", "mul2", "l", "l2", "plus"}
SEED_EDGES = {
    ("x", "mul1"), ("W1", "mul1"), ("mul1", "z"),
    ("z", "phi"), ("phi", "h"),
    ("h", "mul2"), ("W2", "mul2"), ("mul2", "o"),
    ("o", "l"), ("y", "l"), ("l", "L"),
    ("W1", "l2"), ("W2", "l2"), ("l2", "s"),
    ("L", "plus"), ("s", "plus"), ("plus", "J"),
}
# The chapter's backward pass: dJ/dL = dJ/ds = 1, dJ/do = dJ/dL dL/do, dJ/dW2 = dJ/do h^T + lambda W2,
# dJ/dh = W2^T dJ/do, dJ/dz = dJ/dh * phi'(z), dJ/dW1 = dJ/dz x^T + lambda W1.
SEED_GRADIENT_EDGES = {
    ("dJ/dJ", "dJ/dL"), ("dJ/dJ", "dJ/ds"),
    ("dJ/dL", "dJ/do"), ("dJ/do", "dJ/dW2"), ("dJ/do", "dJ/dh"),
    ("dJ/dh", "dJ/dz"), ("dJ/dz", "dJ/dW1"),
    ("dJ/ds", "dJ/dW1"), ("dJ/ds", "dJ/dW2"),
}


def _ids(graph: Graph, kind: str, direction: str = FORWARD) -> set[str]:
    return {n.id for n in graph.nodes if n.kind == kind and n.direction == direction}


def _edges(graph: Graph, direction: str = FORWARD) -> set[tuple[str, str]]:
    return {(e.source, e.target) for e in graph.edges if e.direction == direction}


@pytest.fixture(scope="module")
def seed() -> Graph:
    return graph_for(["model=seed"], backward=True)[0]


@pytest.fixture(scope="module")
def cut3() -> Graph:
    """The default model (4 layers) cut into 3 stages, as the trainer on 3 ranks would cut it."""
    return graph_for([], ranks=3, backward=True)[0]


def test_seed_forward_graph_is_the_chapters(seed):
    assert _ids(seed, VARIABLE) == SEED_VARIABLES
    assert _ids(seed, OPERATOR) == SEED_OPERATORS
    assert _edges(seed) == SEED_EDGES
    assert len([e for e in seed.edges if e.direction == FORWARD]) == len(SEED_EDGES)  # no duplicates
    assert {(e.source, e.target) for e in seed.edges if e.route == BUS} == {("W1", "l2"), ("W2", "l2"),
                                                                           ("dJ/ds", "dJ/dW1"), ("dJ/ds", "dJ/dW2")}


def test_every_edge_joins_a_variable_and_an_operator(seed):
    kind = {n.id: n.kind for n in seed.nodes}
    assert all({kind[e.source], kind[e.target]} == {VARIABLE, OPERATOR} for e in seed.edges if e.direction == FORWARD)


def test_x_enters_lower_left_and_j_leaves_upper_right(seed):
    forward = [n for n in seed.nodes if n.direction == FORWARD]
    x, j = seed.node("x"), seed.node("J")
    assert x.x == min(n.x for n in forward) and x.y == min(n.y for n in forward)
    assert j.x == max(n.x for n in forward) and j.y == max(n.y for n in forward)
    assert all(seed.node(e.source).x <= seed.node(e.target).x for e in seed.edges if e.direction == FORWARD)


def test_seed_backward_graph_names_the_chapters_gradients(seed):
    gradients = _ids(seed, VARIABLE, BACKWARD)
    assert gradients == {f"dJ/d{v}" for v in SEED_VARIABLES - {"x", "y"}}
    assert _ids(seed, OPERATOR, BACKWARD) == set()
    assert _edges(seed, BACKWARD) == SEED_GRADIENT_EDGES
    labels = {n.id: n.label for n in seed.nodes}
    assert labels["dJ/dJ"].endswith("= 1$") and "\\partial J}{\\partial J}" in labels["dJ/dJ"]
    assert "\\partial W_{1}" in labels["dJ/dW1"] and "\\partial z" in labels["dJ/dz"]
    below = max(n.y for n in seed.nodes if n.direction == BACKWARD) < min(n.y for n in seed.nodes
                                                                           if n.direction == FORWARD)
    assert below


def test_one_rank_is_one_stage_without_cuts(seed):
    assert seed.cuts == ()
    assert [(r.stage_index, r.rank, r.label) for r in seed.stages] == [(0, 0, "stage 0 / rank 0")]
    assert {n.stage_index for n in seed.nodes} == {0}


def test_deeper_model_draws_every_layer_with_indices():
    graph = build_graph(num_layers=3, bias=True, stage_layers=[range(3)], placement=looped(1))
    assert _ids(graph, VARIABLE) == {"x", "W1", "b1", "z1", "h1", "W2", "b2", "z2", "h2", "W3", "b3", "o",
                                     "y", "L", "s", "J"}
    assert _ids(graph, OPERATOR) == {"mul1", "phi1", "mul2", "phi2", "mul3", "l", "l2", "plus"}
    assert {("h1", "mul2"), ("b2", "mul2"), ("mul2", "z2"), ("z2", "phi2"), ("phi2", "h2"), ("h2", "mul3"),
            ("b3", "mul3"), ("mul3", "o")} <= _edges(graph)
    # the biases are not regularised: only W_i feed s
    assert {e.source for e in graph.edges if e.target == "l2"} == {"W1", "W2", "W3"}
    grads = build_graph(3, True, [range(3)], looped(1), backward=True)
    assert {("dJ/dz2", "dJ/db2"), ("dJ/dz2", "dJ/dh1"), ("dJ/dh1", "dJ/dz1"), ("dJ/do", "dJ/dh2")} <= _edges(
        grads, BACKWARD)


STAGE_OF_CUT3 = {  # default model 64-128-128-128-10: uniform counts [1, 1, 2]; the last stage holds the loss
    0: {"x", "W1", "b1", "mul1", "z1", "phi1", "h1"},
    1: {"W2", "b2", "mul2", "z2", "phi2", "h2"},
    2: {"W3", "b3", "mul3", "z3", "phi3", "h3", "W4", "b4", "mul4", "o", "y", "l", "L", "l2", "s", "plus", "J"},
}


def test_three_stage_cut_of_the_default_model(cut3):
    for stage_index, ids in STAGE_OF_CUT3.items():
        assert {n.id for n in cut3.nodes if n.direction == FORWARD and n.stage_index == stage_index} == ids
        assert {n.id for n in cut3.nodes if n.direction == BACKWARD and n.stage_index == stage_index} == \
            {f"dJ/d{i}" for i in ids if cut3.node(i).kind == VARIABLE and i not in ("x", "y")}
    assert [(c.stage_index, c.after, c.before) for c in cut3.cuts] == [(1, "h1", "mul2"), (2, "h2", "mul3")]
    assert [(r.stage_index, r.rank, r.label) for r in cut3.stages] == [
        (0, 0, "stage 0 / rank 0"), (1, 1, "stage 1 / rank 1"), (2, 2, "stage 2 / rank 2")]
    bounds = [c.x for c in cut3.cuts]  # each region after the first starts at its cut and ends at the next
    assert [(r.x0, r.x1) for r in cut3.stages[1:]] == list(zip(bounds, bounds[1:] + [cut3.stages[-1].x1]))
    assert cut3.stages[0].x1 == bounds[0]
    for node in cut3.nodes:  # every shape lies wholly inside its stage's region, clear of the dashed lines
        region, half = cut3.stages[node.stage_index], _half_size(node)[0]
        assert region.x0 < node.x - half and node.x + half < region.x1, node.id


def test_cut_lines_cross_the_activations_forward_and_their_gradients_backward(cut3):
    def crossing(direction: str, route: str) -> set[tuple[str, str]]:
        return {(e.source, e.target) for e in cut3.edges if e.direction == direction and e.route == route
                and cut3.node(e.source).stage_index != cut3.node(e.target).stage_index}
    assert crossing(FORWARD, "straight") == {("h1", "mul2"), ("h2", "mul3")}  # SEND_F
    assert crossing(BACKWARD, "straight") == {("dJ/dz2", "dJ/dh1"), ("dJ/dz3", "dJ/dh2")}  # SEND_B
    assert crossing(FORWARD, BUS) == {("W1", "l2"), ("W2", "l2")}  # s is summed over the ranks


def test_the_cut_follows_the_trainers_partition():
    graph = graph_for(["pipeline.partition=[2,1,1]"], ranks=3)[0]
    assert [(c.after, c.before) for c in graph.cuts] == [("h2", "mul3"), ("h3", "mul4")]
    looped = graph_for(["pipeline.schedule=interleaved_1f1b", "pipeline.virtual_stages=2"], ranks=2)[0]
    assert [(r.stage_index, r.rank) for r in looped.stages] == [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert graph_for(["pipeline.ranks=2", "model=seed"])[0].cuts[0].after == "h"


def test_no_two_shapes_overlap(cut3):
    for a, b in combinations(cut3.nodes, 2):
        (wa, ha), (wb, hb) = _half_size(a), _half_size(b)
        assert abs(a.x - b.x) > wa + wb or abs(a.y - b.y) > ha + hb, (a.id, b.id)


def test_cli_writes_svg_and_png(tmp_path, capsys):
    prefix = tmp_path / "sub" / "seed"
    assert main(["--backward", "--out", str(prefix), "model=seed"]) == 0
    assert capsys.readouterr().out.split() == [f"{prefix}.svg", f"{prefix}.png"]
    svg, png = (prefix.parent / "seed.svg").read_bytes(), (prefix.parent / "seed.png").read_bytes()
    assert b"<svg" in svg[:1000] and len(svg) > 10_000
    assert png[:8] == PNG_MAGIC and len(png) > 10_000


@pytest.mark.parametrize("args, named", [
    (["model.activation=nope"], "model.activation"),
    (["--ranks", "9"], "9 stages but the model has 4 layers"),
    (["--ranks", "0"], "--ranks 0"),
    (["--ranks", "2", "pipeline.ranks=3"], "disagree"),
    (["pipeline.partition=[3,1]", "--ranks", "3"], "pipeline.partition=[3, 1] must list 3 layer counts"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*args, "--out", str(tmp_path / "g")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_bad_override_exits_2():
    result = run_cli("pipeline.graph", "model.hidden=[]")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: model.hidden=[]"), result.stderr
