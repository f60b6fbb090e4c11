"""Random weights in a model's real shapes (`load_format="dummy"`), for speed work: speed does not depend
on weight values, and a 16 GB checkpoint need not exist to measure an 8B model."""

from __future__ import annotations

import torch

from lmkit.model.spec import ModelSpec


def weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Canonical (HF) name -> shape of every weight of `spec`."""
    h, i = spec.hidden_size, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (spec.vocab_size, h),
    }
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (spec.q_size, h),
                p + "self_attn.k_proj.weight": (spec.kv_size, h),
                p + "self_attn.v_proj.weight": (spec.kv_size, h),
                p + "self_attn.o_proj.weight": (h, spec.q_size),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
        if spec.qkv_bias:
            shapes.update(
                {
                    p + f"self_attn.{x}_proj.bias": (s,)
                    for x, s in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size))
                }
            )
        if spec.qk_norm:
            shapes.update(
                {p + "self_attn.q_norm.weight": (spec.head_dim,), p + "self_attn.k_norm.weight": (spec.head_dim,)}
            )
    return shapes


def dummy_weights(
    spec: ModelSpec, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Seeded random weights: norms near 1, matrices with std 1/sqrt(fan_in) so activations stay finite."""
    g = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(spec).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.rand(shape, generator=g, device=device)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=g, device=device)
        else:
            t = torch.randn(shape, generator=g, device=device) * shape[-1] ** -0.5
        out[name] = t.to(dtype)
    if spec.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
