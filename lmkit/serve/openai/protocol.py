"""OpenAI request and response models (pydantic) for /v1/chat/completions and /v1/completions.

Requests are strict: wrong types are rejected (no "5" -> 5 coercion), unknown fields are rejected, and
fields the server cannot honour are accepted by the schema only so that `unsupported()` can name them
in a 400 instead of silently ignoring them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictInt | StrictFloat

MAX_N = 16
"""Largest `n` one request may ask for."""
MAX_STOP = 16
"""Most stop strings one request may give."""


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class ResponseFormat(StrictModel):
    type: StrictStr
    json_schema: dict[str, Any] | None = None


class ContentPart(StrictModel):
    type: StrictStr
    text: StrictStr | None = None
    image_url: Any = None
    input_audio: Any = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: StrictStr | None = None
    refusal: StrictStr | None = None


class SamplingFields(StrictModel):
    """Fields shared by chat and text completions."""

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    user: StrictStr | None = None
    # Extras in the vLLM / LMDeploy style.
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    stop_token_ids: list[StrictInt] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    modalities: list[StrictStr] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: StrictStr | None = None
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    service_tier: StrictStr | None = None


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


def unsupported(req: SamplingFields) -> tuple[str, str] | None:
    """(param, why) for the first parameter this server cannot honour, else None."""
    checks: list[tuple[str, bool, str]] = [
        ("presence_penalty", bool(req.presence_penalty), "presence_penalty is not supported (use 0 or omit it)"),
        ("frequency_penalty", bool(req.frequency_penalty), "frequency_penalty is not supported (use 0 or omit it)"),
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
    ]
    if isinstance(req, ChatCompletionRequest):
        fmt = req.response_format
        checks += [
            ("tools", bool(req.tools), "tools are not supported"),
            ("tool_choice", req.tool_choice not in (None, "none"), "tool_choice is not supported"),
            ("functions", bool(req.functions), "functions are not supported"),
            ("function_call", req.function_call not in (None, "none"), "function_call is not supported"),
            (
                "response_format",
                fmt is not None and fmt.type != "text",
                "only response_format type 'text' is supported",
            ),
            ("modalities", req.modalities not in (None, ["text"]), "only the 'text' modality is supported"),
            ("audio", req.audio is not None, "audio output is not supported"),
            ("prediction", req.prediction is not None, "predicted outputs are not supported"),
            ("reasoning_effort", req.reasoning_effort is not None, "reasoning_effort is not supported"),
        ]
    if isinstance(req, CompletionRequest):
        checks += [
            ("echo", req.echo, "echo is not supported"),
            ("suffix", bool(req.suffix), "suffix is not supported"),
            ("best_of", req.best_of not in (None, 1) and req.best_of != req.n, "best_of > n is not supported"),
        ]
    for param, bad, why in checks:
        if bad:
            return param, why
    return None


# Responses ----------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lmkit"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
