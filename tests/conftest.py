"""Shared fixtures: the real SmolLM2 model folder, tiny random-weight checkpoints, and the `gpu` marker."""

from __future__ import annotations

from pathlib import Path

import engine_testing
import pytest
import torch
from tiny_models import make_tiny_model

from lmkit.model.loader import resolve_model_path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct) as a converted HF folder."""
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def parity_prompts(smollm2_dir) -> dict[str, list[int]]:
    return engine_testing.parity_prompts(smollm2_dir)


@pytest.fixture(scope="session")
def parity_hf_reference(smollm2_dir, parity_prompts) -> dict[str, list[int]]:
    """HF's greedy PARITY_NEW_TOKENS tokens for each parity prompt (computed once for both engines' tests)."""
    return engine_testing.hf_greedy(smollm2_dir, parity_prompts, engine_testing.PARITY_NEW_TOKENS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir("llama"|"llama31"|"qwen2"|"qwen3"|"mistral") -> a checkpoint folder."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return made[kind]

    return get


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running end-to-end test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
