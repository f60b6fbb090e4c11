"""CUDA graphs for decode steps (one per batch-size bucket) and for steps that mix decodes with prefill chunks
(one per bucket of prefill tokens); one shared memory pool, static inputs.

A decode-only step of n sequences replays the graph of the smallest bucket >= n. Padding rows write to
slot -1 (skipped by write_kv) and attend over one token of block 0; their logits are never read.
Static buffers (bucket rows, filled each step by three host-to-device copies):

    ids_pos_slots [3, B] int64 = input_ids, positions, slot_mapping
    block_tables [B, max_blocks] int32 (only the batch's widest table is copied: columns past a row's
    blocks are never read)   context_lens [B] int32

Mixed steps are laid out for a graph as (d = the decode bucket, P = _MAX_CHUNKS, t = the prefill bucket):

    rows:   [ decode rows | padding up to d | prefill chunks | padding up to d + t ]
    ints    [3 * (d + t) + d + P] int64 = input_ids, positions, slot_mapping, then the rows that sample
    tables  [d + P, max_blocks] int32 = decode rows' block tables, then the chunks'
    lens    [d + 2 * P + 1] int32 = decode context lens (0: padding, skipped), chunk context lens,
            chunk cu_seqlens (rows after the d decode rows; chunks past the step's have no rows)

Each (d, t) graph reads the heads of the same three buffers, sized for the largest d and t.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch

from lmkit.model.spec import ModelSpec
from lmkit.pytorch_engine.kernels import AttentionMetadata
from lmkit.pytorch_engine.kernels.metadata import padded_table

_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
# Prefill tokens of a mixed step; finer where most steps are (a chunk or two next to a full batch of decodes).
_PREFILL_BUCKETS = [64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048]
_MAX_CHUNKS = 16  # prefill chunks in a graph-captured mixed step; a step with more runs eagerly
# Decode rows of a mixed step (plus the max batch size). Below ~200 rows a step's GEMMs read weights more than
# they compute, so finer buckets would gain little and cost 16 graphs each.
_MIXED_DECODE_BUCKETS = [64, 128]


def meta_window(spec: ModelSpec) -> int:
    return spec.sliding_window or 0


class DecodeGraphs:
    """Captured decode forwards, by batch size; captured lazily on first use of a bucket."""

    def __init__(self, model, kv_caches, max_batch_size: int, max_blocks: int, window: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_blocks = max_blocks
        self.window = window
        self.buckets = [b for b in _BUCKETS if b < max_batch_size] + [max_batch_size]
        dev = model.device
        n = self.buckets[-1]
        self.ids_pos_slots = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.input_ids, self.positions, self.slots = self.ids_pos_slots.unbind(0)
        self.slots.fill_(-1)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, dtype=torch.long, device=dev)
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        from lmkit.pytorch_engine.kernels.triton.paged_attention import num_decode_splits  # needs triton (CUDA)

        self.num_splits = num_decode_splits
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def capture_all(self) -> None:
        """Capture every bucket's graph now, largest first (smaller graphs then reuse its memory pool)."""
        for b in reversed(self.buckets):
            if b not in self.graphs:
                self._capture(b)

    def fits(self, n: int) -> bool:
        return n <= self.buckets[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        meta = AttentionMetadata(slot_mapping=self.slots[:b], num_decode=b)
        meta.sliding_window = self.window
        meta.decode_block_tables = self.block_tables[:b]
        meta.decode_context_lens = self.context_lens[:b]
        meta.decode_num_splits = self.num_splits(self.max_blocks, b, self.model.spec.num_kv_heads, self.num_sms)
        return meta

    def _forward(self, b: int) -> torch.Tensor:
        return self.model.forward(self.input_ids[:b], self.positions[:b], self._meta(b), self.kv_caches, self.rows[:b])

    def _capture(self, b: int) -> None:
        graph, out, self.pool = capture(lambda: self._forward(b), self.pool)
        self.graphs[b] = (graph, out)

    def replay(self, input_ids, positions, slots, tables: list[list[int]], lens: list[int], feed=None) -> torch.Tensor:
        """Run a decode step of len(lens) sequences; returns logits [bucket, vocab] (rows beyond n are padding).
        feed(ids): fills rows of the device input ids whose tokens are still on the device (pipelined steps)."""
        n = len(lens)
        b = next(x for x in self.buckets if x >= n)
        pad = b - n
        width = max(len(t) for t in tables)
        ints = [input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad]
        self.ids_pos_slots[:, :b].copy_(torch.tensor(ints), non_blocking=True)
        self.block_tables[:b, :width].copy_(padded_table(tables, width, b), non_blocking=True)
        self.context_lens[:b].copy_(torch.tensor(lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        if feed is not None:
            feed(self.input_ids)
        if b not in self.graphs:
            self._capture(b)
        graph, out = self.graphs[b]
        graph.replay()
        return out


def capture(forward, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, object]:
    """Capture forward() in a graph on `pool` (None: a new one); returns the graph, its output and its pool.
    Eager runs first compile the Triton kernels and warm cuBLAS outside the capture: two for a new pool, one
    after that (63 graphs at max batch 256: the start-up's capture time is mostly these runs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2 if pool is None else 1):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out, graph.pool()


class MixedGraphs:
    """Captured forwards of steps with prefill chunks, by (decode bucket, prefill-token bucket); layout in the module
    docstring.

    Up to max_batch_size decode rows and _MAX_CHUNKS chunks of up to max_prefill_tokens tokens in all. The decode
    part is padded to its bucket (padding skipped by attention) so that the prefill rows start at a fixed row; the
    GEMMs pay for the padding rows."""

    def __init__(self, model, kv_caches, max_batch_size: int, max_blocks: int, max_prefill_tokens: int, window: int):
        self.model = model
        self.kv_caches = kv_caches
        self.window = window
        self.max_blocks = max_blocks
        self.buckets = [b for b in _PREFILL_BUCKETS if b < max_prefill_tokens] + [max_prefill_tokens]
        self.decode_buckets = [b for b in _MIXED_DECODE_BUCKETS if b < max_batch_size] + [max_batch_size]
        d, p = max_batch_size, _MAX_CHUNKS
        self.num_decode, self.num_chunks = d, p
        dev = model.device
        self.ints = torch.zeros(3 * (d + self.buckets[-1]) + d + p, dtype=torch.long, device=dev)
        self.tables = torch.zeros(d + p, max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(d + 2 * p + 1, dtype=torch.int32, device=dev)
        num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        from lmkit.pytorch_engine.kernels.triton.paged_attention import num_decode_splits  # needs triton (CUDA)

        kv_heads = model.spec.num_kv_heads
        self.num_splits = {b: num_decode_splits(max_blocks, b, kv_heads, num_sms) for b in self.decode_buckets}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def capture_all(self) -> None:
        """Capture every bucket pair's graph now, largest first; with all lengths 0 attention reads nothing."""
        self.lens.zero_()
        for d in reversed(self.decode_buckets):
            for t in reversed(self.buckets):
                rows = d + t
                self.ints.zero_()
                self.ints[2 * rows : 3 * rows].fill_(-1)  # slot -1: no KV written
                graph, out, self.pool = capture(lambda d=d, t=t: self._forward(d, t), self.pool)
                self.graphs[d, t] = (graph, out)

    def fits(self, num_decode: int, chunks: list[tuple[list[int], int, int]]) -> bool:
        """Whether a step of num_decode decode rows and these chunks has a captured graph."""
        num_tokens = sum(n for _, _, n in chunks)
        if num_decode > self.num_decode or len(chunks) > self.num_chunks or num_tokens > self.buckets[-1]:
            return False
        return self._key(num_decode, num_tokens) in self.graphs

    def _key(self, num_decode: int, num_tokens: int) -> tuple[int, int]:
        d = next(b for b in self.decode_buckets if b >= num_decode)
        return d, next(b for b in self.buckets if b >= num_tokens)

    def _forward(self, d: int, t: int) -> torch.Tensor:
        p = self.num_chunks
        rows = d + t
        ids, positions, slots = self.ints[: 3 * rows].view(3, rows).unbind(0)
        logits_rows = self.ints[3 * rows : 3 * rows + d + p]
        meta = AttentionMetadata(slot_mapping=slots, num_decode=d)
        meta.sliding_window = self.window
        meta.decode_block_tables, meta.prefill_block_tables = self.tables[:d], self.tables[d : d + p]
        meta.decode_context_lens = self.lens[:d]
        meta.prefill_context_lens = self.lens[d : d + p]
        meta.prefill_cu_seqlens_q = self.lens[d + p : d + 2 * p + 1]
        meta.decode_num_splits = self.num_splits[d]
        meta.prefill_max_query_len = t
        return self.model.forward(ids, positions, meta, self.kv_caches, logits_rows)

    def replay(self, inputs, decode_tables, decode_lens, chunks, logits_rows, feed: Callable | None = None):
        """A step of len(decode_lens) decode rows, then the chunks (block_table, context_len, num_tokens); inputs are
        (input_ids, positions, slots) in that row order. Returns logits [len(logits_rows), vocab] (a view).
        feed(ids): as in DecodeGraphs.replay (decode rows come first, unmoved)."""
        p = self.num_chunks
        nd = len(decode_lens)
        num_tokens = sum(n for _, _, n in chunks)
        d, t = key = self._key(nd, num_tokens)
        ints = []
        for values, fill in zip(inputs, (0, 0, -1)):
            pad_d, pad_t = [fill] * (d - nd), [fill] * (t - num_tokens)
            ints += values[:nd] + pad_d + values[nd:] + pad_t
        ints += [r if r < nd else r + d - nd for r in logits_rows] + [0] * (d + p - len(logits_rows))
        self.ints[: len(ints)].copy_(torch.tensor(ints), non_blocking=True)
        if feed is not None:
            feed(self.ints)
        tables = decode_tables + [[]] * (d - nd) + [table for table, _, _ in chunks]
        width = max(len(table) for table in tables)
        self.tables[: len(tables), :width].copy_(padded_table(tables, width), non_blocking=True)
        cu = [0, *accumulate(n for _, _, n in chunks)]
        ctx = [c for _, c, _ in chunks]
        lens = decode_lens + [0] * (d - nd) + ctx + [0] * (p - len(ctx)) + cu + [cu[-1]] * (p - len(ctx))
        self.lens[: len(lens)].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        graph, out = self.graphs[key]
        graph.replay()
        return out[: len(logits_rows)]
