"""The `lmkit` command: chat, serve (api_server, proxy, gradio), lite (quantization), check_env.

`serve` and `lite` are registered by their own packages (`lmkit.serve.cli`, `lmkit.lite.cli`), imported only
when that command runs, so `lmkit chat` does not pay for FastAPI or Gradio imports.
"""

from __future__ import annotations

import argparse
import sys

from lmkit.cli.chat import add_chat_parser


def _add_placeholder(subparsers, name: str, help_text: str) -> None:
    """A stand-in for a command whose parser lives elsewhere (listed in --help without importing it)."""
    sub = subparsers.add_parser(name, help=help_text, add_help=False)
    sub.add_argument("rest", nargs=argparse.REMAINDER)


def _add_serve(subparsers, load: bool) -> None:
    help_text = "serve a model: OpenAI api_server, proxy, gradio"
    if not load:
        _add_placeholder(subparsers, "serve", help_text)
        return
    try:
        from lmkit.serve.cli import add_serve_parser
    except ImportError as exc:
        why = f"the serving package cannot be imported ({exc})"
        sub = subparsers.add_parser("serve", help=help_text)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
        sub.set_defaults(func=lambda args: _unavailable("serve", why))
        return
    add_serve_parser(subparsers)


def _add_lite(subparsers, load: bool) -> None:
    help_text = "quantize a model (auto_awq)"
    if not load:
        _add_placeholder(subparsers, "lite", help_text)
        return
    try:
        from lmkit.lite.cli import add_lite_parser  # type: ignore[import-not-found]
    except ImportError:
        lite = subparsers.add_parser("lite", help=help_text)
        sub = lite.add_subparsers(dest="lite_command", required=True)
        awq = sub.add_parser("auto_awq", help="W4A16 activation-aware quantization (not implemented yet)")
        awq.add_argument("model", nargs="?")
        awq.add_argument("rest", nargs=argparse.REMAINDER)
        awq.set_defaults(func=lambda args: _unavailable("lite auto_awq", "not implemented yet"))
        return
    add_lite_parser(subparsers)


def _unavailable(command: str, why: str) -> int:
    print(f"lmkit {command}: {why}", file=sys.stderr)
    return 2


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="lmkit", description="Deploy large language models: chat, serve, quantize.")
    from lmkit import __version__

    parser.add_argument("--version", action="version", version=f"lmkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{chat,serve,lite,check_env}", required=True)
    add_chat_parser(subparsers)
    _add_serve(subparsers, load=command == "serve")
    _add_lite(subparsers, load=command == "lite")
    env = subparsers.add_parser("check_env", help="print the environment: python, torch, CUDA, engines, model")
    env.set_defaults(func=_check_env)
    return parser


def _check_env(args: argparse.Namespace) -> int:
    import importlib.util
    import platform

    from lmkit import __version__

    rows = [
        ("lmkit", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
    ]
    try:
        import torch

        cuda = torch.cuda.is_available()
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "-"
        rows += [
            ("torch", torch.__version__),
            ("CUDA available", f"{cuda} (torch CUDA {torch.version.cuda})"),
            ("GPUs", gpus),
        ]
    except ImportError as exc:
        rows.append(("torch", f"missing ({exc})"))
    for pkg in ("transformers", "tokenizers", "gguf", "fastapi", "gradio"):
        spec = importlib.util.find_spec(pkg)
        rows.append((pkg, _version(pkg) if spec else "missing"))
    from lmkit.engines import BACKENDS

    for name, backend in BACKENDS.items():
        ok, why = backend.available()
        rows.append((f"engine {name}", "available" if ok else why))
    rows.append(("default model", _default_model_status()))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "installed"


def _default_model_status() -> str:
    from lmkit.model.gguf import DEFAULT_MODEL_PACKAGE, default_gguf_path
    from lmkit.model.registry import ModelLoadError

    try:
        return f"{DEFAULT_MODEL_PACKAGE}: {default_gguf_path()}"
    except ModelLoadError as exc:
        return f"missing ({exc})"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    rc = args.func(args)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
