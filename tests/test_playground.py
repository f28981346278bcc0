"""The playground page (server/static/playground.html) in a real browser: headless Debian Chromium driven by
Playwright against a real server with the bundled model. Skipped only where /usr/bin/chromium is absent
(`.ci/run` installs it)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from test_server_support import shared_server, wait_idle

CHROMIUM = Path("/usr/bin/chromium")
# Debian's chromium, kept off the network and away from anything a headless CI box lacks. Never `playwright install`.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
GREEDY_START = ", there was a little girl named Lily"  # the bundled model after "Once upon a time"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server_url() -> str:
    """The bundled model (no chat template, no API key) behind the server suite's shared uvicorn server."""
    return shared_server().url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    expect.set_options(timeout=TIMEOUT_MS)  # the first request may wait for the step to compile
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, server_url: str) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server_url + "/")
    expect(page.locator("#model option")).not_to_have_count(0)  # /v1/models answered
    yield page
    context.close()
    assert not page_errors, page_errors  # no uncaught JavaScript exceptions


def test_completion_streams_the_greedy_text(page: Page):
    page.select_option("#mode", "completion")
    page.fill("#prompt", "Once upon a time")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "48")
    # Record every text the output shows, to see it grow token by token rather than arrive at once.
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => window.__seen.push(document.getElementById("output").innerText))
            .observe(document.getElementById("output"), {childList: true, subtree: true, characterData: true});
    }""")
    page.click("#send")
    expect(page.locator("#output")).to_contain_text("Once upon a time" + GREEDY_START)
    expect(page.locator("#send")).to_be_enabled()  # the stream ended
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#stats")).to_contain_text("finish: length")
    seen = [text for text in page.evaluate("window.__seen") if text.startswith("Once upon a time")]
    assert len(set(seen)) >= 3, seen  # several partial texts: it streamed
    assert all(b.startswith(a) for a, b in itertools.pairwise(seen)), seen  # each extends the last


def test_chat_without_a_template_shows_the_servers_400(page: Page):
    page.select_option("#mode", "chat")
    page.fill("#prompt", "Hello there")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("HTTP 400")
    expect(page.locator("#error")).to_contain_text("chat template")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#prompt")).to_have_value("Hello there")  # kept, to retry
    expect(page.locator("#output .turn")).to_have_count(0)


def test_stop_aborts_the_stream(page: Page):
    page.fill("#prompt", "Once upon a time")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "400")
    page.click("#send")
    expect(page.locator("#output .completion-text")).not_to_be_empty()
    page.click("#stop")
    expect(page.locator("#stats")).to_contain_text("finish: stopped")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#output")).to_contain_text("Once upon a time" + GREEDY_START[:5])
    # The aborted fetch closed the connection, and the server let the request go.
    values = wait_idle(shared_server())
    assert values["jpaged:num_requests_running"] == 0 and values["jpaged:kv_cache_usage_perc"] == 0
