"""Attention kernels over the paged KV cache, picked by device.

Each backend module provides `write_kv(k, v, k_cache, v_cache, slot_mapping)` and
`paged_attention(q, k, v, k_cache, v_cache, meta, scale)`; see attention_cpu.py for the shapes. A CUDA
backend (Triton) plugs in here under "cuda".
"""

from __future__ import annotations

from types import ModuleType

import torch

from lmkit.pytorch_engine.kernels.metadata import AttentionMetadata, PrefillBatch, PrefillChunk

__all__ = ["AttentionMetadata", "PrefillBatch", "PrefillChunk", "attention_backend"]


def attention_backend(device: torch.device | str) -> ModuleType:
    """The kernel module for `device`: the PyTorch implementation until a device-specific one exists."""
    from lmkit.pytorch_engine.kernels import attention_cpu

    return attention_cpu
