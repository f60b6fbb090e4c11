"""The Engine-protocol conformance suite: the same scenarios on every backend of the registry, on SmolLM2.

A backend that is not available here (turbo without its compiled extension) is skipped with the reason.
One engine per backend for the whole module (a small KV pool), float32 so logprobs match HF to 1e-3.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from lmkit.engines import BACKENDS, create_engine, make_config
from lmkit.frontend.protocol import (
    Engine,
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
)

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _backend_params():
    params = []
    for name, backend in BACKENDS.items():
        ok, why = backend.available()
        params.append(pytest.param(name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {why}")))
    return params


@pytest.fixture(scope="module", params=_backend_params())
def engine(request, smollm2_dir):
    config = make_config(
        request.param, {"num_blocks": 96, "dtype": "float32", "session_len": 1024, "max_batch_size": 8}
    )
    eng, name = create_engine(smollm2_dir, request.param, config)
    assert name == request.param
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from lmkit.frontend.tokenizer import Tokenizer

    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    return hf_tokenizer.encode(PROMPT, add_special_tokens=False)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    return model.eval()


_counter = iter(range(10**9))


def req(prompt, **sampling) -> EngineRequest:
    return EngineRequest(f"conf-{next(_counter)}", list(prompt), SamplingParams(**sampling))


def run(engine: Engine, requests: list[EngineRequest], timeout: float = 120.0) -> dict[str, dict]:
    """Add `requests`, collect every output until all finished: id -> {tokens, finish, outputs}."""
    results = {r.request_id: {"tokens": [], "finish": None, "outputs": []} for r in requests}
    for r in requests:
        engine.add_request(r)
    deadline = time.monotonic() + timeout
    while any(v["finish"] is None for v in results.values()):
        assert time.monotonic() < deadline, "engine did not finish in time"
        for out in engine.get_outputs(timeout=0.5):
            if out.request_id not in results:
                continue
            res = results[out.request_id]
            assert res["finish"] is None, "output after the finishing one"
            res["outputs"].append(out)
            res["tokens"] += out.new_token_ids
            res["finish"] = out.finish_reason
    return results


def wait_idle(engine: Engine, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats.num_running == 0 and stats.num_waiting == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def test_is_an_engine(engine):
    assert isinstance(engine, Engine)
    assert engine.vocab_size == 49152 and engine.session_len == 1024


def test_streaming_greedy_matches_hf(engine, prompt_ids, hf_model):
    r = req(prompt_ids, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    res = run(engine, [r])[r.request_id]
    assert res["finish"] == FinishReason.LENGTH and len(res["tokens"]) == 8
    assert len(res["outputs"]) > 1  # streamed, not one batch at the end
    assert res["outputs"][0].num_prompt_tokens == len(prompt_ids)
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=2
        )[0, len(prompt_ids) :].tolist()
    assert res["tokens"] == ref


def test_max_new_tokens_gives_length(engine, prompt_ids):
    r = req(prompt_ids, max_new_tokens=3, temperature=0.7, seed=3, ignore_eos=True)
    res = run(engine, [r])[r.request_id]
    assert res["finish"] == FinishReason.LENGTH and len(res["tokens"]) == 3


def test_stop_token_ids(engine, prompt_ids):
    r = req(prompt_ids, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = run(engine, [r])[r.request_id]["tokens"]
    stop = tokens[3]
    r2 = req(prompt_ids, max_new_tokens=8, temperature=0.0, stop_token_ids=[stop])
    res = run(engine, [r2])[r2.request_id]
    assert res["finish"] == FinishReason.STOP
    assert res["tokens"] == tokens[: tokens.index(stop) + 1]


def test_eos_in_stop_ids_ends_with_stop(engine, prompt_ids):
    r = req(prompt_ids, max_new_tokens=64, temperature=0.0, stop_token_ids=[2])
    res = run(engine, [r])[r.request_id]
    assert res["finish"] == FinishReason.STOP and res["tokens"][-1] == 2


def test_abort_frees_blocks(engine, prompt_ids):
    baseline = wait_idle(engine).num_blocks_free
    r = req(prompt_ids + [100] * 40, max_new_tokens=500, temperature=0.0, ignore_eos=True)
    engine.add_request(r)
    first = None
    deadline = time.monotonic() + 60
    while first is None:
        assert time.monotonic() < deadline
        first = next((o for o in engine.get_outputs(timeout=0.5) if o.request_id == r.request_id), None)
    assert engine.stats().num_blocks_free < baseline
    engine.abort_request(r.request_id)
    res = {"finish": first.finish_reason}
    while res["finish"] is None:
        assert time.monotonic() < deadline
        for o in engine.get_outputs(timeout=0.5):
            if o.request_id == r.request_id:
                res["finish"] = o.finish_reason
    assert res["finish"] == FinishReason.ABORT
    stats = wait_idle(engine)
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_blocks_free == baseline
    engine.abort_request("no-such-request")  # a no-op
    engine.abort_request(r.request_id)  # already finished: a no-op


def test_abort_right_after_add(engine, prompt_ids):
    r = req(prompt_ids, max_new_tokens=500, temperature=0.0, ignore_eos=True)
    engine.add_request(r)
    engine.abort_request(r.request_id)
    finish = None
    deadline = time.monotonic() + 30
    while finish is None:
        assert time.monotonic() < deadline
        for o in engine.get_outputs(timeout=0.5):
            if o.request_id == r.request_id:
                finish = o.finish_reason
    assert finish == FinishReason.ABORT
    assert wait_idle(engine).num_running == 0


def test_logprobs_match_hf(engine, prompt_ids, hf_model):
    r = req(prompt_ids, max_new_tokens=1, temperature=0.0, logprobs=5)
    (out,) = [o for o in run(engine, [r])[r.request_id]["outputs"] if o.new_token_ids]
    (lp,) = out.logprobs
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([prompt_ids])).logits[0, -1].float(), dim=-1)
    assert lp.token_id == out.new_token_ids[0] == int(ref.argmax())
    assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-3
    assert len(lp.top) == 5
    assert {t for t, _ in lp.top} == set(ref.topk(5).indices.tolist())
    for tid, value in lp.top:
        assert abs(value - float(ref[tid])) < 1e-3


def test_seeded_sampling_is_batch_invariant(engine, prompt_ids):
    sampling = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = req(prompt_ids, **sampling)
    tokens_alone = run(engine, [alone])[alone.request_id]["tokens"]
    again = req(prompt_ids, **sampling)
    others = [
        req(prompt_ids[:-3] + [100 + i] * (5 + i), max_new_tokens=12, temperature=1.0, seed=i, ignore_eos=True)
        for i in range(3)
    ]
    results = run(engine, [others[0], again, *others[1:]])
    assert results[again.request_id]["tokens"] == tokens_alone
    other = req(prompt_ids, **{**sampling, "seed": 4321})
    assert run(engine, [other])[other.request_id]["tokens"] != tokens_alone


BAD_REQUESTS = [
    ("empty prompt", dict(prompt=[])),
    ("token id >= vocab", dict(prompt=[1, 49152])),
    ("negative token id", dict(prompt=[1, -1])),
    ("prompt fills the session", dict(prompt=[100] * 1024)),
    ("max_new_tokens 0", dict(max_new_tokens=0)),
    ("negative temperature", dict(temperature=-1.0)),
    ("top_p 0", dict(top_p=0.0)),
    ("logprobs above max", dict(logprobs=10**6)),
]


@pytest.mark.parametrize(("what", "bad"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_invalid_requests_are_refused(engine, prompt_ids, what, bad):
    bad = dict(bad)
    prompt = bad.pop("prompt", prompt_ids)
    with pytest.raises(InvalidRequestError):
        engine.add_request(req(prompt, **bad))
    ok = req(prompt_ids, max_new_tokens=2, temperature=0.0, ignore_eos=True)
    assert run(engine, [ok])[ok.request_id]["finish"] == FinishReason.LENGTH


def test_n_choices_through_async_engine(engine, hf_tokenizer):
    from lmkit.frontend.async_engine import AsyncEngine
    from lmkit.messages import GenerationConfig

    async def go():
        ae = AsyncEngine(engine, hf_tokenizer, "smollm2", "conformance")
        try:
            gen = GenerationConfig(n=3, seed=5, temperature=1.0, max_new_tokens=6, ignore_eos=True)
            chunks = [c async for c in ae.generate([{"role": "user", "content": "Tell me a story."}], gen)]
        finally:
            ae.shutdown(stop_engine=False)
        return chunks

    chunks = asyncio.run(go())
    finals = {c.index: c for c in chunks if c.finish_reason}
    assert sorted(finals) == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.generate_token_len == 6 for c in finals.values())
    ids = [[t for c in chunks if c.index == i for t in c.token_ids] for i in range(3)]
    assert len({tuple(x) for x in ids}) > 1  # seeds 5, 6, 7 differ
    assert wait_idle(engine).num_running == 0


def test_closing_an_async_stream_aborts_and_frees_blocks(engine, hf_tokenizer, prompt_ids):
    from lmkit.frontend.async_engine import AsyncEngine
    from lmkit.messages import GenerationConfig

    baseline = wait_idle(engine).num_blocks_free

    async def go():
        ae = AsyncEngine(engine, hf_tokenizer, "smollm2", "conformance")
        try:
            gen = GenerationConfig(temperature=0, max_new_tokens=500, ignore_eos=True)
            stream = ae.generate(prompt_ids + [100] * 40, gen, request_id="cancel-me")
            first = await anext(stream)
            await stream.aclose()
            return first
        finally:
            ae.shutdown(stop_engine=False)

    first = asyncio.run(go())
    assert first.finish_reason is None
    stats = wait_idle(engine)
    assert stats.num_running == 0 and stats.num_blocks_free == baseline
