"""Turbo's weight layout: HF-named weights (lmkit.model.loader) -> fused, contiguous tensors on the engine's
device in the engine's dtype (float32 on CPU; bfloat16, float16 or float32 on CUDA); rope tables stay float32.

embed, norm, lm_head, rope.cos, rope.sin [P, head_dim/2],
layers.{i}.input_norm, qkv ([q; k; v] rows), qkv_bias (Qwen2), q_norm/k_norm (Qwen3), o,
post_norm, gate_up ([gate; up] rows), down
"""

from __future__ import annotations

import torch

from lmkit.model.rope import inv_frequencies
from lmkit.model.spec import ModelSpec


def rope_tables(spec: ModelSpec, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_positions, head_dim / 2] fp32 (the kernel rotates the two halves)."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_frequencies(spec)[None, :]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def turbo_weights(
    spec: ModelSpec,
    weights: dict[str, torch.Tensor],
    max_positions: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Fuse and rename HF weights for the C++ engine. Consumes `weights` (entries are popped as they go)."""

    def conv(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=dtype).contiguous()

    out: dict[str, torch.Tensor] = {}
    embed = weights.pop("model.embed_tokens.weight")
    lm_head = weights.pop("lm_head.weight")
    out["embed"] = conv(embed)
    out["lm_head"] = out["embed"] if lm_head is embed or lm_head.data_ptr() == embed.data_ptr() else conv(lm_head)
    out["norm"] = conv(weights.pop("model.norm.weight"))
    out["rope.cos"], out["rope.sin"] = (t.to(device) for t in rope_tables(spec, max_positions))
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        q = f"layers.{i}."
        attn = [weights.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        out[q + "qkv"] = conv(torch.cat(attn, dim=0))
        if spec.qkv_bias:
            out[q + "qkv_bias"] = conv(torch.cat([weights.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
        if spec.qk_norm:
            out[q + "q_norm"] = conv(weights.pop(p + "self_attn.q_norm.weight"))
            out[q + "k_norm"] = conv(weights.pop(p + "self_attn.k_norm.weight"))
        out[q + "o"] = conv(weights.pop(p + "self_attn.o_proj.weight"))
        gate_up = [weights.pop(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
        out[q + "gate_up"] = conv(torch.cat(gate_up, dim=0))
        out[q + "down"] = conv(weights.pop(p + "mlp.down_proj.weight"))
        out[q + "input_norm"] = conv(weights.pop(p + "input_layernorm.weight"))
        out[q + "post_norm"] = conv(weights.pop(p + "post_attention_layernorm.weight"))
    return out
