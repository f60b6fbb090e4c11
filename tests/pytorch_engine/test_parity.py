"""The acceptance test: concurrent greedy generation on SmolLM2-135M equals HF generate() token for token,
with prefix caching on, off, and with a KV pool so small that sequences are preempted and recomputed."""

from __future__ import annotations

from engine_testing import PARITY_NEW_TOKENS, generate

from lmkit.frontend.protocol import FinishReason, SamplingParams
from lmkit.messages import PytorchEngineConfig
from lmkit.pytorch_engine import PytorchEngine


def run_engine(path, prompts, config: PytorchEngineConfig, second_wave: dict[str, list[int]] | None = None):
    engine = PytorchEngine(path, config)
    try:
        eos = list(engine.spec.eos_token_ids)
        sampling = SamplingParams(max_new_tokens=PARITY_NEW_TOKENS, temperature=0, stop_token_ids=eos)
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
        expected = FinishReason.LENGTH if len(want) == PARITY_NEW_TOKENS and want[-1] != 2 else FinishReason.STOP
        assert res.last.finish_reason is expected


def test_parity_with_prefix_caching(smollm2_dir, parity_prompts, parity_hf_reference):
    chats = {rid: ids for rid, ids in parity_prompts.items() if rid.startswith("chat")}
    config = PytorchEngineConfig(block_size=16)
    (first, second), _ = run_engine(smollm2_dir, parity_prompts, config, second_wave=chats)
    check(first, parity_hf_reference)
    # The second wave finds every prompt's full blocks in the cache, and still matches.
    check(second, {rid: parity_hf_reference[rid] for rid in chats})
    for rid, ids in chats.items():
        assert second[rid].outputs[0].num_cached_tokens == (len(ids) - 1) // 16 * 16 > 0


def test_parity_without_prefix_caching(smollm2_dir, parity_prompts, parity_hf_reference):
    (results,), _ = run_engine(smollm2_dir, parity_prompts, PytorchEngineConfig(enable_prefix_caching=False))
    check(results, parity_hf_reference)
    assert all(r.outputs[0].num_cached_tokens == 0 for r in results.values())


def test_parity_under_preemption(smollm2_dir, parity_prompts, parity_hf_reference):
    longest = max(len(ids) for ids in parity_prompts.values()) + PARITY_NEW_TOKENS
    blocks = -(-longest // 16) + 4  # room for the longest request and a little more, not for all eight
    config = PytorchEngineConfig(num_gpu_blocks=blocks, block_size=16, max_num_batched_tokens=64)
    (results,), preemptions = run_engine(smollm2_dir, parity_prompts, config)
    assert preemptions > 0
    check(results, parity_hf_reference)
