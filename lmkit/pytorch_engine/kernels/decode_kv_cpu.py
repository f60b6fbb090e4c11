"""Dense copies of the decoding sequences' keys and values, for decode attention on CPU.

On CPU, gathering a decode batch's blocks out of the paged pool costs more than the attention itself: every
key and value of the batch is copied once more and read back, in every layer of every step. (SmolLM2-135M in
bf16 on two cores, 32 sequences of ~190 tokens: 1.2 ms per layer with the gather, 0.35 ms reading dense rows.)
So the sequences in the decode batch also keep their KV in dense rows per layer, read in place:

- values as `[rows, num_kv_heads, capacity, head_dim]`;
- keys, for up to 16 rows, in tiles of 32 tokens, `[rows, num_kv_heads, capacity / 32, head_dim, 32]`: each
  tile holds its tokens' keys transposed, so the scores of a tile are 32 dot products side by side, and the
  attention runs as loops that Inductor vectorises (fp32 accumulation). Two batched GEMMs (oneDNN `bmm`) cost
  more at small batches: every call pays ~15 µs of set-up, for 3 query rows per KV head. SmolLM2-135M in bf16 on
  two cores, median ms per output token: 27.1 -> 25.1 at batch 1, 24.5 -> 24.0 at 8, 32.1 -> 30.6 at 16.
- keys, for more rows, like the values: there the loops, which accumulate each output in one chain of
  dependent adds, are slower than `bmm` (batch 32: ~4% per step).

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
import torch._inductor.inductor_prims  # noqa: F401
import torch.nn.functional as F

from lmkit.pytorch_engine.kernels.attention_cpu import attend, attend_scores, scaled_scores, visibility_bias, write_kv
from lmkit.pytorch_engine.models import linear

_CAP_STEP = 32  # the rows' token capacity moves in steps of this many tokens
_KEY_TILE = 32  # keys are stored in tiles of this many tokens (a divisor of _CAP_STEP)
TILED_ROWS = 16  # up to this many rows (of row capacity), keys are tiled
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
        # per layer, [row_capacity, num_kv_heads, capacity / tile, head_dim, tile] or as v
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []  # per layer [row_capacity, num_kv_heads, capacity, head_dim]
        self.capacity = 0
        # This step's: where the new tokens go in a layer's rows (flat), and the additive mask.
        self.key_index: torch.Tensor | None = None  # as value_index, or for tiled keys [... * head_dim] elements
        self.value_index: torch.Tensor | None = None  # [rows * num_kv_heads] long, head_dim-vectors of v
        self.bias: torch.Tensor | None = None  # [rows, 1, 1, capacity] fp32, 0 or -inf

    def clear(self) -> None:
        self.seqs, self.filled, self.k, self.v, self.capacity = [], [], [], [], 0

    @property
    def tiled(self) -> bool:
        """Whether the keys are stored in tiles (see the module's docstring)."""
        return bool(self.k) and self.k[0].dim() == 5

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
        # At least two key tiles: a count of 1 would get a compiled graph of its own (models/compiled.py).
        capacity = max(-(-max(lens) // _CAP_STEP) * _CAP_STEP, 2 * _KEY_TILE)
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
        k_rows, v_rows, key_index, value_index, bias = self.layer_inputs(self.layer_of[k_pool.data_ptr()])
        _append(k, v, k_rows, v_rows, key_index, value_index)
        return _attend_rows(q, k_rows, v_rows, scale, bias, k.shape)

    def layer_inputs(self, layer: int) -> tuple:
        """What `decode_attention` needs of this step's rows in `layer`, after the pool's arguments."""
        return self.k[layer], self.v[layer], self.key_index, self.value_index, self.bias

    def _reserve(self, rows: int, capacity: int) -> bool:
        row_capacity = self.k[0].shape[0] if self.k else 0
        shrink = capacity + 4 * _CAP_STEP <= self.capacity
        if rows <= row_capacity and capacity <= self.capacity and not shrink:
            return True
        new_rows = max(row_capacity, -(-rows // _ROW_STEP) * _ROW_STEP)
        new_capacity = capacity if capacity > self.capacity or shrink else self.capacity
        k0 = self.pools[0][0]
        kvh, d, t = self.num_kv_heads, self.head_dim, _KEY_TILE
        nbytes = 2 * len(self.pools) * new_rows * kvh * new_capacity * d * k0.element_size()
        if nbytes > self.max_bytes:
            return False
        kept_rows, kept = min(row_capacity, new_rows), min(self.capacity, new_capacity)
        plain = ((new_rows, kvh, new_capacity, d), kept)  # (shape, how much of dim 2 is kept)
        tiled = new_rows <= TILED_ROWS
        if self.k and self.tiled != tiled:  # the rows outgrew tiled keys (rows only grow until a reset)
            self.k = [k.transpose(-1, -2).reshape(k.shape[0], kvh, -1, d) for k in self.k]
        for rows_of, (shape, c) in (
            (self.k, ((new_rows, kvh, new_capacity // t, d, t), kept // t) if tiled else plain),
            (self.v, plain),
        ):
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
                new[:kept_rows, :, :c] = old[:kept_rows, :, :c]
                new[:kept_rows, :, c:] = 0
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
        tiles = -(-tokens // _KEY_TILE)  # the keys' tiles that the tokens reach; the last is padded with zeros
        index = torch.tensor(rows, dtype=torch.long)
        kvh, d, n = self.num_kv_heads, self.head_dim, len(rows)

        def gather(pool: torch.Tensor, length: int) -> torch.Tensor:  # -> [n, kvh, length, d]
            out = pool.index_select(1, blocks.view(-1)).view(kvh, n, -1, d)[:, :, :tokens].transpose(0, 1)
            return F.pad(out, (0, 0, 0, length - tokens)) if length > tokens else out

        for (kp, vp), kw, vw in zip(self.pools, self.k, self.v):
            if self.tiled:
                keys = gather(kp, tiles * _KEY_TILE).reshape(n, kvh, tiles, _KEY_TILE, d).transpose(-1, -2)
                kw[:, :, :tiles].index_copy_(0, index, keys)
            else:
                kw[:, :, :tokens].index_copy_(0, index, gather(kp, tokens))
            vw[:, :, :tokens].index_copy_(0, index, gather(vp, tokens))

    def _step_tensors(self, lens: list[int], sliding_window: int | None) -> None:
        kvh, cap, d, t = self.num_kv_heads, self.capacity, self.head_dim, _KEY_TILE
        lens_t = torch.tensor(lens, dtype=torch.long)
        pos = (lens_t - 1)[:, None]  # the new token's position, per row
        head_rows = torch.arange(len(lens), dtype=torch.long)[:, None] * kvh + torch.arange(kvh, dtype=torch.long)
        self.value_index = self.key_index = (head_rows * cap + pos).view(-1)
        if self.tiled:
            key_start = ((head_rows * (cap // t) + pos // t) * d * t + pos % t)[:, :, None]  # its key's element 0
            self.key_index = (key_start + torch.arange(d, dtype=torch.long) * t).view(-1)
        bias = visibility_bias(lens_t, cap, sliding_window)
        # Always a tensor, so one compiled graph serves every step.
        self.bias = torch.zeros(len(lens), 1, 1, cap) if bias is None else bias
        for tensor, dim in ((self.key_index, 0), (self.value_index, 0), (self.bias, 0), (self.bias, 3)):
            torch._dynamo.maybe_mark_dynamic(tensor, dim)


def decode_attention(
    q, k, v, k_pool, v_pool, slot_mapping, k_rows, v_rows, key_index, value_index, bias, scale: float
) -> torch.Tensor:
    """One layer's attention in a decode-only step (models/llama.py compiles the layer around it): store k, v
    [n, KVH, D] in the pool and in the dense rows, then q [n, H, D] -> [n, KVH, group, D] over the rows."""
    write_kv(k, v, k_pool, v_pool, slot_mapping)
    _append(k, v, k_rows, v_rows, key_index, value_index)
    return _attend_rows(q, k_rows, v_rows, scale, bias, k.shape)


def _attend_rows(q, k_rows, v_rows, scale: float, bias, kv_shape) -> torch.Tensor:
    """q [n, H, D] -> [n, KVH, group, D] over the first n rows, whichever the keys' layout."""
    n, kvh, d = kv_shape
    q = q.reshape(n, kvh, -1, d)
    if k_rows.dim() == 5:
        return tiled_attention(q, k_rows[:n], v_rows[:n], scale, bias)
    return attend(q, k_rows[:n], v_rows[:n], scale, bias)


def tiled_attention(q, k_tiles, v, scale: float, bias) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v, the softmax in fp32. q [n, KVH, group, D]; k_tiles [n, KVH, C / tile, D,
    tile]; v [n, KVH, C, D]; bias [n, 1, 1, C] fp32 or None. Returns [n, KVH, group, D] in q's dtype.

    Traced for Inductor, as broadcast products and sums, which it turns into vectorised loops that accumulate in
    fp32; eagerly (where those would build [n, KVH, group, C, D] products), as batched matmuls."""
    if not linear.tracing():  # [n, KVH, 1, group, D] @ [n, KVH, C / tile, D, tile] -> [n, KVH, C / tile, group, tile]
        return attend_scores(torch.matmul(q.unsqueeze(2), k_tiles).transpose(2, 3).flatten(-2), v, scale, bias)
    # The query in a buffer of its own: else Inductor recomputes its rotary for every tile of keys.
    qf = torch.ops.prims.inductor_force_stride_order(q.float(), q.stride())
    scores = scaled_scores((qf[:, :, :, None, :, None] * k_tiles[:, :, None]).sum(-2).flatten(-2), scale, bias)
    # The softmax's division after the sum over the context: once per output, not once per key.
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    out = (weights.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2) / weights.sum(dim=-1).unsqueeze(-1)
    return out.to(q.dtype)


def _append(k, v, k_rows, v_rows, key_index, value_index) -> None:
    """Store the step's k, v [n, KVH, D] at the new tokens' places in the rows."""
    d = k.shape[-1]
    if k_rows.dim() == 5:  # tiled: a key's elements are `tile` apart
        k_rows.view(-1).index_copy_(0, key_index, k.reshape(-1))
    else:
        k_rows.view(-1, d).index_copy_(0, key_index, k.reshape(-1, d))
    v_rows.view(-1, d).index_copy_(0, value_index, v.reshape(-1, d))
