"""Errors the front-end raises for requests it refuses (the servers turn them into HTTP 400s)."""

from __future__ import annotations


class RequestError(ValueError):
    """An invalid request; `param` names the offending parameter when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
