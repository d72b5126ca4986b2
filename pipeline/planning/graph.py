"""The MLP's computational graph as data (variables, operators, edges, stage cuts) and its picture, as in the D2L chapter.

Variables are squares, operators circles; a dashed line cuts the graph where one pipeline stage ends
and the next begins, and each stage's region names the rank the placement gives it. The command
`python -m pipeline.graph` draws the configured model's graph.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from pipeline.config import Config, in_process
from pipeline.mlp.model import MLPSpec
from pipeline.planning.plan import Plan, retime
from pipeline.planning.planner import make_plan
from pipeline.schedules.placement import Placement

VARIABLE, OPERATOR = "variable", "operator"
FORWARD, BACKWARD = "forward", "backward"
STRAIGHT, BUS = "straight", "bus"  # how an edge is routed: a bus edge goes up (down) to the top row, then along it
MAIN_ROW, PARAM_ROW, TOP_ROW = 0.0, 1.0, 2.0  # y of the activations, of W_i, b_i and y, of s and J
BACKWARD_SHIFT = -3.6  # the gradient graph repeats the forward layout this far below it
BIAS_OFFSET = 0.85  # b_i sits right of W_i


@dataclass(frozen=True)
class Node:
    id: str  # "W1", "mul1", "dJ/dW1": the chapter's names, with layer indices
    kind: str  # VARIABLE (a square) or OPERATOR (a circle)
    label: str  # matplotlib mathtext
    x: float
    y: float
    stage_index: int  # the pipeline stage that computes (or holds) it
    direction: str = FORWARD  # BACKWARD for gradients


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    direction: str = FORWARD
    route: str = STRAIGHT


@dataclass(frozen=True)
class Cut:
    """The dashed line where stage `stage_index` begins: between node `after` and node `before`."""

    stage_index: int
    x: float
    after: str
    before: str


@dataclass(frozen=True)
class StageRegion:
    stage_index: int
    rank: int
    x0: float
    x1: float

    @property
    def label(self) -> str:
        return f"stage {self.stage_index} / rank {self.rank}"


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    cuts: tuple[Cut, ...]
    stages: tuple[StageRegion, ...]

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)


# --- the graph as data ----------------------------------------------------------------------------

class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.edges: list[Edge] = []

    def variable(self, node_id: str, label: str, x: float, y: float, stage_index: int) -> str:
        self.nodes.append(Node(node_id, VARIABLE, label, x, y, stage_index))
        return node_id

    def operator(self, node_id: str, label: str, x: float, y: float, stage_index: int, *inputs: str) -> str:
        self.nodes.append(Node(node_id, OPERATOR, label, x, y, stage_index))
        self.edges.extend(Edge(source, node_id) for source in inputs)
        return node_id

    def edge(self, source: str, target: str, route: str = STRAIGHT) -> None:
        self.edges.append(Edge(source, target, route=route))


def _hidden_names(layer: int, num_layers: int) -> tuple[str, str, str]:
    """(z, phi, h) of hidden layer `layer` (0-based): plain z, phi, h for the chapter's one hidden layer."""
    suffix = "" if num_layers == 2 else str(layer + 1)
    return f"z{suffix}", f"phi{suffix}", f"h{suffix}"


def _math(name: str) -> str:
    """'z12' -> '$z_{12}$', 'phi' -> '$\\phi$'."""
    stem = name.rstrip("0123456789")
    index = name[len(stem):]
    symbol = "\\phi" if stem == "phi" else stem
    return f"${symbol}_{{{index}}}$" if index else f"${symbol}$"


