"""Tiny random-weight checkpoints of each supported family, saved with transformers (test references)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(kind: str):
    """A transformers config of a tiny model of the given family."""
    import transformers as tf

    if kind == "llama":
        return tf.LlamaConfig(**TINY_COMMON, rope_theta=10000.0, tie_word_embeddings=True)
    if kind == "llama31":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return tf.LlamaConfig(**TINY_COMMON, rope_parameters=rope, tie_word_embeddings=False)
    if kind == "mistral":
        return tf.MistralConfig(**TINY_COMMON, rope_theta=10000.0, sliding_window=None)
    if kind == "qwen2":
        return tf.Qwen2Config(**TINY_COMMON, rope_theta=1000000.0, tie_word_embeddings=False)
    if kind == "qwen3":
        return tf.Qwen3Config(**TINY_COMMON, rope_theta=1000000.0, tie_word_embeddings=True)
    raise ValueError(kind)


def make_tiny_model(kind: str, out: Path, seed: int = 0) -> Path:
    """Save a random-weight tiny checkpoint of `kind` to `out` (safetensors + config)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases so every weight matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(out))
    return out
