"""Triton paged-attention kernels (PyTorch engine, CUDA) against a plain PyTorch reference."""

import math

import pytest
import torch

pytestmark = pytest.mark.gpu


def _make_cache(context_lens, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """A paged cache with the blocks of each sequence scattered randomly over the pool."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = [math.ceil(c / block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    width = max(blocks_per_seq)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    return k_cache, v_cache, tables


def _gather(cache, table, n):
    bs = cache.shape[1]
    blocks = cache[table[: math.ceil(n / bs)].long()]  # [nb, bs, hkv, d]
    return blocks.reshape(-1, *cache.shape[2:])[:n].float()


def _reference(q, k, v, q_pos, scale, window=0):
    """q: [t, h, d] at positions q_pos; k, v: [n, hkv, d]; causal (and windowed) softmax in fp32."""
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


TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (16, 4), (32, 4)])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode(head_dim, num_heads, num_kv_heads, block_size, dtype):
    from lmkit.pytorch_engine.kernels.triton.paged_attention import paged_decode_attention

    context_lens = [1, 17, 300, 1000, 4097, block_size, 2 * block_size + 1]
    k_cache, v_cache, tables = _make_cache(context_lens, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(context_lens), num_heads, head_dim, device="cuda", dtype=dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, out=out)
    assert not out.isnan().any()
    for i, n in enumerate(context_lens):
        ref = _reference(
            q[i : i + 1],
            _gather(k_cache, tables[i], n),
            _gather(v_cache, tables[i], n),
            torch.tensor([n - 1], device="cuda"),
            scale,
        )
        torch.testing.assert_close(out[i : i + 1].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 7, 64])
def test_decode_long_context_splits(num_splits):
    from lmkit.pytorch_engine.kernels.triton.paged_attention import paged_decode_attention

    context_lens, block_size = [32768, 12345], 64
    k_cache, v_cache, tables = _make_cache(context_lens, 8, 128, block_size, torch.bfloat16, seed=1)
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 128**-0.5, num_splits=num_splits)
    for i, n in enumerate(context_lens):
        ref = _reference(
            q[i : i + 1],
            _gather(k_cache, tables[i], n),
            _gather(v_cache, tables[i], n),
            torch.tensor([n - 1], device="cuda"),
            128**-0.5,
        )
        torch.testing.assert_close(out[i : i + 1].float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (16, 4), (32, 4)])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_chunked(head_dim, num_heads, num_kv_heads, block_size, dtype):
    from lmkit.pytorch_engine.kernels.triton.paged_attention import paged_prefill_attention

    # (cached prefix, new tokens): fresh prompts, chunks after a cached prefix, single tokens
    seqs = [(0, 1), (0, 77), (100, 50), (513, 1), (0, 1024), (2048, 300)]
    context_lens = [c + n for c, n in seqs]
    k_cache, v_cache, tables = _make_cache(context_lens, num_kv_heads, head_dim, block_size, dtype, seed=2)
    q_lens = [n for _, n in seqs]
    q = torch.randn(sum(q_lens), num_heads, head_dim, device="cuda", dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, max(q_lens), scale, out=out)
    assert not out.isnan().any()
    for i, (c, n) in enumerate(seqs):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        ref = _reference(
            q[sl],
            _gather(k_cache, tables[i], c + n),
            _gather(v_cache, tables[i], c + n),
            torch.arange(c, c + n, device="cuda"),
            scale,
        )
        torch.testing.assert_close(out[sl].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_sliding_window():
    from lmkit.pytorch_engine.kernels.triton.paged_attention import paged_decode_attention, paged_prefill_attention

    seqs, window, bs = [(0, 300), (700, 40)], 128, 16
    context_lens = [c + n for c, n in seqs]
    k_cache, v_cache, tables = _make_cache(context_lens, 2, 64, bs, torch.float32, seed=3)
    q_lens = [n for _, n in seqs]
    q = torch.randn(sum(q_lens), 8, 64, device="cuda")
    cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device="cuda")
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, max(q_lens), 0.125, window=window)
    dec = paged_decode_attention(q[cu[1:] - 1].contiguous(), k_cache, v_cache, tables, lens, 0.125, window=window)
    for i, (c, n) in enumerate(seqs):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        k, v = _gather(k_cache, tables[i], c + n), _gather(v_cache, tables[i], c + n)
        ref = _reference(q[sl], k, v, torch.arange(c, c + n, device="cuda"), 0.125, window)
        torch.testing.assert_close(out[sl], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dec[i : i + 1], ref[-1:], atol=1e-4, rtol=1e-4)


def test_write_kv_skips_padding():
    from lmkit.pytorch_engine.kernels.triton.paged_attention import write_kv

    k_cache = torch.zeros(4, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(3, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.tensor([5, -1, 63], dtype=torch.int32, device="cuda")
    write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache[0, 5], k[0]) and torch.equal(v_cache[3, 15], v[2])
    assert k_cache.count_nonzero() == 2 * 2 * 64 - (k[0] == 0).sum() - (k[2] == 0).sum()
