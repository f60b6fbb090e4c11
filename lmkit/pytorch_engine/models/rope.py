"""Rotary embedding tables (default, linear and llama3 scaling), computed as HF transformers does."""

from __future__ import annotations

import torch

from lmkit.model.rope import inv_frequencies
from lmkit.model.spec import ModelSpec


def rope_tables(spec: ModelSpec, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each [max_positions, head_dim] fp32.

    With x_rot = [x2, x1] (the halves swapped) and sin_signed = [-sin, sin],
    x * cos + x_rot * sin_signed equals HF's x * cos + rotate_half(x) * sin exactly.
    """
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_frequencies(spec)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    half = spec.head_dim // 2
    sin = emb.sin()
    sin[:, :half] = -sin[:, :half]
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin_signed [T, 1, head_dim].

    The halves are swapped with a flip of a size-2 dim rather than a roll: the same values, but an index that
    stays affine in the head dim, which Inductor turns into vector loads (a roll's modulo index is a gather)."""
    t, h, d = x.shape
    return x * cos + x.view(t, h, 2, d // 2).flip(2).view(t, h, d) * sin_signed
