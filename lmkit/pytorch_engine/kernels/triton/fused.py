"""Fused element-wise kernels for the decoder on CUDA: RMSNorm, SiLU·mul, rotary embedding (Triton).

Each replaces a chain of PyTorch ops (RMSNorm is six kernels, SiLU·mul two, rotary with its table gathers
five) by one launch. At batch 1 a kernel on a 4096-wide row runs in ~2 µs whatever it computes, so the
decode step is paid in launches: Llama-3-8B's 32 layers issued ~370 of these small kernels per token.
Math is in fp32; inputs and outputs keep their dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, W, Out, stride_x, stride_o, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (x * inv * w).to(Out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, n] (unit stride in n), weight [n] -> weight * x / rms(x), in x's dtype."""
    rows, n = x.shape
    assert x.stride(1) == 1 and weight.shape == (n,)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](
            x, weight, out, x.stride(0), n, n, eps, BLOCK=block, num_warps=min(16, block // 256) or 1
        )
    return out


@triton.jit
def _silu_mul_kernel(GateUp, Out, stride_g, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(GateUp + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_g + n + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2 * n] = [gate | up] -> silu(gate) * up [rows, n]."""
    rows, n2 = gate_up.shape
    assert gate_up.stride(1) == 1 and n2 % 2 == 0
    n = n2 // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 2048
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), n, n, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rope_kernel(
    X, Pos, Cos, Sin, Out, stride_xt, stride_xh, stride_ot, stride_oh, stride_c, heads, HALF: tl.constexpr
):
    t = tl.program_id(0)
    h = tl.program_id(1) * 4 + tl.arange(0, 4)  # 4 heads per program
    d = tl.arange(0, HALF)
    hmask = (h < heads)[:, None]
    pos = tl.load(Pos + t)
    # cos [P, head_dim] repeats its first half; sin_signed is [-sin | sin] (see rope.py).
    cos = tl.load(Cos + pos * stride_c + d).to(tl.float32)[None, :]
    sin = tl.load(Sin + pos * stride_c + HALF + d).to(tl.float32)[None, :]
    base = X + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(base, mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=hmask, other=0.0).to(tl.float32)
    obase = Out + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(obase, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=hmask)
    tl.store(obase + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=hmask)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] (unit stride in head_dim), positions [T]; cos, sin_signed [P, head_dim] -> the
    rotated x, contiguous. Equals rope.apply_rope(x, cos[positions, None], sin_signed[positions, None])."""
    t, heads, hd = x.shape
    assert x.stride(2) == 1 and cos.stride(1) == 1 and sin_signed.stride() == cos.stride()
    out = torch.empty(t, heads, hd, dtype=x.dtype, device=x.device)
    if t:
        grid = (t, triton.cdiv(heads, 4))
        _rope_kernel[grid](
            x, positions, cos, sin_signed, out, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            cos.stride(0), heads, HALF=hd // 2, num_warps=2,
        )  # fmt: skip
    return out
