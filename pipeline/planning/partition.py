"""Layers -> stages: contiguous cuts of the layer list (which rank holds each stage is the schedule's placement).

With p ranks and v virtual stages per rank there are p*v stages; under the looped placement
(schedules.placement.looped) stage s lives on rank s mod p.

    4 layers, p=2, v=1, uniform:   stage 0 = layers [0, 1] on rank 0 | stage 1 = layers [2, 3] on rank 1
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

from pipeline.errors import ConfigError
from pipeline.mlp.model import MLPSpec


def uniform(num_layers: int, num_stages: int) -> list[int]:
    """Layer counts that differ by at most one; the later stages get the extra layers
    (the last stage also computes the loss, the first has no input gradient to compute)."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (stage_index >= num_stages - extra) for stage_index in range(num_stages)]


def balance(weights: Sequence[float], num_stages: int) -> list[int]:
    """Contiguous layer counts that minimise the heaviest stage (the block-partition problem, exact DP)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: smallest possible max-stage-load cutting the first i layers into k stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                load = max(best[k - 1][j], prefix[i] - prefix[j])
                if load < best[k][i]:
                    best[k][i], cut[k][i] = load, j
    counts, i = [], n
    for k in range(num_stages, 0, -1):
        counts.append(i - cut[k][i])
        i = cut[k][i]
    return counts[::-1]


MAX_CUTS = 20000  # rank_balanced enumerates every cut up to this many (9 layers into 4 stages: 56)


def rank_balanced(weights: Sequence[float], rank_of_stage: Sequence[int], keep: int = 2) -> list[list[int]]:
    """Up to `keep` cuts of the layers into len(rank_of_stage) stages that put the least work on the busiest
    rank (stage s on rank rank_of_stage[s]); among equals, the lightest first stage first (every later
    stage waits for its first F: it is the pipeline's fill), then the evenest stages (least sum of squared
    loads: a rank's two stages alike). [] when there are more than MAX_CUTS cuts."""
    n, num_stages = len(weights), len(rank_of_stage)
    if not 1 <= num_stages <= n or math.comb(n - 1, num_stages - 1) > MAX_CUTS:
        return []
    # loads as fractions of the total, keys compared to 9 digits: sums that are equal but were added in another
    # order (a + b - c against a + (b - c)) tie, and the next key decides
    total = sum(weights) or 1.0
    prefix = list(itertools.accumulate((w / total for w in weights), initial=0.0))
    scored = []
    for inner in itertools.combinations(range(1, n), num_stages - 1):
        bounds = (0, *inner, n)
        loads: dict[int, float] = {}
        for s, rank in enumerate(rank_of_stage):
            loads[rank] = loads.get(rank, 0.0) + prefix[bounds[s + 1]] - prefix[bounds[s]]
        stage_loads = [prefix[bounds[s + 1]] - prefix[bounds[s]] for s in range(num_stages)]
        key = (max(loads.values()), stage_loads[0], sum(w * w for w in stage_loads))
        scored.append((tuple(round(k, 9) for k in key), [bounds[s + 1] - bounds[s] for s in range(num_stages)]))
    scored.sort(key=lambda c: c[0])
    return [counts for _, counts in scored[:keep]]


def layer_counts(spec: MLPSpec, num_stages: int, partition: str | Sequence[int], where: str) -> list[int]:
    """How many layers each stage gets; `where` explains num_stages in error messages."""
    if num_stages > spec.num_layers:
        raise ConfigError(f"{where} gives {num_stages} stages but the model has {spec.num_layers} layers; "
                          "add layers to model.hidden or use fewer stages")
    if partition in ("uniform", "time"):  # "time" is re-cut from measured layer times once ranks can agree
        return uniform(spec.num_layers, num_stages)
    if partition == "params":
        return balance([spec.layer_params(i) for i in range(spec.num_layers)], num_stages)
    counts = list(partition)
    if len(counts) != num_stages or sum(counts) != spec.num_layers or min(counts) < 1:
        raise ConfigError(f"pipeline.partition={counts} must list {num_stages} layer counts ({where}), each at "
                          f"least 1, adding up to the model's {spec.num_layers} layers")
    return counts


def stage_layers(counts: Sequence[int]) -> list[range]:
    """Global layer indices of each stage, from the layer counts."""
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges
