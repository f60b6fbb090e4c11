"""Triton attention over the paged KV cache (CUDA): split-K decode and chunked prefill, GQA, any block size >= 16.

KV cache of one layer (written before attention runs, so the new tokens are already in it):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables:     [num_seqs, max_blocks_per_seq] int32   (block ids in token order)
    context_lens:     [num_seqs] int32                       (tokens in the cache, new ones included)

Decode (one query token per sequence) is flash-decoding: the context is cut into splits that run in
parallel, each keeping an online softmax (max m, sum l, unnormalised acc); a second kernel merges them.
A program handles all query heads of one KV head, so each K/V tile is read once per group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    BlockTables,
    ContextLens,
    AccOut,
    MOut,
    LOut,
    scale,
    window,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ab,
    stride_ah,
    stride_as,
    stride_mb,
    stride_mh,
    blocks_per_split,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ContextLens + b)
    num_blocks = tl.cdiv(ctx, BLOCK_SIZE)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)
    if window > 0:  # sliding window: skip blocks wholly before it
        first = tl.maximum(first, (ctx - window) // BLOCK_SIZE)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_SIZE)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for blk in range(first, last):
        block_id = tl.load(BlockTables + b * stride_bt + blk).to(tl.int64)
        k = tl.load(K + block_id * stride_kb + offs_s[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        pos = blk * BLOCK_SIZE + offs_s
        valid = pos < ctx
        if window > 0:
            valid = valid & (pos >= ctx - window)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a fully masked row must not make NaNs
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(V + block_id * stride_vb + offs_s[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    out = AccOut + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + offs_d[None, :]
    tl.store(out, acc, mask=g_mask[:, None])
    ml = b * stride_mb + heads * stride_mh + split
    tl.store(MOut + ml, m, mask=g_mask)
    tl.store(LOut + ml, l_sum, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    AccIn,
    MIn,
    LIn,
    Out,
    stride_ab,
    stride_ah,
    stride_as,
    stride_mb,
    stride_mh,
    stride_ob,
    stride_oh,
    num_splits,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < num_splits
    m = tl.load(MIn + b * stride_mb + h * stride_mh + offs_s, mask=s_mask, other=float("-inf"))
    l_sum = tl.load(LIn + b * stride_mb + h * stride_mh + offs_s, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    acc = tl.load(
        AccIn + b * stride_ab + h * stride_ah + offs_s[:, None] * stride_as + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_sum * w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (TF32 would break token parity with fp32 references)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_decode_splits(max_blocks_per_seq: int, num_seqs: int, num_kv_heads: int, num_sms: int = 132) -> int:
    """Enough splits to fill the GPU (~2 waves), each at least one block; fixed for a given shape (graphs)."""
    want = triton.cdiv(2 * num_sms, max(num_seqs * num_kv_heads, 1))
    return max(1, min(want, max_blocks_per_seq, 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int = 0,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim] -> out of the same shape (one new token per sequence)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    if num_splits is None:
        num_splits = num_decode_splits(max_blocks, num_seqs, num_kv_heads)
    blocks_per_split = triton.cdiv(max_blocks, num_splits)
    acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    m = torch.empty(num_seqs, num_heads, num_splits, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        acc,
        m,
        lsum,
        scale,
        window,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        m.stride(0),
        m.stride(1),
        blocks_per_split,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        PRECISION=_precision(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    if out is None:
        out = torch.empty_like(q)
    _decode_merge_kernel[(num_seqs, num_heads)](
        acc,
        m,
        lsum,
        out,
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        m.stride(0),
        m.stride(1),
        out.stride(0),
        out.stride(1),
        num_splits,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
        HEAD_DIM=head_dim,
        num_warps=4,
    )
    return out


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    Out,
    BlockTables,
    CuSeqlensQ,
    ContextLens,
    scale,
    window,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CuSeqlensQ + b)
    q_len = tl.load(CuSeqlensQ + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(ContextLens + b)
    q_pos0 = ctx - q_len  # position of the chunk's first token
    kv_head = h // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_SIZE)
    m_mask = offs_m < q_len
    q = tl.load(
        Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_mask[:, None], other=0.0
    )
    q_pos = q_pos0 + offs_m

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum(ctx, q_pos0 + (tile + 1) * BLOCK_M)
    first = 0
    if window > 0:
        first = tl.maximum(0, q_pos0 + tile * BLOCK_M - window + 1) // BLOCK_SIZE
    for blk in range(first, tl.cdiv(end, BLOCK_SIZE)):
        block_id = tl.load(BlockTables + b * stride_bt + blk).to(tl.int64)
        k = tl.load(K + block_id * stride_kb + offs_s[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        k_pos = blk * BLOCK_SIZE + offs_s
        valid = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < ctx)
        if window > 0:
            valid = valid & (k_pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(V + block_id * stride_vb + offs_s[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(
        Out + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_mask[:, None],
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (q: [num_tokens, num_heads, head_dim], packed by
    cu_seqlens_q) over its whole context in the paged cache (cached prefix + the new tokens)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    if out is None:
        out = torch.empty_like(q)
    block_m = 64 if head_dim <= 64 else 32 if q.dtype == torch.float32 else 64
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_seqlens_q,
        context_lens,
        scale,
        window,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_SIZE=block_size,
        PRECISION=_precision(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    return out


@triton.jit
def _write_kv_kernel(
    K,
    V,
    KCache,
    VCache,
    SlotMapping,
    stride_kt,
    stride_vt,
    stride_cb,
    stride_cs,
    stride_vcb,
    stride_vcs,
    ROW: tl.constexpr,
    ROW_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SlotMapping + t).to(tl.int64)
    if slot < 0:  # padding token (CUDA-graph batches)
        return
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    tl.store(KCache + blk * stride_cb + off * stride_cs + offs, tl.load(K + t * stride_kt + offs, mask=mask), mask=mask)
    tl.store(
        VCache + blk * stride_vcb + off * stride_vcs + offs, tl.load(V + t * stride_vt + offs, mask=mask), mask=mask
    )


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k, v [num_tokens, num_kv_heads, head_dim] into their slots; slot -1 is skipped."""
    num_tokens = k.shape[0]
    row = k.shape[1] * k.shape[2]
    k2, v2 = k.reshape(num_tokens, row), v.reshape(num_tokens, row)
    _write_kv_kernel[(num_tokens,)](
        k2,
        v2,
        k_cache,
        v_cache,
        slot_mapping,
        k2.stride(0),
        v2.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        ROW=row,
        ROW_PAD=triton.next_power_of_2(row),
        BLOCK_SIZE=k_cache.shape[1],
    )
