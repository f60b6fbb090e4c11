"""PytorchEngine on a tiny model: validation, aborts, errors, logprobs, stats."""

from __future__ import annotations

import random
import time

import pytest
from engine_testing import collect, generate, random_wave, rss_mib

from lmkit.frontend.protocol import Engine, EngineRequest, FinishReason, InvalidRequestError, SamplingParams
from lmkit.messages import PytorchEngineConfig
from lmkit.pytorch_engine import PytorchEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    config = PytorchEngineConfig(session_len=256, num_gpu_blocks=128, block_size=8, max_num_batched_tokens=64)
    eng = PytorchEngine(tiny_model_dir("llama"), config)
    yield eng
    eng.shutdown()


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def all_blocks_free(eng) -> bool:
    s = eng.stats()
    return s.num_blocks_free == s.num_blocks_total and s.num_running == 0 and s.num_waiting == 0


def test_protocol_and_basic_generation(engine):
    assert isinstance(engine, Engine)
    assert engine.session_len == 256 and engine.vocab_size == 320 and not engine.capabilities.supports_lora
    out = generate(engine, {"g": [1, 5, 9, 13]}, SamplingParams(max_new_tokens=7, temperature=0, ignore_eos=True))
    res = out["g"]
    assert len(res.token_ids) == 7 and res.last.finish_reason is FinishReason.LENGTH
    assert res.outputs[0].num_prompt_tokens == 4 and res.last.num_prompt_tokens == 4
    assert all_blocks_free(engine)


@pytest.mark.parametrize(
    "prompt, sampling, match",
    [
        ([], SamplingParams(), "empty"),
        ([1, 320], SamplingParams(), r"\[0, 320\)"),
        ([1, -1], SamplingParams(), r"\[0, 320\)"),
        (list(range(1, 257)), SamplingParams(), "session_len"),
        ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(logprobs=21), "logprobs"),
    ],
)
def test_invalid_requests_raise_and_engine_stays_healthy(engine, prompt, sampling, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request(EngineRequest("bad", prompt, sampling))
    out = generate(engine, {"next": [3, 4, 5]}, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    assert len(out["next"].token_ids) == 3


def test_duplicate_live_id_rejected(engine):
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    engine.add_request(EngineRequest("dup", [1, 2, 3], long))
    with pytest.raises(InvalidRequestError, match="already"):
        engine.add_request(EngineRequest("dup", [4, 5], long))
    engine.abort_request("dup")
    assert collect(engine, ["dup"])["dup"].last.finish_reason is FinishReason.ABORT
    out = generate(engine, {"dup": [1, 2]}, SamplingParams(max_new_tokens=2, temperature=0))  # id free again
    assert out["dup"].last.finished


def test_abort_mid_prefill_frees_blocks(tiny_model_dir):
    # One token per step: a 200-token prompt takes 200 steps to prefill.
    config = PytorchEngineConfig(num_gpu_blocks=64, block_size=8, max_num_batched_tokens=1)
    eng = PytorchEngine(tiny_model_dir("llama"), config)
    try:
        eng.add_request(EngineRequest("p", list(range(1, 201)), SamplingParams(max_new_tokens=5)))
        wait_for(lambda: eng.stats().num_blocks_free < 64)
        eng.abort_request("p")
        res = collect(eng, ["p"])["p"]
        assert res.token_ids == [] and res.last.finish_reason is FinishReason.ABORT
        assert all_blocks_free(eng)
    finally:
        eng.shutdown()


def test_abort_mid_decode_frees_blocks(engine):
    engine.add_request(EngineRequest("d", [7] * 30, SamplingParams(max_new_tokens=220, ignore_eos=True)))
    got = []
    while len(got) < 3:
        got += [o for o in engine.get_outputs(timeout=5.0) if o.request_id == "d"]
    assert not got[-1].finished
    engine.abort_request("d")
    res = collect(engine, ["d"])["d"]
    assert res.last.finish_reason is FinishReason.ABORT
    assert all_blocks_free(engine)
    engine.abort_request("d")  # unknown / finished ids are a no-op
    engine.abort_request("never-existed")


def test_forward_error_fails_requests_and_loop_survives(engine, monkeypatch):
    real_run = engine.runner.run

    def broken(batch):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.runner, "run", broken)
    res = generate(engine, {"e": [1, 2, 3]}, SamplingParams(max_new_tokens=4))["e"]
    assert res.last.finish_reason is FinishReason.ERROR and "boom" in res.last.error
    monkeypatch.setattr(engine.runner, "run", real_run)
    assert all_blocks_free(engine)
    real_postprocess = engine.scheduler.postprocess
    monkeypatch.setattr(engine.scheduler, "postprocess", lambda batch, sampled: 1 / 0)
    res = generate(engine, {"e2": [1, 2, 3]}, SamplingParams(max_new_tokens=4))["e2"]
    assert res.last.finish_reason is FinishReason.ERROR and "ZeroDivisionError" in res.last.error
    monkeypatch.setattr(engine.scheduler, "postprocess", real_postprocess)
    assert all_blocks_free(engine)
    out = generate(engine, {"after": [1, 2, 3]}, SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0))
    assert len(out["after"].token_ids) == 4


def test_stop_tokens_logprobs_and_seeds(engine):
    greedy = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    ref = generate(engine, {"ref": [9, 8, 7, 6]}, greedy)["ref"]
    lps = [lp for o in ref.outputs for lp in (o.logprobs or [])]
    assert [lp.token_id for lp in lps] == ref.token_ids
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in lps)  # greedy = the top token
    stop_at = ref.token_ids[2]
    stop = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[stop_at])
    res = generate(engine, {"stop": [9, 8, 7, 6]}, stop)["stop"]
    assert res.last.finish_reason is FinishReason.STOP
    assert res.token_ids == ref.token_ids[: ref.token_ids.index(stop_at) + 1]
    seeded = SamplingParams(max_new_tokens=8, temperature=1.5, seed=11, ignore_eos=True)
    alone = generate(engine, {"s": [4, 4, 4]}, seeded)["s"].token_ids
    crowd = {f"c{i}": [i + 1] * (i + 2) for i in range(5)} | {"s": [4, 4, 4]}
    together = generate(engine, crowd, seeded)
    assert together["s"].token_ids == alone


def test_session_len_caps_generation(engine):
    res = generate(engine, {"cap": list(range(1, 251))}, SamplingParams(max_new_tokens=50, ignore_eos=True))["cap"]
    assert len(res.token_ids) == 6 and res.last.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stress_random_cancellations(tiny_model_dir, dtype):
    """1,000 short requests, a third cancelled at random moments: every request ends once, every block is
    returned, and memory does not grow (the dense decode rows come and go with the batch)."""
    config = PytorchEngineConfig(
        dtype=dtype, block_size=16, num_gpu_blocks=48, max_batch_size=64, max_num_batched_tokens=256
    )
    e = PytorchEngine(tiny_model_dir("llama"), config)
    rng = random.Random(0)
    try:
        random_wave(e, "warm", 200, rng, vocab=320, num_blocks=48, max_new_tokens=12)
        rss = rss_mib()
        random_wave(e, "s", 1000, rng, vocab=320, num_blocks=48, max_new_tokens=12)
        assert rss_mib() - rss < 64, f"RSS grew from {rss:.0f} MiB to {rss_mib():.0f} MiB"
        s = e.stats()
        assert s.num_blocks_free == s.num_blocks_total and s.num_running == 0 and s.num_waiting == 0
    finally:
        e.shutdown()
