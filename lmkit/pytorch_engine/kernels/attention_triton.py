"""Attention over the paged KV cache on CUDA: the Triton kernels of kernels/triton/paged_attention.py.

Decode rows (the first `num_decode`) run split-K flash-decoding; the prefill chunks after them run one
chunked-prefill kernel over their cached prefix plus new tokens, packed by `prefill_cu_seqlens_q`.
"""

from __future__ import annotations

import torch

from lmkit.pytorch_engine.kernels.metadata import AttentionMetadata
from lmkit.pytorch_engine.kernels.triton import paged_attention as tk


def allocate_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """One layer's K (or V) pool, zeroed: [num_blocks, block_size, num_kv_heads, head_dim]."""
    return torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping) -> None:
    """Store the step's k, v [num_tokens, num_kv_heads, head_dim] at their slots (slot -1: padding, skipped)."""
    tk.write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, H, D] (its k/v already in the cache) -> out [T, H, D]."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    nd = meta.num_decode
    window = meta.sliding_window
    if nd:
        tk.paged_decode_attention(
            q[:nd],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            window=window,
            num_splits=meta.decode_num_splits,
            out=out[:nd],
        )
    if meta.prefill_cu_seqlens_q is not None:
        tk.paged_prefill_attention(
            q[nd:],
            k_cache,
            v_cache,
            meta.prefill_block_tables,
            meta.prefill_cu_seqlens_q,
            meta.prefill_context_lens,
            meta.prefill_max_query_len,
            scale,
            window=window,
            out=out[nd:],
        )
    return out
