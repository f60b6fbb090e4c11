"""The device side of a step: the model, the KV cache tensors, and the inputs built from a ScheduledBatch.

Flattened batch layout (what the kernels see):

    rows: [ decode tokens (one per sequence) | prefill chunk of seq a | prefill chunk of seq b | ... ]

A chunk of one token is a decode in all but name, so it joins the batched decode group.
"""

from __future__ import annotations

import sys
import time
from itertools import accumulate

import torch

from lmkit.model.spec import ModelSpec
from lmkit.pytorch_engine.cuda_graph import DecodeGraphs, MixedGraphs, meta_window
from lmkit.pytorch_engine.kernels import AttentionMetadata, PrefillBatch, PrefillChunk, reads_paged_cache
from lmkit.pytorch_engine.kernels.attention_cpu import visibility_bias
from lmkit.pytorch_engine.kernels.decode_kv_cpu import TILED_ROWS, DecodeKV
from lmkit.pytorch_engine.kernels.metadata import padded_table
from lmkit.pytorch_engine.models.llama import LlamaForCausalLM
from lmkit.pytorch_engine.scheduler import ScheduledBatch
from lmkit.pytorch_engine.sequence import Sequence


def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        spec: ModelSpec,
        weights: dict[str, torch.Tensor],
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_size: int = 256,
        max_model_len: int = 4096,
        eager: bool = False,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        """eager: no CUDA graphs (GPU), no compiled decode layers (CPU). max_num_batched_tokens: a step's token
        budget (the largest mixed-step graph)."""
        self.spec = spec
        self.device = device
        self.block_size = block_size
        self.model = LlamaForCausalLM(spec, weights, device, dtype, compile=device.type == "cpu" and not eager)
        pool = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim, dtype, device)
        allocate = self.model.kernels.allocate_kv_cache  # the layout is the kernels' choice
        self.kv_caches = [(allocate(*pool), allocate(*pool)) for _ in range(spec.num_layers)]
        self.paged = reads_paged_cache(device)
        # CPU: the decode batch's KV also in dense rows, up to half the pool's size (kernels/decode_kv_cpu.py).
        self.decode_kv = None
        if not self.paged:
            pool_bytes = sum(k.nbytes + v.nbytes for k, v in self.kv_caches)
            self.decode_kv = DecodeKV(self.kv_caches, block_size, max_bytes=pool_bytes // 2)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        if device.type == "cuda" and not eager:
            max_blocks = -(-max_model_len // block_size)
            window = meta_window(spec)
            self.graphs = DecodeGraphs(self.model, self.kv_caches, max_batch_size, max_blocks, window)
            self.mixed_graphs = MixedGraphs(
                self.model, self.kv_caches, max_batch_size, max_blocks, max_num_batched_tokens, window
            )

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Get the steps ready before the first request: capture every decode CUDA graph (GPU), or compile the
        CPU layers: the two halves that prefill and mixed steps run, from a fake prefill of two tokens, and the
        decode layer for one sequence and for several (a batch of 1 gets a graph of its own), with tiled keys and
        with plain ones (more rows than `TILED_ROWS`), from three fake decode steps. These write into block 0,
        which holds nothing yet; their dense rows are dropped."""
        if self.graphs is not None:
            start = time.perf_counter()
            self.mixed_graphs.capture_all()  # the largest first: the decode graphs then fit in its memory pool
            self.graphs.pool = self.mixed_graphs.pool
            self.graphs.capture_all()
            took = time.perf_counter() - start
            num = f"{len(self.graphs.graphs)} decode and {len(self.mixed_graphs.graphs)} mixed-step"
            print(f"[lmkit] {num} CUDA graphs captured in {took:.1f} s", file=sys.stderr)
            return
        paths = [self.model.prefill_path, self.model.decode_path]
        if not any(path.on for path in paths):
            return
        print(
            "[lmkit] compiling the model's steps (Inductor; --eager-mode skips it) ...",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        prefill = ScheduledBatch()
        prefill.seqs.append(Sequence("warm-up", [0, 0], block_table=[0]))
        prefill.num_new_tokens.append(2)
        self.run(prefill)
        for n in (1, 2, TILED_ROWS + 1):
            batch = ScheduledBatch()
            for i in range(n):
                batch.seqs.append(Sequence(f"warm-up-{i}", [0, 0], num_computed_tokens=1, block_table=[0, 0]))
                batch.num_new_tokens.append(1)
            self.run(batch)
        self.decode_kv.clear()
        compiled = [path.name for path in paths if path.on]  # a path that failed has said why
        if compiled:
            took = time.perf_counter() - start
            print(f"[lmkit] {' and '.join(compiled)} steps compiled in {took:.1f} s", file=sys.stderr, flush=True)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, fed_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Forward one step; returns logits [n, vocab] and, per row, the index in batch.seqs. The logits are in
        the model's dtype, or fp32 from a CUDA graph; the sampler works in fp32. A decode row whose token is a
        placeholder -(j + 1) takes fed_tokens[j], the previous step's token still on the device (pipelined
        steps, engine.py)."""
        order = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        window = None
        if self.decode_kv is not None and order:
            rows = self.decode_kv.prepare([batch.seqs[i] for i in order], self.spec.sliding_window)
            if rows is not None:  # decode tokens go in the order of their dense rows
                order, window = [order[r] for r in rows], self.decode_kv
        order += [i for i, n in enumerate(batch.num_new_tokens) if n > 1]
        input_ids, positions, slots, logits_rows, sample_idx = [], [], [], [], []
        num_decode = len(order) - sum(n > 1 for n in batch.num_new_tokens)
        meta = AttentionMetadata(slot_mapping=None, num_decode=num_decode)
        meta.sliding_window = self.spec.sliding_window or 0
        decode_tables, decode_lens, fresh, chunks, fed = [], [], [], [], []
        bs = self.block_size
        for i in order[:num_decode]:  # one token each: the loop below, unrolled (it runs for every sequence)
            seq = batch.seqs[i]
            pos, table = seq.num_computed_tokens, seq.block_table
            token = seq.token_ids[pos]
            if token < 0:  # a placeholder: the token is still on the device
                fed.append((len(input_ids), -1 - token))
                token = 0
            input_ids.append(token)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            decode_tables.append(table)
            decode_lens.append(pos + 1)
            if pos + 1 == len(seq.token_ids):  # batch.samples(i)
                logits_rows.append(len(positions) - 1)
                sample_idx.append(i)
        for i in order[num_decode:]:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            start = seq.num_computed_tokens
            row = len(input_ids)
            input_ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            slots += self._slots(seq.block_table, start, start + n)
            if self.paged:
                chunks.append((seq.block_table, start + n, n))
            elif self._is_fresh(seq, n):
                fresh.append((row, n))
            else:
                meta.prefills.append(self._prefill_chunk(seq, row, n))
            if batch.samples(i):
                logits_rows.append(row + n - 1)
                sample_idx.append(i)
        feed = self._feeder(fed, fed_tokens)
        if self.graphs is not None and not chunks and self.graphs.fits(len(order)):
            logits = self.graphs.replay(input_ids, positions, slots, decode_tables, decode_lens, feed)
            rows = len(logits_rows)  # rows ascend: range(rows) when every row samples, sliced without a gather
            picked = logits[:rows] if rows and logits_rows[-1] == rows - 1 else logits[logits_rows]
            return picked.float(), sample_idx  # a copy: the next replay overwrites the graph's output
        mixed = self.mixed_graphs
        if mixed is not None and chunks and mixed.fits(len(decode_lens), chunks):
            inputs = (input_ids, positions, slots)
            logits = mixed.replay(inputs, decode_tables, decode_lens, chunks, logits_rows, feed)
            return logits.float(), sample_idx
        dev = self.device
        meta.slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        if self.paged:
            self._paged_context(meta, decode_tables, decode_lens, chunks)
        else:
            if window is not None:
                meta.decode_window = window
            elif decode_lens:
                self._decode_context(meta, decode_tables, decode_lens)
            self._batch_fresh_chunks(meta, fresh)
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        if feed is not None:
            feed(ids)
        try:
            logits = self.model.forward(
                ids,
                torch.tensor(positions, dtype=torch.long, device=dev),
                meta,
                self.kv_caches,
                torch.tensor(logits_rows, dtype=torch.long, device=dev),
            )
        except BaseException:
            if window is not None:  # some layers may have appended this step's tokens: start the rows afresh
                window.clear()
            raise
        return logits, sample_idx

    def _feeder(self, fed: list[tuple[int, int]], fed_tokens: torch.Tensor | None):
        """A function that writes fed_tokens[j] into row r of the device input ids, for each (r, j) in fed."""
        if not fed:
            return None
        rows, src = torch.tensor(fed, dtype=torch.long).T.contiguous().to(self.device, non_blocking=True)

        def feed(ids: torch.Tensor) -> None:
            ids.index_copy_(0, rows, fed_tokens.index_select(0, src))

        return feed

    def _paged_context(self, meta: AttentionMetadata, decode_tables, decode_lens, chunks) -> None:
        """Block tables and lengths for kernels that read the paged cache themselves (CUDA)."""
        dev, i32 = self.device, torch.int32
        if decode_lens:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = padded_table(decode_tables, width).to(dev)
            meta.decode_context_lens = torch.tensor(decode_lens, dtype=i32, device=dev)
        if chunks:
            width = max(len(t) for t, _, _ in chunks)
            meta.prefill_block_tables = padded_table([t for t, _, _ in chunks], width).to(dev)
            cu = [0, *accumulate(n for _, _, n in chunks)]
            meta.prefill_cu_seqlens_q = torch.tensor(cu, dtype=i32, device=dev)
            meta.prefill_context_lens = torch.tensor([c for _, c, _ in chunks], dtype=i32, device=dev)
            meta.prefill_max_query_len = max(n for _, _, n in chunks)

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _window_mask(self, q_pos: torch.Tensor, ctx_len: int) -> torch.Tensor:
        """[len(q_pos), ctx_len] bool: key j is visible from position p when p - window < j <= p."""
        k_pos = torch.arange(ctx_len, device=self.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        window = self.spec.sliding_window
        if window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        return mask

    def _is_fresh(self, seq: Sequence, n: int) -> bool:
        """A chunk that is its sequence's whole context (no cached prefix, no window to apply)."""
        window = self.spec.sliding_window
        return seq.num_computed_tokens == 0 and (window is None or n <= window)

    def _batch_fresh_chunks(self, meta: AttentionMetadata, fresh: list[tuple[int, int]]) -> None:
        """Fresh chunks of similar lengths go into one padded batch; otherwise each runs on its own."""
        max_len = max((n for _, n in fresh), default=0)
        if len(fresh) < 2 or len(fresh) * max_len > 2 * sum(n for _, n in fresh):
            meta.prefills += [PrefillChunk(start=row, num_tokens=n) for row, n in fresh]
            return
        rows = [[row + min(j, n - 1) for j in range(max_len)] for row, n in fresh]
        valid = [c * max_len + j for c, (_, n) in enumerate(fresh) for j in range(n)]
        dev = self.device
        rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
        valid_t = torch.tensor(valid, dtype=torch.long, device=dev)
        meta.prefill_batch = PrefillBatch(rows=rows_t, valid=valid_t, dest=rows_t.view(-1)[valid_t])

    def _prefill_chunk(self, seq: Sequence, row: int, n: int) -> PrefillChunk:
        """A chunk over a cached prefix (or under a sliding window): reads its context from the cache."""
        start = seq.num_computed_tokens
        ctx = start + n
        q_pos = torch.arange(start, ctx, device=self.device)
        slots = torch.tensor(self._slots(seq.block_table, 0, ctx), dtype=torch.long, device=self.device)
        return PrefillChunk(start=row, num_tokens=n, context_slots=slots, mask=self._window_mask(q_pos, ctx))

    def _decode_context(self, meta: AttentionMetadata, tables: list[list[int]], lens: list[int]) -> None:
        bs, dev = self.block_size, self.device
        max_len = max(lens)
        max_blocks = -(-max_len // bs)
        padded = [t[:max_blocks] + [t[0]] * (max_blocks - min(len(t), max_blocks)) for t in tables]
        meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=dev)
        meta.decode_context_lens = torch.tensor(lens, dtype=torch.long, device=dev)
        window = self.spec.sliding_window
        uniform = min(lens) == max_len and (window is None or max_len <= window)
        meta.decode_ctx_len = max_len if uniform else max_blocks * bs  # uniform: read exactly the context
        meta.decode_bias = visibility_bias(meta.decode_context_lens, meta.decode_ctx_len, window)
