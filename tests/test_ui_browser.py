"""`deltatune ui` in a real browser: headless Chromium (Debian's /usr/bin/chromium, or
$DELTATUNE_CHROMIUM) driven by Playwright, against the app on 127.0.0.1.

With DELTATUNE_UI_SCREENSHOTS=DIR the tests also save the README's screenshots there.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.serving.server import ServerThread
from deltatune.serving.generate import generate_text
from deltatune.training.progress import RunLog
from deltatune.ui.app import build_app
from tiny_runs import one_thread  # noqa: F401  (the fixture)
from ui_site import finish_comparison, make_site, start_comparison, train_chat_run, train_compared_method

CHROMIUM = os.environ.get("DELTATUNE_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("DELTATUNE_UI_SCREENSHOTS")
TIMEOUT_MS = 90_000  # a launched run is a fresh Python process on a busy 2-core machine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    torch.set_num_threads(1)
    site = make_site(tmp_path_factory.mktemp("ui-browser"))
    site["cmp"] = start_comparison(site)
    site["summaries"] = {"lora": train_compared_method(site, site["cmp"], "lora")}
    train_chat_run(site)
    server = ServerThread(build_app(site["runs"], poll_ms=250))
    site["url"] = server.url
    yield site
    server.server.should_exit = True  # the app's shutdown stops any job still running
    server.thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: `apt-get install -y chromium` (.ci/run does) or set DELTATUNE_CHROMIUM")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no JavaScript error on any page


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"ui-{name}.png"))


def half_up(value: float) -> str:
    """Two decimals as the page's toFixed(2) writes them (ties away from zero; Python's format
    rounds 53.125 to even, 53.12)."""
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def fill(page, values: dict) -> None:
    for name, value in values.items():
        target = page.locator(f"#f-{name}")
        if target.evaluate("node => node.tagName") == "SELECT":
            target.select_option(value)
        else:
            target.fill(value)


def test_bad_form_input_shows_a_message_next_to_the_field(page, site):
    page.goto(f"{site['url']}/#/launch")
    fill(page, {"name": "no spaces allowed", "model": "/nowhere/model", "train": "missing.jsonl", "r": "-1"})
    page.click("#start-button")
    for field, text in [("name", "letters, digits"), ("model", "not a preset"),
                        ("train", "file not found"), ("r", "must be > 0")]:
        message = page.locator(f'[data-error-for="{field}"]')
        message.wait_for()
        assert text in message.inner_text()
        assert "invalid" in page.locator(f'.field[data-field="{field}"]').get_attribute("class")
    assert "Traceback" not in page.content()
    assert page.locator(".job").count() == 0  # nothing was started


def test_launch_a_run_from_the_form_and_see_its_curve_and_row(page, site):
    page.goto(f"{site['url']}/#/launch")
    fill(page, {"name": "from-form", "model": str(site["bert"]), "train": str(site["train"]),
                "eval": str(site["dev"]), "method": "lora", "r": "4", "max_steps": "6",
                "batch_size": "8", "eval_every": "3"})
    page.click("#plan-button")
    peak = page.locator('#plan-table tr[data-method="lora"] td.peak')
    assert float(peak.inner_text().replace(",", "")) > 0  # plan's predicted peak MB
    page.click("#start-button")
    job = page.locator('.job[data-state="finished"]')
    job.wait_for()
    page.goto(f"{site['url']}/#/runs")
    row = page.locator('#runs-table tr[data-run="from-form"]')
    row.wait_for()
    summary = json.loads((site["runs"] / "from-form" / "summary.json").read_text())
    assert f"{half_up(100 * summary['final_eval']['accuracy'])}%" in row.inner_text()
    shot(page, "runs")
    row.click()
    curve = page.locator('#loss-chart polyline[data-series="train loss"]')
    curve.wait_for()
    assert curve.get_attribute("data-points") == "6"  # one point per logged step
    assert page.locator('#loss-chart polyline[data-series="eval loss"]').get_attribute("data-points") == "2"
    assert "step-6" in page.locator("#view").inner_text()  # its checkpoints are listed


def test_curve_grows_as_metrics_jsonl_grows(page, site):
    partial = site["runs"] / ".growing.partial"
    partial.mkdir()
    (partial / "config.yaml").write_text("model: m\ntask: classification\nmethod: {name: lora}\n")
    log = RunLog(partial, total_steps=10)
    log.log({"step": 1, "loss": 0.9})
    page.goto(f"{site['url']}/#/run/growing")
    curve = '#loss-chart polyline[data-series="train loss"]'
    page.wait_for_selector(f'{curve}[data-points="1"]', state="attached")
    for step in (2, 3, 4):
        log.log({"step": step, "loss": 0.9 / step})
    page.wait_for_selector(f'{curve}[data-points="4"]', state="attached")
    log.log({"step": 4, "eval_loss": 0.5, "eval_accuracy": 0.75})
    page.wait_for_selector('#eval-chart polyline[data-series="accuracy"][data-points="1"]', state="attached")
    log.close()


def test_comparison_fills_in_and_hover_reads_a_point(page, site):
    page.goto(f"{site['url']}/#/compare/cmp")
    page.wait_for_selector('#tradeoff-chart[data-points="1"]')  # lora finished, prompt not yet
    site["summaries"]["prompt"] = train_compared_method(site, site["cmp"], "prompt")
    rows = finish_comparison(site, site["cmp"], site["summaries"])
    page.wait_for_selector('#tradeoff-chart[data-points="2"]')
    page.wait_for_selector("#compare-reading li")
    prompt = next(r for r in rows if r["method"] == "prompt")
    page.hover('#tradeoff-chart circle[data-key="prompt"]')
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    text = tip.inner_text()
    assert f"accuracy: {half_up(100 * prompt['score'])}%" in text
    assert f"trainable: {prompt['trainable_params']:,}" in text
    assert f"peak memory: {prompt['peak_memory_mb']:,.0f} MB" in text
    assert f"file: {prompt['saved_mb']:.2f} MB" in text
    assert page.locator("#compare-table tbody tr").count() == 2
    assert "Best task score" in page.locator("#compare-reading").inner_text()
    shot(page, "compare")


def test_playground_classifier_side_by_side(page, site):
    page.goto(f"{site['url']}/#/playground")
    page.locator("#play-base").select_option(label=f"{site['bert']} · classification")
    page.fill("#play-text", "the film was superb")
    page.click("#play-classify")
    columns = page.locator("#play-results .column")
    columns.first.wait_for()
    assert columns.count() >= 2  # the first adapters are ticked by default
    for i in range(columns.count()):
        text = columns.nth(i).inner_text()
        percents = [float(p) for p in re.findall(r"([\d.]+)%", text)]
        assert len(percents) == 2 and abs(sum(percents) - 100) < 0.2
        assert columns.nth(i).locator(".predicted").inner_text() in ("0", "1")


def test_playground_chat_streams_an_answer(page, site):
    page.goto(f"{site['url']}/#/playground")
    page.locator("#play-base").select_option(label=f"{site['llama']} · causal-lm")
    page.fill("#play-max-tokens", "12")
    page.fill("#play-message", "Repeat the word good.")
    page.click("#play-send")
    reply = page.locator('#play-chats [data-run="chat"] .bubble.assistant[data-state="done"]')
    reply.wait_for()
    model, tokenizer = dt.load_model(str(site["llama"]), task="causal-lm")
    dt.load_adapter(model, site["runs"] / "chat")
    expected = generate_text(model, tokenizer, "Repeat the word good.", max_new_tokens=12)
    assert reply.inner_text().strip() == expected and expected
    shot(page, "playground")


def test_the_page_asks_once_for_the_api_key(page, site):
    server = ServerThread(build_app(site["runs"], api_key="s3cret"))
    try:
        asked = []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept("s3cret")))
        page.goto(f"{server.url}/#/runs")
        page.locator('#runs-table tr[data-run="chat"]').wait_for()
        assert len(asked) == 1 and "API key" in asked[0]
        page.reload()  # remembered by this browser
        page.locator('#runs-table tr[data-run="chat"]').wait_for()
        assert len(asked) == 1
    finally:
        server.stop()
