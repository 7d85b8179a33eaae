"""The chat page end to end in headless Chromium (Debian's package, driven by Python playwright). Screenshots go to
test-output/web/ (or $NANOSEEK_TEST_OUTPUT/web)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from nanoseek.serve.app import ServeConfig
from nanoseek.serve.policy import Policy
from nanoseek.serve.pricing import Prices
from serving import live_server, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# scripts/test.sh installs Debian's chromium when it is missing, so in CI this always runs.
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (scripts/test.sh installs it)")
OUT = Path(os.environ.get("NANOSEEK_TEST_OUTPUT", Path(__file__).parent.parent / "test-output")) / "web"
RICH = ("## Result\n\nThe **sum** is $2+2=4$, so\n\n$$\\boxed{4}$$\n\nand \\(x^2\\) too.\n\n```python\nprint(2 + 2)\n```\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>"
        "[link](javascript:window.pwned=3)")


class Browser:
    """A page plus everything that went wrong in it: console errors, page errors, failed requests."""

    def __init__(self, playwright):
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        self.context = self.browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.problems = []
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("response", lambda r: self.problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)

    def shot(self, name):
        OUT.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
        assert (OUT / f"{name}.png").stat().st_size > 5000


@pytest.fixture
def chat_page(chat_checkpoint, tmp_path):
    from playwright.sync_api import sync_playwright

    directory, _ = chat_checkpoint("deepseek_v3")
    (tmp_path / "policy.toml").write_text('name = "house"\nsystem_prompt = "Answer in one line."\n')
    config = ServeConfig(model_name="tiny", prices=Prices(0.10, 2000.0, 20000.0, 100.0),
                         policy=Policy.from_file(tmp_path / "policy.toml"))
    with live_server(directory, config) as (base, llm, _), sync_playwright() as p:
        b = Browser(p)
        b.page.goto(base + "/")
        b.page.wait_for_function("document.querySelector('#model').options.length > 0")
        yield b, base, llm
        b.browser.close()


def test_markdown_code_and_math_render_safely_in_light_and_dark(chat_page):
    b, base, _ = chat_page
    page = b.page
    conv = {"id": "c1", "title": "Rendering", "created": 1, "settings": {"system": "", "temperature": 0.6,
                                                                         "max_tokens": 64, "model": "tiny"},
            "messages": [{"role": "user", "content": "Show me everything"},
                         {"role": "assistant", "content": RICH, "reasoning": "2 + 2 is 4.",
                          "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}],
                          "policy": "house/system_prompt", "stats": {"tokens": 12, "tps": 30.5, "prompt_tokens": 20,
                                                                     "cache_hit": 16, "cost": 0.000123}}]}
    page.evaluate("c => { localStorage.setItem('nanoseek-conversations', JSON.stringify({c1: c}));"
                  " localStorage.setItem('nanoseek-current', 'c1'); }", conv)
    page.reload()
    page.wait_for_selector(".msg.assistant .content h2")
    reply = page.locator(".msg.assistant")
    assert reply.locator(".content h2").inner_text() == "Result"
    assert reply.locator(".katex").count() >= 3 and reply.locator(".katex-display").count() == 1
    assert "4" in reply.locator(".katex-display").inner_text()
    assert reply.locator("pre code.hljs").count() == 1 and reply.locator("pre code span").count() >= 1
    assert reply.locator("table td").count() == 2
    assert page.evaluate("window.pwned") is None  # no handler, script or javascript: link ever ran
    assert reply.locator("img, script").count() == 0  # no images at all: a reply cannot make the browser fetch
    assert not (reply.locator("a").get_attribute("href") or "").startswith("javascript")
    assert reply.locator(".policy").inner_text() == "Policy intervened: house/system_prompt"
    assert "Tool call: get_weather" in reply.locator("details.tool-call summary").inner_text()
    stats = reply.locator(".stats").inner_text()
    assert "12 tokens" in stats and "cache hit 16/20" in stats and "cost $0.000123" in stats
    assert reply.locator("details.thinking").get_attribute("open") is None  # collapsed when done
    b.shot("render-light")
    page.click("#theme")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    b.shot("render-dark")
    page.reload()  # the theme is remembered
    page.wait_for_selector(".msg.assistant")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert b.problems == []


def test_chat_flow_reload_regenerate_edit_stop_and_conversations(chat_page):
    b, base, llm = chat_page
    page = b.page
    page.fill("#input", "What is 2 + 2?")
    page.keyboard.press("Enter")  # keyboard-usable: Enter sends
    page.wait_for_selector(".msg.assistant .stats:not(:empty)", timeout=60_000)
    reply = page.locator(".msg.assistant")
    stats = reply.locator(".stats").inner_text()
    assert "tokens/s" in stats and "cache hit" in stats and "cost $" in stats
    assert reply.locator(".policy").inner_text() == "Policy intervened: house/system_prompt"
    thinking = reply.locator("details.thinking")  # the R1 template opens <think>: the answer starts there
    assert thinking.is_visible() and thinking.get_attribute("open") is None
    b.shot("chat")
    # A conversation survives a reload, with its title in the list.
    page.reload()
    page.wait_for_selector(".msg.assistant .stats:not(:empty)")
    assert page.locator(".msg.user .content").inner_text() == "What is 2 + 2?"
    assert page.locator("#conversations li.active .open").inner_text() == "What is 2 + 2?"
    first = llm.engine.stats()["requests"]
    # Regenerate: the reply is asked for again, and replaced.
    page.click(".msg.assistant button[title='Regenerate this reply']")
    assert wait_until(lambda: llm.engine.stats()["requests"] == first + 1)
    page.wait_for_selector(".msg.assistant .stats:not(:empty)", timeout=60_000)
    assert page.locator(".msg.assistant").count() == 1
    # Edit and resend: the user turn changes and a new answer follows it.
    page.click(".msg.user button[title='Edit and resend']")
    page.fill("textarea.editor", "What is 3 + 3?")
    page.click("button.resend")
    page.wait_for_selector(".msg.assistant .stats:not(:empty)", timeout=60_000)
    assert page.locator(".msg.user .content").inner_text() == "What is 3 + 3?"
    assert page.locator(".msg").count() == 2 and llm.engine.stats()["requests"] == first + 2
    # Stop frees the request on the server.
    page.click("#settings summary")
    page.fill("#max-tokens", "4000")
    page.fill("#input", "Tell me a long story")
    page.click("#send")
    page.wait_for_function("document.querySelector('#stop').disabled === false")
    assert wait_until(lambda: llm.engine.stats()["num_running"] == 1)
    page.keyboard.press("Escape")  # Esc stops, like the Stop button
    assert wait_until(lambda: llm.engine.stats()["num_running"] == 0 and llm.engine.stats()["num_waiting"] == 0)
    page.wait_for_function("document.querySelector('#send').disabled === false")
    assert llm.engine.stats()["requests_aborted"] >= 1
    # Conversations: a new one, rename, export, delete.
    page.keyboard.press("Control+Shift+O")
    assert page.locator("#conversations li").count() == 2 and page.locator(".msg").count() == 0
    page.once("dialog", lambda d: d.accept("Renamed chat"))
    page.click("#conversations li:not(.active) .rename")
    assert wait_until(lambda: "Renamed chat" in page.locator("#conversations").inner_text(), timeout=5)
    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert {c["title"] for c in exported} == {"Renamed chat", "New chat"}
    assert any(m["content"] == "What is 3 + 3?" for c in exported for m in c["messages"])
    page.once("dialog", lambda d: d.accept())
    page.click("#conversations li:not(.active) .delete")
    assert wait_until(lambda: page.locator("#conversations li").count() == 1, timeout=5)
    b.shot("conversations")
    assert b.problems == []
