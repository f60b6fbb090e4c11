"""The gradio chat page in headless Chromium: type a message, watch the answer stream in, screenshot it."""

from __future__ import annotations

import os
import shutil
import sys
import time

import pytest
from e2e_util import ROOT, Proc, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def gradio_page(server, logs_dir):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lmkit.serve.gradio.app",
        "--api-url",
        server.url,
        "--server-name",
        "127.0.0.1",
        "--server-port",
        str(port),
    ]
    proc = Proc(cmd, port, logs_dir / "gradio.log")
    try:
        yield proc.start(ready_path="/", timeout_s=120)
    finally:
        proc.stop()


def test_chat_in_browser(gradio_page, tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = tmp_path_factory.mktemp("gradio-screenshots")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1200,900",
    ]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(gradio_page.url)
        box = _wait(lambda: driver.find_element(By.CSS_SELECTOR, "#msg textarea"), 60, "the message box")
        box.send_keys("What is the capital of France?")
        box.send_keys(Keys.ENTER)

        def bot_text() -> str:
            bots = driver.find_elements(By.CSS_SELECTOR, "#chatbot .bot, #chatbot [data-testid='bot']")
            return bots[-1].text.strip() if bots else ""

        first = _wait(lambda: bot_text() or None, 90, "the first streamed words")
        final = first
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # streaming: the answer keeps growing, then settles
            time.sleep(1.0)
            now = bot_text()
            if now == final and len(now) > len(first):
                break
            final = now
        path = shots / "gradio_chat.png"
        driver.save_screenshot(str(path))
        print(f"gradio screenshot: {path}")
        assert final and "\ufffd" not in final
        assert "error" not in final.lower()
        assert (ROOT / "lmkit").exists()
    finally:
        driver.quit()


def _wait(get, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = get()
            if value:
                return value
        except Exception:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")
