"""The README's screenshots of `deltatune ui`, taken in the headless Chromium the browser tests use.

    python docs/ui_screenshots.py --runs RUNS_DIR [--out docs/images] [--text "..."] [--message "..."]

Opens the runs page, the first comparison (hovering its best point) and the playground (the
classifier base: --text classified by every adapter; a causal-LM base: --message sent to the
base model and its adapter) for the runs under RUNS_DIR, and writes ui-*.png into --out.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from deltatune.serving.server import ServerThread
from deltatune.ui.app import build_app

CHROMIUM = os.environ.get("DELTATUNE_CHROMIUM", "/usr/bin/chromium")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True)
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--text", default="A gorgeous, funny and moving film.")
    parser.add_argument("--message", default="What is the capital of France?")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    server = ServerThread(build_app(args.runs))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.set_default_timeout(300_000)  # a real model loads on the first playground request
        page.goto(f"{server.url}/#/runs")
        page.wait_for_selector("#runs-table")
        page.screenshot(path=str(out / "ui-runs.png"))

        page.goto(f"{server.url}/#/compare")
        page.wait_for_selector("#compare-table")
        best = max(page.locator("#compare-table tbody tr").all(),
                   key=lambda row: float(row.locator("td").nth(1).inner_text().rstrip("%") or 0))
        page.hover(f'#tradeoff-chart circle[data-key="{best.get_attribute("data-method")}"]')
        page.screenshot(path=str(out / "ui-compare.png"), full_page=True)

        page.goto(f"{server.url}/#/playground")
        page.wait_for_selector("#play-base option", state="attached")
        options = page.locator("#play-base option").all_inner_texts()
        done = set()
        for index, label in enumerate(options):
            kind = "classification" if label.endswith("classification") else "causal-lm"
            if kind in done:
                continue
            done.add(kind)
            page.locator("#play-base").select_option(str(index))
            if kind == "classification":
                page.fill("#play-text", args.text)
                page.click("#play-classify")
                page.wait_for_selector("#play-results .column")
                page.screenshot(path=str(out / "ui-playground.png"), full_page=True)
            else:
                page.locator('#play-adapters input[value="base"]').check()
                page.fill("#play-message", args.message)
                page.click("#play-send")
                page.wait_for_function("document.querySelectorAll('#play-chats [data-state=done]').length"
                                       " == document.querySelectorAll('#play-chats .bubble.assistant').length")
                page.screenshot(path=str(out / "ui-chat.png"), full_page=True)
        browser.close()
    server.stop()
    print("wrote", ", ".join(sorted(p.name for p in out.glob("ui-*.png"))))


if __name__ == "__main__":
    main()
