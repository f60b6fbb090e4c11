"""Rotary embedding tables (default, linear and llama3 scaling), computed as HF transformers does."""

from __future__ import annotations

import torch

from lmkit.model.rope import inv_frequencies
from lmkit.model.spec import ModelSpec


def rope_tables(spec: ModelSpec, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each [max_positions, head_dim] fp32.

    With x_rot = x.roll(head_dim // 2) = [x2, x1] and sin_signed = [-sin, sin],
    x * cos + x_rot * sin_signed equals HF's x * cos + rotate_half(x) * sin exactly.
    """
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_frequencies(spec)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    half = spec.head_dim // 2
    sin = emb.sin()
    sin[:, :half] = -sin[:, :half]
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin_signed [T, 1, head_dim]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
