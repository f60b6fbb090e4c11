"""The acceptance test: concurrent greedy generation on SmolLM2-135M equals HF generate() token for token,
with prefix caching on, off, and with a KV pool so small that sequences are preempted and recomputed."""

from __future__ import annotations

import pytest
import torch
from engine_testing import generate

from lmkit.frontend.protocol import FinishReason, SamplingParams
from lmkit.messages import PytorchEngineConfig
from lmkit.pytorch_engine import PytorchEngine

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
    for i, q in enumerate(CHATS):  # chat prompts share the system prompt: a common prefix of several blocks
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


def run_engine(path, prompts, config: PytorchEngineConfig, second_wave: dict[str, list[int]] | None = None):
    engine = PytorchEngine(path, config)
    try:
        eos = list(engine.spec.eos_token_ids)
        sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, stop_token_ids=eos)
        results = [generate(engine, prompts, sampling)]
        if second_wave:
            results.append(generate(engine, second_wave, sampling))
        stats = engine.stats()
        assert stats.num_blocks_free == stats.num_blocks_total
        return results, engine.num_preemptions
    finally:
        engine.shutdown()


def check(results, hf_reference):
    assert results.keys() == hf_reference.keys()
    for rid, want in hf_reference.items():
        res = results[rid]
        assert res.token_ids == want, (
            f"{rid} diverges at token {next((i for i, (a, b) in enumerate(zip(res.token_ids, want)) if a != b), None)}"
        )
        expected = FinishReason.LENGTH if len(want) == NEW_TOKENS and want[-1] != 2 else FinishReason.STOP
        assert res.last.finish_reason is expected


def test_parity_with_prefix_caching(smollm2_dir, prompts, hf_reference):
    chats = {rid: ids for rid, ids in prompts.items() if rid.startswith("chat")}
    config = PytorchEngineConfig(block_size=16)
    (first, second), _ = run_engine(smollm2_dir, prompts, config, second_wave=chats)
    check(first, hf_reference)
    # The second wave finds every prompt's full blocks in the cache, and still matches.
    check(second, {rid: hf_reference[rid] for rid in chats})
    for rid, ids in chats.items():
        assert second[rid].outputs[0].num_cached_tokens == (len(ids) - 1) // 16 * 16 > 0


def test_parity_without_prefix_caching(smollm2_dir, prompts, hf_reference):
    (results,), _ = run_engine(smollm2_dir, prompts, PytorchEngineConfig(enable_prefix_caching=False))
    check(results, hf_reference)
    assert all(r.outputs[0].num_cached_tokens == 0 for r in results.values())


def test_parity_under_preemption(smollm2_dir, prompts, hf_reference):
    longest = max(len(ids) for ids in prompts.values()) + NEW_TOKENS
    blocks = -(-longest // 16) + 4  # room for the longest request and a little more, not for all eight
    config = PytorchEngineConfig(num_gpu_blocks=blocks, block_size=16, max_num_batched_tokens=64)
    (results,), preemptions = run_engine(smollm2_dir, prompts, config)
    assert preemptions > 0
    check(results, hf_reference)
