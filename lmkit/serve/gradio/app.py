"""A gradio chat page over an in-process pipeline or a running api_server.

lmkit serve gradio MODEL                       # in-process engine
lmkit serve gradio --api-url http://host:23333 # a running api_server (or proxy)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Protocol


class ChatBackend(Protocol):
    model_name: str

    def stream(self, messages: list[dict], temperature: float, top_p: float, max_tokens: int) -> Iterator[str]: ...


class APIBackend:
    """Streams from an api_server through the OpenAI client."""

    def __init__(self, api_url: str, api_key: str | None = None, model: str | None = None) -> None:
        from lmkit.serve.client import APIClient

        self.client = APIClient(api_url, api_key, model)
        self.model_name = self.client.model

    def stream(self, messages, temperature, top_p, max_tokens) -> Iterator[str]:
        return self.client.chat_stream(messages, temperature=temperature, top_p=top_p, max_tokens=int(max_tokens))


class PipelineBackend:
    """Streams from an in-process `lmkit.api.pipeline`."""

    def __init__(self, model: str, backend: str = "auto", backend_config=None, model_name: str | None = None):
        from lmkit.api import pipeline

        self.pipe = pipeline(model, backend_config=backend_config, backend=backend, model_name=model_name)
        self.model_name = self.pipe.async_engine.model_name

    def stream(self, messages, temperature, top_p, max_tokens) -> Iterator[str]:
        from lmkit.messages import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=int(max_tokens), temperature=temperature, top_p=top_p)
        it = self.pipe.stream_infer(messages, cfg)
        try:
            for resp in it:
                if resp.text:
                    yield resp.text
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def _text(content) -> str:
    """Gradio may hand back message content as a string or as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(p.get("text", "") if isinstance(p, dict) else p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content or "")


def build_demo(backend: ChatBackend):
    import gradio as gr

    def add_user(message: str, history: list):
        if not message.strip():
            return message, history
        return "", [*history, {"role": "user", "content": message}]

    def respond(history: list, temperature: float, top_p: float, max_tokens: int):
        if not history or history[-1]["role"] != "user":
            yield history
            return
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in history]
        history = [*history, {"role": "assistant", "content": ""}]
        try:
            for piece in backend.stream(messages, temperature, top_p, max_tokens):
                history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
                yield history
        except Exception as exc:  # show the failure in the chat instead of a broken page
            history[-1] = {"role": "assistant", "content": f"{history[-1]['content']}\n\n[error: {exc}]"}
            yield history

    with gr.Blocks(title="lmkit chat") as demo:
        gr.Markdown(f"## lmkit chat · `{backend.model_name}`")
        chatbot = gr.Chatbot(height=460, elem_id="chatbot", label="Chat")
        msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="msg")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            stop = gr.Button("Stop", elem_id="stop")
            reset = gr.Button("Reset", elem_id="reset")
        with gr.Accordion("Generation settings", open=False):
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top p")
            max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
        settings = [chatbot, temperature, top_p, max_tokens]
        ev_submit = msg.submit(add_user, [msg, chatbot], [msg, chatbot], queue=False).then(respond, settings, chatbot)
        ev_click = send.click(add_user, [msg, chatbot], [msg, chatbot], queue=False).then(respond, settings, chatbot)
        stop.click(None, None, None, cancels=[ev_submit, ev_click])
        reset.click(lambda: [], None, chatbot, queue=False, cancels=[ev_submit, ev_click])
    return demo


def add_gradio_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="model to run in-process (or use --api-url)")
    parser.add_argument("--api-url", default=None, help="a running api_server or proxy")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--backend", default="auto", choices=["auto", "pytorch", "turbo"])
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--server-name", default="0.0.0.0")
    parser.add_argument("--server-port", type=int, default=6006)


def run_gradio(args: argparse.Namespace) -> None:
    if (args.model is None) == (args.api_url is None):
        raise SystemExit("lmkit serve gradio: give either MODEL or --api-url")
    if args.api_url:
        backend: ChatBackend = APIBackend(args.api_url, args.api_key, args.model_name)
    else:
        backend = PipelineBackend(args.model, args.backend, model_name=args.model_name)
    demo = build_demo(backend)
    demo.queue(default_concurrency_limit=8)
    print(f"lmkit gradio on http://{args.server_name}:{args.server_port}", flush=True)
    demo.launch(server_name=args.server_name, server_port=args.server_port, share=False, show_error=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmkit.serve.gradio.app",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_gradio_args(parser)
    run_gradio(parser.parse_args(argv))


if __name__ == "__main__":
    main()
