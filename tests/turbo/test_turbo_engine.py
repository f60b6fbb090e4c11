"""TurboEngine behaviour on a tiny model: validation, cancellation, accounting, seeds, logprobs, stress."""

from __future__ import annotations

import random
import time

import pytest
from engine_testing import collect, generate, random_wave, rss_mib, wait_idle

from lmkit.frontend.protocol import (
    Engine,
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
)
from lmkit.messages import TurboEngineConfig
from lmkit.turbo.engine import TurboEngine


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def engine(tiny):
    e = TurboEngine(
        tiny, TurboEngineConfig(cache_block_seq_len=16, num_blocks=64, max_num_batched_tokens=64, session_len=400)
    )
    yield e
    e.shutdown()


def test_protocol_and_spec(engine):
    assert isinstance(engine, Engine)
    assert engine.vocab_size == 320 and engine.session_len == 400
    assert engine.spec.num_layers == 2
    s = engine.stats()
    assert s.num_blocks_total == 64 and s.num_blocks_free == 64


@pytest.mark.parametrize(
    "ids, sampling, match",
    [
        ([], SamplingParams(), "empty"),
        ([1, 320, 3], SamplingParams(), "outside"),
        ([1, -1], SamplingParams(), "outside"),
        ([1] * 400, SamplingParams(), "session_len"),
        ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(logprobs=21), "logprobs"),
    ],
)
def test_invalid_requests(engine, ids, sampling, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request(EngineRequest("bad", ids, sampling))
    assert engine.stats().num_waiting == 0


def test_duplicate_request_id(engine):
    engine.add_request(EngineRequest("dup", [1, 2, 3], SamplingParams(max_new_tokens=200, ignore_eos=True)))
    with pytest.raises(InvalidRequestError, match="already"):
        engine.add_request(EngineRequest("dup", [1, 2, 3], SamplingParams()))
    engine.abort_request("dup")
    assert collect(engine, ["dup"])["dup"].last.finish_reason is FinishReason.ABORT


def test_pool_too_small_for_one_request(tiny):
    e = TurboEngine(tiny, TurboEngineConfig(cache_block_seq_len=16, num_blocks=2))  # 32 tokens in all
    try:
        assert e.session_len == 32
        with pytest.raises(InvalidRequestError, match="KV pool"):
            e.add_request(EngineRequest("big", list(range(40)), SamplingParams()))
        # a request that fits finishes with LENGTH at the pool's capacity
        r = generate(e, {"fits": list(range(20))}, SamplingParams(max_new_tokens=100, ignore_eos=True))["fits"]
        assert r.last.finish_reason is FinishReason.LENGTH and len(r.token_ids) == 12
    finally:
        e.shutdown()


def test_outputs_and_finish(engine):
    ids = list(range(3, 40))
    res = generate(engine, {"a": ids}, SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3))[
        "a"
    ]
    assert len(res.token_ids) == 5 and res.last.finish_reason is FinishReason.LENGTH
    assert res.outputs[0].num_prompt_tokens == len(ids)
    lps = [lp for o in res.outputs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == res.token_ids
    assert all(len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] for lp in lps)
    assert all(lp.logprob == pytest.approx(lp.top[0][1], abs=1e-5) for lp in lps)  # greedy: the top token
    # stop token: generation ends on it, and it is reported
    stop = res.token_ids[2]
    res2 = generate(engine, {"b": ids}, SamplingParams(max_new_tokens=50, temperature=0.0, stop_token_ids=[stop]))["b"]
    assert res2.token_ids == res.token_ids[: res.token_ids.index(stop) + 1]
    assert res2.last.finish_reason is FinishReason.STOP
    # prefix cache: the same prompt again is served from cache for its full blocks
    res3 = generate(engine, {"c": ids}, SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True))["c"]
    assert res3.token_ids == res.token_ids and res3.outputs[0].num_cached_tokens == 32


def test_seed_reproducible_whatever_the_batch(engine):
    ids = list(range(5, 25))
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = generate(engine, {"s": ids}, sp)["s"].token_ids
    others = {f"o{i}": list(range(i, i + 30)) for i in range(6)}
    for rid, p in others.items():
        engine.add_request(EngineRequest(rid, p, SamplingParams(max_new_tokens=20, temperature=1.0)))
    engine.add_request(EngineRequest("s2", ids, sp))
    res = collect(engine, [*others, "s2"])
    assert res["s2"].token_ids == alone
    different = generate(
        engine, {"s3": ids}, SamplingParams(max_new_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    )["s3"].token_ids
    assert different != alone


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.002)


