"""Rotary embedding tables (default, linear and llama3 scaling), computed as HF transformers does."""

from __future__ import annotations

import math

import torch

from lmkit.model.spec import ModelSpec


def inv_frequencies(spec: ModelSpec) -> torch.Tensor:
    dim, base, scaling = spec.head_dim, spec.rope_theta, spec.rope_scaling
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    if scaling.type != "llama3":
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


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
