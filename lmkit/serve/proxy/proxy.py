"""One OpenAI endpoint in front of many api_servers.

    lmkit serve proxy [--server-port 8000] [--strategy min_expected_latency]
    lmkit serve api_server MODEL --proxy-url http://proxy:8000      # nodes register themselves

A request that fails before its first byte reaches the client (connection refused, node died during
prefill, 5xx) is retried on another node and the failed node is health-checked (and dropped if dead).
A stream cut mid-way ends with an SSE error event; a client that goes away closes the upstream request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmkit.serve.openai.errors import APIError, install_handlers
from lmkit.serve.openai.parsing import DEFAULT_MAX_BODY_BYTES, parse_json, read_body
from lmkit.serve.openai.streams import ClientDisconnected, until_disconnect

from .nodes import Node, NodeError, NodeManager, Strategy

logger = logging.getLogger("lmkit.serve.proxy")

_RETRY_STATUS = {500, 502, 503, 504}
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


class _ClosingStream(StreamingResponse):
    """Closes the upstream response whatever way the downstream stream ends."""

    def __init__(self, content, upstream: httpx.Response, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.upstream = upstream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(BaseException):
                await self.body_iterator.aclose()  # type: ignore[union-attr]
            with contextlib.suppress(BaseException):
                await self.upstream.aclose()


def build_proxy_app(manager: NodeManager, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    client_holder: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
        client_holder["c"] = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5), limits=limits)
        manager.start()
        yield
        await manager.stop()
        await client_holder["c"].aclose()

    app = FastAPI(title="lmkit proxy", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.manager = manager
    install_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/nodes/status")
    async def status() -> JSONResponse:
        return JSONResponse({url: n.status() for url, n in manager.nodes.items()})

    @app.post("/nodes/add")
    async def add(request: Request) -> JSONResponse:
        body = parse_json(await read_body(request, 1 << 16))
        url, key = body.get("url"), body.get("api_key")
        if not isinstance(url, str) or not (key is None or isinstance(key, str)):
            raise APIError(400, 'expected {"url": str, "api_key": str | null}', "url")
        try:
            node = await manager.add(url, key)
        except NodeError as exc:
            raise APIError(400, str(exc), "url") from None
        return JSONResponse({"url": node.url, "models": node.models})

    @app.post("/nodes/remove")
    async def remove(request: Request) -> JSONResponse:
        url = request.query_params.get("url")
        if url is None:
            url = parse_json(await read_body(request, 1 << 16)).get("url")
        if not isinstance(url, str) or not manager.remove(url):
            raise APIError(404, f"no such node: {url}", "url")
        return JSONResponse({"removed": url})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "owned_by": "lmkit"} for m in manager.model_names()],
            }
        )

    async def forward(request: Request, path: str) -> Response:
        raw = await read_body(request, max_body_bytes)
        model, stream = _peek(raw)
        if model is not None and manager.nodes and model not in manager.model_names():
            raise APIError(
                404,
                f"The model `{model}` does not exist. Served models: {manager.model_names()}",
                "model",
                "model_not_found",
            )
        try:
            return await until_disconnect(
                request, _route(client_holder["c"], manager, request, path, raw, model, stream)
            )
        except ClientDisconnected:
            return Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await forward(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request, "/v1/completions")

    return app


def _peek(raw: bytes) -> tuple[str | None, bool]:
    """The model and stream fields, if the body is a JSON object (the node reports any other problem)."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None, False
    if not isinstance(obj, dict):
        return None, False
    model = obj.get("model") if isinstance(obj.get("model"), str) else None
    return model, obj.get("stream") is True


