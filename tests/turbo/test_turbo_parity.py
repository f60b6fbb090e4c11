"""Acceptance: 32 concurrent greedy requests (8 prompts x 4) on SmolLM2-135M equal HF generate() token for
token, with prefix caching, and again with a KV pool so small that sequences are preempted and recomputed."""

from __future__ import annotations

import pytest
import torch
from engine_testing import generate

from lmkit.frontend.protocol import FinishReason, SamplingParams
from lmkit.messages import TurboEngineConfig
from lmkit.turbo.engine import TurboEngine

NEW_TOKENS = 64
SYSTEM = "You are a terse assistant who answers questions about geography and history in one paragraph."
CHATS = [
    "What is the capital of France?",
    "Name three rivers in Africa and say which is the longest.",
    "Who built the pyramids of Giza?",
    "Explain in detail why the Roman Empire fell, covering economics, the military, politics and the "
    "pressure of migrating peoples on its borders over several centuries.",
]
RAW = [
    "The quick brown fox",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    ",
    "The history of the printing press begins",
]


@pytest.fixture(scope="module")
def prompts(smollm2_dir) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    out = {}
    for i, q in enumerate(CHATS):  # the chat prompts share the system prompt: a common prefix of blocks
        text = tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
        )
        out[f"chat{i}"] = tok.encode(text, add_special_tokens=False)
    for i, text in enumerate(RAW):
        out[f"raw{i}"] = tok.encode(text)
    return out


@pytest.fixture(scope="module")
def hf_reference(smollm2_dir, prompts) -> dict[str, list[int]]:
    """HF greedy, one prompt at a time (no batching, no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ref = {}
    with torch.inference_mode():
        for rid, ids in prompts.items():
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False)
            ref[rid] = out[0, len(ids) :].tolist()
    return ref


def run(path, prompts, config, copies=4):
    engine = TurboEngine(path, config)
    try:
        sampling = SamplingParams(
            max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=list(engine.spec.eos_token_ids)
        )
        requests = {f"{rid}#{c}": ids for c in range(copies) for rid, ids in prompts.items()}  # all at once
        results = generate(engine, requests, sampling)
        if copies > 1:  # a second wave finds every prompt's full blocks in the cache, and still matches
            again = generate(engine, {f"{rid}#again": ids for rid, ids in prompts.items()}, sampling)
            for rid, ids in prompts.items():
                assert again[f"{rid}#again"].outputs[0].num_cached_tokens == (len(ids) - 1) // 16 * 16
            results.update(again)
        stats = engine.stats()
        return results, stats, engine.num_preemptions
    finally:
        engine.shutdown()


def check(results, hf_reference):
    for rid, r in results.items():
        want = hf_reference[rid.split("#")[0]]
        assert r.token_ids == want, (
            f"{rid} diverges at token {next((i for i, (a, b) in enumerate(zip(r.token_ids, want)) if a != b), None)}"
        )
        expected = FinishReason.LENGTH if len(want) == NEW_TOKENS and want[-1] != 2 else FinishReason.STOP
        assert r.last.finish_reason is expected


def test_parity_concurrent_with_prefix_caching(smollm2_dir, prompts, hf_reference):
    config = TurboEngineConfig(cache_block_seq_len=16, num_blocks=512)
    results, stats, _ = run(smollm2_dir, prompts, config)
    check(results, hf_reference)
    assert stats.num_blocks_free == stats.num_blocks_total
    assert stats.num_blocks_cached > 0


def test_parity_under_preemption(smollm2_dir, prompts, hf_reference):
    longest = max(len(ids) for ids in prompts.values()) + NEW_TOKENS
    blocks = -(-longest // 16) + 4  # room for the longest request and a little more, not for all eight
    config = TurboEngineConfig(cache_block_seq_len=16, num_blocks=blocks, max_num_batched_tokens=64)
    results, stats, preemptions = run(smollm2_dir, prompts, config, copies=1)
    check(results, hf_reference)
    assert preemptions > 0
    assert stats.num_blocks_free == stats.num_blocks_total
