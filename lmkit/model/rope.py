"""Rotary inverse frequencies (default, linear, llama3 scaling), computed exactly as HF transformers does.

Both engines build their cos/sin tables from these, each in the layout its kernels want.
"""

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
