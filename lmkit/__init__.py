"""lmkit: one front-end API over two LLM engines (turbo, PyTorch), an OpenAI server, quantization."""

import os

# OpenMP workers spin after each parallel region before they sleep. libgomp's default spin (about 3 ms)
# starves every other process on a small machine (a server beside its clients, several servers on one host:
# a decode step measured 30x slower); sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes every op pay for a
# wake-up (the PyTorch engine's batch-8 decode step on 2 cores, SmolLM2 bf16: 42 ms against 28 ms). About
# 0.1 ms of spinning covers the gaps between one step's ops. Must be set before torch is first imported;
# a user's own OpenMP settings win.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

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
