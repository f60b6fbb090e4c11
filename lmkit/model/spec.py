"""ModelSpec: the architecture facts both engines need, read from a HF config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling. `type` is "default" (none), "linear", or "llama3"."""

    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only transformer of the Llama family (Llama, Mistral, Qwen2, Qwen3)."""

    architecture: str
    """The HF architecture name, e.g. "LlamaForCausalLM"."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False
    """Qwen2: q/k/v projections carry a bias."""
    qk_norm: bool = False
    """Qwen3: per-head RMSNorm on q and k before rotary."""
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    """Mistral's window; None when attention is global."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    """The checkpoint's dtype."""
    quantization: dict[str, Any] | None = None
    """`quantization_config` of the checkpoint (AWQ), or None for dense weights."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
