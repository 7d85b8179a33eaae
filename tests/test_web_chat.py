"""The chat page end to end in headless Chromium (Debian's package, driven by Python playwright)."""

import shutil

import pytest

from nanoseek.serve.app import ServeConfig
from serving import live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# scripts/test.sh installs Debian's chromium when it is missing, so in CI this always runs.
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (scripts/test.sh installs it)")


def test_type_a_message_and_see_the_streamed_answer_and_thinking_panel(chat_checkpoint):
    from playwright.sync_api import sync_playwright

    directory, _ = chat_checkpoint("deepseek_v3")
    with live_server(directory, ServeConfig(model_name="tiny")) as (base, llm, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(base + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        assert page.input_value("#model") == "tiny"
        page.fill("#input", "What is 2 + 2?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant .stats:not(:empty)", timeout=60_000)
        thinking = page.locator(".msg.assistant details.thinking")
        assert thinking.is_visible()  # the R1 template opens <think>: the answer starts in the thinking panel
        assert page.locator(".msg.assistant details.thinking .body").text_content().strip() != ""  # collapsed
        stats = page.locator(".msg.assistant .stats").inner_text()
        assert "tokens/s" in stats and "tokens" in stats
        assert page.locator(".msg.user").inner_text() == "What is 2 + 2?"
        # The conversation survives a reload (kept in the browser).
        page.reload()
        page.wait_for_selector(".msg.assistant")
        assert page.locator(".msg.user").count() == 1
        browser.close()
