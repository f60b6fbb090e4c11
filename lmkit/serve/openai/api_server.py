"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncEngine.

    lmkit serve api_server MODEL [--server-port 23333] [--api-keys KEY ...]
    python -m lmkit.serve.openai.api_server MODEL ...

Routes: /v1/models, /v1/chat/completions, /v1/completions (SSE when stream=true), /health (liveness),
/ready (readiness), /metrics (Prometheus). Every route but /health needs a key when --api-keys is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import APIError, install_handlers
from .metrics import ServerMetrics
from .parsing import DEFAULT_MAX_BODY_BYTES, parse_request
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .serving import OpenAIServing
from .streams import ClientDisconnected

logger = logging.getLogger("lmkit.serve")


@dataclass
class ServerConfig:
    """HTTP-side settings of an api_server (the engine's are in its backend config)."""

    api_keys: list[str] = field(default_factory=list)
    """Accepted Bearer keys; empty = no authentication."""
    max_concurrent_requests: int = 0
    """Generation requests served at once before answering 429; 0 = unlimited."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Larger request bodies get 413."""
    ready_stall_s: float = 30.0
    """/ready fails when work is pending but no token came for this long."""


class EngineStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body (and so aborts the engine request) when it ends,
    also when the client disconnects mid-stream."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(BaseException):
                await self.body_iterator.aclose()  # type: ignore[union-attr]
            self._on_close()


