"""What the attention kernels need to know about a step's flattened batch (built once per step)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's prefill chunk: rows [start, start + num_tokens) of the flattened batch."""

    start: int
    num_tokens: int
    context_slots: torch.Tensor | None = None
    """[ctx_len] cache slots of the whole context (cached prefix + this chunk); None when the chunk is
    the whole context, so attention runs on the fresh k/v without touching the cache."""
    mask: torch.Tensor | None = None
    """[num_tokens, ctx_len] bool (True = attend); None = plain causal with num_tokens == ctx_len."""


@dataclass(slots=True)
class PrefillBatch:
    """Prefill chunks without a cached prefix, attended together as one padded causal batch.

    Padding sits after each chunk's tokens, so causal attention keeps real rows exact; padded rows are dropped.
    """

    rows: torch.Tensor
    """[num_chunks, max_len] long: the flattened-batch row of each padded position (padding repeats a real row)."""
    valid: torch.Tensor
    """[num_real] long: the positions of real tokens in rows.view(-1)."""
    dest: torch.Tensor
    """[num_real] long: rows.view(-1)[valid], the flattened-batch rows they write."""


@dataclass(slots=True)
class AttentionMetadata:
    """Flattened batch layout: the decode tokens (one per sequence) first, then the prefill chunks."""

    slot_mapping: torch.Tensor
    """[num_tokens] long: cache slot (block_id * block_size + offset) that each token's k/v goes to."""
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None
    """[num_decode, max_blocks] long: each decode sequence's blocks, padded (with any valid block id)."""
    decode_context_lens: torch.Tensor | None = None
    """[num_decode] long: tokens in each decode sequence's context, the new one included."""
    decode_ctx_len: int = 0
    """Context positions the decode attention reads: max_blocks * block_size, or less when no mask is needed."""
    decode_bias: torch.Tensor | None = None
    """[num_decode, 1, 1, decode_ctx_len] fp32, 0 where a key is visible and -inf where not; None when every
    position is visible (CPU; attention_cpu.visibility_bias)."""
    decode_window: object | None = None
    """CPU: the DecodeKV (kernels/decode_kv_cpu.py) whose dense rows hold the decode rows' KV, prepared for
    this step; decode attention then reads those rows instead of the block tables."""
    prefills: list[PrefillChunk] = field(default_factory=list)
    prefill_batch: PrefillBatch | None = None
    """Fresh prefill chunks batched into one call (also listed nowhere else)."""
    # Kernels that read the paged cache directly (CUDA) take these instead of `prefills` / `prefill_batch`:
    sliding_window: int = 0
    """0 = global attention."""
    decode_num_splits: int | None = None
    """Split-K factor of decode attention; fixed per CUDA graph."""
    prefill_block_tables: torch.Tensor | None = None
    """[num_prefill, max_blocks] int32: the prefill sequences' blocks (rows after the decode rows)."""
    prefill_cu_seqlens_q: torch.Tensor | None = None
    """[num_prefill + 1] int32: prefill sequence i owns rows num_decode + cu[i] .. num_decode + cu[i + 1]."""
    prefill_context_lens: torch.Tensor | None = None
    """[num_prefill] int32: cached prefix + chunk tokens of each prefill sequence."""
    prefill_max_query_len: int = 0


def padded_table(rows: list[list[int]], width: int, num_rows: int | None = None) -> torch.Tensor:
    """[num_rows, width] int32 (host) of `rows`, each padded with 0; rows past len(rows) are all 0.

    Five times faster than `torch.tensor` on padded nested lists (0.5 ms against 2.8 for 256 block tables of
    up to 190 blocks), which matters when it runs every step."""
    out = np.zeros((num_rows or len(rows), width), dtype=np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)
