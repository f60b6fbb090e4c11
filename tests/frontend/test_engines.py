"""The backend registry: config conversion between engines and the `auto` choice."""

from __future__ import annotations

import pytest

from lmkit import engines
from lmkit.engines import Backend, choose_backend, convert_config, make_config
from lmkit.messages import PytorchEngineConfig, TurboEngineConfig
from lmkit.model.spec import ModelSpec

SPEC = ModelSpec("LlamaForCausalLM", 320, 64, 160, 2, 4, 2, 16)


def test_make_config_maps_names_and_drops_unknown(capsys):
    cfg = make_config("pytorch", {"block_size": 32, "num_blocks": 10, "session_len": 99, "quant_policy": 8})
    assert isinstance(cfg, PytorchEngineConfig)
    assert (cfg.block_size, cfg.num_gpu_blocks, cfg.session_len) == (32, 10, 99)
    assert "quant_policy" in capsys.readouterr().err
    turbo = make_config("turbo", {"block_size": 32, "num_gpu_blocks": 10})
    assert (turbo.cache_block_seq_len, turbo.num_blocks) == (32, 10)


def test_convert_config_carries_only_user_choices():
    cfg = convert_config(TurboEngineConfig(session_len=512, cache_block_seq_len=32), "pytorch")
    assert isinstance(cfg, PytorchEngineConfig)
    assert cfg.session_len == 512 and cfg.block_size == 32
    default = convert_config(TurboEngineConfig(), "pytorch")
    assert default == PytorchEngineConfig()  # turbo's default block size is not forced on pytorch
    same = PytorchEngineConfig(block_size=8)
    assert convert_config(same, "pytorch") is same
    assert convert_config(None, "turbo") == TurboEngineConfig()


class _Supported:
    @staticmethod
    def supports(spec, device):
        return device == "cpu", "cpu only"


def test_auto_prefers_turbo_when_it_supports_the_model(monkeypatch, capsys):
    monkeypatch.setattr(Backend, "load", lambda self: _Supported if self.name == "turbo" else object)
    assert choose_backend(SPEC, "auto", TurboEngineConfig(device="cpu")) == "turbo"
    assert "auto -> turbo" in capsys.readouterr().err
    assert choose_backend(SPEC, "auto", TurboEngineConfig(device="cuda")) == "pytorch"
    assert "cpu only" in capsys.readouterr().err


def test_auto_with_a_pytorch_config_means_the_pytorch_engine(monkeypatch, capsys):
    monkeypatch.setattr(Backend, "load", lambda self: _Supported)
    assert choose_backend(SPEC, "auto", PytorchEngineConfig(device="cpu")) == "pytorch"
    assert "PytorchEngineConfig" in capsys.readouterr().err
    assert choose_backend(SPEC, "turbo", PytorchEngineConfig(device="cpu")) == "turbo"  # an explicit choice stands


def test_auto_falls_back_when_turbo_is_missing(monkeypatch):
    def load(self):
        if self.name == "turbo":
            raise ImportError("No module named 'lmkit._turbo'")
        return object

    monkeypatch.setattr(Backend, "load", load)
    assert choose_backend(SPEC, "auto", None) == "pytorch"
    with pytest.raises(RuntimeError, match="not available"):
        choose_backend(SPEC, "turbo", None)
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend(SPEC, "nope", None)
    assert set(engines.AUTO_ORDER) == set(engines.BACKENDS)


def test_public_api_exports():
    import lmkit

    for name in ("pipeline", "Pipeline", "GenerationConfig", "PytorchEngineConfig", "TurboEngineConfig", "Response"):
        assert getattr(lmkit, name) is not None
