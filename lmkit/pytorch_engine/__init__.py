"""The PyTorch engine: paged KV cache, continuous batching, chunked prefill, prefix caching."""

from lmkit.pytorch_engine.engine import PytorchEngine

__all__ = ["PytorchEngine"]