def forward_graph(num_layers: int, bias: bool, stage_layers: Sequence[range], placement: Placement) -> Graph:
    """The forward graph of an MLP with `num_layers` layers, cut into the given stages.

    Columns advance left to right, one node per column on the main row: x, then per layer the
    product, z_i, phi, h_i (the last layer: the product, o), then l, L; s and J on the top row.
    """
    stage_of = {layer: s for s, layers in enumerate(stage_layers) for layer in layers}
    g = _Builder()
    previous, column, cuts = g.variable("x", "$x$", 0, MAIN_ROW, stage_of[0]), 0, []
    for layer in range(num_layers):
        if layer and stage_of[layer] != stage_of[layer - 1]:  # between h_{i-1} and the next product
            cuts.append(Cut(stage_of[layer], column + 0.5, previous, f"mul{layer + 1}"))
        previous, column = _layer(g, layer, num_layers, bias, stage_of[layer], previous, column + 1)
    right = _objective(g, num_layers, column, stage_of[num_layers - 1])
    return Graph(tuple(g.nodes), tuple(g.edges), tuple(cuts), _regions(cuts, right, placement))


def _layer(g: _Builder, layer: int, num_layers: int, bias: bool, stage_index: int, previous: str,
           column: int) -> tuple[str, int]:
    """z_i = W_i h_{i-1} (+ b_i) at `column`, then h_i = phi(z_i); the last layer's z is o.
    Returns the layer's output and its column."""
    k = layer + 1
    inputs = [previous, g.variable(f"W{k}", f"$W_{{{k}}}$", column, PARAM_ROW, stage_index)]
    if bias:
        inputs.append(g.variable(f"b{k}", f"$b_{{{k}}}$", column + BIAS_OFFSET, PARAM_ROW, stage_index))
    product = g.operator(f"mul{k}", "$\\times{+}$" if bias else "$\\times$", column, MAIN_ROW, stage_index, *inputs)
    if layer == num_layers - 1:
        g.edge(product, g.variable("o", "$o$", column + 1, MAIN_ROW, stage_index))
        return "o", column + 1
    z, phi, h = _hidden_names(layer, num_layers)
    g.edge(product, g.variable(z, _math(z), column + 1, MAIN_ROW, stage_index))
    g.operator(phi, _math(phi), column + 2, MAIN_ROW, stage_index, z)
    g.edge(phi, g.variable(h, _math(h), column + 3, MAIN_ROW, stage_index))
    return h, column + 3


def _objective(g: _Builder, num_layers: int, column: int, stage_index: int) -> int:
    """L = l(o, y) after o's `column`; s = lambda/2 sum ||W_i||^2 and J = L + s on the top row.
    The last stage holds them all (each rank adds its own ||W_i||^2; one all-reduce sums s).
    Returns J's column."""
    g.operator("l", "$l$", column + 1, MAIN_ROW, stage_index, "o",
               g.variable("y", "$y$", column + 1, PARAM_ROW, stage_index))
    g.edge("l", g.variable("L", "$L$", column + 2, MAIN_ROW, stage_index))
    g.operator("l2", "$\\ell_2$", column + 1, TOP_ROW, stage_index)
    for k in range(1, num_layers + 1):
        g.edge(f"W{k}", "l2", BUS)
    g.edge("l2", g.variable("s", "$s$", column + 2, TOP_ROW, stage_index))
    g.operator("plus", "$+$", column + 3, TOP_ROW, stage_index, "L", "s")
    g.edge("plus", g.variable("J", "$J$", column + 4, TOP_ROW, stage_index))
    return column + 4


def _regions(cuts: list[Cut], right: float, placement: Placement) -> tuple[StageRegion, ...]:
    """Stage s spans from its cut (or the left edge) to the next cut (or the right edge), on the rank the
    placement gives it (a V puts the first and the last stage on rank 0)."""
    bounds = [-0.7, *(cut.x for cut in cuts), right + 0.9]
    return tuple(StageRegion(s, placement.rank_of(s), bounds[s], bounds[s + 1]) for s in range(len(bounds) - 1))


def gradient_id(node_id: str) -> str:
    return f"dJ/d{node_id}"


def _gradient_label(node: Node) -> str:
    """The chapter's notation: dJ/dW_1 as a fraction; dJ/dJ = 1 starts the backward pass."""
    symbol = node.label.strip("$")
    return "$\\dfrac{\\partial J}{\\partial J} = 1$" if node.id == "J" else \
        f"$\\dfrac{{\\partial J}}{{\\partial {symbol}}}$"


