"""The turbo engine's CUDA kernels (src/turbo/kernels/cuda, JIT-built by cuda_harness) against plain PyTorch.

Sampling is in test_turbo_cuda_sampling.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def ops():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import cuda_harness

    return cuda_harness.load()


# ---------------------------------------------------------------- attention helpers


def _make_cache(context_lens, num_kv_heads, head_dim, block_size, dtype, seed=0, extra_width=0):
    """A paged cache with each sequence's blocks scattered randomly over the pool (pool has spare garbage blocks)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = [math.ceil(c / block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    width = max(blocks_per_seq) + extra_width
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    # The tail of the last block of each sequence holds garbage: make it NaN so reading past ctx shows up.
    for i, c in enumerate(context_lens):
        if c % block_size:
            last = tables[i, blocks_per_seq[i] - 1].long()
            k_cache[last, c % block_size :] = float("nan")
            v_cache[last, c % block_size :] = float("nan")
    return k_cache, v_cache, tables


def _gather(cache, table, n):
    bs = cache.shape[1]
    blocks = cache[table[: math.ceil(n / bs)].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:n].float()


def _reference(q, k, v, q_pos, scale, window=0):
    """q: [t, h, d] at positions q_pos; k, v: [n, hkv, d]; causal (windowed) softmax in fp32."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("thd,nhd->htn", q.float(), k) * scale
    kpos = torch.arange(k.shape[0], device=q.device)
    mask = kpos[None, :] <= q_pos[:, None]
    if window:
        mask &= kpos[None, :] > q_pos[:, None] - window
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("htn,nhd->thd", s.softmax(-1), v)


def _decode(ops, q, k_cache, v_cache, tables, lens, scale, num_splits, window=0, hint=None):
    ws = torch.empty(
        max(1, ops.decode_workspace_size(q.shape[0], q.shape[1], q.shape[2], num_splits)),
        dtype=torch.uint8,
        device="cuda",
    )
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    min_split = None if hint is None else torch.tensor([hint], dtype=torch.int32, device="cuda")
    ops.paged_attention_decode(out, q, k_cache, v_cache, tables, lens, scale, num_splits, ws, window, min_split)
    return out


def _check_decode(out, q, k_cache, v_cache, tables, context_lens, scale, dtype, window=0):
    assert not out.isnan().any()
    for i, n in enumerate(context_lens):
        ref = _reference(
            q[i : i + 1],
            _gather(k_cache, tables[i], n),
            _gather(v_cache, tables[i], n),
            torch.tensor([n - 1], device="cuda"),
            scale,
            window,
        )
        torch.testing.assert_close(out[i : i + 1].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (16, 4), (32, 4), (28, 4), (12, 4)])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(ops, head_dim, num_heads, num_kv_heads, block_size, dtype):
    context_lens = [1, 17, 300, 1000, 4097, block_size, 2 * block_size + 1]
    k_cache, v_cache, tables = _make_cache(context_lens, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(context_lens), num_heads, head_dim, device="cuda", dtype=dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    auto = ops.decode_num_splits(len(context_lens), num_kv_heads, tables.shape[1], block_size, 132)
    for num_splits in sorted({1, auto, 5}):
        out = _decode(ops, q, k_cache, v_cache, tables, lens, scale, num_splits)
        _check_decode(out, q, k_cache, v_cache, tables, context_lens, scale, dtype)


@pytest.mark.parametrize("num_splits", [1, 7, 64, 128])
def test_decode_long_context(ops, num_splits):
    context_lens = [32768, 20000, 1]
    dtype = torch.bfloat16
    k_cache, v_cache, tables = _make_cache(context_lens, 8, 128, 16, dtype, seed=1)
    q = torch.randn(len(context_lens), 32, 128, device="cuda", dtype=dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    out = _decode(ops, q, k_cache, v_cache, tables, lens, 128**-0.5, num_splits)
    _check_decode(out, q, k_cache, v_cache, tables, context_lens, 128**-0.5, dtype)


def test_decode_splits_bound_the_work_of_a_split(ops):
    """At batch 256 a long context is split (no CTA runs alone over it at the kernel's end); the grid stays bounded."""
    assert ops.decode_num_splits(256, 8, 48, 64, 132) == 4  # tables of 48 blocks of 64: 3,072 tokens
    assert ops.decode_num_splits(64, 8, 48, 64, 132) == 6  # 512 tokens a split
    assert ops.decode_num_splits(1024, 8, 2048, 16, 132) == 1  # 8,192 CTAs already
    assert ops.decode_num_splits(1, 8, 2, 16, 132) == 1  # never below 128 tokens a split


def test_decode_ragged_batch_auto_splits(ops):
    """A ShareGPT-like batch: mostly short contexts, a few long ones, the splits a graph of 3,072 tokens gets. Short
    sequences write their output from one split, long ones go through the merge."""
    g = torch.Generator().manual_seed(4)
    context_lens = torch.randint(1, 400, (192,), generator=g).tolist() + [3072, 2900, 1500, 700] * 16
    k_cache, v_cache, tables = _make_cache(context_lens, 8, 128, 64, torch.bfloat16, seed=4)
    q = torch.randn(len(context_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    splits = ops.decode_num_splits(len(context_lens), 8, 48, 64, 132)
    assert splits > 1
    out = _decode(ops, q, k_cache, v_cache, tables, lens, 128**-0.5, splits)
    _check_decode(out, q, k_cache, v_cache, tables, context_lens, 128**-0.5, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hint", [0, 100, 256, 1000, 5000, 2**31 - 1])
def test_decode_split_hint(ops, dtype, hint):
    """The step's min_split_tokens hint regroups each context's splits (one split up to about the hint, pieces of
    about the hint past it, never more than the grid's); every grouping gives the same attention."""
    g = torch.Generator().manual_seed(5)
    context_lens = torch.randint(1, 600, (40,), generator=g).tolist() + [3072, 2900, 1500, 1, 129, 257, 2049]
    k_cache, v_cache, tables = _make_cache(context_lens, 8, 128, 64, dtype, seed=5)
    q = torch.randn(len(context_lens), 32, 128, device="cuda", dtype=dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    for splits, window in [(6, 0), (1, 0), (13, 700)]:
        out = _decode(ops, q, k_cache, v_cache, tables, lens, 128**-0.5, splits, window, hint=hint)
        _check_decode(out, q, k_cache, v_cache, tables, context_lens, 128**-0.5, dtype, window)


def test_decode_min_split_tokens(ops):
    """The hint is the tokens per CTA if the step's contexts were spread over two waves of the resident CTA slots
    (4 per SM; TURBO_DECODE_BALANCE unset)."""
    slots = 2 * 4 * 132
    assert ops.decode_min_split_tokens(64 * 1024, 32, 8, 132) == math.ceil(64 * 1024 * 8 / slots)
    assert ops.decode_min_split_tokens(1024 * 256, 32, 8, 132) == math.ceil(1024 * 256 * 8 / slots)
    assert ops.decode_min_split_tokens(300, 64, 8, 132) == math.ceil(300 * 8 / slots)  # 8 heads a CTA: 1 per KV head
    assert ops.decode_min_split_tokens(300, 32, 2, 132) == math.ceil(300 * 4 / slots)  # 16 heads a KV head: 2 CTAs
    assert ops.decode_min_split_tokens(0, 32, 8, 132) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_big_group_window_and_strided_q(ops, dtype):
    context_lens = [5, 700, 2500]
    k_cache, v_cache, tables = _make_cache(context_lens, 2, 64, 32, dtype, seed=2, extra_width=3)
    qkv = torch.randn(len(context_lens), 32 + 4, 64, device="cuda", dtype=dtype)
    q = qkv[:, :32]  # strided rows, as a view of a fused QKV output
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    for window in [0, 256]:
        out = _decode(ops, q, k_cache, v_cache, tables, lens, 0.125, 9, window)
        _check_decode(out, q, k_cache, v_cache, tables, context_lens, 0.125, dtype, window)


def test_decode_q_rows_not_16_byte_aligned(ops):
    """q rows that 16-byte loads cannot read (an odd element offset and row stride) take the CUDA-core kernel."""
    context_lens = [33, 300]
    k_cache, v_cache, tables = _make_cache(context_lens, 4, 128, 16, torch.bfloat16, seed=3)
    buf = torch.randn(len(context_lens), 16 * 128 + 1, device="cuda", dtype=torch.bfloat16)
    q = buf[:, 1:].view(len(context_lens), 16, 128)
    assert q.data_ptr() % 16 != 0
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    for splits in [1, 3]:
        out = _decode(ops, q, k_cache, v_cache, tables, lens, 128**-0.5, splits)
        _check_decode(out, q, k_cache, v_cache, tables, context_lens, 128**-0.5, torch.bfloat16)


def test_decode_empty_sequence_writes_zeros(ops):
    """A padded (graph) batch slot with context 0 gets zeros, not NaN."""
    k_cache, v_cache, tables = _make_cache([40, 16], 2, 128, 16, torch.bfloat16)
    q = torch.randn(2, 4, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([40, 0], dtype=torch.int32, device="cuda")
    for splits in [1, 4]:
        out = _decode(ops, q, k_cache, v_cache, tables, lens, 0.1, splits)
        assert not out.isnan().any() and (out[1] == 0).all()


def test_decode_cuda_graph(ops):
    """Capturable: fixed splits and workspace, new context lengths replayed without recapture."""
    dtype = torch.bfloat16
    context_lens = [100, 2000, 513, 64]
    k_cache, v_cache, tables = _make_cache([4096] * 4, 8, 128, 16, dtype, seed=3)
    q = torch.randn(4, 32, 128, device="cuda", dtype=dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    splits = 16
    ws = torch.empty(ops.decode_workspace_size(4, 32, 128, splits), dtype=torch.uint8, device="cuda")
    out = torch.empty_like(q)
    ops.paged_attention_decode(out, q, k_cache, v_cache, tables, lens, 128**-0.5, splits, ws, 0)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention_decode(out, q, k_cache, v_cache, tables, lens, 128**-0.5, splits, ws, 0)
    for new in ([100, 2000, 513, 64], [4096, 1, 3000, 77]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check_decode(out, q, k_cache, v_cache, tables, new, 128**-0.5, dtype)


def test_decode_cuda_graph_split_hint(ops):
    """The split hint is read on the device: one graph replays with new hints and contexts."""
    dtype = torch.bfloat16
    k_cache, v_cache, tables = _make_cache([4096] * 4, 8, 128, 64, dtype, seed=6)
    q = torch.randn(4, 32, 128, device="cuda", dtype=dtype)
    lens = torch.tensor([100, 2000, 513, 64], dtype=torch.int32, device="cuda")
    hint = torch.zeros(1, dtype=torch.int32, device="cuda")
    splits = 6
    ws = torch.empty(ops.decode_workspace_size(4, 32, 128, splits), dtype=torch.uint8, device="cuda")
    out = torch.empty_like(q)
    ops.paged_attention_decode(out, q, k_cache, v_cache, tables, lens, 128**-0.5, splits, ws, 0, hint)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention_decode(out, q, k_cache, v_cache, tables, lens, 128**-0.5, splits, ws, 0, hint)
    for new, h in (([100, 2000, 513, 64], 0), ([4096, 1, 3000, 77], 1500), ([4096, 700, 3000, 77], 10**6)):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        hint.fill_(h)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check_decode(out, q, k_cache, v_cache, tables, new, 128**-0.5, dtype)


# ---------------------------------------------------------------- prefill


def _run_prefill(ops, seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, window=0, seed=0):
    """seqs: [(cached prefix, new tokens)]; returns (out, q, cache..., ref per sequence)."""
    context_lens = [p + n for p, n in seqs]
    k_cache, v_cache, tables = _make_cache(context_lens, num_kv_heads, head_dim, block_size, dtype, seed=seed)
    q_lens = [n for _, n in seqs]
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), num_heads, head_dim, device="cuda", dtype=dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    ops.paged_attention_prefill(out, q, k_cache, v_cache, tables, cu, lens, max(q_lens), scale, window)
    assert not out.isnan().any()
    for i, (p, n) in enumerate(seqs):
        s, e = int(cu[i]), int(cu[i + 1])
        ctx = p + n
        ref = _reference(
            q[s:e],
            _gather(k_cache, tables[i], ctx),
            _gather(v_cache, tables[i], ctx),
            torch.arange(p, ctx, device="cuda"),
            scale,
            window,
        )
        torch.testing.assert_close(out[s:e].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (16, 4), (32, 4)])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(ops, head_dim, num_heads, num_kv_heads, block_size, dtype):
    seqs = [(0, 1), (0, 70), (100, 64), (37, 130), (1000, 5), (0, 300), (64, 64)]
    _run_prefill(ops, seqs, num_heads, num_kv_heads, head_dim, block_size, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_long(ops, dtype):
    _run_prefill(ops, [(0, 4096), (8000, 512), (30000, 33)], 8, 2, 128, 16, dtype, seed=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_ragged_step(ops, dtype):
    """A chunked-prefill step as ShareGPT makes them: many short prompts, a long one, a continued chunk; the work
    list orders their tiles by key range and must cover every row exactly once."""
    g = torch.Generator().manual_seed(7)
    seqs = [(0, int(n)) for n in torch.randint(1, 200, (45,), generator=g)]
    seqs[10] = (0, 1300)
    seqs.append((2000, 700))
    _run_prefill(ops, seqs, 32, 8, 128, 64, dtype, seed=6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_window(ops, dtype):
    _run_prefill(ops, [(0, 300), (500, 200), (10, 7)], 8, 4, 64, 32, dtype, window=96, seed=5)


# ---------------------------------------------------------------- KV write


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_write_kv(ops, dtype, index_dtype, head_dim):
    t, hk, bs, nb = 37, 4, 16, 10
    qkv = torch.randn(t, 8 + 2 * hk, head_dim, device="cuda", dtype=dtype)
    k, v = qkv[:, 8 : 8 + hk], qkv[:, 8 + hk :]  # strided views, as from a fused QKV projection
    k_cache = torch.randn(nb, bs, hk, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(nb * bs, device="cuda")[:t].to(index_dtype)
    slots[[3, 20]] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    k_ref.view(-1, hk, head_dim)[slots[keep].long()] = k[keep]
    v_ref.view(-1, hk, head_dim)[slots[keep].long()] = v[keep]
    ops.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    # odd head_dim offset (not 16-byte aligned views) takes the scalar path
    k2 = qkv[:, 1 : 1 + hk, 1:][:, :, : head_dim - 1]
    kc = torch.zeros(nb, bs, hk, head_dim - 1, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    ops.write_kv(k2, k2, kc, vc, slots)
    ref = torch.zeros_like(kc)
    ref.view(-1, hk, head_dim - 1)[slots[keep].long()] = k2[keep]
    assert torch.equal(kc, ref) and torch.equal(vc, ref)


# ---------------------------------------------------------------- norms, rotary, activation


def _rms_ref(x, w, eps):
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return w * n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [100, 576, 4096, 5120, 16384])
def test_rms_norm(ops, dtype, hidden):
    x_full = torch.randn(33, hidden + 64, device="cuda", dtype=dtype)
    x = x_full[:, :hidden]  # strided rows
    w = torch.rand(hidden, device="cuda", dtype=dtype) + 0.5
    out = torch.full((33, hidden), float("nan"), device="cuda", dtype=dtype)
    ops.rms_norm(out, x, w, 1e-6)
    torch.testing.assert_close(out.float(), _rms_ref(x, w, 1e-6).float(), atol=TOL[dtype], rtol=TOL[dtype])
    # fused add
    res = torch.randn(33, hidden, device="cuda", dtype=dtype)
    xc = x.contiguous()
    r_ref = (xc.float() + res.float()).to(dtype)
    o_ref = _rms_ref(r_ref, w, 1e-6)
    ops.fused_add_rms_norm(xc, res, w, 1e-6)
    torch.testing.assert_close(res, r_ref, atol=0, rtol=0)
    torch.testing.assert_close(xc.float(), o_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def _rope_cache(max_pos, rot_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2, device="cuda", dtype=torch.float32) / rot_dim)
    f = torch.arange(max_pos, device="cuda", dtype=torch.float32)[:, None] * inv[None]
    return torch.cat([f.cos(), f.sin()], dim=-1)


def _rope_ref(x, pos, cache):
    rot = cache.shape[1]
    cos, sin = cache[pos.long()].float().chunk(2, dim=-1)
    x = x.float().clone()
    x1, x2 = x[..., : rot // 2].clone(), x[..., rot // 2 : rot].clone()
    x[..., : rot // 2] = x1 * cos[:, None] - x2 * sin[:, None]
    x[..., rot // 2 : rot] = x2 * cos[:, None] + x1 * sin[:, None]
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("head_dim,rot_dim", [(64, 64), (128, 128), (128, 64)])
@pytest.mark.parametrize("cache_fp32", [True, False])
@pytest.mark.parametrize("aligned", [True, False], ids=["vec16", "scalar"])
def test_rotary(ops, dtype, pos_dtype, head_dim, rot_dim, cache_fp32, aligned):
    t, hq, hk = 29, 8, 2
    # Head rows one element off 16 bytes take the scalar kernel; aligned ones the 16-byte one.
    qkv = torch.randn(t, hq + 2 * hk, head_dim + (0 if aligned else 1), device="cuda", dtype=dtype)
    qkv = qkv if aligned else qkv[..., 1:]
    q, k = qkv[:, :hq], qkv[:, hq : hq + hk]
    pos = torch.randint(0, 4000, (t,), device="cuda").to(pos_dtype)
    cache = _rope_cache(4096, rot_dim)
    if not cache_fp32:
        cache = cache.to(dtype)
    q_ref, k_ref = _rope_ref(q, pos, cache), _rope_ref(k, pos, cache)
    v_before = qkv[:, hq + hk :].clone()
    ops.rotary(q, k, pos, cache)
    torch.testing.assert_close(q.float(), q_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k.float(), k_ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, hq + hk :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("head_dim,rot_dim", [(64, 64), (128, 128), (128, 64)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("aligned", [True, False], ids=["vec16", "scalar"])
def test_rotary_write_kv(ops, dtype, pos_dtype, head_dim, rot_dim, slot_dtype, aligned):
    """One kernel where rot_dim == head_dim, the rows are 16-byte aligned and the slots int64; the two kernels
    otherwise. Either way: q and k rotated in place, the rotated k and v at their slots, padding slots skipped."""
    t, hq, hk, bs, nb = 37, 8, 2, 16, 6
    qkv = torch.randn(t, hq + 2 * hk, head_dim + (0 if aligned else 1), device="cuda", dtype=dtype)
    qkv = qkv if aligned else qkv[..., 1:]
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    pos = torch.randint(0, 4000, (t,), device="cuda").to(pos_dtype)
    cache = _rope_cache(4096, rot_dim)
    q_ref, k_ref, v_before = _rope_ref(q, pos, cache), _rope_ref(k, pos, cache), v.clone()
    k_cache = torch.full((nb, bs, hk, head_dim), float("nan"), device="cuda", dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(nb * bs, device="cuda")[:t]
    slots[[4, 17]] = -1
    ops.rotary_write_kv(q, k, v, pos, cache, k_cache, v_cache, slots.to(slot_dtype))
    torch.testing.assert_close(q.float(), q_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k.float(), k_ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(v, v_before)
    keep = slots >= 0
    kc, vc = k_cache.view(-1, hk, head_dim), v_cache.view(-1, hk, head_dim)
    assert torch.equal(kc[slots[keep]], k[keep]) and torch.equal(vc[slots[keep]], v[keep])
    untouched = torch.ones(nb * bs, dtype=torch.bool, device="cuda")
    untouched[slots[keep]] = False
    assert kc[untouched].isnan().all() and vc[untouched].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1536, 14336, 100])
def test_silu_mul(ops, dtype, inter):
    gu = torch.randn(19, 2 * inter, device="cuda", dtype=dtype) * 3
    out = torch.full((19, inter), float("nan"), device="cuda", dtype=dtype)
    ops.silu_mul(out, gu)
    ref = F.silu(gu[:, :inter]) * gu[:, inter:]
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336), (1000, 64), (33, 520)])
def test_gemv(ops, dtype, rows, n, k):
    """Decode GEMV against an fp32 matmul; every output written; strided x rows; with and without bias."""
    x = torch.randn(rows, k + 8, device="cuda", dtype=dtype)[:, :k]  # rows strided by k + 8
    w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
    for bias in (None, torch.randn(n, device="cuda", dtype=dtype)):
        y = torch.full((rows, n), float("nan"), device="cuda", dtype=dtype)
        ops.gemv(y, x, w, bias)
        ref = x.float() @ w.float().T + (0 if bias is None else bias.float())
        assert not y.isnan().any()
        err = (y.float() - ref).norm() / ref.norm()
        assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], err


def test_gemv_refuses_what_it_cannot_take(ops):
    w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    assert ops.gemv_supported(torch.randn(8, 64, device="cuda", dtype=torch.bfloat16), w)
    assert not ops.gemv_supported(torch.randn(9, 64, device="cuda", dtype=torch.bfloat16), w)  # too many rows
    assert not ops.gemv_supported(torch.randn(1, 64, device="cuda"), w)  # dtypes differ
    w_odd = torch.randn(64, 63, device="cuda", dtype=torch.bfloat16)
    assert not ops.gemv_supported(torch.randn(1, 63, device="cuda", dtype=torch.bfloat16), w_odd)  # 126-byte rows
