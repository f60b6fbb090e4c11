"""PytorchEngine's step: the plain-argmax path, and outputs kept back one step (as on CUDA, where they are built
while the GPU runs the next step), on CPU."""

from __future__ import annotations

import pytest
from engine_testing import collect, generate

from lmkit.frontend.protocol import EngineRequest, FinishReason, SamplingParams
from lmkit.messages import PytorchEngineConfig
from lmkit.pytorch_engine import PytorchEngine

PROMPTS = {"a": [1, 5, 9, 13], "b": list(range(20, 60)), "c": [7] * 11}
GREEDY = SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True)


@pytest.fixture
def engine(tiny_model_dir):
    config = PytorchEngineConfig(session_len=256, num_gpu_blocks=128, block_size=8, max_num_batched_tokens=32)
    eng = PytorchEngine(tiny_model_dir("llama"), config)
    yield eng
    eng.shutdown()


def test_argmax_path_gives_the_samplers_tokens(engine):
    sampler, calls = engine.sampler, []
    engine.sampler = lambda logits, rows: calls.append(len(rows)) or sampler(logits, rows)
    fast = generate(engine, PROMPTS, GREEDY)
    assert not calls and engine._num_live_sampled == 0
    # logprobs need the sampler: the same greedy tokens come back through it
    slow = generate(engine, PROMPTS, SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True, logprobs=0))
    assert calls and engine._num_live_sampled == 0
    for rid in PROMPTS:
        assert fast[rid].token_ids == slow[rid].token_ids


def test_outputs_kept_back_a_step_are_the_same_stream(engine):
    now = generate(engine, PROMPTS, GREEDY)
    engine._defer_outputs = True  # the loop thread reads it at the end of each step
    later = generate(engine, PROMPTS, GREEDY)
    for rid in PROMPTS:
        assert later[rid].token_ids == now[rid].token_ids
        assert [len(o.new_token_ids) for o in later[rid].outputs] == [len(o.new_token_ids) for o in now[rid].outputs]
        assert later[rid].last.finish_reason is FinishReason.LENGTH and engine._pending == []
    # an abort mid-decode: the tokens kept back go out first, nothing after the end
    engine.add_request(EngineRequest("x", [3, 4, 5], SamplingParams(max_new_tokens=200, ignore_eos=True)))
    first = engine.get_outputs(timeout=30.0)
    assert first and first[0].request_id == "x"
    engine.abort_request("x")
    res = collect(engine, ["x"])["x"]
    assert res.last.finish_reason is FinishReason.ABORT and not res.last.new_token_ids
    assert [o.finished for o in res.outputs].count(True) == 1
    assert engine.stats().num_blocks_free == engine.stats().num_blocks_total