def backward_graph(forward: Graph) -> Graph:
    """The forward graph plus dJ/dv for every variable v but the data (x, y), drawn below it.

    For every operator with inputs u and output v, the gradient flows dJ/dv -> dJ/du (the chain
    rule: dJ/du = dJ/dv dv/du), so each backward edge reverses a path u -> operator -> v.
    """
    data = {"x", "y"}
    gradients = [Node(gradient_id(n.id), VARIABLE, _gradient_label(n), n.x, n.y + BACKWARD_SHIFT, n.stage_index,
                      BACKWARD) for n in forward.nodes if n.kind == VARIABLE and n.id not in data]
    produced_by = {e.source: e.target for e in forward.edges if forward.node(e.source).kind == OPERATOR}
    reversed_edges = [Edge(gradient_id(produced_by[e.target]), gradient_id(e.source), BACKWARD, e.route)
                      for e in forward.edges if e.target in produced_by and e.source not in data]
    return replace(forward, nodes=forward.nodes + tuple(gradients), edges=forward.edges + tuple(reversed_edges))


def build_graph(num_layers: int, bias: bool, stage_layers: Sequence[range], placement: Placement,
                backward: bool = False) -> Graph:
    """The forward graph, with the backward graph below it when asked."""
    forward = forward_graph(num_layers, bias, stage_layers, placement)
    return backward_graph(forward) if backward else forward


# --- the picture -----------------------------------------------------------------------------------

INCH_PER_UNIT = 0.75
SQUARE, GRADIENT_SIDE, RADIUS = 0.5, 0.7, 0.28
COLOURS = {"variable": "#DCEBF7", "variable_edge": "#0072B2", "operator": "#FFFFFF", "operator_edge": "#333333",
           "gradient": "#FBE3D6", "gradient_edge": "#D55E00", FORWARD: "#333333", BACKWARD: "#D55E00",
           "cut": "#444444", "text": "#222222"}
RANK_TINTS = ("#F2F6FA", "#FAF5EC", "#F0F7F1", "#F7F0F6", "#F5F5F0", "#EEF4F7", "#F8F1EE", "#F1F1F7")


def _half_size(node: Node) -> tuple[float, float]:
    """Half the width and height of the node's shape."""
    if node.kind == OPERATOR:
        return RADIUS, RADIUS
    if node.direction == BACKWARD:
        return (0.68 if node.id == gradient_id("J") else GRADIENT_SIDE / 2), GRADIENT_SIDE / 2
    return SQUARE / 2, SQUARE / 2


def _shape(node: Node):
    from matplotlib.patches import Circle, FancyBboxPatch
    if node.kind == OPERATOR:
        return Circle((node.x, node.y), RADIUS, facecolor=COLOURS["operator"], edgecolor=COLOURS["operator_edge"],
                      linewidth=1.2, zorder=3)
    w, h = _half_size(node)
    fill, edge = ("gradient", "gradient_edge") if node.direction == BACKWARD else ("variable", "variable_edge")
    return FancyBboxPatch((node.x - w, node.y - h), 2 * w, 2 * h, boxstyle="square,pad=0", facecolor=COLOURS[fill],
                          edgecolor=COLOURS[edge], linewidth=1.2, zorder=3)


def _bus_path(source: Node, target: Node):
    """Vertical from the lower node to the top row, then along it (or the reverse), ending at the shapes."""
    from matplotlib.path import Path as MplPath
    low, high = (source, target) if source.y < target.y else (target, source)
    start = (low.x, low.y + _half_size(low)[1])
    side = _half_size(high)[0] if high.x > low.x else -_half_size(high)[0]
    end = (high.x - side, high.y)
    points = [start, (low.x, high.y), end] if low is source else [end, (low.x, high.y), start]
    return MplPath(points, [MplPath.MOVETO, MplPath.LINETO, MplPath.LINETO])


