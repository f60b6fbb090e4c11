"""Turn a model argument (None, a HF folder, a GGUF file) into a ModelSpec and canonical weights.

Canonical weights use HF Llama names (`model.layers.{i}.self_attn.q_proj.weight`, ...); `lm_head.weight`
is always present (the embedding itself when tied). Each engine lays them out its own way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkit.model.gguf import convert_gguf, default_gguf_path
from lmkit.model.registry import ModelLoadError, spec_from_config
from lmkit.model.spec import ModelSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for an engine: its spec, HF-named weights, and the folder (tokenizer lives there)."""

    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    path: Path


def resolve_model_path(model: str | Path | None) -> Path:
    """None -> the default model; a .gguf file -> its converted (cached) HF folder; a folder -> itself."""
    if model is None:
        return convert_gguf(default_gguf_path())
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path '{model}' does not exist (give a HF checkpoint folder or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"'{model}' is neither a .gguf file nor a HF checkpoint folder")
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"'{model}' has no config.json: not a HF checkpoint folder")
    return path


def load_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e


def load_spec(path: str | Path) -> ModelSpec:
    """The ModelSpec of a HF checkpoint folder (generation_config.json's EOS ids take precedence)."""
    path = Path(path)
    spec = spec_from_config(load_config(path))
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {gen_path}: {e}") from e
        if eos is not None:
            from dataclasses import replace

            spec = replace(spec, eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),))
    return spec


def _weight_files(path: Path) -> list[Path]:
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise ModelLoadError(f"no weights (*.safetensors or *.bin) in '{path}'")


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many different types
        raise ModelLoadError(f"cannot read weights from '{file}': {e}") from e


def _check_weights(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        need += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        need += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        need += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if spec.qkv_bias:
            need += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        if spec.qk_norm:
            need += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    missing = [n for n in need if n not in weights]
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
    emb = weights["model.embed_tokens.weight"]
    if tuple(emb.shape) != (spec.vocab_size, spec.hidden_size):
        raise ModelLoadError(f"embedding shape {tuple(emb.shape)} does not match config")


def load_weights(path: str | Path, spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All weights of the checkpoint under canonical names, cast to `dtype` (on CPU)."""
    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        for name, tensor in _read_file(file).items():
            if "rotary_emb.inv_freq" in name:
                continue
            weights[name] = tensor.to(dtype)
    if "lm_head.weight" not in weights:
        if not spec.tie_word_embeddings and "model.embed_tokens.weight" in weights:
            raise ModelLoadError("checkpoint has no lm_head.weight and does not tie word embeddings")
        weights["lm_head.weight"] = weights.get("model.embed_tokens.weight")
    _check_weights(spec, weights)
    return weights


def load_model(
    model: str | Path | None,
    dtype: torch.dtype | str = torch.float32,
    load_format: str = "auto",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Resolve, read the spec and load the weights of `model` (None = the default model).

    load_format "dummy" makes seeded random weights in the checkpoint's shapes on `device` (the folder
    needs only config.json); "auto" reads the checkpoint's files onto the CPU.
    """
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    path = resolve_model_path(model)
    spec = load_spec(path)
    if load_format == "dummy":
        from lmkit.model.dummy import dummy_weights

        return LoadedModel(spec=spec, weights=dummy_weights(spec, dtype, device), path=path)
    if load_format != "auto":
        raise ModelLoadError(f"unknown load_format {load_format!r}; use 'auto' or 'dummy'")
    return LoadedModel(spec=spec, weights=load_weights(path, spec, dtype), path=path)
