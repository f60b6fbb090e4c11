"""Scheduler policy with fake model outputs (no tensors): budget, chunked prefill, preemption, pipelined steps."""

from __future__ import annotations

import pytest

from lmkit.frontend.protocol import FinishReason, SamplingParams
from lmkit.pytorch_engine.block_manager import BlockManager
from lmkit.pytorch_engine.scheduler import Scheduler
from lmkit.pytorch_engine.sequence import Sequence

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=16, prefix_caching=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, prefix_caching), max_num_seqs, budget)


def seq(rid: str, prompt_len: int, max_new: int, first: int = 0) -> Sequence:
    return Sequence(rid, list(range(first, first + prompt_len)), SamplingParams(max_new_tokens=max_new))


def fake_token(s: Sequence) -> int:
    """A deterministic 'model': the next token depends only on the sequence so far."""
    return fake_next(s.token_ids)


def fake_next(tokens: list[int]) -> int:
    """fake_token of a sequence whose token_ids are `tokens`."""
    return (sum(tokens) * 31 + len(tokens)) % 1000 + 1000


def run_to_completion(sched: Scheduler, max_steps: int = 1000, check=None) -> dict[str, list[int]]:
    done: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return done
        batch = sched.schedule()
        assert not batch.failed
        if check:
            check(batch)
        sampled = {i: fake_token(s) for i, s in enumerate(batch.seqs) if batch.samples(i)}
        for _, s, reason in sched.postprocess(batch, sampled):
            if reason is not None:
                done[s.request_id] = s.generated_token_ids
    raise AssertionError("did not finish")


def reference(prompt_len: int, max_new: int, first: int = 0) -> list[int]:
    s = seq("ref", prompt_len, max_new, first)
    while s.num_generated_tokens < max_new:
        s.token_ids.append(fake_token(s))
    return s.generated_token_ids


def test_budget_and_decode_first():
    sched = make(budget=16, max_num_seqs=4)
    for i in range(6):
        sched.add(seq(f"r{i}", 10, 5, first=100 * i))

    def check(batch):
        assert sum(batch.num_new_tokens) <= 16
        assert len(sched.running) <= 4
        kinds = [n > 1 or s.num_computed_tokens == 0 for s, n in zip(batch.seqs, batch.num_new_tokens)]
        assert kinds == sorted(kinds), "decode tokens are scheduled before prefill chunks"

    out = run_to_completion(sched, check=check)
    assert out == {f"r{i}": reference(10, 5, 100 * i) for i in range(6)}
    assert sched.block_manager.num_blocks_free == 64


def test_chunked_prefill_splits_long_prompt():
    sched = make(budget=8)
    sched.add(seq("long", 20, 3))
    chunks = []
    for _ in range(3):
        batch = sched.schedule()
        chunks.append(batch.num_new_tokens[0])
        assert batch.samples(0) == (sum(chunks) == 20)
        sched.postprocess(batch, {0: 7} if batch.samples(0) else {})
    assert chunks == [8, 8, 4]
    assert sched.running[0].num_computed_tokens == 20 and sched.running[0].token_ids[-1] == 7


def test_prefill_chunk_shares_budget_with_decodes():
    sched = make(budget=8)
    sched.add(seq("a", 4, 10))
    sched.postprocess(sched.schedule(), {0: 1})  # a prefilled, now decoding
    sched.add(seq("b", 30, 2, first=50))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [1, 7]


def test_preemption_by_recompute_completes_with_same_tokens():
    # 10 blocks of 4 = 40 token slots; four requests of 6 + 10 tokens each need 16 slots (4 blocks).
    sched = make(num_blocks=10, budget=64, prefix_caching=False)
    for i in range(4):
        sched.add(seq(f"r{i}", 6, 10, first=10 * i))
    preempted = []
    out = run_to_completion(sched, check=lambda b: preempted.extend(s.request_id for s in b.preempted))
    assert sched.num_preemptions > 0 and preempted
    assert "r0" not in preempted, "the newest sequences are preempted first"
    assert out == {f"r{i}": reference(6, 10, 10 * i) for i in range(4)}
    assert sched.block_manager.num_blocks_free == 10


def test_request_larger_than_pool_fails_instead_of_hanging():
    sched = make(num_blocks=4, budget=64)
    sched.add(seq("huge", 20, 1))  # 5 blocks > 4
    sched.add(seq("ok", 5, 2, first=500))
    batch = sched.schedule()
    assert [s.request_id for s in batch.failed] == ["huge"]
    assert [s.request_id for s in batch.seqs] == ["ok"]
    assert sched.block_manager.num_blocks_free == 2


def test_finish_reasons_and_abort_free_blocks():
    sched = make()
    s = seq("a", 5, 3)
    s.sampling.stop_token_ids = [99]
    sched.add(s)
    batch = sched.schedule()
    [(_, _, reason)] = sched.postprocess(batch, {0: 99})
    assert reason is FinishReason.STOP and sched.block_manager.num_blocks_free == 64
    t = seq("b", 5, 1)
    sched.add(t)
    [(_, _, reason)] = sched.postprocess(sched.schedule(), {0: 99})
    assert reason is FinishReason.LENGTH
    u = seq("c", 9, 5)
    sched.add(u)
    sched.postprocess(sched.schedule(), {0: 1})
    assert sched.block_manager.num_blocks_free < 64
    sched.finish(u)
    assert sched.block_manager.num_blocks_free == 64 and not sched.has_work()


