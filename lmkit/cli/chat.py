"""`lmkit chat [MODEL]`: an interactive multi-turn chat in the terminal.

Each turn re-submits the whole conversation; prefix caching means only the new tokens are prefilled, which
the line after each answer shows. `reset` clears the history, `exit` (or Ctrl-D) quits, Ctrl-C stops an answer.
"""

from __future__ import annotations

import argparse
import sys
import time

# CLI flag -> engine config field (either engine's name; the registry maps them to the chosen engine).
_ENGINE_FLAGS = {
    "session_len": "session_len",
    "cache_max_entry_count": "cache_max_entry_count",
    "cache_block_seq_len": "block_size",
    "max_batch_size": "max_batch_size",
    "enable_prefix_caching": "enable_prefix_caching",
    "tp": "tp",
    "quant_policy": "quant_policy",
    "model_format": "model_format",
    "device": "device",
    "dtype": "dtype",
    "num_blocks": "num_blocks",
    "eager_mode": "eager_mode",
}
EAGER_MODE_HELP = "pytorch engine: no CUDA graphs (GPU), no compiled layers (CPU)"
_GEN_FLAGS = ["temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed"]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags shared with other commands (names as in LMDeploy)."""
    from lmkit.engines import backend_names

    g = parser.add_argument_group("engine")
    g.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *backend_names()],
        help="engine: auto picks turbo where it supports the model and device, else pytorch",
    )
    g.add_argument("--session-len", type=int, help="max prompt + generated tokens per request")
    g.add_argument("--cache-max-entry-count", type=float, help="fraction of free memory for the KV cache")
    g.add_argument("--cache-block-seq-len", type=int, help="tokens per KV-cache block")
    g.add_argument("--max-batch-size", type=int, help="max sequences running at once")
    g.add_argument(
        "--enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_true",
        default=None,
        help="reuse KV blocks of identical prefixes (default: on)",
    )
    g.add_argument("--disable-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    g.add_argument("--tp", type=int, help="tensor parallel degree")
    g.add_argument("--quant-policy", type=int, choices=[0, 4, 8], help="KV cache quantization (turbo)")
    g.add_argument("--model-format", choices=["hf", "awq"], help="checkpoint format (default: detect)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the engine runs (default: auto)")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="compute dtype")
    g.add_argument("--num-blocks", type=int, help="exact number of KV blocks (overrides --cache-max-entry-count)")
    g.add_argument("--adapters", nargs="+", metavar="NAME=PATH", help="LoRA adapters to load (pytorch engine)")
    g.add_argument("--eager-mode", action="store_true", default=None, help=EAGER_MODE_HELP)


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    chat = subparsers.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument(
        "model", nargs="?", default=None, help="HF checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    add_engine_args(chat)
    g = chat.add_argument_group("generation")
    g.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 = off (default 0)")
    g.add_argument("--max-new-tokens", type=int, help="max tokens per answer (default 512)")
    g.add_argument("--repetition-penalty", type=float, help="1 = off")
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument("--system", help="a system prompt")
    chat.set_defaults(func=run_chat)
    return chat


def engine_fields(args: argparse.Namespace) -> dict:
    """The engine settings the user gave (flags left out keep each engine's own defaults)."""
    fields = {
        field: getattr(args, flag) for flag, field in _ENGINE_FLAGS.items() if getattr(args, flag, None) is not None
    }
    if getattr(args, "adapters", None):
        bad = [a for a in args.adapters if "=" not in a]
        if bad:
            raise SystemExit(f"lmkit: --adapters takes NAME=PATH pairs, got {bad[0]!r}")
        fields["adapters"] = dict(a.split("=", 1) for a in args.adapters)
    return fields


def start_async_engine(args: argparse.Namespace):
    """Pick the backend, build its config from the flags, start the engine."""
    from lmkit.engines import build_async_engine, choose_backend, make_config
    from lmkit.model.loader import load_spec, resolve_model_path

    path = resolve_model_path(args.model)
    fields = engine_fields(args)
    backend = choose_backend(load_spec(path), args.backend, make_config("pytorch", dict(fields)))
    return build_async_engine(args.model, backend, make_config(backend, fields))


def run_chat(args: argparse.Namespace) -> int:
    from lmkit.api import Pipeline
    from lmkit.messages import GenerationConfig
    from lmkit.model.registry import ModelLoadError

    try:
        pipe = Pipeline(start_async_engine(args))
    except (ModelLoadError, RuntimeError, ValueError) as exc:  # a bad model path, a backend that is missing
        print(f"lmkit chat: {exc}", file=sys.stderr)
        return 1
    gen = GenerationConfig(**{k: getattr(args, k) for k in _GEN_FLAGS if getattr(args, k) is not None})
    print(
        f"lmkit chat: {pipe.async_engine.model_name} on the {pipe.backend} engine. "
        "Type `reset` to clear the history, `exit` to quit; Ctrl-C stops an answer.",
        flush=True,
    )
    try:
        _loop(pipe, gen, args.system)
    finally:
        pipe.close()
    return 0


def _loop(pipe, gen, system: str | None) -> None:
    history: list[dict] = []
    while True:
        try:
            line = input("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return
        cmd = line.strip()
        if cmd == "exit":
            return
        if cmd == "reset":
            history.clear()
            print("[history cleared]", flush=True)
            continue
        if not cmd:
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        answer = _answer(pipe, messages, gen)
        if answer is not None:
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def _answer(pipe, messages: list[dict], gen) -> str | None:
    """Stream one answer; None when it was stopped with Ctrl-C (the turn is then left out of the history)."""
    start = time.perf_counter()
    pieces: list[str] = []
    last = None
    stream = pipe.stream_infer(messages, gen)
    try:
        for chunk in stream:
            print(chunk.text, end="", flush=True)
            pieces.append(chunk.text)
            last = chunk
    except KeyboardInterrupt:
        stream.close()  # aborts the engine request
        print("\n[stopped]", flush=True)
        return None
    except Exception as exc:  # a refused request (e.g. the conversation outgrew the session): say so, go on
        print(f"\n[error: {exc}]", flush=True)
        return None
    elapsed = time.perf_counter() - start
    if last is not None:
        n = last.generate_token_len
        cached = last.num_cached_tokens
        new = last.input_token_len - cached
        note = "" if last.finish_reason in ("stop", None) else f", finish: {last.finish_reason}"
        print(
            f"\n[{n} tokens, {n / max(elapsed, 1e-9):.1f} tok/s, prefill {new} new / {cached} cached tokens{note}]",
            flush=True,
        )
    return "".join(pieces)
