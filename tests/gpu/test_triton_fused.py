"""Fused Triton element-wise kernels (PyTorch engine, CUDA) against PyTorch references in fp32."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("n", [576, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm(rows, n, dtype):
    from lmkit.pytorch_engine.kernels.triton.fused import rms_norm

    x = torch.randn(rows, n, device="cuda", dtype=dtype) * 3
    w = torch.randn(n, device="cuda", dtype=dtype)
    ref = w.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert _rel(rms_norm(x, w, 1e-5), ref) < 1e-2


@pytest.mark.parametrize("rows", [1, 3, 257])
@pytest.mark.parametrize("n", [1536, 14336])
def test_silu_mul(rows, n):
    from lmkit.pytorch_engine.kernels.triton.fused import silu_mul

    gu = torch.randn(rows, 2 * n, device="cuda", dtype=torch.bfloat16) * 2
    g, u = gu.double().chunk(2, dim=-1)
    assert _rel(silu_mul(gu), torch.nn.functional.silu(g) * u) < 1e-2


@pytest.mark.parametrize("t", [1, 9, 130])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 4, 64)])
def test_rope_on_qkv_view(t, heads, kv_heads, head_dim):
    """Rotates the q|k part of a fused qkv output in place of rope.apply_rope (same tables, same layout)."""
    from lmkit.pytorch_engine.kernels.triton.fused import rope
    from lmkit.pytorch_engine.models.rope import apply_rope

    max_pos = 4096
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, : head_dim // 2] *= -1
    cos = emb.cos()
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(t, heads + kv_heads, head_dim)
    pos = torch.randint(0, max_pos, (t,), device="cuda")
    cos_d, sin_d = cos.to("cuda", torch.bfloat16), sin.to("cuda", torch.bfloat16)
    out = rope(qk, pos, cos_d, sin_d)
    ref = apply_rope(qk.double(), cos_d.double()[pos, None], sin_d.double()[pos, None])
    assert out.shape == qk.shape and _rel(out, ref) < 1e-2
