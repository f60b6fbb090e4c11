"""Pipelined steps of the PyTorch engine on CUDA (a step runs before the last one's tokens are read) against the
same engine with them off (LMKIT_PIPELINE=0): the same tokens and finish reasons with stop tokens, length limits,
preemption, prefix caching, aborts and a sampled request that turns pipelining off for a while."""

from __future__ import annotations

import pytest
import torch

from lmkit.frontend.protocol import EngineRequest, FinishReason, SamplingParams
from lmkit.messages import PytorchEngineConfig
from lmkit.pytorch_engine.engine import PytorchEngine

pytestmark = pytest.mark.gpu

SHARED = list(range(10, 74))  # four blocks of 16: a prefix the cache can serve
PROMPTS = [
    [5, 17, 99, 3],
    SHARED + [1, 2, 3],
    list(range(40, 140)),
    SHARED + [4, 5],
    [7] * 33,
    [250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
]
MAX_NEW = [1, 2, 37, 20, 9, 30]


def make_engine(tiny_model_dir, monkeypatch, pipeline: bool, num_gpu_blocks: int = 64) -> PytorchEngine:
    monkeypatch.setenv("LMKIT_PIPELINE", "1" if pipeline else "0")
    cfg = PytorchEngineConfig(
        device="cuda",
        dtype="float32",
        num_gpu_blocks=num_gpu_blocks,
        block_size=16,
        max_num_batched_tokens=64,
        max_batch_size=8,
    )
    engine = PytorchEngine(tiny_model_dir("llama"), cfg)
    assert engine._pipeline == pipeline
    return engine


def run(engine: PytorchEngine, requests: list[tuple[list[int], SamplingParams]], prefix: str = "r"):
    """Submit all, collect until each finishes: id -> (tokens, finish reason). Checks no placeholder escapes."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(EngineRequest(f"{prefix}{i}", prompt, params))
    out = {f"{prefix}{i}": ([], None) for i in range(len(requests))}
    done = 0
    while done < len(requests):
        for o in engine.get_outputs(timeout=10.0):
            assert o.error is None, o.error
            assert all(t >= 0 for t in o.new_token_ids), o.new_token_ids
            tokens, reason = out[o.request_id]
            assert reason is None, f"{o.request_id} got output after it finished"
            out[o.request_id] = (tokens + o.new_token_ids, o.finish_reason)
            done += o.finished
    return out


def greedy(max_new: int, stop: list[int] = (), ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=ignore_eos, stop_token_ids=list(stop))


def both(tiny_model_dir, monkeypatch, requests, **kw):
    """The same requests with pipelining on and off (the pipelined run chains steps, the other none); returns
    both results and their preemption counts."""
    results = []
    for pipeline in (True, False):
        engine = make_engine(tiny_model_dir, monkeypatch, pipeline, **kw)
        try:
            results.append(run(engine, requests))
            stats = engine.stats()
            assert stats.num_blocks_used == 0, "a finished request kept its blocks"
            assert (stats.num_pipelined_steps > 0) == pipeline, stats.num_pipelined_steps
            results.append(engine.num_preemptions)
        finally:
            engine.shutdown()
    return results


def test_lengths_and_stop_tokens_match_unpipelined(tiny_model_dir, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    lengths = [(p, greedy(n)) for p, n in zip(PROMPTS, MAX_NEW)]
    got, _, ref, _ = both(tiny_model_dir, monkeypatch, lengths)
    assert got == ref
    for (tokens, reason), n in zip(ref.values(), MAX_NEW):
        assert len(tokens) == n and reason is FinishReason.LENGTH
    plain = list(ref.values())
    # Stop on a token that some outputs reach early: those requests end one step after the pipeline ran ahead.
    stop = ref["r2"][0][3]
    stopping = [(p, greedy(32, [stop], ignore_eos=False)) for p in PROMPTS]
    got, _, ref, _ = both(tiny_model_dir, monkeypatch, stopping)
    assert got == ref
    assert ref["r2"] == (plain[2][0][: plain[2][0].index(stop) + 1], FinishReason.STOP)


def test_preemption_and_prefix_cache_match_unpipelined(tiny_model_dir, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    requests = [(p, greedy(40)) for p in PROMPTS]
    got, got_preempted, ref, ref_preempted = both(tiny_model_dir, monkeypatch, requests, num_gpu_blocks=16)
    assert got_preempted > 0 and ref_preempted > 0
    assert got == ref


def test_abort_and_sampled_request_while_pipelined(tiny_model_dir, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    requests = [(p, greedy(48)) for p in PROMPTS]
    engine = make_engine(tiny_model_dir, monkeypatch, pipeline=False)
    try:
        ref = run(engine, requests)
    finally:
        engine.shutdown()
    engine = make_engine(tiny_model_dir, monkeypatch, pipeline=True)
    try:
        for i, (prompt, params) in enumerate(requests):
            engine.add_request(EngineRequest(f"r{i}", prompt, params))
        # A sampled request turns pipelining off until it finishes; an abort lands while steps are in flight.
        sampled = SamplingParams(max_new_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
        engine.add_request(EngineRequest("sampled", [3, 4, 5], sampled))
        out = {f"r{i}": ([], None) for i in range(len(requests))} | {"sampled": ([], None)}
        aborted = False
        while any(reason is None for _, reason in out.values()):
            for o in engine.get_outputs(timeout=10.0):
                assert o.error is None and all(t >= 0 for t in o.new_token_ids)
                tokens, reason = out[o.request_id]
                assert reason is None
                out[o.request_id] = (tokens + o.new_token_ids, o.finish_reason)
                if not aborted and len(out["r2"][0]) >= 10:
                    engine.abort_request("r2")
                    aborted = True
        assert engine.stats().num_blocks_used == 0
        again = run(engine, requests[:2], prefix="again")
    finally:
        engine.shutdown()
    tokens, reason = out.pop("r2")
    assert reason is FinishReason.ABORT and tokens == ref["r2"][0][: len(tokens)]
    assert len(out.pop("sampled")[0]) == 5
    assert out == {k: v for k, v in ref.items() if k != "r2"}
    assert list(again.values()) == [ref["r0"], ref["r1"]]
