"""Attention over the paged KV cache in plain PyTorch (the CPU path).

KV cache of one layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; viewed flat as
[num_slots, num_kv_heads, head_dim] so a token's slot = block_id * block_size + offset.
Decode sequences run as one batched SDPA over their gathered, padded contexts; each prefill chunk runs
its own causal SDPA (on the fresh k/v when it has no cached prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkit.pytorch_engine.kernels.metadata import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping) -> None:
    """Store the step's k, v [num_tokens, num_kv_heads, head_dim] at their slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] of this step (already in the cache) -> out [T, H, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    group = q.shape[1] // num_kv_heads
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        # GQA without repeating k/v: a kv head's `group` query heads act as `group` queries on it.
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim)
        # Gather whole blocks (contiguous rows of block_size * KVH * D): far cheaper than per-slot indexing.
        blocks = meta.decode_block_tables.view(-1)
        ctx = meta.decode_ctx_len
        kd = k_cache.index_select(0, blocks).view(nd, -1, num_kv_heads, head_dim)[:, :ctx].transpose(1, 2)
        vd = v_cache.index_select(0, blocks).view(nd, -1, num_kv_heads, head_dim)[:, :ctx].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = od.reshape(nd, -1, head_dim)
    if meta.prefill_batch is not None:
        _prefill_batch(q, k, v, meta.prefill_batch, scale, out)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if chunk.context_slots is None:
            kp, vp = k[rows], v[rows]
        else:
            kp, vp = k_flat.index_select(0, chunk.context_slots), v_flat.index_select(0, chunk.context_slots)
        kp = kp.transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
        vp = vp.transpose(0, 1).unsqueeze(0)
        causal = chunk.mask is None and chunk.num_tokens > 1
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=chunk.mask, is_causal=causal, scale=scale, enable_gqa=group > 1
        )
        out[rows] = op[0].transpose(0, 1)
    return out


def _prefill_batch(q, k, v, pb, scale: float, out: torch.Tensor) -> None:
    """One padded causal SDPA for many fresh chunks (a handful of ops instead of several per chunk)."""
    num, max_len = pb.rows.shape
    idx = pb.rows.view(-1)

    def padded(x: torch.Tensor) -> torch.Tensor:  # [T, heads, D] -> [num, heads, max_len, D]
        return x.index_select(0, idx).view(num, max_len, x.shape[1], x.shape[2]).transpose(1, 2)

    o = F.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    o = o.transpose(1, 2).reshape(num * max_len, q.shape[1], q.shape[2])
    out.index_copy_(0, pb.dest, o.index_select(0, pb.valid))