class ServerState:
    def __init__(self, engine, model_name: str, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(model_name)
        self.serving = OpenAIServing(engine, model_name, self.metrics)
        self.in_flight = 0

    def check_auth(self, request: Request) -> None:
        keys = self.config.api_keys
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def acquire(self) -> None:
        limit = self.config.max_concurrent_requests
        if limit and self.in_flight >= limit:
            raise APIError(429, f"too many concurrent requests (limit {limit}); retry later")
        if self.in_flight == 0:
            self.serving.last_progress = time.monotonic()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def stats(self):
        try:
            return self.engine.stats()
        except Exception:
            logger.exception("engine.stats() failed")
            return None

    def ready(self) -> tuple[bool, str]:
        stats = self.stats()
        pending = self.in_flight + (stats.num_running + stats.num_waiting if stats else 0)
        idle_for = time.monotonic() - self.serving.last_progress
        if pending and idle_for > self.config.ready_stall_s:
            return False, f"{pending} requests pending but no token for {idle_for:.0f} s"
        return True, "ok"


def build_app(
    engine, model_name: str | None = None, config: ServerConfig | None = None, on_startup=None, on_shutdown=None
) -> FastAPI:
    """The FastAPI app over a running AsyncEngine (tests pass a fake one)."""
    state = ServerState(engine, model_name or engine.model_name, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if on_startup is not None:
            await on_startup()
        yield
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(
        title="lmkit OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.lmkit = state
    install_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        state.check_auth(request)
        ok, why = state.ready()
        return JSONResponse({"ready": ok, "reason": why}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state.check_auth(request)
        body = state.metrics.render(state.stats(), state.in_flight)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        state.check_auth(request)
        card = ModelCard(id=state.serving.model_name, max_model_len=state.serving.session_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        state.check_auth(request)
        req = await parse_request(request, ChatCompletionRequest, state.config.max_body_bytes)
        return await _generate(state, request, state.serving.chat_job(req))

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.check_auth(request)
        req = await parse_request(request, CompletionRequest, state.config.max_body_bytes)
        return await _generate(state, request, state.serving.completion_job(req))

    return app


async def _generate(state: ServerState, request: Request, job) -> Response:
    state.acquire()
    handed_off = False
    try:
        stream = await state.serving.open(job, request)
        if job.req.stream:
            body = state.serving.sse(job, stream)
            handed_off = True
            return EngineStreamingResponse(
                body,
                state.release,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await state.serving.full_response(job, stream, request)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        if not handed_off:
            state.release()


# -- command line --------------------------------------------------------------------------------------


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model folder, GGUF file or AWQ checkpoint (default: the bundled SmolLM2)",
    )
    parser.add_argument("--backend", default="auto", choices=["auto", "pytorch", "turbo"])
    parser.add_argument("--server-name", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--server-port", type=int, default=23333)
    parser.add_argument("--api-keys", nargs="*", default=None, help="accepted Bearer keys (none = open)")
    parser.add_argument("--model-name", default=None, help="name served in /v1/models (default: the model path)")
    parser.add_argument("--max-concurrent-requests", type=int, default=0, help="429 above this; 0 = unlimited")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument(
        "--ready-stall-s",
        type=float,
        default=30.0,
        help="/ready fails after this many seconds with pending work and no token",
    )
    parser.add_argument("--proxy-url", default=None, help="register with this proxy on start-up")
    parser.add_argument(
        "--advertise-url",
        default=None,
        help="the URL the proxy should use to reach this server (default: from --server-name, "
        "or this host's address when listening on all interfaces)",
    )
    parser.add_argument("--log-level", default="warning")
    add_engine_args(parser)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--session-len", type=int, default=None, help="max prompt + generated tokens per request")
    g.add_argument("--cache-max-entry-count", type=float, default=0.8, help="fraction of memory for the KV cache")
    g.add_argument("--cache-block-seq-len", type=int, default=None, help="tokens per KV block")
    g.add_argument("--max-batch-size", type=int, default=128)
    g.add_argument(
        "--prefill-interval",
        type=int,
        default=1,
        help="PyTorch engine: admit new requests every N steps while others decode (throughput over TTFT)",
    )
    g.add_argument("--eager-mode", action="store_true", help="PyTorch engine: no CUDA graphs, no compiled layers (CPU)")
    g.add_argument("--tp", type=int, default=1)
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument(
        "--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights in the model's shapes"
    )


def backend_config(args: argparse.Namespace):
    """The engine config for --backend (auto uses the turbo config's fields, which both engines share)."""
    from lmkit.messages import PytorchEngineConfig, TurboEngineConfig

    common = dict(
        session_len=args.session_len,
        cache_max_entry_count=args.cache_max_entry_count,
        max_batch_size=args.max_batch_size,
        tp=args.tp,
        device=args.device,
        dtype=args.dtype,
        load_format=getattr(args, "load_format", "auto"),
    )
    if args.backend == "pytorch":
        cfg = PytorchEngineConfig(
            **common,
            prefill_interval=getattr(args, "prefill_interval", 1),
            eager_mode=getattr(args, "eager_mode", False),
        )
        if args.cache_block_seq_len:
            cfg.block_size = args.cache_block_seq_len
        return cfg
    cfg = TurboEngineConfig(**common)
    if args.cache_block_seq_len:
        cfg.cache_block_seq_len = args.cache_block_seq_len
    return cfg


def run_server(args: argparse.Namespace, engine_factory=None) -> None:
    """Build the engine inside the server's event loop (the AsyncEngine dispatches to the loop it runs on)."""
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        if engine_factory is None:
            from lmkit.engines import build_async_engine

            engine = build_async_engine(args.model, args.backend, backend_config(args), args.model_name)
        else:
            engine = engine_factory()
        config = ServerConfig(
            api_keys=list(args.api_keys or []),
            max_concurrent_requests=args.max_concurrent_requests,
            max_body_bytes=args.max_body_bytes,
            ready_stall_s=args.ready_stall_s,
        )
        url = args.advertise_url or f"http://{_reachable_host(args.server_name)}:{args.server_port}"
        model_name = args.model_name or engine.model_name
        tasks: list[asyncio.Task] = []

        async def started() -> None:
            if args.proxy_url:
                tasks.append(asyncio.create_task(_register_with_proxy(args.proxy_url, url, config.api_keys)))
            print(f"lmkit api_server ready on {url} (model {model_name!r})", flush=True)

        async def stopped() -> None:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await engine.close()

        app = build_app(engine, model_name, config, on_startup=started, on_shutdown=stopped)
        server = uvicorn.Server(
            uvicorn.Config(
                app, host=args.server_name, port=args.server_port, log_level=args.log_level, timeout_graceful_shutdown=5
            )
        )
        await server.serve()

    asyncio.run(serve())


def _reachable_host(server_name: str) -> str:
    """An address other machines can use for a server listening on `server_name`."""
    if server_name not in ("0.0.0.0", "::", ""):
        return server_name
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


async def _register_with_proxy(proxy_url: str, url: str, api_keys: list[str]) -> None:
    import httpx

    payload = {"url": url, "api_key": api_keys[0] if api_keys else None}
    for attempt in range(30):
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.post(proxy_url.rstrip("/") + "/nodes/add", json=payload)
            if r.status_code == 200:
                logger.warning("registered %s with proxy %s", url, proxy_url)
                return
            logger.warning("proxy %s refused %s: %s", proxy_url, url, r.text)
        except Exception as exc:
            logger.warning("cannot reach proxy %s (%s); retrying", proxy_url, exc)
        await asyncio.sleep(min(1 + attempt, 5))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmkit.serve.openai.api_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_server_args(parser)
    run_server(parser.parse_args(argv))


if __name__ == "__main__":
    main()
