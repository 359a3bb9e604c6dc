"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Screenshots land in tests/artifacts/.  Outside CI the tests skip when Chromium or
Playwright is missing (`make deps` installs both); in CI (CI=true) that is a failure."""

import datetime
import os
import pwd
import shutil

import pytest
from conftest import REPO
from webserver import XSS_NOTE, XSS_QUEUE_NOTE, XSS_USER, seed_pool, web_servers

ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 844}

# Counts the page's fetches of /api/status and lets a test hide the page (document.hidden).
PAGE_HOOKS = """
window.__statusFetches = 0;
window.__hidden = false;
const realFetch = window.fetch;
window.fetch = function (url, options) {
  if (String(url).startsWith("/api/status")) window.__statusFetches += 1;
  return realFetch.call(this, url, options);
};
Object.defineProperty(Document.prototype, "hidden", { get: () => window.__hidden });
Object.defineProperty(Document.prototype, "visibilityState", {
  get: () => (window.__hidden ? "hidden" : "visible"),
});
window.__setHidden = (hidden) => {
  window.__hidden = hidden;
  document.dispatchEvent(new Event("visibilitychange"));
};
"""


def unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run the browser tests (make deps installs it)")
    pytest.skip(f"{reason} (make deps installs it)")


@pytest.fixture(scope="module")
def browser():
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if chromium is None:
        unavailable("Chromium is not installed (Debian package `chromium`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright for Python is not installed (pip package `playwright`)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def web(cli, tmp_path):
    yield from web_servers(cli, tmp_path)


class Page:
    """A page of the dashboard, recording console errors, page errors and dialogs."""

    def __init__(self, browser, server, viewport=DESKTOP, scheme="dark", clock=False, **options):
        self.context = browser.new_context(viewport=viewport, color_scheme=scheme, **options)
        self.page = self.context.new_page()
        self.problems = []
        self.page.on(
            "console",
            lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"),
        )
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on(
            "dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss())
        )
        self.page.add_init_script(PAGE_HOOKS)
        if clock:  # fake timers, paused: they run only when the test says
            now = datetime.datetime.now()
            self.page.clock.install(time=now)
            self.page.clock.pause_at(now + datetime.timedelta(seconds=1))
        self.page.goto(server.url + "/")
        self.page.wait_for_selector("#gpus .card")
        self.page.wait_for_function("() => document.getElementById('report-totals').textContent")

    def __getattr__(self, name):
        return getattr(self.page, name)

    def card(self, gpu):
        return self.page.locator(f'#gpus .card[data-gpu="{gpu}"]')

    def shot(self, name):
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return path

    def close(self):
        self.context.close()


@pytest.fixture
def open_page(browser):
    pages = []

    def open_(server, **kwargs):
        pages.append(Page(browser, server, **kwargs))
        return pages[-1]

    yield open_
    for page in pages:
        page.close()


def test_dashboard_shows_the_seeded_pool(cli, r, fake_smi, web, open_page):
    seed_pool(cli, r, fake_smi)
    page = open_page(web())
    assert page.locator("#host").text_content() == os.uname().nodename
    assert page.title() == f"{os.uname().nodename} · canhazgpu"
    assert page.locator("#gpus .card").count() == 5
    badges = [page.card(i).locator(".badge").text_content() for i in range(5)]
    assert badges == ["In use", "In use", "Available", "Unreserved", "Error"]
    alice = page.card(1)
    assert alice.locator(".user").text_content() == "alice"
    assert alice.locator(".sub").text_content().startswith("run · for 1h 2m")
    assert alice.locator(".note").text_content() == "llama fine-tune, lr 3e-4"
    assert "29.5 / 79.6 GiB · 37%" in alice.locator(".mem-label").text_content()
    width = alice.locator(".fill").evaluate("e => e.style.width")
    assert width == "37%"  # the browser normalises 37.0%
    assert "Heartbeat" in alice.locator(".facts").text_content()
    manual = page.card(0).locator(".facts").text_content()
    assert "Expires" in manual and "in 3h 59m" in manual
    assert "Free for0h 30m" in page.card(2).locator(".facts").text_content()
    assert "5000MB used by PID" in page.card(3).locator(".facts").text_content()
    assert "unparseable state" in page.card(4).locator(".facts").text_content()
    stats = page.locator("#stats").text_content()
    assert "Available1 / 5" in stats and "In use2" in stats and "Waiting1" in stats
    queue = page.locator("#queue .q-item")
    assert queue.count() == 1 and "dave" in queue.text_content()
    assert "wants GPU 1" in queue.text_content()
    names = page.locator("#report-rows .r-name").all_text_contents()
    me = pwd.getpwuid(os.getuid()).pw_name  # the account behind the --user display name
    assert names == ["carol", "alice", "bob", f"{me} ({XSS_USER})"]  # GPU hours: 12, 7, 2.5, ~0
    assert page.locator("#banner").is_hidden()
    page.shot("dashboard-desktop-dark")
    assert page.problems == []


def test_user_strings_are_shown_as_text_and_run_nothing(cli, r, fake_smi, web, open_page):
    seed_pool(cli, r, fake_smi)
    page = open_page(web())
    card = page.card(0)
    assert card.locator(".note").text_content() == XSS_NOTE
    me = pwd.getpwuid(os.getuid()).pw_name
    assert card.locator(".user").text_content() == f"{me} ({XSS_USER})"
    assert page.locator("#queue .note").text_content() == XSS_QUEUE_NOTE
    assert XSS_USER in page.locator("#report-rows").text_content()
    assert page.evaluate("window.__xss") is None
    assert page.locator("main img, main script, main svg").count() == 0
    assert page.problems == []  # nor did Content-Security-Policy have to block anything


def test_phone_layout_has_no_horizontal_scrolling(cli, r, fake_smi, web, open_page):
    seed_pool(cli, r, fake_smi)
    long_note = "checkpoint-" + "x" * 180  # one unbreakable word
    cli("release", check=True)
    cli("reserve", "-G", "0", "--note", long_note, "--user", "a-very-long-display-name-" * 3,
        "--nonblock", check=True)  # fmt: skip
    server = web()
    for width in (390, 320):
        page = open_page(
            server, viewport={"width": width, "height": 844}, is_mobile=True, has_touch=True,
            device_scale_factor=2,
        )  # fmt: skip
        scroll = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert scroll[0] <= scroll[1], f"{width}px wide: the page scrolls sideways {scroll}"
        assert page.card(0).locator(".note").text_content() == long_note
        boxes = page.locator("#gpus .card").evaluate_all(
            "cards => cards.map(c => c.getBoundingClientRect().right)"
        )
        assert max(boxes) <= width
        if width == 390:
            page.shot("dashboard-phone")
        assert page.problems == []


def test_demo_screenshots(web, open_page):
    server = web("--demo")
    page = open_page(server)
    assert page.locator("#demo").is_visible()
    assert page.locator("#gpus .card").count() == 8
    assert page.locator("#queue .q-item").count() == 2
    page.shot("demo-desktop-dark")
    page.close()
    light = open_page(server, scheme="light")
    assert light.evaluate("document.documentElement.dataset.theme") == "light"
    light.shot("demo-desktop-light")
    phone = open_page(server, viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    assert phone.evaluate("document.documentElement.scrollWidth <= innerWidth")
    phone.shot("demo-phone")
    assert page.problems == light.problems == phone.problems == []


def test_theme_toggle_switches_and_is_remembered(web, open_page):
    page = open_page(web("--demo"), scheme="dark")
    theme = "document.documentElement.dataset.theme"
    background = "getComputedStyle(document.body).backgroundColor"
    assert page.evaluate(theme) == "dark"
    dark_bg = page.evaluate(background)
    page.click("#theme")
    assert page.evaluate(theme) == "light" and page.evaluate(background) != dark_bg
    page.reload()
    page.wait_for_selector("#gpus .card")
    assert page.evaluate(theme) == "light"
    assert page.problems == []


def test_report_day_selector(cli, r, fake_smi, web, open_page):
    seed_pool(cli, r, fake_smi)
    page = open_page(web())
    assert page.locator('.seg button[aria-pressed="true"]').text_content() == "30 days"
    assert "carol" in page.locator("#report-rows").text_content()  # 20 days ago
    with page.expect_response(lambda resp: "/api/report?days=7" in resp.url):
        page.click('.seg button[data-days="7"]')
    page.wait_for_function(
        "() => !document.querySelector('#report-rows').textContent.includes('carol')"
    )
    assert page.locator("#days").input_value() == "7"
    with page.expect_response(lambda resp: "/api/report?days=90" in resp.url):
        page.fill("#days", "90")
        page.press("#days", "Enter")
    page.wait_for_function(
        "() => document.querySelector('#report-rows').textContent.includes('carol')"
    )
    assert page.locator('.seg button[aria-pressed="true"]').text_content() == "90 days"
    page.fill("#days", "91")  # out of range: no request, the report stays
    page.press("#days", "Enter")
    assert not page.locator("#days").evaluate("e => e.checkValidity()")
    assert page.locator("#banner").is_hidden()
    assert page.problems == []


def test_auto_refresh_every_30s_paused_while_hidden(web, open_page):
    page = open_page(web("--demo"), clock=True)

    def fetched(n):  # n fetches of /api/status, the last one answered and shown
        page.wait_for_function(f"() => window.__statusFetches === {n}")
        page.wait_for_function("() => document.getElementById('dot').className !== 'dot busy'")
        return page.evaluate("window.__statusFetches") == n

    assert fetched(1)
    page.clock.run_for(29_000)
    assert fetched(1)
    page.clock.run_for(2_000)
    assert fetched(2)
    page.evaluate("window.__setHidden(true)")
    page.clock.run_for(120_000)
    assert fetched(2)  # nobody looking: no refresh
    page.evaluate("window.__setHidden(false)")  # back after more than 30 s: refresh at once
    page.clock.run_for(100)
    assert fetched(3)
    page.clock.run_for(31_000)
    assert fetched(4)
    assert page.problems == []


def test_errors_show_in_a_banner(cli, redis_server, web, open_page):
    cli("admin", "--gpus", "2", check=True)
    page = open_page(web())
    assert page.locator("#banner").is_hidden()
    redis_server.stop()
    page.click("#refresh")
    page.wait_for_selector("#banner:not([hidden])")
    banner = page.locator("#banner").text_content()
    assert "GPU status: cannot reach Redis at redis://127.0.0.1:" in banner
    assert page.locator("#dot").get_attribute("class") == "dot stale"
    assert page.locator("#gpus .card").count() == 2  # the last good answer stays
    page.shot("dashboard-redis-down")


def test_fleet_tiles_select_a_pool(web, open_page):
    page = open_page(web("--demo", "--fleet"))
    page.wait_for_selector(".tile")
    tiles = page.locator(".tile")
    assert tiles.count() == 3
    assert tiles.nth(0).get_attribute("aria-pressed") == "true"  # this host's pool first
    assert "this host" in tiles.nth(0).text_content()
    assert page.locator(".card .badge.idle").count() >= 1  # eval-bot's reservation is idle
    assert "starts by" in page.locator("#queue").text_content()  # erin waits for GPU 2
    with page.expect_response(lambda resp: "/api/status?pool=dgx-02" in resp.url):
        page.click('.tile[data-pool="dgx-02"]')
    page.wait_for_function(
        "() => document.querySelectorAll('.card').length === 8 && "
        "document.querySelector('#gpus').textContent.includes('carol')"
    )
    assert page.locator("#pool-name").text_content() == "· dgx-02"
    assert page.evaluate("location.hash") == "#pool=dgx-02"
    page.shot("fleet")
    assert page.problems == []
