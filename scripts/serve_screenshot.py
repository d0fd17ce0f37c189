"""Screenshot of the web demo for the README (docs/serve.png): the page over a pipeline, one of each class from
CTF and the baseline side by side, and a re-roll of one image's details.

Starts the server on a free loopback port in this process and drives Debian's Chromium with Playwright, as the
browser tests do. Retake it whenever the shipped pipeline changes:

    .venv/bin/python scripts/serve_screenshot.py [--pipeline pretrained/fmnist] [--out docs/serve.png]
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from ctfgen.pipeline import CTFPipeline
from ctfgen.serve.actions import Demo
from ctfgen.serve.app import build_app, launch_options

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 600_000
LOADED = "ids => ids.every(id => { const img = document.querySelector(id + ' img'); " \
         "return img && img.complete && img.naturalWidth > 0; })"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=str(REPO / "pretrained" / "fmnist"))
    parser.add_argument("--out", default=str(REPO / "docs" / "serve.png"))
    parser.add_argument("--reroll", type=int, default=8, help="the image (from 1) whose details are re-rolled")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    demo = Demo(CTFPipeline.from_pretrained(args.pipeline))
    app = build_app(demo)
    port = free_port()
    app.launch(**launch_options(demo, "127.0.0.1", port), prevent_thread_lock=True, quiet=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"http://127.0.0.1:{port}")
            page.check("#one-of-each input")
            page.fill("#per-class input", "1")
            page.check("#mode input[value='Both']")
            page.click("#generate")
            page.wait_for_function("() => document.querySelector('#stats').innerText.includes('done')")
            page.fill("#reroll-index input", str(args.reroll))
            page.click("#reroll")
            page.wait_for_function(LOADED, arg=["#ctf-images", "#baseline-images", "#reroll-images"])
            page.screenshot(path=str(tmp), full_page=True)
            browser.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        app.close()
        demo.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
