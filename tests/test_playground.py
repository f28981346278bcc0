"""The playground page (server/static/playground.html) in a real browser: headless Debian Chromium driven by
Playwright against a real server with the bundled model. Skipped only where /usr/bin/chromium is absent
(`.ci/run` installs it)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from test_server_support import API_KEY, MODEL_NAME, fake_server, shared_server, wait_idle

CHROMIUM = Path("/usr/bin/chromium")
# Debian's chromium, kept off the network and away from anything a headless CI box lacks. Never `playwright install`.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
GREEDY_START = ", there was a little girl named Lily"  # the bundled model after "Once upon a time"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    expect.set_options(timeout=TIMEOUT_MS)  # the first request may wait for the step to compile
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def playground(
    browser: Browser, url: str, *, models_listed: bool = True, password: str | None = None
) -> Iterator[Page]:
    """The page at `url` in a fresh browser context (answering an HTTP Basic prompt with `password`, when given);
    fails on any uncaught JavaScript exception."""
    credentials = {"username": "me", "password": password} if password is not None else None
    context = browser.new_context(http_credentials=credentials)
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.set_default_timeout(TIMEOUT_MS)
    response = page.goto(url + "/")
    assert response is not None and response.status == 200, response and response.status
    if models_listed:
        expect(page.locator("#model option")).not_to_have_count(0)  # /v1/models answered
    yield page
    context.close()
    assert not page_errors, page_errors


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """The bundled model, no chat template, no API key: the server suite's shared server."""
    with playground(browser, shared_server().url) as page:
        yield page


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
    # Stop only once two tokens have shown: on a slow box one token may be all there is when the click lands.
    streamed = "Once upon a time" + GREEDY_START[:5]
    expect(page.locator("#output")).to_contain_text(streamed)
    page.click("#stop")
    expect(page.locator("#stats")).to_contain_text("finish: stopped")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#output")).to_contain_text(streamed)  # what streamed before the stop is kept
    # The aborted fetch closed the connection, and the server let the request go.
    values = wait_idle(shared_server())
    assert values["jpaged:num_requests_running"] == 0 and values["jpaged:kv_cache_usage_perc"] == 0


def test_chat_keeps_the_conversation(browser: Browser):
    with playground(browser, shared_server(chat_template=True).url) as page:
        page.select_option("#mode", "chat")
        page.fill("#system", "You tell short stories.")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        for turn, message in enumerate(["Tell me a story.", "And then?"], start=1):
            page.fill("#prompt", message)
            page.click("#send")
            expect(page.locator("#output .turn.assistant .content")).to_have_count(turn)
            expect(page.locator("#output .turn.assistant .content").nth(turn - 1)).not_to_be_empty()
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#prompt")).to_have_value("")
        expect(page.locator("#output .turn.user .content")).to_have_text(["Tell me a story.", "And then?"])
        expect(page.locator("#error")).to_be_empty()


def test_a_server_with_an_api_key_asks_the_browser_for_it(browser: Browser):
    """The page itself needs the key (HTTP Basic, as a browser prompts for it); given it, the page makes its API
    calls with the same key, and one typed into its key field is remembered across reloads."""
    running, _ = fake_server(api_key=API_KEY)
    try:
        # No key, or a wrong one: Chromium either gives up on the Basic prompt or shows the server's 401 (which
        # differs between the two cases); either way the playground does not open.
        for credentials in (None, {"username": "me", "password": "wrong"}):
            context = browser.new_context(http_credentials=credentials)
            page = context.new_page()
            try:
                response = page.goto(running.url + "/")
                assert response is not None and response.status == 401, credentials
                assert page.locator("#model").count() == 0
            except PlaywrightError as refused:
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(refused), credentials
            finally:
                context.close()
        with playground(browser, running.url, password=API_KEY) as page:
            expect(page.locator("#api-key")).to_have_value(API_KEY)  # handed over by the server
            expect(page.locator("#model")).to_have_value(MODEL_NAME)  # /v1/models answered with the key
            page.fill("#prompt", "Hi")
            page.fill("#max-tokens", "3")
            page.click("#send")
            expect(page.locator("#output .completion-text")).to_have_text(" a a a")  # the fake engine's tokens
            page.fill("#api-key", "typed-by-hand")
            page.press("#api-key", "Tab")  # change: stored, and the models listed again with it
            expect(page.locator("#error")).to_contain_text("HTTP 401")
            page.fill("#api-key", API_KEY)
            page.press("#api-key", "Tab")
            expect(page.locator("#error")).to_be_empty()
            page.reload()
            expect(page.locator("#api-key")).to_have_value(API_KEY)
            expect(page.locator("#model")).to_have_value(MODEL_NAME)
    finally:
        running.stop()