def test_cancel_mid_prefill(tiny):
    e = TurboEngine(
        tiny,
        TurboEngineConfig(cache_block_seq_len=16, num_blocks=64, max_num_batched_tokens=1, enable_prefix_caching=False),
    )
    try:
        before = e.stats().num_prefill_tokens
        e.add_request(EngineRequest("p", [t % 300 + 3 for t in range(500)], SamplingParams(max_new_tokens=5)))
        _wait_for(lambda: e.stats().num_prefill_tokens > before)
        e.abort_request("p")
        res = collect(e, ["p"])["p"]
        assert res.last.finish_reason is FinishReason.ABORT and res.token_ids == []
        assert e.stats().num_prefill_tokens < 500  # stopped before the prompt was done
        wait_idle(e, 64)
    finally:
        e.shutdown()


def test_cancel_mid_decode(engine):
    engine.add_request(EngineRequest("d", list(range(10, 30)), SamplingParams(max_new_tokens=300, ignore_eos=True)))
    got = []
    while not got:
        got = [o for o in engine.get_outputs(1.0) if o.new_token_ids]
    engine.abort_request("d")
    res = collect(engine, ["d"])["d"]
    assert res.last.finish_reason is FinishReason.ABORT
    assert len(got[0].new_token_ids) + len(res.token_ids) < 300
    engine.abort_request("d")  # unknown / finished ids are a no-op
    engine.abort_request("never-seen")
    wait_idle(engine, 64)


def test_preemption_keeps_outputs(tiny):
    prompts = {f"r{i}": [(7 * i + j) % 300 + 3 for j in range(40)] for i in range(6)}
    sp = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    big = TurboEngine(tiny, TurboEngineConfig(cache_block_seq_len=16, num_blocks=64))
    try:
        want = {rid: generate(big, {rid: ids}, sp)[rid].token_ids for rid, ids in prompts.items()}
    finally:
        big.shutdown()
    small = TurboEngine(tiny, TurboEngineConfig(cache_block_seq_len=16, num_blocks=10, max_num_batched_tokens=32))
    try:
        got = generate(small, prompts, sp)
        assert small.num_preemptions > 0
        assert {rid: r.token_ids for rid, r in got.items()} == want
        wait_idle(small, 10)
    finally:
        small.shutdown()


def test_shutdown_aborts_in_flight(tiny):
    e = TurboEngine(tiny, TurboEngineConfig(cache_block_seq_len=16, num_blocks=32))
    e.add_request(EngineRequest("x", [1, 2, 3], SamplingParams(max_new_tokens=100000, ignore_eos=True)))
    e.add_request(EngineRequest("y", list(range(200)), SamplingParams(max_new_tokens=100000, ignore_eos=True)))
    time.sleep(0.05)
    e.shutdown()
    res = collect(e, ["x", "y"], timeout=10)
    assert all(r.last.finish_reason is FinishReason.ABORT for r in res.values())
    with pytest.raises(InvalidRequestError):
        e.add_request(EngineRequest("z", [1], SamplingParams()))
    e.shutdown()  # idempotent


def test_stress_random_cancellations(tiny):
    """1,000 short requests, a third cancelled at random moments: every request ends once, every block is
    returned, and memory does not grow."""
    e = TurboEngine(
        tiny, TurboEngineConfig(cache_block_seq_len=16, num_blocks=48, max_batch_size=64, max_num_batched_tokens=256)
    )
    rng = random.Random(0)
    try:
        random_wave(e, "warm", 200, rng, vocab=320, num_blocks=48)
        rss = rss_mib()
        random_wave(e, "s", 1000, rng, vocab=320, num_blocks=48)
        assert rss_mib() - rss < 64, f"RSS grew from {rss:.0f} MiB to {rss_mib():.0f} MiB"
        s = e.stats()
        assert s.num_blocks_free == s.num_blocks_total and s.num_running == 0 and s.num_waiting == 0
    finally:
        e.shutdown()
