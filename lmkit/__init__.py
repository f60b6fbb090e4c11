"""lmkit: one front-end API over two LLM engines (turbo, PyTorch), an OpenAI server, quantization."""

import os

# OpenMP threads that spin after each parallel region starve every other process on a small machine (a
# server beside its clients, several servers on one host): a decode step measured 30x slower. Sleeping
# threads cost little here. Must be set before torch is first imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lmkit.messages import GenerationConfig, PytorchEngineConfig, Response, TurboEngineConfig  # noqa: E402

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
