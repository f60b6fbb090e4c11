"""TurboEngine: the Engine protocol over the C++ engine (lmkit._turbo).

The batching loop, scheduler, block manager, model and sampler all run in C++ on the engine's own thread,
which never takes the GIL; this class validates requests, converts types, and waits on `get_outputs` with
the GIL released.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

from lmkit import _turbo
from lmkit.cpu_threads import in_passing_thread
from lmkit.frontend.protocol import (
    EngineCapabilities,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    InvalidRequestError,
    TokenLogprob,
    check_request,
)
from lmkit.messages import TurboEngineConfig
from lmkit.model.loader import load_model
from lmkit.model.spec import ModelSpec
from lmkit.turbo.weights import turbo_weights

_REASONS = {1: FinishReason.STOP, 2: FinishReason.LENGTH, 3: FinishReason.ABORT, 4: FinishReason.ERROR}
_MASK64 = (1 << 64) - 1


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Head dims the CUDA attention kernels are instantiated for.
_CUDA_HEAD_DIMS = (64, 128)


def kv_bytes_per_block(spec: ModelSpec, block_size: int, elem_bytes: int = 4) -> int:
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem_bytes


def cuda_built() -> bool:
    """Whether lmkit._turbo was built with its CUDA kernels."""
    return bool(getattr(_turbo, "cuda_built", lambda: False)())


def _resolve_device(name: str) -> str:
    """Device "auto": cuda when a GPU is visible and the extension has CUDA kernels, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() and cuda_built() else "cpu"
    return name


