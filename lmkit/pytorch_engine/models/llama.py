"""The Llama-family decoder (Llama, Mistral, Qwen2 with qkv bias, Qwen3 with qk norm) over a paged KV cache.

Weights come HF-named (lmkit.model.loader) and are fused at load: q/k/v into one projection, gate/up into
another, so a layer is four GEMMs. The forward takes a step's flattened tokens (decode tokens and
prefill chunks together) and returns logits only for the rows that sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmkit.model.spec import ModelSpec
from lmkit.pytorch_engine.kernels import AttentionMetadata, attention_backend
from lmkit.pytorch_engine.models.linear import Linear
from lmkit.pytorch_engine.models.rope import apply_rope, rope_tables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The same op order as HF's LlamaRMSNorm, so logits match it bit for bit where the GEMMs do.
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rms_norm_fp32_stats(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of a half-precision x with its statistics in fp32 (as HF's LlamaRMSNorm), in one ATen op."""
    return F.rms_norm(x, weight.shape, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_at(positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
    cos, sin_signed = cos[positions].unsqueeze(1), sin_signed[positions].unsqueeze(1)
    return lambda qk: apply_rope(qk, cos, sin_signed)


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [q_size + 2 * kv_size, hidden], bias [q_size + 2 * kv_size] (Qwen2)
    qk_norm: torch.Tensor | None  # [num_heads + num_kv_heads, head_dim]: q_norm per q head, k_norm per kv head
    o: Linear  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear  # [hidden, intermediate]


class LlamaForCausalLM:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.device = device
        self.kernels = attention_backend(device)

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")
        # Tied to the embedding or not, the LM head gets its own (on CPU, packed) copy of the weight.
        self.lm_head = Linear(self.embed if spec.tie_word_embeddings else w("lm_head.weight"))
        self.norm = w("model.norm.weight")
        self.layers = [self._layer(w, f"model.layers.{i}.") for i in range(spec.num_layers)]
        cos, sin = rope_tables(spec, spec.max_position_embeddings)
        self.rope_cos, self.rope_sin = cos.to(device, dtype), sin.to(device, dtype)
        self.scale = spec.head_dim**-0.5
        self.ops = DecoderOps.for_device(device, dtype)

    def _layer(self, w, p: str) -> LayerWeights:
        spec = self.spec
        attn = p + "self_attn."
        qk_norm = None
        if spec.qk_norm:
            q_norm = w(attn + "q_norm.weight").expand(spec.num_heads, -1)
            qk_norm = torch.cat([q_norm, w(attn + "k_norm.weight").expand(spec.num_kv_heads, -1)])
        return LayerWeights(
            input_norm=w(p + "input_layernorm.weight"),
            qkv=Linear(
                torch.cat([w(attn + f"{n}_proj.weight") for n in "qkv"]),
                torch.cat([w(attn + f"{n}_proj.bias") for n in "qkv"]) if spec.qkv_bias else None,
            ),
            qk_norm=qk_norm,
            o=Linear(w(attn + "o_proj.weight")),
            post_norm=w(p + "post_attention_layernorm.weight"),
            gate_up=Linear(torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])),
            down=Linear(w(p + "mlp.down_proj.weight")),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> logits [len(logits_indices), vocab] of the rows that sample."""
        eps = self.spec.rms_norm_eps
        norm, ops = self.ops.rms_norm, self.ops
        rope = ops.rope_at(positions, self.rope_cos, self.rope_sin)
        h = F.embedding(input_ids, self.embed)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            attn = self._attention(norm(h, layer.input_norm, eps), layer, rope, meta, k_cache, v_cache)
            h = layer.o.add(attn, h)
            h = layer.down.add(ops.silu_mul(layer.gate_up(norm(h, layer.post_norm, eps))), h)
        return self.lm_head(norm(h[logits_indices], self.norm, eps))

    def _attention(self, x, layer: LayerWeights, rope, meta, k_cache, v_cache) -> torch.Tensor:
        spec = self.spec
        t, nh, nkv, hd = x.shape[0], spec.num_heads, spec.num_kv_heads, spec.head_dim
        qkv = layer.qkv(x)
        qk = qkv[:, : (nh + nkv) * hd].view(t, nh + nkv, hd)
        v = qkv[:, (nh + nkv) * hd :].view(t, nkv, hd)
        if layer.qk_norm is not None:
            qk = rms_norm(qk, layer.qk_norm, spec.rms_norm_eps)
        qk = rope(qk)
        q, k = qk[:, :nh], qk[:, nh:]
        self.kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = self.kernels.paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return out.reshape(t, nh * hd)


@dataclass(frozen=True)
class DecoderOps:
    """The element-wise ops of a layer: PyTorch by default (bit-compatible with HF's op order), fused Triton
    kernels on CUDA in half precision (kernels/triton/fused.py; fewer launches, fp32 math), and on CPU in half
    precision an RMSNorm whose statistics are fp32."""

    rms_norm: Callable = rms_norm
    silu_mul: Callable = silu_mul
    rope_at: Callable = rope_at
    """(positions, cos, sin_signed) -> a function that rotates qk [T, heads, head_dim]."""

    @staticmethod
    def for_device(device: torch.device, dtype: torch.dtype) -> DecoderOps:
        if dtype == torch.float32:
            return DecoderOps()
        if device.type != "cuda":
            return DecoderOps(rms_norm=rms_norm_fp32_stats)
        from lmkit.pytorch_engine.kernels.triton import fused

        return DecoderOps(
            fused.rms_norm, fused.silu_mul, lambda pos, cos, sin: lambda qk: fused.rope(qk, pos, cos, sin)
        )
