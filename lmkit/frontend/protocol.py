"""The token-level contract between the shared front-end and every engine.

An engine takes `EngineRequest`s (token ids + sampling parameters) and streams back `EngineOutput`s
(new token ids, optional logprobs, a finish reason). Both engines — turbo (C++) and the PyTorch
engine — implement `Engine`, and both pass `tests/conformance/`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token id (stop strings are the front-end's business)
    LENGTH = "length"  # max_new_tokens reached, or the session length
    ABORT = "abort"  # cancelled by abort_request()
    ERROR = "error"  # the engine failed this request; EngineOutput.error says why


class InvalidRequestError(ValueError):
    """A request the engine refuses up front (raised by `Engine.add_request`)."""


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling parameters as the engine sees them (after the front-end's defaults)."""

    max_new_tokens: int = 512
    """Generate at most this many tokens (>= 1)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p * p(max); 0 disables."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty over prompt + generated tokens; 1 disables."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever the batch."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the request (EOS ids are included here by the front-end)."""
    ignore_eos: bool = False
    """Keep generating past stop_token_ids."""
    logprobs: int | None = None
    """Return the sampled token's logprob and the top-n alternatives (0 = sampled token only)."""


@dataclass(slots=True)
class EngineRequest:
    """One generation request: token ids in."""

    request_id: str
    """Unique among the engine's live requests."""
    prompt_token_ids: list[int]
    """The full prompt (the engine reuses cached prefix blocks on its own)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """How to pick the next tokens."""
    adapter: str | None = None
    """Name of a LoRA adapter (engines with `supports_lora`)."""
    session_id: int | None = None
    """Optional multi-turn session the request belongs to (a hint; prefix caching does the work)."""


@dataclass(slots=True)
class TokenLogprob:
    """The logprob of one generated token and, when asked, the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class EngineOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    """Tokens generated since the previous output of this request."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per new token when the request asked for logprobs."""
    finish_reason: FinishReason | None = None
    """Set on the request's last output."""
    error: str | None = None
    """Why, when finish_reason is ERROR."""
    num_prompt_tokens: int = 0
    """Prompt length (reported on the first output and the last)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (reported on the first output and the last)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class EngineStats:
    """A snapshot of an engine's load, for metrics and tests."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks_total: int = 0
    num_blocks_free: int = 0
    """Blocks that hold no live sequence (cached-but-unreferenced blocks count as free)."""
    num_blocks_cached: int = 0
    """Free blocks that still hold reusable prefix-cache content."""
    num_prefill_tokens: int = 0
    """Prompt tokens computed (not served from cache) since start."""
    num_generated_tokens: int = 0
    """Tokens generated since start."""
    num_steps: int = 0
    num_pipelined_steps: int = 0
    """Steps launched before the previous step's tokens were read back (pipelined decode on a GPU)."""

    @property
    def num_blocks_used(self) -> int:
        return self.num_blocks_total - self.num_blocks_free


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do; the front-end asks these instead of checking the backend's name."""

    supports_lora: bool = False
    supports_logprobs: bool = True
    max_top_logprobs: int = 20
    supports_prefix_caching: bool = True


def check_request(request: EngineRequest, capabilities: EngineCapabilities) -> None:
    """The checks every engine's add_request makes, besides its own vocabulary and length limits.

    Raises InvalidRequestError with a message fit for a user.
    """
    sp = request.sampling
    if not request.prompt_token_ids:
        raise InvalidRequestError("the prompt is empty")
    if sp.max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be >= 1, got {sp.max_new_tokens}")
    if sp.temperature < 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {sp.temperature}")
    if not 0 < sp.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {sp.top_p}")
    if sp.top_k < 0 or not 0 <= sp.min_p <= 1 or sp.repetition_penalty <= 0:
        raise InvalidRequestError("top_k must be >= 0, min_p in [0, 1], repetition_penalty > 0")
    if sp.logprobs is not None and not 0 <= sp.logprobs <= capabilities.max_top_logprobs:
        raise InvalidRequestError(f"logprobs must be in [0, {capabilities.max_top_logprobs}]")
    if request.adapter is not None and not capabilities.supports_lora:
        raise InvalidRequestError("this engine does not support LoRA adapters")


@runtime_checkable
class Engine(Protocol):
    """A running engine. Thread-safe: any thread may call any method.

    The engine runs its own loop (a Python or C++ thread). `get_outputs` hands back everything produced
    since the last call, one batch per step at most, so the front-end pays no per-token round trip.
    """

    capabilities: EngineCapabilities
    vocab_size: int
    """Token ids must be in [0, vocab_size)."""
    session_len: int
    """Prompt + generated tokens may not exceed this."""

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. Raises InvalidRequestError for a request that can never run."""
        ...

    def abort_request(self, request_id: str) -> None:
        """Cancel a request; it ends with FinishReason.ABORT (a no-op for unknown or finished ids)."""
        ...

    def get_outputs(self, timeout: float | None = None) -> list[EngineOutput]:
        """Block until outputs are ready (or `timeout` seconds pass) and return them all."""
        ...

    def stats(self) -> EngineStats:
        """Current load and cache usage."""
        ...

    def shutdown(self) -> None:
        """Stop the loop and free the engine's memory; in-flight requests end with ABORT."""
        ...
