"""`lmkit chat` driven in a pseudo-terminal as a person would use it, and `lmkit --help`."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

STATS = re.compile(r"\[(\d+) tokens, ([\d.]+) tok/s, prefill (\d+) new / (\d+) cached tokens")


def lmkit_command() -> list[str]:
    exe = shutil.which("lmkit")
    return [exe] if exe else [sys.executable, "-m", "lmkit.cli.main"]


def test_help_lists_commands_and_flags():
    out = subprocess.run([*lmkit_command(), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("chat", "serve", "lite", "check_env"):
        assert command in out
    chat = subprocess.run([*lmkit_command(), "chat", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in (
        "--backend",
        "--tp",
        "--session-len",
        "--cache-max-entry-count",
        "--cache-block-seq-len",
        "--max-batch-size",
        "--quant-policy",
        "--model-format",
        "--enable-prefix-caching",
        "--disable-prefix-caching",
        "--temperature",
        "--top-p",
        "--top-k",
        "--max-new-tokens",
        "--adapters",
    ):
        assert flag in chat


def test_lite_auto_awq_says_not_implemented():
    proc = subprocess.run([*lmkit_command(), "lite", "auto_awq", "some/model"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not implemented yet" in proc.stderr


def test_check_env():
    out = subprocess.run([*lmkit_command(), "check_env"], capture_output=True, text=True, check=True).stdout
    for key in ("python", "torch", "CUDA available", "lmkit", "engine turbo", "engine pytorch", "default model"):
        assert key in out


def test_chat_two_turns_reset_interrupt_exit(smollm2_dir):
    cmd = [
        *lmkit_command(),
        "chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "200",
        "--num-blocks",
        "128",
        "--session-len",
        "2048",
        "--cache-block-seq-len",
        "16",
    ]
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=120, dimensions=(50, 200))
    child.logfile_read = transcript = io.StringIO()
    try:
        child.expect(">>> ")
        child.sendline("What is the capital of France?")
        child.expect(STATS)
        first = [int(x) for x in (child.match.group(1), child.match.group(3), child.match.group(4))]
        assert "Paris" in child.before
        child.expect(">>> ")
        child.sendline("And of Germany?")
        child.expect(STATS)
        n, new, cached = int(child.match.group(1)), int(child.match.group(3)), int(child.match.group(4))
        assert n > 0 and cached > 0 and new < new + cached
        assert new + cached > sum(first[1:])  # the whole conversation was re-submitted
        child.expect(">>> ")
        child.sendline("reset")
        child.expect(r"\[history cleared\]")
        child.expect(">>> ")
        child.sendline("Write a very long story about a dragon who learns to fly.")
        child.expect(r"fly\.\r?\n")  # the echo of the question
        child.expect(r"\w{2,}")  # the answer has started
        child.sendintr()  # Ctrl-C stops the answer, not the chat
        child.expect(r"\[stopped\]")
        child.expect(">>> ")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    print(transcript.getvalue())
    assert child.exitstatus == 0, transcript.getvalue()
