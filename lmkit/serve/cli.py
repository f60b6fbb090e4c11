"""`lmkit serve {api_server,proxy,gradio}`: registered on the main `lmkit` parser by `add_serve_parser`."""

from __future__ import annotations

import argparse


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    serve = subparsers.add_parser("serve", help="serve a model: OpenAI api_server, proxy, gradio")
    sub = serve.add_subparsers(dest="serve_command", required=True)

    from lmkit.serve.gradio.app import add_gradio_args
    from lmkit.serve.openai.api_server import add_server_args
    from lmkit.serve.proxy.proxy import add_proxy_args

    api = sub.add_parser("api_server", help="OpenAI-compatible HTTP server")
    add_server_args(api)
    api.set_defaults(func=_run_api_server)

    proxy = sub.add_parser("proxy", help="one endpoint in front of many api_servers")
    add_proxy_args(proxy)
    proxy.set_defaults(func=_run_proxy)

    gradio = sub.add_parser("gradio", help="a chat web page")
    add_gradio_args(gradio)
    gradio.set_defaults(func=_run_gradio)
    return serve


def _run_api_server(args: argparse.Namespace) -> None:
    from lmkit.serve.openai.api_server import run_server

    run_server(args)


def _run_proxy(args: argparse.Namespace) -> None:
    from lmkit.serve.proxy.proxy import run_proxy

    run_proxy(args)


def _run_gradio(args: argparse.Namespace) -> None:
    from lmkit.serve.gradio.app import run_gradio

    run_gradio(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lmkit")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
