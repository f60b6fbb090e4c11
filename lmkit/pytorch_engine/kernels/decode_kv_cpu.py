"""Dense copies of the decoding sequences' keys and values, for decode attention on CPU.

On CPU, gathering a decode batch's blocks out of the paged pool costs more than the attention itself: every
key and value of the batch is copied once more and read back, in every layer of every step. (SmolLM2-135M in
bf16 on two cores, 32 sequences of ~190 tokens: 1.2 ms per layer with the gather, 0.35 ms reading dense rows.)
So the sequences in the decode batch also keep their KV in dense rows, `[rows, num_kv_heads, capacity,
head_dim]` per layer, which two batched GEMMs read in place.

- Each step appends every row's new token; the paged pool gets it too and stays the source of truth.
- A row is filled from the pool when its sequence joins the decode batch: new after its prefill, or back
  after a preemption. Any row whose length does not match its sequence is refilled, so a stale row is never read.
- A sequence that leaves gives its row to the last one, so the batch's rows are always 0..n-1; the runner
  lays out the decode tokens in row order.
- Rows hold at most `max_bytes`; a batch that needs more reads the paged pool instead (`prepare` returns None).

A step that mixes decode rows and prefill chunks calls `DecodeKV.attend` from the paged attention; a decode-only
step runs `decode_attention` inside the model's compiled layer (models/llama.py), with the layer's rows passed in.
"""

from __future__ import annotations

import torch

from lmkit.pytorch_engine.kernels.attention_cpu import attend, visibility_bias, write_kv

_CAP_STEP = 32  # the rows' token capacity moves in steps of this many tokens
_ROW_STEP = 8  # and their count in steps of this many rows


