"""lmkit: one front-end API over two LLM engines (turbo, PyTorch), an OpenAI server, quantization."""

from lmkit.messages import GenerationConfig, PytorchEngineConfig, Response, TurboEngineConfig

__version__ = "0.1.0"
__all__ = [
    "pipeline",
    "Pipeline",
    "GenerationConfig",
    "PytorchEngineConfig",
    "TurboEngineConfig",
    "Response",
    "__version__",
]


def __getattr__(name: str):
    # The pipeline pulls in torch and transformers: import it on first use, so `import lmkit` stays light.
    if name in ("pipeline", "Pipeline"):
        from lmkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmkit' has no attribute {name!r}")
