"""Attention kernels over the paged KV cache, picked by device.

Each backend module provides `allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device)`
(the pool's layout is the backend's choice), `write_kv(k, v, k_cache, v_cache, slot_mapping)` and
`paged_attention(q, k, v, k_cache, v_cache, meta, scale)`; see attention_cpu.py for the shapes. A CUDA
backend (Triton) plugs in here under "cuda".
"""

from __future__ import annotations

from types import ModuleType

import torch

from lmkit.pytorch_engine.kernels.metadata import AttentionMetadata, PrefillBatch, PrefillChunk

__all__ = ["AttentionMetadata", "PrefillBatch", "PrefillChunk", "attention_backend", "reads_paged_cache"]


def attention_backend(device: torch.device | str) -> ModuleType:
    """The kernel module for `device`: Triton kernels on CUDA, the PyTorch implementation elsewhere."""
    if torch.device(device).type == "cuda":
        from lmkit.pytorch_engine.kernels import attention_triton

        return attention_triton
    from lmkit.pytorch_engine.kernels import attention_cpu

    return attention_cpu


def reads_paged_cache(device: torch.device | str) -> bool:
    """Whether the backend takes block tables + packed lengths (else per-chunk slots and masks)."""
    return torch.device(device).type == "cuda"
