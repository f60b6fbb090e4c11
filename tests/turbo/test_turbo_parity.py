"""Acceptance: 32 concurrent greedy requests (8 prompts x 4) on SmolLM2-135M equal HF generate() token for
token, with prefix caching, and again with a KV pool so small that sequences are preempted and recomputed."""

from __future__ import annotations

from engine_testing import PARITY_NEW_TOKENS, generate

from lmkit.frontend.protocol import FinishReason, SamplingParams
from lmkit.messages import TurboEngineConfig
from lmkit.turbo.engine import TurboEngine


def run(path, prompts, config, copies=4):
    engine = TurboEngine(path, config)
    try:
        sampling = SamplingParams(
            max_new_tokens=PARITY_NEW_TOKENS, temperature=0.0, stop_token_ids=list(engine.spec.eos_token_ids)
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
        expected = FinishReason.LENGTH if len(want) == PARITY_NEW_TOKENS and want[-1] != 2 else FinishReason.STOP
        assert r.last.finish_reason is expected


def test_parity_concurrent_with_prefix_caching(smollm2_dir, parity_prompts, parity_hf_reference):
    config = TurboEngineConfig(cache_block_seq_len=16, num_blocks=512)
    results, stats, _ = run(smollm2_dir, parity_prompts, config)
    check(results, parity_hf_reference)
    assert stats.num_blocks_free == stats.num_blocks_total
    assert stats.num_blocks_cached > 0


def test_parity_under_preemption(smollm2_dir, parity_prompts, parity_hf_reference):
    longest = max(len(ids) for ids in parity_prompts.values()) + PARITY_NEW_TOKENS
    blocks = -(-longest // 16) + 4  # room for the longest request and a little more, not for all eight
    config = TurboEngineConfig(cache_block_seq_len=16, num_blocks=blocks, max_num_batched_tokens=64)
    results, stats, preemptions = run(smollm2_dir, parity_prompts, config, copies=1)
    check(results, parity_hf_reference)
    assert preemptions > 0
    assert stats.num_blocks_free == stats.num_blocks_total
