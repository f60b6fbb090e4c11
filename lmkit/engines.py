"""The one registry of engine backends: name -> engine class, config class, availability and support checks.

Backend names appear here and nowhere else; the front-end asks `Engine.capabilities`.
`build_async_engine` is the one call every entry point (pipeline, chat, api_server, gradio) uses.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmkit.messages import PytorchEngineConfig, TurboEngineConfig
from lmkit.model.spec import ModelSpec

EngineConfig = PytorchEngineConfig | TurboEngineConfig

# Fields that mean the same thing under different names: (pytorch name, turbo name).
_RENAMES = [("block_size", "cache_block_seq_len"), ("num_gpu_blocks", "num_blocks")]


@dataclass(frozen=True)
class Backend:
    """One engine backend."""

    name: str
    engine_path: str
    """"module:Class" of the engine; imported lazily (an ImportError means "not available")."""
    config_cls: type
    extension: str | None = None
    """A compiled module the engine needs (checked first, for a clear reason)."""

    def load(self) -> type:
        if self.extension:
            importlib.import_module(self.extension)
        module, cls = self.engine_path.split(":")
        return getattr(importlib.import_module(module), cls)

    def available(self) -> tuple[bool, str]:
        try:
            self.load()
        except ImportError as exc:
            return False, f"not available ({exc})"
        return True, ""

    def supports(self, spec: ModelSpec, device: str) -> tuple[bool, str]:
        """Whether this backend runs `spec` on `device`; the engine class may define `supports(spec, device)`."""
        ok, why = self.available()
        if not ok:
            return ok, why
        check: Callable | None = getattr(self.load(), "supports", None)
        if check is None:
            return True, ""
        result = check(spec, device)
        if isinstance(result, tuple):
            return bool(result[0]), str(result[1])
        return bool(result), "" if result else f"does not support {spec.architecture} on {device}"


BACKENDS: dict[str, Backend] = {
    "turbo": Backend("turbo", "lmkit.turbo.engine:TurboEngine", TurboEngineConfig, extension="lmkit._turbo"),
    "pytorch": Backend("pytorch", "lmkit.pytorch_engine.engine:PytorchEngine", PytorchEngineConfig),
}
AUTO_ORDER = ["turbo", "pytorch"]
"""`--backend auto` takes the first backend here that is available and supports the model and device."""


def backend_names() -> list[str]:
    return list(BACKENDS)


def make_config(backend: str, fields: dict) -> EngineConfig:
    """The config of `backend` from user-given `fields` (either engine's names); unknown ones are dropped."""
    target = BACKENDS[backend].config_cls
    target_fields = {f.name for f in dataclasses.fields(target)}
    renames = {a: b for a, b in _RENAMES} | {b: a for a, b in _RENAMES}
    values, dropped = {}, []
    for name, value in fields.items():
        mapped = name if name in target_fields else renames.get(name)
        if mapped in target_fields:
            values[mapped] = value
        else:
            dropped.append(name)
    if dropped:
        print(f"[lmkit] the {backend} engine has no {', '.join(dropped)}; ignored", file=sys.stderr)
    return target(**values)


def convert_config(config: EngineConfig | None, backend: str) -> EngineConfig:
    """`config` for `backend`: kept as is when it is that engine's config, else its non-default fields mapped."""
    target = BACKENDS[backend].config_cls
    if config is None:
        return target()
    if isinstance(config, target):
        return config
    defaults = type(config)()  # a default of the other engine is no choice of the user's
    given = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(defaults, f.name)
    }
    return make_config(backend, given)


def _device(config: EngineConfig | None) -> str:
    device = getattr(config, "device", "auto") if config is not None else "auto"
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def choose_backend(spec: ModelSpec, backend: str, config: EngineConfig | None) -> str:
    """The backend to run: `backend` itself, or for "auto" the first of AUTO_ORDER that fits (and why). As in
    LMDeploy, "auto" with a PytorchEngineConfig means the PyTorch engine."""
    if backend == "auto" and isinstance(config, PytorchEngineConfig):
        print("[lmkit] backend auto -> pytorch (a PytorchEngineConfig was given)", file=sys.stderr, flush=True)
        backend = "pytorch"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
        ok, why = BACKENDS[backend].available()
        if not ok:
            raise RuntimeError(f"backend {backend!r} is {why}")
        return backend
    device = _device(config)
    reasons = []
    for name in AUTO_ORDER:
        ok, why = BACKENDS[name].supports(spec, device)
        if ok:
            note = f" ({'; '.join(reasons)})" if reasons else ""
            print(f"[lmkit] backend auto -> {name} on {device}{note}", file=sys.stderr, flush=True)
            return name
        reasons.append(f"{name}: {why}")
    raise RuntimeError(f"no backend runs this model on {device}: {'; '.join(reasons)}")


def create_engine(model_path: str | Path, backend: str = "auto", config: EngineConfig | None = None):
    """Start an engine on a resolved model folder. Returns (engine, backend_name)."""
    from lmkit.model.loader import load_spec

    spec = load_spec(model_path)
    name = choose_backend(spec, backend, config)
    entry = BACKENDS[name]
    engine = entry.load()(model_path, convert_config(config, name))
    return engine, name


def default_model_name(model: str | Path | None, path: Path) -> str:
    """A readable model name: the default model's, a GGUF file's stem, or the folder's name."""
    if model is None:
        from lmkit.model.gguf import DEFAULT_MODEL_FILE

        return DEFAULT_MODEL_FILE.split(".")[0]
    return Path(model).stem if str(model).endswith(".gguf") else Path(model).resolve().name


def build_async_engine(
    model: str | Path | None = None,
    backend: str = "auto",
    backend_config: EngineConfig | None = None,
    model_name: str | None = None,
):
    """Resolve the model (None = the default model), start the engine, wrap it in an AsyncEngine."""
    from lmkit.frontend.async_engine import AsyncEngine
    from lmkit.frontend.tokenizer import Tokenizer
    from lmkit.model.loader import resolve_model_path

    path = resolve_model_path(model)
    engine, name = create_engine(path, backend, backend_config)
    try:
        tokenizer = Tokenizer(path)
    except Exception:
        engine.shutdown()
        raise
    return AsyncEngine(engine, tokenizer, model_name or default_model_name(model, path), name)