def _arrow(edge: Edge, nodes: dict, patches: dict):
    from matplotlib.patches import FancyArrowPatch
    style = dict(arrowstyle="-|>", mutation_scale=11, linewidth=1.1, color=COLOURS[edge.direction], zorder=2)
    source, target = nodes[edge.source], nodes[edge.target]
    if edge.route == BUS:
        return FancyArrowPatch(path=_bus_path(source, target), **style)
    return FancyArrowPatch((source.x, source.y), (target.x, target.y), patchA=patches[edge.source],
                           patchB=patches[edge.target], shrinkA=1, shrinkB=1, **style)


def _extent(graph: Graph) -> tuple[float, float, float, float]:
    xs = [n.x for n in graph.nodes]
    ys = [n.y for n in graph.nodes]
    return min(xs) - 0.9, max(xs) + 1.1, min(ys) - 0.7, max(ys) + 1.05


def draw(graph: Graph, title: str = ""):
    """A headless matplotlib Figure of the graph: stage regions, cuts, nodes, edges, labels."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:  # a GUI backend would need a display
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    left, right, bottom, top = _extent(graph)
    fig = Figure(figsize=((right - left) * INCH_PER_UNIT, (top - bottom) * INCH_PER_UNIT + 0.35), dpi=110)
    ax = fig.add_axes((0, 0, 1, (top - bottom) / (top - bottom + 0.35 / INCH_PER_UNIT)))
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_aspect("equal")
    ax.axis("off")
    _draw_stages(ax, graph, bottom, top)
    nodes = {n.id: n for n in graph.nodes}
    patches = {n.id: _shape(n) for n in graph.nodes}
    for node in graph.nodes:
        ax.add_patch(patches[node.id])
        size = 11 if node.direction == BACKWARD else 13
        ax.text(node.x, node.y, node.label, ha="center", va="center", fontsize=size, color=COLOURS["text"],
                zorder=4)
    for edge in graph.edges:
        ax.add_patch(_arrow(edge, nodes, patches))
    if any(n.direction == BACKWARD for n in graph.nodes):
        ax.text(left + 0.1, BACKWARD_SHIFT + TOP_ROW + 0.75, "backward: gradients flow right to left",
                fontsize=10, color=COLOURS[BACKWARD], ha="left", va="center")
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / ((top - bottom) * INCH_PER_UNIT + 0.35))
    return fig


def _draw_stages(ax, graph: Graph, bottom: float, top: float) -> None:
    from matplotlib.patches import Rectangle
    for region in graph.stages:
        ax.add_patch(Rectangle((region.x0, bottom), region.x1 - region.x0, top - bottom, linewidth=0,
                               facecolor=RANK_TINTS[region.rank % len(RANK_TINTS)], zorder=0))
        ax.text((region.x0 + region.x1) / 2, top - 0.3, region.label, ha="center", va="center", fontsize=11,
                fontweight="bold", color="#555555", zorder=1)
    for cut in graph.cuts:
        ax.plot([cut.x, cut.x], [bottom, top], linestyle=(0, (5, 4)), linewidth=1.4, color=COLOURS["cut"], zorder=1)


def save(fig, prefix: str | Path) -> list[Path]:
    """PREFIX.svg and PREFIX.png, reproducible byte for byte (no date, fixed SVG ids)."""
    import matplotlib
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    svg, png = prefix.with_name(prefix.name + ".svg"), prefix.with_name(prefix.name + ".png")
    with matplotlib.rc_context({"svg.hashsalt": "pipeline.graph", "svg.fonttype": "path"}):
        fig.savefig(svg, metadata={"Date": None})
    fig.savefig(png, metadata={"Software": None})
    return [svg, png]


def stage_plan(conf: Config, spec: MLPSpec, ranks: int) -> Plan:
    """The Plan the trainer would make for `ranks` ranks (stage_layers, placement); ConfigError if impossible."""
    conf = in_process(conf, ranks)
    plan = make_plan(conf, spec, world_size=1, eval_rows=1)
    if conf.pipeline.partition == "time":  # one process measures alone: its own times are the mean
        plan = retime(plan, spec, conf, lambda times: times)
    return plan
