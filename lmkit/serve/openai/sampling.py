"""OpenAI sampling parameters -> lmkit GenerationConfig, with range checks that name the parameter."""

from __future__ import annotations

from lmkit.messages import GenerationConfig

from .errors import bad_request
from .protocol import MAX_N, MAX_STOP, ChatCompletionRequest, CompletionRequest, SamplingFields, unsupported


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise bad_request(message, param)


def check_common(req: SamplingFields) -> None:
    bad = unsupported(req)
    if bad is not None:
        raise bad_request(bad[1], bad[0])
    t, p = req.temperature, req.top_p
    _check(t is None or 0 <= t <= 2, "temperature", f"temperature must be in [0, 2], got {t}")
    _check(p is None or 0 < p <= 1, "top_p", f"top_p must be in (0, 1], got {p}")
    _check(
        req.top_k is None or req.top_k >= -1, "top_k", f"top_k must be -1, 0 (disabled) or positive, got {req.top_k}"
    )
    _check(req.min_p is None or 0 <= req.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {req.min_p}")
    rp = req.repetition_penalty
    _check(rp is None or 0 < rp <= 10, "repetition_penalty", f"repetition_penalty must be in (0, 10], got {rp}")
    _check(1 <= req.n <= MAX_N, "n", f"n must be between 1 and {MAX_N}, got {req.n}")
    seed = req.seed
    _check(seed is None or -(2**63) <= seed < 2**63, "seed", "seed must fit in a signed 64-bit integer")
    _check(req.stream or req.stream_options is None, "stream_options", "stream_options is only allowed with stream")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    _check(len(stops) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
    _check(all(stops), "stop", "stop sequences must be non-empty strings")
    ids = req.stop_token_ids or []
    _check(all(i >= 0 for i in ids), "stop_token_ids", "stop_token_ids must be non-negative")


def requested_max_tokens(req: SamplingFields) -> int | None:
    """The client's output budget; None when it left it to the server."""
    value, param = req.max_tokens, "max_tokens"
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        value, param = req.max_completion_tokens, "max_completion_tokens"
    _check(value is None or value >= 1, param, f"{param} must be at least 1, got {value}")
    return value


def logprobs_count(req: SamplingFields, max_top: int, supported: bool) -> int | None:
    """How many alternatives to return per token (0 = the sampled token only), or None for no logprobs."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None:
            _check(req.logprobs, "top_logprobs", "top_logprobs requires logprobs to be true")
            _check(
                0 <= req.top_logprobs <= max_top,
                "top_logprobs",
                f"top_logprobs must be between 0 and {max_top}, got {req.top_logprobs}",
            )
        count = (req.top_logprobs or 0) if req.logprobs else None
    else:
        assert isinstance(req, CompletionRequest)
        count = req.logprobs
        _check(
            count is None or 0 <= count <= max_top, "logprobs", f"logprobs must be between 0 and {max_top}, got {count}"
        )
    _check(count is None or supported, "logprobs", "this engine does not return logprobs")
    return count


def generation_config(req: SamplingFields, max_new_tokens: int, logprobs: int | None) -> GenerationConfig:
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=top_k,
        min_p=float(req.min_p or 0.0),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        seed=req.seed,
        stop=[req.stop] if isinstance(req.stop, str) else (list(req.stop) if req.stop else None),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        n=req.n,
        skip_special_tokens=req.skip_special_tokens,
    )
