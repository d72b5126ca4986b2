"""pipeline.runtime.latency: one message timed between two processes over gloo, a bare socket and shm,
and the transport a simulation charges (auto resolved as a run resolves it)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.runtime import latency
from pipeline.runtime.distributed import shm_unavailable

pytestmark = pytest.mark.timeout(60)


def test_every_link_gives_positive_figures_for_each_size():
    got = latency.measure([2048, 8192], iters=5, repeats=1, busy_trials=3, timeout_s=50)
    assert [(lat.link, lat.nbytes) for lat in got.latencies] == [
        (link, n) for link in latency.LINKS for n in (2048, 8192)]
    for lat in got.latencies:
        figures = (lat.pingpong_s, lat.busy_s, lat.busy_mean_s, lat.busy_p90_s, lat.send_s, lat.recv_s,
                   lat.woken_s, lat.woken_p90_s, lat.polled_s, lat.polled_p90_s)
        assert all(math.isfinite(s) and 0 < s < 10 for s in figures), lat
        assert lat.busy_s <= lat.busy_p90_s and lat.woken_s <= lat.woken_p90_s and lat.polled_s <= lat.polled_p90_s
    assert 0 < got.allreduce_s < 10


def test_what_a_simulation_charges_is_timed_without_taking_the_busy_figure_apart():
    (lat,), _ = latency.measure([2048], [latency.SHM], iters=3, repeats=1, busy_trials=3, timeout_s=50, apart=False)
    assert 0 < lat.busy_mean_s < 10 and 0 < lat.send_s < 10 and 0 < lat.recv_s < 10
    assert all(math.isnan(s) for s in (lat.woken_s, lat.woken_p90_s, lat.polled_s, lat.polled_p90_s)), lat


def test_an_odd_size_is_rounded_up_to_whole_floats_and_one_link_is_timed_alone():
    (lat,), allreduce = latency.measure([5], [latency.SOCKET], iters=3, repeats=1, busy_trials=2, timeout_s=50)
    assert (lat.link, lat.nbytes) == ("socket", 8) and lat.pingpong_s > 0 and allreduce > 0


def test_an_unknown_link_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="unknown link 'tcp'; pick from gloo, socket, shm"):
        latency.measure([2048], ["tcp"])


def test_transport_costs_over_shm_split_the_busy_mean_into_send_latency_and_receive(monkeypatch):
    seen = []

    def fake_measure(sizes, links, **kwargs):
        seen.append((sizes, links, kwargs))
        return latency.Measured([latency.Latency("shm", 2048, 1e-5, 3e-5, 50e-6, 9e-5, 8e-6, 2e-6)], 4e-4)

    monkeypatch.setattr(latency, "measure", fake_measure)
    costs = latency.transport_costs(2048, "shm", values=6)
    assert seen == [([2048], ["shm"], {"values": 6, "apart": False})]  # a simulation times only what it charges
    assert costs == pytest.approx(latency.TransportCosts(40e-6, 8e-6, 2e-6, 4e-4))
    latency.transport_costs(2048, "p2p")
    assert seen[-1][1] == ["gloo"]  # p2p on a CPU host is gloo


def test_in_process_messages_cost_nothing_and_auto_must_be_resolved_first():
    assert latency.transport_costs(1 << 20, "inprocess") == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="resolve"):
        latency.transport_costs(2048, "auto")


def test_auto_resolves_as_a_run_does():
    cpu = "shm" if shm_unavailable(torch.device("cpu")) is None else "p2p"
    assert latency.resolve("auto") == cpu
    assert latency.resolve("auto", torch.device("cuda", 0)) == "p2p"  # shm carries CPU tensors only
    assert [latency.resolve(t) for t in ("shm", "p2p", "inprocess")] == ["shm", "p2p", "inprocess"]
    with pytest.raises(ConfigError, match="transport 'gloo' is unknown; pick one of auto, shm, p2p, inprocess"):
        latency.resolve("gloo")
