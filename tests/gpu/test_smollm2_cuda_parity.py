"""SmolLM2-135M on the GPU in fp32: greedy tokens of both engines equal HF transformers' for 64 tokens."""

from __future__ import annotations

import pytest
import torch
from test_pytorch_engine_cuda import run_greedy

pytestmark = pytest.mark.gpu

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion briefly.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def prompts_and_reference(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    prompts.append(tok.encode("The history of the printing press"))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).cuda().eval()
    ref = []
    for p in prompts:
        g = model.generate(
            torch.tensor([p], device="cuda"),
            max_new_tokens=64,
            min_new_tokens=64,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        ref.append(g[0, len(p) :].tolist())
    return prompts, ref


def _engine(backend: str, path):
    from lmkit.engines import create_engine
    from lmkit.messages import PytorchEngineConfig, TurboEngineConfig

    if backend == "turbo":
        cfg = TurboEngineConfig(device="cuda", dtype="float32", cache_block_seq_len=16, num_blocks=512)
    else:
        cfg = PytorchEngineConfig(device="cuda", dtype="float32", block_size=16, num_gpu_blocks=512)
    engine, _ = create_engine(path, backend, cfg)
    return engine


@pytest.mark.parametrize("backend", ["pytorch", "turbo"])
def test_greedy_equals_hf_on_gpu(smollm2_dir, prompts_and_reference, backend):
    prompts, ref = prompts_and_reference
    engine = _engine(backend, smollm2_dir)
    try:
        got = run_greedy(engine, prompts, 64)
    finally:
        engine.shutdown()
    for g, r in zip(got, ref):
        assert g == r
