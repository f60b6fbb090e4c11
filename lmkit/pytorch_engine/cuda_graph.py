"""CUDA graphs for decode steps: one graph per batch-size bucket, one shared memory pool, static inputs.

A decode-only step of n sequences replays the graph of the smallest bucket >= n. Padding rows write to
slot -1 (skipped by write_kv) and attend over one token of block 0; their logits are never read.
Static buffers (bucket rows, filled each step by three host-to-device copies):

    ids_pos_slots [3, B] int64 = input_ids, positions, slot_mapping
    block_tables [B, max_blocks] int32 (only the batch's widest table is copied: columns past a row's
    blocks are never read)   context_lens [B] int32
"""

from __future__ import annotations

import torch

from lmkit.model.spec import ModelSpec
from lmkit.pytorch_engine.kernels import AttentionMetadata
from lmkit.pytorch_engine.kernels.metadata import padded_table

_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


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
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b)
        self.pool = graph.pool()
        self.graphs[b] = (graph, out)

    def replay(self, input_ids, positions, slots, tables: list[list[int]], lens: list[int]) -> torch.Tensor:
        """Run a decode step of len(lens) sequences; returns logits [bucket, vocab] (rows beyond n are padding)."""
        n = len(lens)
        b = next(x for x in self.buckets if x >= n)
        pad = b - n
        width = max(len(t) for t in tables)
        ints = [input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad]
        self.ids_pos_slots[:, :b].copy_(torch.tensor(ints), non_blocking=True)
        self.block_tables[:b, :width].copy_(padded_table(tables, width, b), non_blocking=True)
        self.context_lens[:b].copy_(torch.tensor(lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        if b not in self.graphs:
            self._capture(b)
        graph, out = self.graphs[b]
        graph.replay()
        return out
