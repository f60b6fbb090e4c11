"""The proxy's routing strategies on a hand-made node table (no HTTP)."""

from __future__ import annotations

import collections
import random

import pytest

from lmkit.serve.proxy.nodes import Node, NodeManager, Strategy


def table(strategy: Strategy) -> NodeManager:
    m = NodeManager(strategy)
    for i in range(3):
        m.nodes[f"http://n{i}"] = Node(f"http://n{i}", models=["m"])
    return m


@pytest.mark.parametrize("strategy", list(Strategy))
def test_every_strategy_spreads_a_burst(strategy):
    random.seed(0)  # the random strategy leaves a node under 5 of 30 picks in about 1 run of 10
    m = table(strategy)
    picked = collections.Counter()
    for _ in range(30):  # a burst: nothing finishes, so queues only grow
        node = m.pick("m", set())
        node.in_flight += 1
        picked[node.url] += 1
    assert len(picked) == 3 and min(picked.values()) >= 5, picked


def test_latency_strategies_prefer_the_fast_node():
    for strategy in (Strategy.MIN_EXPECTED_LATENCY, Strategy.MIN_OBSERVED_LATENCY):
        m = table(strategy)
        for url, latency in [("http://n0", 0.1), ("http://n1", 1.0), ("http://n2", 2.0)]:
            for _ in range(5):
                m.nodes[url].record(latency)
        picks = collections.Counter(m.pick("m", set()).url for _ in range(20))
        assert picks == {"http://n0": 20}, (strategy, picks)
        m.nodes["http://n0"].in_flight = 30  # a long queue outweighs its speed
        assert m.pick("m", set()).url != "http://n0"


def test_pick_respects_model_and_exclusions():
    m = table(Strategy.RANDOM)
    m.nodes["http://n2"].models = ["other"]
    assert m.pick("other", set()).url == "http://n2"
    assert m.pick("m", {"http://n0", "http://n1"}) is None
    assert m.pick("nope", set()) is None
    assert m.model_names() == ["m", "other"]


def test_ewma_and_mean():
    n = Node("http://x")
    for v in (1.0, 3.0):
        n.record(v)
    assert n.mean_latency_s == pytest.approx(2.0)
    assert n.ewma_latency_s == pytest.approx(0.3 * 3.0 + 0.7 * 1.0)
