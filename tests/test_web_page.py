"""The web page at ``GET /``, driven in headless Debian Chromium (Playwright, no downloaded browser)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_serve_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
ARTEFACTS = ROOT / "tests" / "artefacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")]


@pytest.fixture(scope="module")
def smollm_server(tmp_path_factory):
    """serve.py on the embedded default models with three untrained (random, small) LoRAs."""
    from tests.helpers import make_smollm_pool

    d = tmp_path_factory.mktemp("web")
    pool = make_smollm_pool(d)
    server = ServerProcess(["--config_path", str(pool), "--lora_num", "2", "--max_new_tokens", "12"], d / "server.log")
    server.wait_ready()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def page(smollm_server):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
    pg = browser.new_page(viewport={"width": 1100, "height": 900})
    pg.goto(smollm_server.url + "/")
    pg.wait_for_function("document.querySelectorAll('#sliders input').length === 3")
    yield pg
    browser.close()
    pw.stop()


SARCASM = "Which statement is sarcastic?\n\nOPTIONS:\n- (a) Great, another meeting that could have been an email.\n- (b) The meeting ended early."


def test_prompt_streams_answer_and_shows_retrieved_adapters(page):
    page.get_by_label("Input (Enter sends").fill(SARCASM)
    page.get_by_label("Input (Enter sends").press("Enter")  # the keyboard alone sends
    page.wait_for_selector("#answer[data-done='1']", timeout=120_000)
    assert page.inner_text("#answer").strip()
    names = page.locator("#adapters .adapter-name").all_inner_texts()
    assert len(names) == 2 and names[0] == "snarks"
    assert "weight 0.500" in page.inner_text("#adapters")
    assert page.inner_text("#composition-used") == "mixture"
    assert page.inner_text("#t-total") != "–"
    ARTEFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "web_page.png"), full_page=True)
    assert (ARTEFACTS / "web_page.png").stat().st_size > 10_000


def test_hand_picked_mix_is_applied(page):
    page.select_option("#mode", "manual")
    for name, value in (("qa_wikidata", "0.7"), ("winowhy", "1.2")):
        slider = page.locator(f"#sliders input[data-adapter='{name}']")
        slider.evaluate(f"(el) => {{ el.value = '{value}'; el.dispatchEvent(new Event('input')); }}")
    page.get_by_label("Input (Enter sends").fill("The capital of France is")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('#adapters .adapter-name').length === 2 && "
                           "[...document.querySelectorAll('#adapters .adapter-name')].map(e => e.textContent).sort().join() === 'qa_wikidata,winowhy'",
                           timeout=60_000)
    text = page.inner_text("#adapters")
    assert "weight 0.700" in text and "weight 1.200" in text
    page.select_option("#mode", "auto")


def test_api_error_is_shown_as_its_message(page):
    page.fill("#max-tokens", "100000")
    page.get_by_label("Input (Enter sends").fill("hello")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "'max_tokens' must be between 1 and 1024" in page.inner_text("#error")
    page.fill("#max-tokens", "8")


def test_compare_runs_three_requests(page):
    page.get_by_label("Input (Enter sends").fill(SARCASM)
    page.click("#compare-btn")
    page.wait_for_function("document.querySelectorAll('#compare article .timing').length === 3 && "
                           "[...document.querySelectorAll('#compare article .timing')].every(e => e.textContent.includes('total'))",
                           timeout=180_000)
    titles = page.locator("#compare h3").all_inner_texts()
    assert titles == ["base", "top-1 selection", "top-3 mixture"]
    arts = page.locator("#compare article")
    assert arts.nth(0).locator(".adapter").count() == 0
    assert arts.nth(1).locator(".adapter").count() == 1
    assert arts.nth(2).locator(".adapter").count() == 3


def test_phone_width_has_no_horizontal_scroll(page):
    page.set_viewport_size({"width": 380, "height": 800})
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    for control in ("Mode", "Composition", "k (adapters retrieved)", "Weighting", "Max tokens"):
        assert page.get_by_label(control).is_visible()
    page.set_viewport_size({"width": 1100, "height": 900})


def test_teach_a_new_task_trains_it_shows_the_loss_and_retrieves_it(page, smollm_server):
    """Runs last: the pool gains an adapter. Rows pasted as JSON Lines; the loss is drawn while it trains; once ready,
    a prompt of the new task retrieves it."""
    rows = [{"inputs": f"Recipe question {i}: how many minutes to bake the {food} in the oven?", "targets": f"{20 + i} minutes"}
            for i, food in enumerate(["cake", "bread", "pie", "cookies", "muffins", "scones", "tart", "brownies", "buns", "rolls",
                                      "bagels", "pretzels"])]
    page.fill("#teach-rows", "not json\n")
    page.fill("#teach-name", "cooking")
    page.click("#teach-btn")
    page.wait_for_selector("#teach-error:not([hidden])")
    assert "Line 1 is not JSON" in page.inner_text("#teach-error")
    page.fill("#teach-rows", "\n".join(json.dumps(r) for r in rows[:5]))
    page.click("#teach-btn")
    page.wait_for_function("document.querySelector('#teach-error').textContent.includes('8 to 5000')")  # the server's 400
    page.fill("#teach-rows", "\n".join(json.dumps(r) for r in rows))
    page.fill("#teach-domain", "recipes")
    page.fill("#teach-steps", "4")
    page.click("#teach-btn")
    page.wait_for_selector("#teach-status[data-state='ready'], #teach-status[data-state='failed']", timeout=240_000)
    assert page.get_attribute("#teach-status", "data-state") == "ready", page.inner_text("#teach-error")
    assert "cooking joined the pool" in page.inner_text("#teach-status")
    assert page.locator("#teach-loss polyline").get_attribute("points").count(",") == 4  # one point per step
    assert page.is_visible("#teach-loss")
    page.wait_for_function("document.querySelectorAll('#sliders input').length === 4")  # the page's pool list refreshed
    page.get_by_label("Input (Enter sends").fill("Recipe question: how many minutes to bake the cake in the oven?")
    page.click("#send")
    page.wait_for_selector("#answer[data-done='1']", timeout=120_000)  # reset to 0 when a prompt is sent
    assert "cooking" in page.locator("#adapters .adapter-name").all_inner_texts()
    page.screenshot(path=str(ARTEFACTS / "web_page_teach.png"), full_page=True)
