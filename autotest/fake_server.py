"""An api_server process over the fake engine of tests/serve (LMKIT_AUTOTEST_FAKE=1: develops and
debugs the end-to-end tests without a model). Same flags as `lmkit serve api_server`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fake_engine import FakeAsyncEngine  # noqa: E402

from lmkit.serve.openai.api_server import add_server_args, run_server  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    args = parser.parse_args()
    run_server(
        args,
        engine_factory=lambda: FakeAsyncEngine(
            args.session_len or 512, token_delay_s=0.02, model_name=args.model_name or "fake"
        ),
    )
