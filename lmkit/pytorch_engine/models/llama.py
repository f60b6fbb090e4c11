"""The Llama-family decoder (Llama, Mistral, Qwen2 with qkv bias, Qwen3 with qk norm) over a paged KV cache.

Weights come HF-named (lmkit.model.loader) and are fused at load: q/k/v into one projection, gate/up into
another, so a layer is four GEMMs. The forward takes a step's flattened tokens (decode tokens and
prefill chunks together) and returns logits only for the rows that sample.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmkit.model.spec import ModelSpec
from lmkit.pytorch_engine.kernels import AttentionMetadata, attention_backend
from lmkit.pytorch_engine.kernels.decode_kv_cpu import decode_attention
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


def rope_inputs(positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The step's rotary inputs for `apply_rope`: the tables' rows at the positions, [T, 1, head_dim] each."""
    return cos[positions].unsqueeze(1), sin_signed[positions].unsqueeze(1)


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
    def __init__(
        self,
        spec: ModelSpec,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        compile_decode: bool = False,
    ):
        """compile_decode: run decode-only steps over dense KV rows (CPU) through `torch.compile`d layers."""
        self.spec = spec
        self.device = device
        self.kernels = attention_backend(device)

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")
        # Tied to the embedding or not, the LM head gets its own (on CPU, packed) copy of the weight.
        self.lm_head = Linear(self.embed if spec.tie_word_embeddings else w("lm_head.weight"))
        self.norm = w("model.norm.weight")
        self.layers = [self._layer_weights(w, f"model.layers.{i}.") for i in range(spec.num_layers)]
        cos, sin = rope_tables(spec, spec.max_position_embeddings)
        self.rope_cos, self.rope_sin = cos.to(device, dtype), sin.to(device, dtype)
        self.scale = spec.head_dim**-0.5
        self.ops = DecoderOps.for_device(device, dtype)
        self._compiled_layer = torch.compile(self._layer) if compile_decode else None
        self._compiled_once = False

    @property
    def compiles_decode(self) -> bool:
        """Whether decode-only steps over dense KV rows run through the compiled layer (else eagerly)."""
        return self._compiled_layer is not None

    def _layer_weights(self, w, p: str) -> LayerWeights:
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
        rope = self.ops.rope_inputs(positions, self.rope_cos, self.rope_sin)
        h = F.embedding(input_ids, self.embed)
        decode_only = meta.num_decode == input_ids.shape[0]
        if self._compiled_layer is not None and meta.decode_window is not None and decode_only:
            h = self._decode_over_rows(h, rope, meta, kv_caches)
        else:
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                h = self._layer(h, layer, rope, self._paged_attention, (k_cache, v_cache, meta))
        return self.lm_head(self.ops.rms_norm(h[logits_indices], self.norm, self.spec.rms_norm_eps))

    def _decode_over_rows(self, h, rope, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        """A decode-only step over the dense KV rows (CPU), each layer through the compiled `_layer`.

        If the first compilation fails (no C++ compiler, say), decode steps run eagerly from then on. The retry
        is exact: the layers that ran wrote the same keys and values to the same places as the eager run will."""
        mark_batch_dynamic(h, *rope, meta.slot_mapping)
        try:
            out = self._layers_over_rows(self._compiled_layer, h, rope, meta, kv_caches)
        except Exception as e:
            if self._compiled_once:
                raise
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"[lmkit] torch.compile of the decode step failed, decoding eagerly ({why})", file=sys.stderr)
            self._compiled_layer = None
            return self._layers_over_rows(self._layer, h, rope, meta, kv_caches)
        self._compiled_once = True
        return out

    def _layers_over_rows(self, layer_fn: Callable, h, rope, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            rows = meta.decode_window.layer_inputs(i)
            h = layer_fn(h, layer, rope, decode_attention, (k_cache, v_cache, meta.slot_mapping, *rows))
        return h

    def _layer(self, h: torch.Tensor, layer: LayerWeights, rope: tuple, attention: Callable, attn_args: tuple):
        """One decoder layer: h [T, hidden] -> h. attention(q, k, v, *attn_args) -> [T, ...] of T * q_size."""
        spec, ops, eps = self.spec, self.ops, self.spec.rms_norm_eps
        t, nh, nkv, hd = h.shape[0], spec.num_heads, spec.num_kv_heads, spec.head_dim
        qkv = layer.qkv(ops.rms_norm(h, layer.input_norm, eps))
        qk = qkv[:, : (nh + nkv) * hd].view(t, nh + nkv, hd)
        v = qkv[:, (nh + nkv) * hd :].view(t, nkv, hd)
        if layer.qk_norm is not None:
            qk = rms_norm(qk, layer.qk_norm, eps)
        qk = ops.rope(qk, *rope)
        attn = attention(qk[:, :nh], qk[:, nh:], v, *attn_args, self.scale)
        h = layer.o.add(attn.reshape(t, nh * hd), h)
        return layer.down.add(ops.silu_mul(layer.gate_up(ops.rms_norm(h, layer.post_norm, eps))), h)

    def _paged_attention(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self.kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.kernels.paged_attention(q, k, v, k_cache, v_cache, meta, scale)


def mark_batch_dynamic(*tensors: torch.Tensor) -> None:
    """Let torch.compile treat dim 0 (the batch) of these as dynamic: one graph for every batch size > 1."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


@dataclass(frozen=True)
class DecoderOps:
    """The element-wise ops of a layer: PyTorch by default (bit-compatible with HF's op order), fused Triton
    kernels on CUDA in half precision (kernels/triton/fused.py; fewer launches, fp32 math), and on CPU in half
    precision an RMSNorm whose statistics are fp32."""

    rms_norm: Callable = rms_norm
    silu_mul: Callable = silu_mul
    rope_inputs: Callable = rope_inputs
    """(positions, cos, sin_signed) -> the step's rotary inputs, a tuple of tensors, computed once per step."""
    rope: Callable = apply_rope
    """(qk [T, heads, head_dim], *rope_inputs) -> qk rotated."""

    @staticmethod
    def for_device(device: torch.device, dtype: torch.dtype) -> DecoderOps:
        if dtype == torch.float32:
            return DecoderOps()
        if device.type != "cuda":
            return DecoderOps(rms_norm=rms_norm_fp32_stats)
        from lmkit.pytorch_engine.kernels.triton import fused

        return DecoderOps(fused.rms_norm, fused.silu_mul, lambda pos, cos, sin: (pos, cos, sin), fused.rope)
