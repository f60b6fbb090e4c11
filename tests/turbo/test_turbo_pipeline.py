"""turbo's pipelined decode on CPU (TURBO_PIPELINE=1 turns it on for eager steps; it is on by default only with
CUDA graphs): step N+1 is scheduled and launched from N's argmax before N's tokens are read. The same tokens and
finish reasons as TURBO_PIPELINE=0 with stop tokens, length limits at different steps, admissions while chained,
a pool small enough to preempt, an abort and a sampled request; requests at their length limit leave without
breaking the chain. The GPU twins are in tests/gpu/test_turbo_cuda_engine.py."""

from __future__ import annotations

import random
import time

import pytest

from lmkit.frontend.protocol import EngineRequest, FinishReason, SamplingParams
from lmkit.messages import TurboEngineConfig
from lmkit.turbo.engine import TurboEngine

VOCAB = 320  # the tiny llama's


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def prompts(lens, seed=1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lens]


def run(tiny, monkeypatch, pipeline: str, reqs, abort: str | None = None, **cfg):
    """Every request submitted at once (`abort` aborted once it has 3 tokens); returns ({id: (tokens, finish
    reason)}, the engine's stats, its preemptions)."""
    monkeypatch.setenv("TURBO_PIPELINE", pipeline)
    config = dict(cache_block_seq_len=16, num_blocks=256, session_len=512)
    engine = TurboEngine(tiny, TurboEngineConfig(**(config | cfg)))
    try:
        ids = [f"r{i}" for i in range(len(reqs))]
        for rid, (p, sp) in zip(ids, reqs):
            engine.add_request(EngineRequest(rid, p, sp))
        got = {rid: ([], None) for rid in ids}
        deadline = time.monotonic() + 120
        while any(reason is None for _, reason in got.values()):
            assert time.monotonic() < deadline, "timed out"
            for o in engine.get_outputs(timeout=1.0):
                assert o.error is None, o.error
                tokens = got[o.request_id][0] + o.new_token_ids
                got[o.request_id] = (tokens, o.finish_reason if o.finished else None)
            if abort is not None and len(got[abort][0]) >= 3:
                engine.abort_request(abort)
                abort = None
        return got, engine.stats(), engine.num_preemptions
    finally:
        engine.shutdown()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def with_stops(reqs, ref, every: int, at: int):
    """The same requests, every `every`-th one stopping on the token it generated `at`-th in `ref`."""
    out = []
    for i, (p, sp) in enumerate(reqs):
        ids = [ref[f"r{i}"][0][at - 1]] if i % every == 0 else []
        out.append((p, SamplingParams(max_new_tokens=sp.max_new_tokens, temperature=0.0, stop_token_ids=ids)))
    return out


def test_stop_tokens_and_length_limits_match_unpipelined(tiny, monkeypatch):
    reqs = [(p, greedy(20 + 7 * i)) for i, p in enumerate(prompts((5, 19, 40, 71, 3, 12)))]
    ref, plain, _ = run(tiny, monkeypatch, "0", reqs)
    got, piped, _ = run(tiny, monkeypatch, "1", reqs)
    assert got == ref
    assert all(len(ref[f"r{i}"][0]) == 20 + 7 * i for i in range(6))
    assert plain.num_pipelined_steps == 0 and piped.num_pipelined_steps > piped.num_steps // 2
    stops = with_stops(reqs, ref, every=2, at=7)
    want = run(tiny, monkeypatch, "0", stops)[0]
    assert sum(reason is FinishReason.STOP for _, reason in want.values()) == 3
    assert run(tiny, monkeypatch, "1", stops)[0] == want


def test_requests_at_their_length_limit_do_not_break_the_chain(tiny, monkeypatch):
    # The first prompt is long, so the other 23 requests arrive while it is prefilled.
    reqs = [(p, greedy(6 + 3 * i)) for i, p in enumerate(prompts([300] + [3 + 5 * i for i in range(1, 24)]))]
    ref = run(tiny, monkeypatch, "0", reqs)[0]
    got, piped, _ = run(tiny, monkeypatch, "1", reqs)
    assert got == ref
    # Each step that admits requests and the decode step after it are unchained. Were the chain broken by each of
    # the 23 requests that end before the last, 25 or more steps would be.
    unchained = piped.num_steps - piped.num_pipelined_steps
    assert unchained <= 10, (piped.num_steps, piped.num_pipelined_steps)


@pytest.mark.parametrize("num_blocks", [256, 12])
def test_admissions_prefill_chunks_and_preemption_match_unpipelined(tiny, monkeypatch, num_blocks):
    """More requests than the batch holds, prefill chunks beside decodes (a 32-token budget), and with 12 blocks
    a pool that preempts."""
    cfg = dict(num_blocks=num_blocks, max_batch_size=4, max_num_batched_tokens=32)
    reqs = [(p, greedy(9 + 5 * i)) for i, p in enumerate(prompts((5, 19, 40, 71, 3, 12, 33, 8, 50)))]
    ref, _, plain_preemptions = run(tiny, monkeypatch, "0", reqs, **cfg)
    got, piped, piped_preemptions = run(tiny, monkeypatch, "1", reqs, **cfg)
    assert got == ref and piped.num_pipelined_steps > 0
    if num_blocks == 12:
        assert plain_preemptions > 0 and piped_preemptions > 0
    stops = with_stops(reqs, ref, every=3, at=4)
    want = run(tiny, monkeypatch, "0", stops, **cfg)[0]
    assert run(tiny, monkeypatch, "1", stops, **cfg)[0] == want


def test_abort_and_a_sampled_request(tiny, monkeypatch):
    """An abort ends only its request; a sampled request (no argmax to chain on) runs beside greedy ones."""
    reqs = [(p, greedy(30)) for p in prompts((7, 21, 13))]
    ref = run(tiny, monkeypatch, "0", reqs)[0]
    sampled = (prompts((9,), seed=2)[0], SamplingParams(max_new_tokens=25, temperature=0.8, seed=5, ignore_eos=True))
    want = run(tiny, monkeypatch, "0", [*reqs, sampled])[0]
    assert run(tiny, monkeypatch, "1", [*reqs, sampled])[0] == want
    aborted = run(tiny, monkeypatch, "1", reqs, abort="r1")[0]
    assert aborted.pop("r1")[1] is FinishReason.ABORT
    assert aborted == {k: v for k, v in ref.items() if k != "r1"}


def test_step_profile_lines_add_up(tiny, monkeypatch, capfd):
    """TURBO_PROFILE=steps: one stderr line per step, numbered from 0, whose tokens add up to the work done (every
    prompt token once, every generated token but the last fed back once), chained steps included."""
    monkeypatch.setenv("TURBO_PROFILE", "steps")
    lens, outs = (5, 19, 40, 33), (6, 11, 3, 20)
    reqs = [(p, greedy(n)) for p, n in zip(prompts(lens), outs)]
    got, stats, _ = run(tiny, monkeypatch, "1", reqs)
    assert all(len(got[f"r{i}"][0]) == n for i, n in enumerate(outs))
    lines = [ln.split() for ln in capfd.readouterr().err.splitlines() if ln.startswith("[turbo] step ")]
    assert [int(w[2]) for w in lines] == list(range(len(lines))) and len(lines) == stats.num_steps
    assert sum(int(w[6]) for w in lines) == sum(lens) + sum(n - 1 for n in outs)
    assert any(w[7] == "chained" for w in lines) and all(w[7] in ("chained", "launched") for w in lines)
    assert all(float(w[8]) >= 0 for w in lines)
