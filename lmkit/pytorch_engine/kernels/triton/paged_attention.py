"""Triton attention over the paged KV cache (CUDA): split-K decode and chunked prefill, GQA, any block size >= 16.

KV cache of one layer (written before attention runs, so the new tokens are already in it):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables:     [num_seqs, max_blocks_per_seq] int32   (block ids in token order)
    context_lens:     [num_seqs] int32                       (tokens in the cache, new ones included; a
                                                             decode row of length 0 is padding, left unwritten)

Decode (one query token per sequence) is flash-decoding: the context is cut into splits of at most 16 blocks
that run in parallel, each keeping an online softmax (max m, sum l, unnormalised acc); a second kernel merges
them. A program handles all query heads of one KV head, so each K/V tile is read once per group. Both kernels
read keys in tiles of 64 gathered from several blocks: at 16-token blocks a tile per block left the loop
latency-bound.
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
    scale_log2,
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
    split_len,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ContextLens + b)
    first = split * split_len
    if first >= ctx:  # past this sequence's end: the merge reads only splits that start inside the context
        return
    last = tl.minimum(first + split_len, ctx)
    if window > 0:  # sliding window: skip tiles wholly before it
        first = tl.maximum(first, (ctx - window) // TILE * TILE)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, TILE)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = BlockTables + b * stride_bt
    for start in range(first, last, TILE):  # a tile spans TILE // BLOCK_SIZE blocks (or part of one)
        pos = start + offs_t
        valid = pos < last
        if window > 0:
            valid = valid & (pos >= ctx - window)
        block_id = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k_rows = K + block_id * stride_kb + slot * stride_ks + kv_head * stride_kh
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # log2 units: exp2 below
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a fully masked row must not make NaNs
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v_rows = V + block_id * stride_vb + slot * stride_vs + kv_head * stride_vh
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
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
    ContextLens,
    Out,
    stride_ab,
    stride_ah,
    stride_as,
    stride_mb,
    stride_mh,
    stride_ob,
    stride_oh,
    split_len,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ContextLens + b)
    if ctx == 0:  # a padding row of a graph-captured mixed step: no output
        return
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < tl.cdiv(ctx, split_len)  # the splits that ran
    m = tl.load(MIn + b * stride_mb + h * stride_mh + offs_s, mask=s_mask, other=float("-inf"))
    l_sum = tl.load(LIn + b * stride_mb + h * stride_mh + offs_s, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.math.exp2(m - m_max), 0.0)
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


_LOG2E = 1.4426950408889634
_DECODE_TILE = 64  # keys per loop iteration (four 16-token blocks, gathered into one tile)
_MAX_SPLIT_BLOCKS = 16  # a split's most blocks: long contexts get more splits, not longer programs
# One warp per merge program: 12 vs 29 µs a layer at batch 256 with 12 splits (H100); it is latency-bound, and
# more warps per program only mean fewer programs in flight.
_MERGE_WARPS = 1


def num_decode_splits(max_blocks_per_seq: int, num_seqs: int, num_kv_heads: int, num_sms: int = 132) -> int:
    """Splits of each sequence's blocks: enough to fill the GPU (~4 programs per SM), and at most
    _MAX_SPLIT_BLOCKS blocks each so that in a large batch the longest sequence does not keep a few programs
    running long after the rest. Programs past a sequence's end exit at once. Fixed for a given shape (graphs)."""
    want = triton.cdiv(4 * num_sms, max(num_seqs * num_kv_heads, 1))
    want = max(want, triton.cdiv(max_blocks_per_seq, _MAX_SPLIT_BLOCKS))
    return max(1, min(want, max_blocks_per_seq, 256))


def _split_len(max_blocks: int, num_splits: int, block_size: int) -> int:
    """Keys per split: whole blocks, and whole tiles where a tile spans several blocks."""
    blocks = triton.cdiv(max_blocks, num_splits)
    per_tile = max(1, _DECODE_TILE // block_size)
    return triton.cdiv(blocks, per_tile) * per_tile * block_size


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
    split_len = _split_len(max_blocks, num_splits, block_size)
    num_splits = triton.cdiv(max_blocks * block_size, split_len)
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
        scale * _LOG2E,
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
        split_len,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE=_DECODE_TILE,
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
        context_lens,
        out,
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        m.stride(0),
        m.stride(1),
        out.stride(0),
        out.stride(1),
        split_len,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
        HEAD_DIM=head_dim,
        num_warps=_MERGE_WARPS,
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
    scale_log2,
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
    TILE_N: tl.constexpr,
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
    offs_n = tl.arange(0, TILE_N)
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
        first = tl.maximum(0, q_pos0 + tile * BLOCK_M - window + 1) // TILE_N * TILE_N
    table = BlockTables + b * stride_bt
    for start in range(first, end, TILE_N):  # TILE_N keys, gathered from TILE_N // BLOCK_SIZE blocks
        k_pos = start + offs_n
        in_ctx = k_pos < end
        block_id = tl.load(table + k_pos // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
        slot = k_pos % BLOCK_SIZE
        k_rows = K + block_id * stride_kb + slot * stride_ks + kv_head * stride_kh
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=in_ctx[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        valid = (k_pos[None, :] <= q_pos[:, None]) & in_ctx[None, :]
        if window > 0:
            valid = valid & (k_pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v_rows = V + block_id * stride_vb + slot * stride_vs + kv_head * stride_vh
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=in_ctx[:, None], other=0.0)
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
        scale * _LOG2E,
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
        TILE_N=64 if q.dtype != torch.float32 else 32,
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