class DecodeKV:
    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, max_bytes: int):
        self.pools = kv_caches  # per layer (k, v), [num_kv_heads, num_blocks, block_size, head_dim]
        self.layer_of = {k.data_ptr(): i for i, (k, _) in enumerate(kv_caches)}
        k0 = kv_caches[0][0]
        self.num_kv_heads, self.head_dim = k0.shape[0], k0.shape[3]
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.seqs: list = []  # row -> its Sequence (held, so an id is never reused while it has a row)
        self.filled: list[int] = []  # row -> tokens it holds
        self.k: list[torch.Tensor] = []  # per layer [row_capacity, num_kv_heads, capacity, head_dim]
        self.v: list[torch.Tensor] = []
        self.capacity = 0
        # This step's: flat positions of the new tokens in a layer's rows, and the additive mask.
        self.append_index: torch.Tensor | None = None  # [rows * num_kv_heads] long
        self.bias: torch.Tensor | None = None  # [rows, 1, 1, capacity] fp32, 0 or -inf

    def clear(self) -> None:
        self.seqs, self.filled, self.k, self.v, self.capacity = [], [], [], [], 0

    def prepare(self, seqs: list, sliding_window: int | None = None) -> list[int] | None:
        """Rows for this step's decode sequences; returns, per row, the index in `seqs` of its sequence (the
        order their tokens must take), or None when the rows would exceed the memory budget."""
        present = {id(s) for s in seqs}
        r = 0
        while r < len(self.seqs):  # drop the rows of sequences that left
            if id(self.seqs[r]) in present:
                r += 1
                continue
            last = len(self.seqs) - 1
            if r != last:
                for t in self.k + self.v:
                    t[r].copy_(t[last])
                self.seqs[r], self.filled[r] = self.seqs[last], self.filled[last]
            self.seqs.pop()
            self.filled.pop()
        known = {id(s) for s in self.seqs}
        for s in seqs:
            if id(s) not in known:
                self.seqs.append(s)
                self.filled.append(0)
        lens = [s.num_computed_tokens + 1 for s in self.seqs]
        capacity = -(-max(lens) // _CAP_STEP) * _CAP_STEP
        stale = [r for r, s in enumerate(self.seqs) if self.filled[r] != s.num_computed_tokens]
        if len(stale) == len(self.seqs) and capacity < self.capacity:
            # Every row is filled afresh (a new batch): nothing to keep, so the rows take the size it needs.
            # Attention reads a row's whole capacity, so one sized for a longer, earlier batch costs every step.
            self.k, self.v, self.capacity = [], [], 0
        if not self._reserve(len(self.seqs), capacity):
            self.clear()
            return None
        self._fill(stale)
        self.filled = list(lens)
        self._step_tensors(lens, sliding_window)
        index = {id(s): i for i, s in enumerate(seqs)}
        return [index[id(s)] for s in self.seqs]

    def attend(self, q, k, v, k_pool: torch.Tensor, scale: float) -> torch.Tensor:
        """Append the decode rows' k, v [n, KVH, D] to their rows, then q [n, H, D] -> out [n, KVH, group, D]."""
        return _append_and_attend(q, k, v, *self.layer_inputs(self.layer_of[k_pool.data_ptr()]), scale)

    def layer_inputs(self, layer: int) -> tuple:
        """What `decode_attention` needs of this step's rows in `layer`, after the pool's arguments."""
        return self.k[layer], self.v[layer], self.append_index, self.bias

    def _reserve(self, rows: int, capacity: int) -> bool:
        row_capacity = self.k[0].shape[0] if self.k else 0
        shrink = capacity + 4 * _CAP_STEP <= self.capacity
        if rows <= row_capacity and capacity <= self.capacity and not shrink:
            return True
        new_rows = max(row_capacity, -(-rows // _ROW_STEP) * _ROW_STEP)
        new_capacity = capacity if capacity > self.capacity or shrink else self.capacity
        k0 = self.pools[0][0]
        nbytes = 2 * len(self.pools) * new_rows * self.num_kv_heads * new_capacity * self.head_dim * k0.element_size()
        if nbytes > self.max_bytes:
            return False
        shape = (new_rows, self.num_kv_heads, new_capacity, self.head_dim)
        kept_rows, kept = min(row_capacity, new_rows), min(self.capacity, new_capacity)
        for rows_of in (self.k, self.v):
            if not rows_of:
                rows_of.extend([None] * len(self.pools))
            for i, old in enumerate(rows_of):  # one layer at a time, so old and new never all coexist
                new = rows_of[i] = torch.empty(shape, dtype=k0.dtype, device=k0.device)
                torch._dynamo.maybe_mark_dynamic(new, 0)  # one compiled graph for every shape of rows
                torch._dynamo.maybe_mark_dynamic(new, 2)
                # Each element written once: what is kept, zeros elsewhere (masked positions are multiplied by 0
                # and must not hold NaN/inf bit patterns).
                if old is None:
                    new.zero_()
                    continue
                new[:kept_rows, :, :kept] = old[:kept_rows, :, :kept]
                new[:kept_rows, :, kept:] = 0
                new[kept_rows:] = 0
        self.capacity = new_capacity
        return True

    def _fill(self, rows: list[int]) -> None:
        """Copy the rows' sequences' computed tokens [0, num_computed_tokens) from the paged pool, all rows at once.

        Positions past a sequence's length get whatever its table's padding block holds: finite values that the
        mask hides until the sequence's own tokens overwrite them."""
        if not rows:
            return
        tables = [self.seqs[r].block_table[: -(-self.seqs[r].num_computed_tokens // self.block_size)] for r in rows]
        width = max(len(t) for t in tables)
        if width == 0:
            return
        blocks = torch.tensor([t + [t[0] if t else 0] * (width - len(t)) for t in tables], dtype=torch.long)
        tokens = min(width * self.block_size, self.capacity)
        index = torch.tensor(rows, dtype=torch.long)
        kvh, d = self.num_kv_heads, self.head_dim
        for (kp, vp), kw, vw in zip(self.pools, self.k, self.v):
            for pool, dense in ((kp, kw), (vp, vw)):
                gathered = pool.index_select(1, blocks.view(-1)).view(kvh, len(rows), -1, d)[:, :, :tokens]
                dense[:, :, :tokens].index_copy_(0, index, gathered.transpose(0, 1))

    def _step_tensors(self, lens: list[int], sliding_window: int | None) -> None:
        kvh, cap = self.num_kv_heads, self.capacity
        lens_t = torch.tensor(lens, dtype=torch.long)
        rows = torch.arange(len(lens), dtype=torch.long)
        heads = torch.arange(kvh, dtype=torch.long)
        self.append_index = ((rows[:, None] * kvh + heads[None, :]) * cap + (lens_t - 1)[:, None]).view(-1)
        bias = visibility_bias(lens_t, cap, sliding_window)
        # Always a tensor, so one compiled graph serves every step.
        self.bias = torch.zeros(len(lens), 1, 1, cap) if bias is None else bias
        torch._dynamo.maybe_mark_dynamic(self.append_index, 0)
        torch._dynamo.maybe_mark_dynamic(self.bias, 0)
        torch._dynamo.maybe_mark_dynamic(self.bias, 3)


def decode_attention(q, k, v, k_pool, v_pool, slot_mapping, k_rows, v_rows, append_index, bias, scale: float):
    """One layer's attention in a decode-only step: store k, v [n, KVH, D] in the pool and in the dense rows,
    then q [n, H, D] -> [n, KVH, group, D] over the rows. Plain tensor ops, so `torch.compile` fuses them."""
    write_kv(k, v, k_pool, v_pool, slot_mapping)
    return _append_and_attend(q, k, v, k_rows, v_rows, append_index, bias, scale)


def _append_and_attend(q, k, v, k_rows, v_rows, append_index, bias, scale: float) -> torch.Tensor:
    n, kvh, d = k.shape
    k_rows.view(-1, d).index_copy_(0, append_index, k.reshape(-1, d))
    v_rows.view(-1, d).index_copy_(0, append_index, v.reshape(-1, d))
    return attend(q.reshape(n, kvh, -1, d), k_rows[:n], v_rows[:n], scale, bias)