def _resolve_dtype(name: str, device: str) -> torch.dtype:
    """Dtype "auto": bfloat16 on CUDA, float32 on CPU. The CPU kernels compute in float32 only."""
    if device == "cpu":
        if name not in ("auto", "float32"):
            print(f"[lmkit] turbo on CPU computes in float32 (dtype {name!r} ignored)", file=sys.stderr)
        return torch.float32
    if name == "auto":
        return torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"turbo: unknown dtype {name!r}; use auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def _cuda_num_blocks(config: TurboEngineConfig, bytes_per_block: int, device: str) -> int:
    """KV blocks from cache_max_entry_count x the GPU memory free once the weights are on the device."""
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()  # memory cached by torch's allocator (e.g. from loading) counts as free here
    free, _ = torch.cuda.mem_get_info(dev)
    return max(1, int(free * config.cache_max_entry_count // bytes_per_block))


def model_config(spec: ModelSpec) -> _turbo.ModelConfig:
    """The C++ model config of `spec` (the engine and the model-level tests build it the same way)."""
    mcfg = _turbo.ModelConfig()
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "qkv_bias",
        "qk_norm",
    ):
        setattr(mcfg, name, getattr(spec, name))
    mcfg.sliding_window = spec.sliding_window or 0
    return mcfg


class TurboEngine:
    """The turbo engine. Thread-safe; all model work happens on its C++ loop thread."""

    capabilities = EngineCapabilities(supports_lora=False)

    @staticmethod
    def supports(spec: ModelSpec, device: str) -> tuple[bool, str]:
        if device.startswith("cuda"):
            if not cuda_built():
                return False, "this build of turbo has no CUDA kernels (built without nvcc or CUDA torch)"
            if spec.head_dim not in _CUDA_HEAD_DIMS:
                return False, f"turbo's CUDA attention supports head_dim 64 and 128, not {spec.head_dim}"
        elif device != "cpu":
            return False, f"turbo has no {device} kernels"
        if spec.quantization:
            return False, "turbo does not run quantized checkpoints yet"
        if spec.head_dim % 2:
            return False, "odd head_dim"
        return True, ""

    def __init__(self, model_path: str | Path | None, config: TurboEngineConfig | None = None) -> None:
        self.config = config = config or TurboEngineConfig()
        self.device = _resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        if config.quant_policy not in (0,):
            raise ValueError("turbo: quant_policy 8/4 (KV quantization) is not implemented yet")
        if config.tp != 1:
            raise ValueError("turbo: tensor parallelism is not supported yet")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("turbo: device 'cuda' asked for, but no CUDA GPU is visible")
        if self.device == "cpu":  # see lmkit/cpu_threads.py
            self._engine = in_passing_thread(self._build, model_path)
        else:
            self._engine = self._build(model_path)
        print(  # the C++ engine has printed the KV pool (blocks, tokens, MiB)
            f"[lmkit] turbo engine on {self.device} ({str(self.dtype).removeprefix('torch.')}), "
            f"session_len {self.session_len}",
            file=sys.stderr,
            flush=True,
        )

    def _build(self, model_path: str | Path | None) -> _turbo.Engine:
        """Load the weights, size the KV pool, and start the C++ engine (which packs the weights)."""
        weights = self._load(model_path)
        self.block_size = self.config.cache_block_seq_len
        self.num_blocks = self._num_blocks()
        if self.num_blocks * self.block_size < self.session_len:
            print(
                f"[lmkit] session_len {self.session_len} capped at the KV pool's "
                f"{self.num_blocks * self.block_size} tokens",
                file=sys.stderr,
            )
            self.session_len = self.num_blocks * self.block_size
        return _turbo.Engine(self._engine_config(), model_config(self.spec), weights)

    def _load(self, model_path: str | Path | None) -> dict[str, torch.Tensor]:
        """Read (or, with load_format "dummy", make) the weights and lay them out for the C++ engine."""
        load_format = self.config.load_format
        # Dummy weights are made on the device; checkpoint weights are read on the CPU and moved per tensor.
        load_device = self.device if load_format == "dummy" else "cpu"
        loaded = load_model(model_path, dtype=self.dtype, load_format=load_format, device=load_device)
        spec = self.spec = loaded.spec
        ok, why = self.supports(spec, self.device)
        if not ok:
            raise RuntimeError(f"turbo cannot run this model: {why}")
        self.model_path = loaded.path
        self.vocab_size = spec.vocab_size
        self.session_len = min(spec.max_position_embeddings, self.config.session_len or sys.maxsize)
        return turbo_weights(spec, loaded.weights, self.session_len, self.device, self.dtype)

    def _num_blocks(self) -> int:
        """KV blocks: config.num_blocks, else cache_max_entry_count of free GPU memory (CUDA) or of the CPU budget."""
        config = self.config
        bytes_per_block = kv_bytes_per_block(self.spec, self.block_size, self.dtype.itemsize)
        if config.num_blocks:
            return int(config.num_blocks)
        if self.device.startswith("cuda"):
            return _cuda_num_blocks(config, bytes_per_block, self.device)
        budget = config.cpu_kv_cache_gib * 2**30 * config.cache_max_entry_count
        return max(1, int(budget // bytes_per_block))

    def _engine_config(self) -> _turbo.EngineConfig:
        config, ecfg = self.config, _turbo.EngineConfig()
        ecfg.max_num_seqs = config.max_batch_size
        ecfg.max_num_batched_tokens = config.max_num_batched_tokens
        ecfg.num_blocks = self.num_blocks
        ecfg.block_size = self.block_size
        ecfg.enable_prefix_caching = config.enable_prefix_caching
        ecfg.session_len = self.session_len
        ecfg.num_threads = config.num_threads or len(os.sched_getaffinity(0))
        ecfg.quant_policy = config.quant_policy
        return ecfg

    # ---- Engine protocol ----
    def add_request(self, request: EngineRequest) -> None:
        check_request(request, self.capabilities)
        sp = request.sampling
        ids = request.prompt_token_ids
        if len(ids) + 1 > self.session_len:
            limit = "the KV pool's capacity" if self.session_len == self.num_blocks * self.block_size else "session_len"
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; with one new token it exceeds {limit} {self.session_len}"
            )
        params = {
            "max_new_tokens": sp.max_new_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "top_k": sp.top_k,
            "min_p": sp.min_p,
            "repetition_penalty": sp.repetition_penalty,
            "seed": None if sp.seed is None else sp.seed & _MASK64,
            "stop_token_ids": list(sp.stop_token_ids),
            "ignore_eos": sp.ignore_eos,
            "logprobs": sp.logprobs,
        }
        try:
            self._engine.add_request(request.request_id, ids, params)
        except (ValueError, TypeError) as e:  # _turbo.InvalidRequest is a ValueError
            raise InvalidRequestError(
                str(e) if isinstance(e, ValueError) else f"prompt token ids must be ints in [0, {self.vocab_size})"
            ) from e

    def abort_request(self, request_id: str) -> None:
        self._engine.abort_request(request_id)

    def get_outputs(self, timeout: float | None = None) -> list[EngineOutput]:
        raw = self._engine.get_outputs(-1.0 if timeout is None else max(0.0, float(timeout)))
        return [self._convert(o) for o in raw]

    @staticmethod
    def _convert(o) -> EngineOutput:
        lps = o.logprobs
        reason = _REASONS.get(o.finish_reason)
        return EngineOutput(
            request_id=o.request_id,
            new_token_ids=list(o.new_token_ids),
            logprobs=None if lps is None else [TokenLogprob(t, lp, list(top)) for t, lp, top in lps],
            finish_reason=reason,
            error=o.error or None if reason is FinishReason.ERROR else None,
            num_prompt_tokens=o.num_prompt_tokens,
            num_cached_tokens=o.num_cached_tokens,
        )

    def stats(self) -> EngineStats:
        s = self._engine.stats()  # the C++ struct names its fields as EngineStats does
        return EngineStats(**{f.name: getattr(s, f.name) for f in dataclasses.fields(EngineStats)})

    @property
    def num_preemptions(self) -> int:
        return self._engine.stats().num_preemptions

    def shutdown(self) -> None:
        self._engine.shutdown()
