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
from lmkit.pytorch_engine.models.compiled import CompiledFunction
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
        compile: bool = False,
    ):
        """compile: run the layers (CPU) compiled by Inductor (see `decode_path` and `prefill_path`)."""
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
        # CPU: decode-only steps over the dense KV rows run each layer as one compiled graph; other steps of more
        # than one token run the two halves of each layer compiled, with the paged attention between them.
        # Two compilations of the decode layer: for dense rows whose keys are plain, and tiled (decode_kv_cpu.py).
        self.decode_path = CompiledPath("decode", (self._decode_layer, self._decode_layer), enabled=compile)
        self.prefill_path = CompiledPath("prefill", (self._attention_inputs, self._attention_output), enabled=compile)

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
        if meta.decode_window is not None and meta.num_decode == input_ids.shape[0] and self.decode_path.on:
            mark_batch_dynamic(h, *rope, meta.slot_mapping)
            h = self.decode_path.run(
                lambda plain, tiled: self._layers_over_rows(
                    tiled if meta.decode_window.tiled else plain, h, rope, meta, kv_caches
                )
            )
        elif h.shape[0] > 1 and self.prefill_path.on:
            mark_batch_dynamic(h, *rope)
            h = self.prefill_path.run(lambda pre, post: self._paged_layers(pre, post, h, rope, meta, kv_caches))
        else:
            h = self._paged_layers(self._attention_inputs, self._attention_output, h, rope, meta, kv_caches)
        return self.lm_head(self.ops.rms_norm(h[logits_indices], self.norm, self.spec.rms_norm_eps))

    def _layers_over_rows(self, layer_fn: Callable, h, rope, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        """A decode-only step over the dense KV rows (CPU): each layer is one `layer_fn`, attention included."""
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            rows = meta.decode_window.layer_inputs(i)
            h = layer_fn(h, layer, rope, (k_cache, v_cache, meta.slot_mapping, *rows))
        return h

    def _paged_layers(self, pre: Callable, post: Callable, h, rope, meta: AttentionMetadata, kv_caches):
        """Any step, with attention over the paged cache between each layer's `pre` and `post` halves."""
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            q, k, v = pre(h, layer, rope)
            attn = self._paged_attention(q, k, v, k_cache, v_cache, meta, self.scale).contiguous()
            mark_batch_dynamic(attn)  # comes from eager code: else `post` specializes on the step's size
            h = post(attn, h, layer)
        return h

    def _layer(self, h: torch.Tensor, layer: LayerWeights, rope: tuple, attention: Callable, attn_args: tuple):
        """One decoder layer: h [T, hidden] -> h. attention(q, k, v, *attn_args) -> [T, ...] of T * q_size."""
        q, k, v = self._attention_inputs(h, layer, rope)
        return self._attention_output(attention(q, k, v, *attn_args, self.scale), h, layer)

    def _decode_layer(self, h: torch.Tensor, layer: LayerWeights, rope: tuple, attn_args: tuple) -> torch.Tensor:
        """`_layer` with the decode-only attention over the dense KV rows (CPU)."""
        return self._layer(h, layer, rope, decode_attention, attn_args)

    def _attention_inputs(self, h: torch.Tensor, layer: LayerWeights, rope: tuple) -> tuple[torch.Tensor, ...]:
        """The first half of a layer: h [T, hidden] -> q [T, heads, D], k and v [T, kv_heads, D]."""
        spec, ops, eps = self.spec, self.ops, self.spec.rms_norm_eps
        t, nh, nkv, hd = h.shape[0], spec.num_heads, spec.num_kv_heads, spec.head_dim
        qkv = layer.qkv(ops.rms_norm(h, layer.input_norm, eps))
        qk = qkv[:, : (nh + nkv) * hd].view(t, nh + nkv, hd)
        v = qkv[:, (nh + nkv) * hd :].view(t, nkv, hd)
        if layer.qk_norm is not None:
            qk = rms_norm(qk, layer.qk_norm, eps)
        qk = ops.rope(qk, *rope)
        return qk[:, :nh], qk[:, nh:], v

    def _attention_output(self, attn: torch.Tensor, h: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        """The second half of a layer: the attention's output and the residual h -> the layer's output."""
        ops, eps = self.ops, self.spec.rms_norm_eps
        h = layer.o.add(attn.reshape(h.shape[0], -1), h)
        return layer.down.add(ops.silu_mul(layer.gate_up(ops.rms_norm(h, layer.post_norm, eps))), h)

    def _paged_attention(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self.kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.kernels.paged_attention(q, k, v, k_cache, v_cache, meta, scale)


class CompiledPath:
    """Functions compiled by Inductor (`CompiledFunction`), with their eager originals to fall back on.

    If the first compiled run fails (no C++ compiler, say), the path says why in one line and runs eagerly from
    then on. A run that is retried must be exact: one that failed part-way wrote the same keys and values to the
    same places as the retry will. A failure after a compiled run has succeeded is raised."""

    def __init__(self, name: str, fns: tuple[Callable, ...], enabled: bool):
        self.name = name
        self.eager = fns
        self.compiled = tuple(CompiledFunction(f) for f in fns) if enabled else None
        self.ran = False  # a compiled run has succeeded

    @property
    def on(self) -> bool:
        return self.compiled is not None

    def run(self, body: Callable):
        """body(*functions), with the compiled ones unless they are off or fail on their first run."""
        if self.compiled is None:
            return body(*self.eager)
        try:
            out = body(*self.compiled)
        except Exception as e:
            if self.ran:
                raise
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"[lmkit] compiling the {self.name} step failed, running it eagerly ({why})", file=sys.stderr)
            self.compiled = None
            return body(*self.eager)
        self.ran = True
        return out


def mark_batch_dynamic(*tensors: torch.Tensor) -> None:
    """Mark dim 0 (the batch) of these dynamic for the compiled layers: one graph for every batch size > 1."""
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