def test_prefill_interval_admits_every_nth_step_while_decoding():
    sched = Scheduler(BlockManager(64, BS, True), 8, 64, prefill_interval=4)
    sched.add(seq("a", 6, 40))
    first = sched.schedule()  # nothing is decoding: admitted at once
    assert [s.request_id for s in first.seqs] == ["a"]
    sched.postprocess(first, {0: fake_token(first.seqs[0])})
    admitted_at = []
    for step in range(1, 13):
        sched.add(seq(f"w{step}", 3, 2, first=100 * step))  # a new request every step
        batch = sched.schedule()
        if any(s.num_computed_tokens == 0 for s in batch.seqs):
            admitted_at.append(step)
        assert all(n == 1 for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens > 0)
        sampled = {i: fake_token(s) for i, s in enumerate(batch.seqs) if batch.samples(i)}
        sched.postprocess(batch, sampled)
    assert admitted_at == [4, 8, 12]  # three decode-only steps between admissions


def test_prefill_interval_keeps_outputs_and_rejects_zero():
    sched = Scheduler(BlockManager(64, BS, True), 4, 16, prefill_interval=8)
    for i in range(6):
        sched.add(seq(f"r{i}", 10, 5, first=100 * i))
    assert run_to_completion(sched) == {f"r{i}": reference(10, 5, 100 * i) for i in range(6)}
    assert sched.block_manager.num_blocks_free == 64
    with pytest.raises(ValueError, match="prefill_interval"):
        Scheduler(BlockManager(8, BS, True), 4, 16, prefill_interval=0)


def run_pipelined(sched: Scheduler, max_steps: int = 1000) -> dict[str, list[int]]:
    """run_to_completion as the engine's pipelined CUDA steps do it (engine.PytorchEngine._pipelined_step): each
    step is scheduled and launched before the last one's tokens are known, its sampled rows given placeholders
    -(j + 1); the 'model' computes a token only when it is read, from the tokens then known."""
    done: dict[str, list[int]] = {}
    in_flight = None

    def drain(batch, placed) -> None:
        tokens = [(i, at, fake_next(batch.seqs[i].token_ids[:at])) for i, at in placed]
        for _, s, reason in sched.fill(batch, tokens):
            assert all(t >= 0 for t in s.token_ids[: s.num_computed_tokens]), "a computed token is a placeholder"
            if reason is not None:
                done[s.request_id] = s.generated_token_ids

    for _ in range(max_steps):
        batch = sched.schedule()
        assert not batch.failed
        if not batch.seqs:
            if in_flight is None and not sched.has_work():
                return done
            if in_flight is not None:
                drain(*in_flight)
                in_flight = None
            continue
        for i, s in enumerate(batch.seqs):  # a step's input tokens: known, or the last step's (on the device)
            for t in s.token_ids[s.num_computed_tokens : s.num_computed_tokens + batch.num_new_tokens[i]]:
                assert t >= 0 or batch.num_new_tokens[i] == 1, "a prefill chunk holds a placeholder"
        placed = []
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            samples = batch.samples(i)
            s.num_computed_tokens += n
            if samples:
                s.token_ids.append(-1 - len(placed))
                placed.append((i, len(s.token_ids) - 1))
        if in_flight is not None:
            drain(*in_flight)
        in_flight = (batch, placed)
    raise AssertionError("did not finish")


@pytest.mark.parametrize("num_blocks", [64, 12])
def test_pipelined_steps_give_the_same_tokens(num_blocks):
    """Scheduler.fill under the pipelined engine's protocol: the same tokens as step-by-step scheduling, with stop
    tokens, length limits, a shared prefix and (12 blocks) preemption; every block freed at the end."""
    prompts = [(6, 10, 0), (9, 7, 100), (6, 12, 0), (3, 1, 300), (13, 9, 400), (6, 5, 0)]  # (len, max_new, first)
    stop = reference(9, 7, 100)[3]  # request r1 ends on its 4th token

    def add_all(sched: Scheduler) -> None:
        for k, (n, max_new, first) in enumerate(prompts):
            s = seq(f"r{k}", n, max_new, first)
            if k == 1:
                s.sampling.stop_token_ids = [stop]
            sched.add(s)

    expected_sched, sched = make(num_blocks=num_blocks, budget=16), make(num_blocks=num_blocks, budget=16)
    add_all(expected_sched)
    add_all(sched)
    expected = run_to_completion(expected_sched)
    assert expected["r1"] == reference(9, 7, 100)[:4]
    assert run_pipelined(sched) == expected
    assert (sched.num_preemptions > 0) == (num_blocks == 12)
    assert sched.block_manager.num_blocks_free == num_blocks
    cached = [b.token_ids for b in sched.block_manager.blocks if b.hash is not None]
    assert cached and all(t >= 0 for tokens in cached for t in tokens), "a block was cached with a placeholder"
