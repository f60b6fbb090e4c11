"""Every turbo CPU kernel against a PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch

from lmkit import _turbo

torch.manual_seed(0)


def ref_rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_rms_norm():
    x, w = torch.randn(7, 96), torch.rand(96) + 0.5
    torch.testing.assert_close(_turbo.rms_norm(x, w, 1e-6), ref_rms(x, w, 1e-6), rtol=1e-5, atol=1e-5)


def test_rms_norm_strided_in_place():
    """Per-head norm (Qwen3 qk norm) on a strided view of a fused qkv row."""
    qkv = torch.randn(5, 8 * 16)
    view = qkv[:, 16:80].view(5, 4, 16)  # 4 heads in the middle of each row
    expect = qkv.clone()
    w = torch.rand(16) + 0.5
    expect[:, 16:80] = ref_rms(expect[:, 16:80].view(5, 4, 16), w, 1e-6).reshape(5, 64)
    _turbo.rms_norm_(view, w, 1e-6)
    torch.testing.assert_close(qkv, expect, rtol=1e-5, atol=1e-5)


def test_fused_add_rms_norm():
    x, r, w = torch.randn(6, 64), torch.randn(6, 64), torch.rand(64)
    new_r = r + x
    expect = ref_rms(new_r, w, 1e-5)
    _turbo.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(r, new_r)
    torch.testing.assert_close(x, expect, rtol=1e-5, atol=1e-5)


def rope_ref(x, pos, cos, sin):
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * c + rot * s


@pytest.mark.parametrize("scaling", ["default", "linear", "llama3"])
def test_rotary(scaling):
    from lmkit.model.spec import ModelSpec, RopeScaling
    from lmkit.turbo.weights import rope_tables

    rs = RopeScaling(type=scaling, factor=4.0, original_max_position_embeddings=64)
    spec = ModelSpec("LlamaForCausalLM", 10, 64, 64, 1, 4, 2, 32, rope_theta=10000.0, rope_scaling=rs)
    cos, sin = rope_tables(spec, 256)
    qkv = torch.randn(9, (4 + 2 * 2) * 32)
    q = qkv[:, : 4 * 32].view(9, 4, 32)
    pos = torch.randint(0, 256, (9,))
    expect = rope_ref(q.clone(), pos, cos, sin)
    _turbo.rotary(q, pos, cos, sin)
    torch.testing.assert_close(q, expect, rtol=1e-5, atol=1e-5)


def test_rotary_matches_hf():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from lmkit.model.registry import spec_from_config
    from lmkit.turbo.weights import rope_tables

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    spec = spec_from_config(cfg.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    pos = torch.arange(100)
    q = torch.randn(1, 4, 100, 16)
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(q, pos[None])
    expect, _ = apply_rotary_pos_emb(q, q, hf_cos, hf_sin)
    cos, sin = rope_tables(spec, 128)
    x = q[0].transpose(0, 1).contiguous()  # [T, H, D]
    _turbo.rotary(x, pos, cos, sin)
    torch.testing.assert_close(x, expect[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_silu_mul():
    gu = torch.randn(5, 2 * 40)
    expect = torch.nn.functional.silu(gu[:, :40]) * gu[:, 40:]
    torch.testing.assert_close(_turbo.silu_mul(gu), expect, rtol=1e-5, atol=1e-6)


def test_write_kv():
    kc, vc = torch.zeros(4, 8, 2, 16), torch.zeros(4, 8, 2, 16)
    kv = torch.randn(3, 2 * 2 * 16)
    k, v = kv[:, :32].view(3, 2, 16), kv[:, 32:].view(3, 2, 16)
    slots = torch.tensor([5, 17, 31])
    _turbo.write_kv(k, v, kc, vc, slots)
    torch.testing.assert_close(kc.view(32, 2, 16)[slots], k)
    torch.testing.assert_close(vc.view(32, 2, 16)[slots], v)
    assert kc.view(32, 2, 16)[[0, 6, 30]].abs().sum() == 0


def ref_attention(q, k, v, scale, kv_len, window=0):
    """q [n, H, D] at the last n positions of kv_len keys; k, v [kv_len, KVH, D]."""
    n, H, D = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(kv_len - n, kv_len)[:, None]
    kpos = torch.arange(kv_len)[None, :]
    mask = kpos > qpos
    if window:
        mask |= kpos <= qpos - window
    s = s.masked_fill(mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_mixed_batch(block_size, window):
    """Prefill chunks over cached tokens and decodes in one call; GQA; shuffled block tables."""
    H, KVH, D = 4, 2, 32
    kv_lens = [37, 5, 20, 1, 64]
    q_lens = [12, 5, 1, 1, 33]  # a chunk after 25 cached, a fresh prefill, decodes, a long chunk
    num_blocks = sum(math.ceil(n / block_size) for n in kv_lens) + 3
    kc, vc = torch.randn(num_blocks, block_size, KVH, D), torch.randn(num_blocks, block_size, KVH, D)
    perm = torch.randperm(num_blocks).tolist()
    max_b = max(math.ceil(n / block_size) for n in kv_lens)
    tables = torch.zeros(len(kv_lens), max_b, dtype=torch.int32)
    qs, expects = [], []
    for s, (kv_len, q_len) in enumerate(zip(kv_lens, q_lens)):
        nb = math.ceil(kv_len / block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables[s, :nb] = torch.tensor(blocks, dtype=torch.int32)
        k = kc[blocks].reshape(-1, KVH, D)[:kv_len]
        v = vc[blocks].reshape(-1, KVH, D)[:kv_len]
        q = torch.randn(q_len, H, D)
        qs.append(q)
        expects.append(ref_attention(q, k, v, D**-0.5, kv_len, window))
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    # q as a strided view of a fused qkv tensor, as the model passes it
    T = sum(q_lens)
    qkv = torch.randn(T, (H + 2 * KVH) * D)
    qkv[:, : H * D] = torch.cat(qs).reshape(T, H * D)
    q_view = qkv[:, : H * D].view(T, H, D)
    out = _turbo.paged_attention(q_view, kc, vc, tables, cu, torch.tensor(kv_lens, dtype=torch.int32), D**-0.5, window)
    torch.testing.assert_close(out, torch.cat(expects), rtol=1e-4, atol=1e-4)


def test_paged_attention_long_decode_batch():
    """Enough work to take the parallel path."""
    H, KVH, D, bs = 8, 2, 64, 16
    S, kv_len = 8, 300
    nb = math.ceil(kv_len / bs)
    kc, vc = torch.randn(S * nb, bs, KVH, D), torch.randn(S * nb, bs, KVH, D)
    tables = torch.arange(S * nb, dtype=torch.int32).view(S, nb)
    q = torch.randn(S * 40, H, D)  # 40-token chunks
    cu = torch.arange(0, S * 40 + 1, 40, dtype=torch.int32)
    out = _turbo.paged_attention(q, kc, vc, tables, cu, torch.full((S,), kv_len, dtype=torch.int32), 0.125)
    for s in range(S):
        k = kc[tables[s].long()].reshape(-1, KVH, D)[:kv_len]
        v = vc[tables[s].long()].reshape(-1, KVH, D)[:kv_len]
        torch.testing.assert_close(
            out[40 * s : 40 * s + 40], ref_attention(q[40 * s : 40 * s + 40], k, v, 0.125, kv_len), rtol=1e-4, atol=1e-4
        )


# ---- sampling ----


def params(**kw):
    return {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "seed": 1} | kw


def test_greedy_and_repetition_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [1.0, 3.0, 2.0, -1.0]])
    toks, lps = _turbo.sample(
        logits, [params(temperature=0.0), params(temperature=0.0, repetition_penalty=2.0)], [[], [1, 1]], [0, 0]
    )
    assert toks == [1, 2] and lps == [None, None]  # 3/2 = 1.5 < 2


def test_logprobs_of_raw_logits():
    logits = torch.randn(2, 50)
    toks, lps = _turbo.sample(logits, [params(temperature=0.0, logprobs=5), params(logprobs=0)], [[], []], [0, 0])
    ref = logits.log_softmax(-1)
    tok, lp, top = lps[0]
    assert tok == toks[0] == int(logits[0].argmax())
    assert lp == pytest.approx(float(ref[0, tok]), abs=1e-5)
    vals, ids = ref[0].topk(5)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-5)
    assert lps[1][2] == [] and lps[1][1] == pytest.approx(float(ref[1, toks[1]]), abs=1e-5)


def empirical(logits, n, **kw):
    counts = torch.zeros(logits.shape[-1])
    rows = [params(seed=s, **kw) for s in range(n)]
    toks, _ = _turbo.sample(logits.expand(n, -1).contiguous(), rows, [[]] * n, [0] * n)
    for t in toks:
        counts[t] += 1
    return counts / n


def test_temperature_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    for temp in (1.0, 0.5):
        freq = empirical(logits, 4000, temperature=temp)
        torch.testing.assert_close(freq, (logits[0] / temp).softmax(-1), atol=0.03, rtol=0)


def test_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    assert set(empirical(logits, 500, top_k=2).nonzero().flatten().tolist()) == {0, 1}
    freq = empirical(logits, 3000, top_k=2)
    assert freq[0] == pytest.approx(2 / 3, abs=0.04)
    # top_p 0.8: 0.5 + 0.25 < 0.8, so the third token is kept too
    assert set(empirical(logits, 500, top_p=0.8).nonzero().flatten().tolist()) == {0, 1, 2}
    assert set(empirical(logits, 500, top_p=0.5).nonzero().flatten().tolist()) == {0}
    # min_p 0.2: keep p >= 0.1
    assert set(empirical(logits, 500, min_p=0.2).nonzero().flatten().tolist()) == {0, 1, 2}
    assert set(empirical(logits, 500, min_p=0.2, top_k=4).nonzero().flatten().tolist()) == {0, 1, 2}


def test_seed_is_batch_independent():
    logits = torch.randn(1, 1000)
    alone, _ = _turbo.sample(logits, [params(seed=42)], [[]], [7])
    other = torch.randn(3, 1000)
    batch = torch.cat([other[:2], logits, other[2:]])
    toks, _ = _turbo.sample(
        batch, [params(seed=1), params(seed=2), params(seed=42), params(seed=3)], [[]] * 4, [0, 0, 7, 0]
    )
    assert toks[2] == alone[0]
    draws = {_turbo.sample(logits, [params(seed=42)], [[]], [step])[0][0] for step in range(20)}
    assert len(draws) > 1  # the step moves the draw on
