"""Turning raw HTTP request bodies into validated request models, with a 4xx for every way they can be bad.

The body is read by hand (not by FastAPI's body parameter) so that oversize bodies stop at the limit
(413), non-UTF-8 bytes, truncated JSON, NaN and lone surrogates are 400s, and pydantic's messages are
turned into one readable line naming the offending parameter.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from .errors import APIError, bad_request

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, max_bytes: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise bad_request("invalid Content-Length header")
        if int(length) > max_bytes:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict:
    if not body.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not valid UTF-8 (byte offset {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(obj).__name__}")
    _check_strings(obj, "")
    return obj


def _check_strings(obj: Any, path: str) -> None:
    """Reject lone surrogates (valid JSON escapes, but not encodable text)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("string contains an unpaired surrogate (invalid Unicode)", path or None) from None
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_strings(key, path)
            _check_strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _check_strings(value, f"{path}[{i}]")


def validate(model: type[M], obj: dict) -> M:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if not _is_type_tag(p)]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            raise bad_request(f"unknown or unsupported parameter: {param}", param) from None
        if err.get("type") == "missing":
            raise bad_request(f"missing required parameter: {param}", param) from None
        raise bad_request(f"invalid value for {param}: {err.get('msg')}", param) from None


def _is_type_tag(part: Any) -> bool:
    # pydantic puts union member names (e.g. 'str', 'list[int]', 'function-after[...]') in error locations.
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


async def parse_request(request: Request, model: type[M], max_bytes: int) -> M:
    return validate(model, parse_json(await read_body(request, max_bytes)))
