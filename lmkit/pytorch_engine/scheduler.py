"""Continuous-batching policy over sequences and token counts; no tensors.

Each step gets a budget of max_num_batched_tokens: running decodes first, then running prefills
continued in chunks, then waiting sequences admitted (up to max_num_seqs) with what budget is left. With
prefill_interval n > 1, waiting sequences are admitted only every n-th step while others are decoding.
When blocks run out, the newest running sequence is preempted by recompute: its blocks are freed and
it goes back to the front of the waiting queue (its prefix may still be found in the cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmkit.frontend.protocol import FinishReason
from lmkit.pytorch_engine.block_manager import BlockManager
from lmkit.pytorch_engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: seqs[i] computes num_new_tokens[i] tokens from its num_computed_tokens on."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)
    """Sequences that cannot fit in the whole KV pool; the engine finishes them with ERROR."""

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether seqs[i] reaches its last token this step (so a new token is sampled for it)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == len(seq)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, prefill_interval: int = 1
    ) -> None:
        if prefill_interval < 1:
            raise ValueError(f"prefill_interval must be >= 1, not {prefill_interval}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_interval = prefill_interval
        self._steps_without_admitting = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler and release its blocks (finished, aborted or failed)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    # ---- scheduling ----
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # Decodes first (one token each), then prefills that are mid-way; sorted() is stable.
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or len(seq) >= seq.max_tokens:
                continue  # preempted earlier in this loop, or (pipelined steps) done once its last token is read
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._allocate_or_preempt(seq, num_new, batch):
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
        decoding = any(s.num_uncomputed_tokens == 1 for s in self.running)
        if batch.preempted or (decoding and self._steps_without_admitting + 1 < self.prefill_interval):
            self._steps_without_admitting += 1
        else:
            admitted = len(batch.seqs)
            self._admit(batch, budget)
            # Nothing could be admitted (no free slot or blocks): try again next step, not an interval later.
            blocked = len(batch.seqs) == admitted and self.waiting
            self._steps_without_admitting = self.prefill_interval - 1 if blocked else 0
        return batch

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Allocate seq's slots, preempting the newest unscheduled running sequences as needed."""
        while not self.block_manager.allocate_slots(seq, num_new):
            victims = [s for s in self.running if s is not seq and s not in batch.seqs]
            victim = victims[-1] if victims else seq
            if victim is seq and len(self.running) == 1 and not batch.seqs:
                self._fail(seq, batch)  # alone with the whole pool and still short
                return False
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            first_time = seq.num_preemptions == 0
            cached = self.block_manager.match_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.allocate_slots(seq, num_new):
                self.block_manager.free(seq)
                if self.running:
                    break  # wait for running sequences to free blocks
                self.waiting.popleft()
                self._fail(seq, batch)
                continue
            if first_time:
                seq.num_cached_tokens = cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _fail(self, seq: Sequence, batch: ScheduledBatch) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        batch.failed.append(seq)

    # ---- after the forward ----
    def postprocess(
        self, batch: ScheduledBatch, sampled: dict[int, int]
    ) -> list[tuple[int, Sequence, FinishReason | None]]:
        """Advance each scheduled seq; `sampled` maps batch index -> new token. Returns (index, seq, finish)
        for the sequences that got a token, finishing (and freeing) those that are done."""
        results = []
        for i, seq in enumerate(batch.seqs):
            seq.num_computed_tokens += batch.num_new_tokens[i]
            self.block_manager.cache_full_blocks(seq)
            if i not in sampled:
                continue
            token = sampled[i]
            seq.token_ids.append(token)
            reason = check_finish(seq, token)
            if reason is not None:
                self.finish(seq)
            results.append((i, seq, reason))
        return results

    def fill(
        self, batch: ScheduledBatch, placed: list[tuple[int, int, int]]
    ) -> list[tuple[int, Sequence, FinishReason | None]]:
        """postprocess for a step that ran ahead of its tokens (engine.py, pipelined steps): the engine has moved
        num_computed_tokens on already and put a placeholder at token_ids[at] for each (batch index, at, token) in
        placed; a later step may have appended another. Sequences finished (aborted) since are skipped, preempted
        ones get their token all the same. Returns (index, seq, finish) like postprocess."""
        live = []
        for i, at, token in placed:
            seq = batch.seqs[i]
            if seq.status is not SequenceStatus.FINISHED:
                seq.token_ids[at] = token
                live.append((i, at, token))
        for seq in batch.seqs:  # their computed tokens are all known now
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq)
        results = []
        for i, at, token in live:
            seq = batch.seqs[i]
            reason = check_finish(seq, token, at + 1)
            if reason is not None:
                del seq.token_ids[at + 1 :]  # a placeholder of the step after, which then runs for nothing
                self.finish(seq)
            results.append((i, seq, reason))
        return results


def check_finish(seq: Sequence, token: int, length: int | None = None) -> FinishReason | None:
    """Why seq ends with `token`, its length-th token (default: its last), or None."""
    if not seq.sampling.ignore_eos and token in seq.sampling.stop_token_ids:
        return FinishReason.STOP
    if (len(seq) if length is None else length) >= seq.max_tokens:
        return FinishReason.LENGTH
    return None