async def _route(
    client: httpx.AsyncClient,
    manager: NodeManager,
    request: Request,
    path: str,
    raw: bytes,
    model: str | None,
    stream: bool,
) -> Response:
    tried: set[str] = set()
    last_error = "no node is serving"
    auth = request.headers.get("authorization")
    while True:
        node = manager.pick(model, tried)
        if node is None:
            raise APIError(503, f"no node could serve the request ({last_error})")
        tried.add(node.url)
        headers = {"Content-Type": "application/json", **node.headers(auth)}
        start = time.monotonic()
        node.in_flight += 1
        released = False
        try:
            upstream = await client.send(
                client.build_request("POST", node.url + path, content=raw, headers=headers), stream=True
            )
            if upstream.status_code in _RETRY_STATUS:
                body = await upstream.aread()
                await upstream.aclose()
                last_error = f"{node.url} answered {upstream.status_code}: {body[:200]!r}"
                node.num_failures += 1
                asyncio.create_task(manager.check_or_remove(node))
                continue
            if stream and upstream.status_code == 200:
                released = True
                return _ClosingStream(
                    _relay(upstream, node, manager, start),
                    upstream,
                    status_code=200,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            body = await upstream.aread()
            await upstream.aclose()
            if upstream.status_code == 200:
                node.record(time.monotonic() - start)
            headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
            return Response(body, status_code=upstream.status_code, headers=headers)
        except httpx.HTTPError as exc:  # nothing reached the client yet: try another node
            last_error = f"{node.url}: {type(exc).__name__}: {exc}"
            logger.warning("request to %s failed before any byte was sent (%s); retrying", node.url, last_error)
            node.num_failures += 1
            asyncio.create_task(manager.check_or_remove(node))
        finally:
            if not released:
                node.in_flight -= 1


async def _relay(upstream: httpx.Response, node: Node, manager: NodeManager, start: float):
    """Relay whole SSE events only, so a cut stream never leaves half an event at the client."""
    ok = False
    done = False  # the [DONE] event went out: the request counts even if the client leaves at once after it
    pending = b""
    try:
        async for chunk in upstream.aiter_raw():
            pending += chunk
            cut = pending.rfind(b"\n\n")
            if cut >= 0:
                piece, pending = pending[: cut + 2], pending[cut + 2 :]
                done = done or b"data: [DONE]" in piece
                yield piece
        if pending:
            yield pending
        ok = True
    except httpx.HTTPError as exc:
        node.num_failures += 1
        err = APIError(502, f"the upstream node {node.url} failed mid-stream: {type(exc).__name__}: {exc}")
        yield err.sse() + "data: [DONE]\n\n"
        asyncio.create_task(manager.check_or_remove(node))
    finally:
        node.in_flight -= 1
        if ok or done:
            node.record(time.monotonic() - start)
        if not ok:
            with contextlib.suppress(BaseException):
                await upstream.aclose()


def add_proxy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-name", default="0.0.0.0")
    parser.add_argument("--server-port", type=int, default=8000)
    parser.add_argument("--strategy", default="min_expected_latency", choices=[s.value for s in Strategy])
    parser.add_argument("--health-interval", type=float, default=5.0, help="seconds between node health checks")
    parser.add_argument("--nodes", nargs="*", default=[], help="node URLs to add at start-up")
    parser.add_argument("--log-level", default="warning")


def run_proxy(args: argparse.Namespace) -> None:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper())
    manager = NodeManager(Strategy(args.strategy), args.health_interval)
    app = build_proxy_app(manager)

    async def serve() -> None:
        for url in args.nodes:
            try:
                await manager.add(url)
            except NodeError as exc:
                logger.warning("%s", exc)
        server = uvicorn.Server(
            uvicorn.Config(
                app, host=args.server_name, port=args.server_port, log_level=args.log_level, timeout_graceful_shutdown=5
            )
        )
        print(f"lmkit proxy on http://{args.server_name}:{args.server_port} ({args.strategy})", flush=True)
        await server.serve()

    asyncio.run(serve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmkit.serve.proxy.proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_proxy_args(parser)
    run_proxy(parser.parse_args(argv))


if __name__ == "__main__":
    main()
