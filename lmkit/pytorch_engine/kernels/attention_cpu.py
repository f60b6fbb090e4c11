"""Attention over the paged KV cache in plain PyTorch (the CPU path).

KV cache of one layer: k_cache, v_cache [num_kv_heads, num_blocks, block_size, head_dim], head-major. One
`index_select` of a decode batch's blocks then yields each KV head's keys for every sequence as one
contiguous [num_kv_heads, num_seqs, ctx, head_dim] tensor, which batched GEMMs read without a transpose copy.
A token's slot = block_id * block_size + offset indexes the flat [num_kv_heads, num_slots, head_dim] view.

Decode rows run as two batched GEMMs around an fp32 softmax; a KV head's GQA group of query heads are the
rows of its GEMM, so K/V are never repeated. They read the dense rows of `DecodeKV` (decode_kv_cpu.py) when
the runner keeps them, else the batch's blocks gathered from the pool. Each prefill chunk runs its own
causal SDPA, on the fresh k/v when it has no cached prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkit.pytorch_engine.kernels.metadata import AttentionMetadata


def allocate_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """One layer's K (or V) pool, zeroed."""
    return torch.zeros(num_kv_heads, num_blocks, block_size, head_dim, dtype=dtype, device=device)


def _slots_view(cache: torch.Tensor) -> torch.Tensor:
    """[num_kv_heads, num_slots, head_dim] view of a layer's pool."""
    return cache.view(cache.shape[0], -1, cache.shape[3])


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping) -> None:
    """Store the step's k, v [num_tokens, num_kv_heads, head_dim] at their slots."""
    _slots_view(k_cache).index_copy_(1, slot_mapping, k.transpose(0, 1))
    _slots_view(v_cache).index_copy_(1, slot_mapping, v.transpose(0, 1))


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
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd and meta.decode_window is not None:
        out[:nd] = meta.decode_window.attend(q[:nd], k[:nd], v[:nd], k_cache, scale).view(nd, -1, head_dim)
    elif nd:
        _decode(q[:nd], k_cache, v_cache, meta, scale, out[:nd].view(nd, num_kv_heads, group, head_dim))
    if meta.prefill_batch is not None:
        _prefill_batch(q, k, v, meta.prefill_batch, scale, out)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if chunk.context_slots is None:
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            kp = _slots_view(k_cache).index_select(1, chunk.context_slots)  # [KVH, ctx, D]
            vp = _slots_view(v_cache).index_select(1, chunk.context_slots)
        causal = chunk.mask is None and chunk.num_tokens > 1
        op = F.scaled_dot_product_attention(
            qp,
            kp.unsqueeze(0),
            vp.unsqueeze(0),
            attn_mask=chunk.mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=group > 1,
        )
        out[rows] = op[0].transpose(0, 1)
    return out


def _decode(q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    """q [nd, H, D] -> out [nd, KVH, group, D] for the decode rows, over their blocks gathered from the pool."""
    nd, num_kv_heads, group, head_dim = out.shape
    blocks = meta.decode_block_tables.view(-1)
    ctx = meta.decode_ctx_len
    kd = k_cache.index_select(1, blocks).view(num_kv_heads, nd, -1, head_dim)[:, :, :ctx]  # [KVH, nd, ctx, D]
    vd = v_cache.index_select(1, blocks).view(num_kv_heads, nd, -1, head_dim)[:, :, :ctx]
    bias = None if meta.decode_bias is None else meta.decode_bias.transpose(0, 1)  # the gather is head-major
    out.transpose(0, 1).copy_(attend(q.view(nd, num_kv_heads, group, head_dim).transpose(0, 1), kd, vd, scale, bias))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v, the softmax in fp32. q [..., group, D]; k, v [..., ctx, D]; bias
    broadcasts to [..., group, ctx] (fp32, 0 or -inf) or is None. Returns [..., group, D]."""
    return attend_scores(torch.matmul(q, k.transpose(-1, -2)), v, scale, bias)


def attend_scores(scores: torch.Tensor, v: torch.Tensor, scale: float, bias) -> torch.Tensor:
    """softmax(scores * scale + bias) v, the softmax in fp32, the result in v's dtype."""
    return torch.matmul(torch.softmax(scaled_scores(scores, scale, bias), dim=-1).to(v.dtype), v)


def scaled_scores(scores: torch.Tensor, scale: float, bias) -> torch.Tensor:
    """scores * scale + bias, in fp32 (bias: fp32 0 or -inf, or None)."""
    return scores.float() * scale if bias is None else torch.add(bias, scores, alpha=scale)


def visibility_bias(lens: torch.Tensor, width: int, window: int | None) -> torch.Tensor | None:
    """[n, 1, 1, width] fp32 for n decode rows with contexts of lens[i] tokens (the new one included): 0 where
    key j is visible (j < lens[i], and inside the sliding window), -inf elsewhere; None when all are visible."""
    pos = torch.arange(width, device=lens.device)
    hidden = pos[None, :] >= lens[:, None]
    if window:
        hidden |= pos[None, :] <= (lens - 1 - window)[:, None]
    if not bool(hidden.any()):
        return None
    bias = torch.zeros(hidden.shape, device=lens.device).masked_fill_(hidden, float("-inf"))
    return bias.view(len(lens), 1, 1, width)


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
