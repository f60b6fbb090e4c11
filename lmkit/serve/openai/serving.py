"""Chat and text completions over an AsyncEngine: prompts -> token ids -> engine -> OpenAI JSON or SSE.

The server tokenizes prompts itself (chat template, then encode) so it can check the context limit
exactly and answer like vLLM does ("maximum context length is N tokens. However, you requested ...").
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from .errors import APIError, bad_request
from .logprobs import LogprobFormatter
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, random_id
from .sampling import check_common, generation_config, logprobs_count, requested_max_tokens
from .streams import ChoiceStream, until_disconnect

try:
    from lmkit.frontend.errors import RequestError
except ImportError:  # the front-end is being written alongside

    class RequestError(ValueError):  # type: ignore[no-redef]
        param: str | None = None


@dataclass
class Job:
    """One validated generation request, ready for the engine."""

    kind: str  # "chat" or "completion"
    req: ChatCompletionRequest | CompletionRequest
    prompts: list[list[int]]
    gen_config: object
    logprobs: int | None
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))


class OpenAIServing:
    def __init__(self, engine, model_name: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.session_len: int = engine.session_len
        caps = getattr(getattr(engine, "engine", None), "capabilities", None)
        self.max_top_logprobs = getattr(caps, "max_top_logprobs", 20)
        self.supports_logprobs = getattr(caps, "supports_logprobs", True)
        self.vocab_size = getattr(getattr(engine, "engine", None), "vocab_size", None)
        self.logprob_formatter = LogprobFormatter(engine.tokenizer)
        self.last_progress = time.monotonic()

    # -- request -> Job ----------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist. Served models: [{self.model_name!r}]",
                "model",
                "model_not_found",
            )

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        self.check_model(req.model)
        check_common(req)
        messages = _chat_messages(req)
        try:
            text = self.engine.apply_chat_template(messages)
            ids = self.engine.encode(text, add_special_tokens=False)
        except Exception as exc:
            raise bad_request(f"cannot apply the chat template to these messages: {exc}", "messages") from None
        return self._job("chat", req, [ids])

    def completion_job(self, req: CompletionRequest) -> Job:
        self.check_model(req.model)
        check_common(req)
        prompts: list[list[int]] = []
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], str)):
            texts = [raw] if isinstance(raw, str) else raw
            for text in texts:
                if not text:
                    raise bad_request("prompt must not be empty", "prompt")
                prompts.append(self.engine.encode(text))
        elif raw and isinstance(raw[0], int):
            prompts.append(list(raw))  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in raw]  # type: ignore[union-attr]
        if not prompts or not all(prompts):
            raise bad_request("prompt must not be empty", "prompt")
        for ids in prompts:
            if min(ids) < 0 or (self.vocab_size is not None and max(ids) >= self.vocab_size):
                raise bad_request(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        return self._job("completion", req, prompts)

    def _job(self, kind: str, req, prompts: list[list[int]]) -> Job:
        max_tokens = requested_max_tokens(req)
        longest = max(len(p) for p in prompts)
        where = "messages" if kind == "chat" else "prompt"
        if longest >= self.session_len:
            raise bad_request(
                f"This model's maximum context length is {self.session_len} tokens. However, your {where} "
                f"has {longest} tokens, which leaves no room for the completion. Please reduce the length "
                f"of the {where}.",
                where,
            )
        if max_tokens is None:
            max_tokens = self.session_len - longest
        elif longest + max_tokens > self.session_len:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise bad_request(
                f"This model's maximum context length is {self.session_len} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the {where}, {max_tokens} in the completion). "
                f"Please reduce the length of the {where} or of the completion.",
                param,
            )
        logprobs = logprobs_count(req, self.max_top_logprobs, self.supports_logprobs)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        gen_config = generation_config(req, max_tokens, logprobs)
        return Job(kind, req, prompts, gen_config, logprobs, random_id(prefix))

    # -- running -----------------------------------------------------------------------------------

    async def open(self, job: Job, request: Request) -> ChoiceStream:
        stream = ChoiceStream(self.engine, job.prompts, job.gen_config, job.request_id)
        self.last_progress = time.monotonic()
        try:
            await until_disconnect(request, stream.start())
        except RequestError as exc:
            raise bad_request(str(exc), getattr(exc, "param", None)) from None
        return stream

    async def full_response(self, job: Job, stream: ChoiceStream, request: Request) -> JSONResponse:
        acc = _Accumulator(job, self)
        try:
            await until_disconnect(request, acc.consume(stream))
        finally:
            await stream.aclose()
        return JSONResponse(acc.body())

    async def sse(self, job: Job, stream: ChoiceStream) -> AsyncIterator[str]:
        acc = _Accumulator(job, self)
        opts = job.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        try:
            async for prompt_index, resp in stream:
                for chunk in acc.chunks(prompt_index, resp):
                    if include_usage:
                        chunk["usage"] = acc.usage() if continuous else None
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                if acc.error is not None:
                    yield acc.error.sse()
                    break
            if include_usage and acc.error is None:
                yield f"data: {json.dumps(acc.envelope([], usage=acc.usage()))}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as exc:  # an engine failure after the 200 went out: tell the client in-band
            yield APIError(500, f"generation failed: {type(exc).__name__}: {exc}").sse()
            yield "data: [DONE]\n\n"
        finally:
            acc.finish_metrics()
            await stream.aclose()


def _chat_messages(req: ChatCompletionRequest) -> list[dict]:
    if not req.messages:
        raise bad_request("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(req.messages):
        param = f"messages[{i}]"
        if m.role == "tool" or m.tool_calls or m.tool_call_id:
            raise bad_request("tool messages and tool calls are not supported", param)
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise bad_request("only text content parts are supported", f"{param}.content")
            content = "".join(p.text for p in content)  # type: ignore[misc]
        if content is None:
            raise bad_request("message content must not be null", f"{param}.content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if not any(m["content"] for m in out):
        raise bad_request("messages must not all be empty", "messages")
    return out


class _Accumulator:
    """Turns engine chunks into OpenAI chunks and a final body; keeps usage and metrics."""

    def __init__(self, job: Job, serving: OpenAIServing) -> None:
        self.job = job
        self.serving = serving
        self.n = job.gen_config.n  # type: ignore[attr-defined]
        self.texts: dict[int, list[str]] = {}
        self.logprobs: dict[int, list] = {}
        self.finish: dict[int, str | None] = {}
        self.completion_tokens: dict[int, int] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}
        self.text_offset: dict[int, int] = {}
        self.error: APIError | None = None
        self.timer = serving.metrics.timer()
        self.metrics_done = False

    def _record(self, prompt_index: int, resp) -> int:
        serving = self.serving
        serving.last_progress = time.monotonic()
        idx = prompt_index * self.n + resp.index
        self.timer.on_tokens(len(resp.token_ids))
        self.completion_tokens[idx] = max(self.completion_tokens.get(idx, 0), resp.generate_token_len)
        self.prompt_tokens[prompt_index] = resp.input_token_len or self.prompt_tokens.get(prompt_index, 0)
        self.cached_tokens[prompt_index] = max(self.cached_tokens.get(prompt_index, 0), resp.num_cached_tokens)
        if resp.finish_reason is not None:
            self.finish[idx] = resp.finish_reason
            if resp.finish_reason in ("error", "abort") and self.error is None:
                why = resp.error or (
                    "the request was aborted by the engine" if resp.finish_reason == "abort" else "the engine failed"
                )
                self.error = APIError(503 if resp.finish_reason == "abort" else 500, why)
        return idx

    async def consume(self, stream: ChoiceStream) -> None:
        async for prompt_index, resp in stream:
            idx = self._record(prompt_index, resp)
            self.texts.setdefault(idx, []).append(resp.text)
            if resp.logprobs and self.job.logprobs is not None:
                self.logprobs.setdefault(idx, []).extend(resp.logprobs)
        self.finish_metrics()
        if self.error is not None:
            raise self.error

    def chunks(self, prompt_index: int, resp) -> list[dict]:
        first = (prompt_index * self.n + resp.index) not in self.texts
        idx = self._record(prompt_index, resp)
        self.texts.setdefault(idx, [])
        out = []
        chat = self.job.kind == "chat"
        if chat and first:
            out.append(
                self.envelope(
                    [
                        {
                            "index": idx,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        lp = self._logprobs(idx, resp.logprobs) if resp.logprobs and self.job.logprobs is not None else None
        finish = resp.finish_reason if resp.finish_reason in ("stop", "length") else None
        if resp.text or lp is not None or finish is not None:
            if chat:
                delta = {"content": resp.text} if resp.text else {}
                choice = {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": idx, "text": resp.text, "logprobs": lp, "finish_reason": finish}
            out.append(self.envelope([choice]))
        return out

    def _logprobs(self, idx: int, entries: list) -> dict:
        fmt = self.serving.logprob_formatter
        if self.job.kind == "chat":
            return {"content": fmt.chat(entries, self.job.logprobs or 0)}
        offset = self.text_offset.get(idx, 0)
        body, self.text_offset[idx] = fmt.completion(entries, offset)
        return body

    def envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        chat = self.job.kind == "chat"
        body = {
            "id": self.job.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.job.created,
            "model": self.serving.model_name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return body

    def usage(self) -> dict:
        prompt = (
            sum(self.prompt_tokens.values())
            if self.job.kind == "completion"
            else max(self.prompt_tokens.values(), default=0)
        )
        completion = sum(self.completion_tokens.values())
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        cached = sum(self.cached_tokens.values())
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    def body(self) -> dict:
        chat = self.job.kind == "chat"
        choices = []
        for idx in sorted(self.texts):
            text = "".join(self.texts[idx])
            lp = None
            if self.job.logprobs is not None:
                lp = self._logprobs(idx, self.logprobs.get(idx, []))
            if chat:
                choice = {
                    "index": idx,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": lp,
                    "finish_reason": self.finish.get(idx),
                }
            else:
                choice = {"index": idx, "text": text, "logprobs": lp, "finish_reason": self.finish.get(idx)}
            choices.append(choice)
        body = self.envelope(choices, usage=self.usage())
        body["object"] = "chat.completion" if chat else "text_completion"
        return body

    def finish_metrics(self) -> None:
        if self.metrics_done:
            return
        self.metrics_done = True
        for idx in self.texts or [0]:
            self.timer.on_finish(self.finish.get(idx))
        self.timer.metrics.prompt_tokens.labels(self.timer.metrics.model_name).inc(sum(self.prompt_tokens.values()))
        self.timer.done()
