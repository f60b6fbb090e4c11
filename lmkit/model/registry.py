"""Supported architectures and how their HF config maps to a ModelSpec."""

from __future__ import annotations

from typing import Any

from lmkit.model.spec import ModelSpec, RopeScaling

# HF architecture name -> model_type. Every entry is a Llama-family decoder; their differences are
# ModelSpec fields (qkv_bias, qk_norm, sliding_window), not separate code paths.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_BY_MODEL_TYPE = {v: k for k, v in ARCHITECTURES.items()}


class ModelLoadError(Exception):
    """A model that cannot be loaded: missing, corrupt, or not understood."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's architecture is not one lmkit implements."""


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def resolve_architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    model_type = config.get("model_type")
    if not archs and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    found = ", ".join(archs) if archs else f"model_type={model_type!r}"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {found}; supported: {', '.join(supported_architectures())}"
    )


def _rope(config: dict[str, Any]) -> tuple[float, RopeScaling]:
    """rope_theta and scaling from either the transformers-4 keys or transformers-5 `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(f"unsupported rope scaling {rope_type!r}; supported: linear, llama3")
    if rope_type == "default":
        return theta, RopeScaling()
    return theta, RopeScaling(
        type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def spec_from_config(config: dict[str, Any]) -> ModelSpec:
    """Build a ModelSpec from a parsed config.json."""
    arch = resolve_architecture(config)
    model_type = ARCHITECTURES[arch]
    try:
        num_heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        theta, scaling = _rope(config)
        window = config.get("sliding_window") if config.get("use_sliding_window", model_type == "mistral") else None
        return ModelSpec(
            architecture=arch,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden // num_heads),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=_eos_ids(config.get("eos_token_id")),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            quantization=config.get("quantization_config"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json is missing or has a bad field: {e}") from e
