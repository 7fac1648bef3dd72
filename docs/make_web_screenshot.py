"""Regenerate docs/web_page.png: the web page after one answer, on the embedded default with the trained pool.

    python docs/make_web_screenshot.py

Starts ``serve.py --settings config/embedded.json``, opens ``/`` in headless Debian Chromium (Playwright with
``executable_path``), sends one prompt from the embedded suite and saves the page.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    from bench_serve import start_server
    from playwright.sync_api import sync_playwright

    rows = json.loads((ROOT / "data" / "bigbench" / "combined_test.json").read_text())
    prompt = next(r["inputs"] for r in rows if r["task"] == "snarks")
    proc, url = start_server(["--settings", "config/embedded.json"], ROOT / ".web_screenshot.log")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#sliders input').length > 0")
            page.fill("#prompt", prompt)
            page.press("#prompt", "Enter")
            page.wait_for_selector("#answer[data-done='1']", timeout=120_000)
            page.screenshot(path=str(ROOT / "docs" / "web_page.png"), full_page=True)
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
