"""The console at ``/ui/``: sessions, CSRF, escaping and the pages, over plain HTTP
against an in-process server; then one operator's walk through it in headless Chromium
against ``campaign-worker api`` and a worker, both real subprocesses."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import pytest
from pydantic import SecretStr

from app import CampaignClient
from app.jobs import JobTarget
from app.overview import node_counts
from app.settings import Settings
from tests.conftest import ROOT
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.queue_view import claim_one
from tests.worker.api.conftest import RO, RW, TOKENS, ApiProcess
from worker.api.auth import SESSION_COOKIE
from worker.api.server import build_api, load_tokens
from worker.embedded_redis import EmbeddedRedis
from worker.http_server import HealthServer

TRACE_URL = "http://jaeger.example:16686/trace/{trace_id}"
TRACE_ID = "ab" * 16
#: An id that is markup: every page must show it as text.
EVIL = '<script>alert("x")</script>&/?#'

GRAPH = {"id": "onboard", "entry": "welcome", "nodes": {
    "welcome": {"type": "action", "action": "log", "next": "reply"},
    "reply": {"type": "wait", "event": "replied", "timeout": "P3D",
              "on_event": "done", "on_timeout": "nudge"},
    "nudge": {"type": "action", "action": "log", "next": "done",
              "outcomes": {"bounced": "done", "snoozed": "reply"}},
    "done": {"type": "exit"}}}  # fmt: skip


@dataclass
class Got:
    status: int
    text: str
    headers: Any


class Browser:
    """A cookie-carrying caller of the in-process console (aiohttp's jar ignores cookies
    set by an IP address, so the session cookie is sent by hand)."""

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.http = session
        self.cookie: str | None = None

    async def request(self, method: str, path: str, data: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None) -> Got:  # fmt: skip
        hdrs = dict(headers or {})
        if self.cookie is not None:
            hdrs["Cookie"] = f"{SESSION_COOKIE}={self.cookie}"
        async with self.http.request(method, self.base + path, data=data, headers=hdrs,
                                     allow_redirects=False) as resp:  # fmt: skip
            return Got(resp.status, await resp.text(), resp.headers)

    async def get(self, path: str) -> Got:
        return await self.request("GET", path)

    async def post(self, path: str, data: dict[str, str], **kw: Any) -> Got:
        return await self.request("POST", path, data, **kw)

    async def login(self, token: str) -> Got:
        got = await self.post("/ui/login", {"token": token})
        match = re.search(rf"{SESSION_COOKIE}=([^;]+)", got.headers.get("Set-Cookie", ""))
        if match:
            self.cookie = match.group(1)
        return got

    async def csrf(self, path: str = "/ui/") -> str:
        page = await self.get(path)
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found, page.text[:500]
        return found.group(1)


@pytest.fixture
async def ui(settings: Settings, client: CampaignClient) -> AsyncIterator[Browser]:
    """The API with the console in this test's loop (tokens RW and RO, a trace URL)."""
    api_settings = settings.model_copy(
        update={"api_tokens": SecretStr(TOKENS), "trace_url": TRACE_URL}
    )
    server = HealthServer(build_api(client, api_settings, load_tokens(api_settings)),
                          "127.0.0.1", 0)  # fmt: skip
    await server.start()
    async with aiohttp.ClientSession() as session:
        yield Browser(f"http://127.0.0.1:{server.port}", session)
    await server.stop()


class GraphCounts(HTMLParser):
    """``{node: {state: n}}`` as drawn in the campaign page's SVG (absent: 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, dict[str, int]] = {}
        self.edges: list[tuple[str, str, str]] = []
        self._node: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "g" and a.get("data-node") is not None:
            self._node = a["data-node"]
            self.nodes.setdefault(str(self._node), {})
        elif tag == "g" and a.get("data-from") is not None:
            self.edges.append((str(a["data-from"]), str(a["data-to"]), str(a["data-kind"])))
        elif tag == "text" and a.get("data-count") is not None and self._node is not None:
            self.nodes[self._node][str(a["data-state"])] = int(str(a["data-count"]))

    @classmethod
    def of(cls, html: str) -> GraphCounts:
        parser = cls()
        parser.feed(html)
        return parser


def nonzero(by_node: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {n: {s: c for s, c in per.items() if c} for n, per in by_node.items()
            if any(per.values())}  # fmt: skip


async def populate(client: CampaignClient) -> None:
    """``onboard``: 7 enrolled at reply (one of them an id that is markup): 2 replied
    (completed at done), 1 cancelled, 4 waiting; 3 scheduled at nudge, 2 of those failed
    by hand (no worker runs: every state is set by the test)."""
    await client.register_campaign(GRAPH)
    for i in range(6):
        await client.enroll("onboard", f"w{i}", node="reply")
    await client.enroll("onboard", EVIL, node="reply")
    for i in range(2):
        assert await client.signal(f"onboard:w{i}", "replied")
    assert await client.cancel("onboard:w5")
    for i in range(3):
        st = await client.enroll("onboard", f"n{i}", node="nudge")
        if i < 2:
            claim = await claim_one(client.service, st.enrollment_id)
            await client.service.fail(
                JobTarget(st.enrollment_id, "onboard", st.step, None), job_id=claim.job_id,
                node="nudge", step=st.step, attempt=1,
                error={"type": "Boom", "message": f"<b>broke</b> {i}", "trace_id": TRACE_ID,
                       "traceback": "Traceback (most recent call last):\n  <frame>\nBoom"},
            )  # fmt: skip


# -- sessions ------------------------------------------------------------------------------


async def test_pages_need_a_session_and_login_sets_a_strict_cookie(ui: Browser) -> None:
    for path in ["/ui/", "/ui/campaigns/x", "/ui/campaigns/x/enrollments", "/ui/failures",
                 "/ui/dead-letters", "/ui/enrollments/x:y", "/ui/nowhere"]:  # fmt: skip
        got = await ui.get(path)
        assert got.status == 303, path
        assert got.headers["Location"].startswith("/ui/login"), path
    assert (await ui.get("/ui/failures")).headers["Location"] == "/ui/login?next=%2Fui%2Ffailures"
    form = await ui.get("/ui/login")
    assert form.status == 200 and 'name="token"' in form.text
    assert form.headers["Content-Type"].startswith("text/html")
    assert "script-src" not in form.headers["Content-Security-Policy"]  # default-src 'none'
    assert 'id="insecure"' not in form.text  # loopback: the Secure cookie is kept
    remote = await ui.request("GET", "/ui/login", headers={"Host": "console.example:8000"})
    assert 'id="insecure"' in remote.text
    proxied = await ui.request("GET", "/ui/login", headers={
        "Host": "console.example", "X-Forwarded-Proto": "https"})  # fmt: skip
    assert 'id="insecure"' not in proxied.text

    wrong = await ui.login("not-a-token-at-all")
    assert wrong.status == 401 and "That token is not valid." in wrong.text
    assert "Set-Cookie" not in wrong.headers and ui.cookie is None

    ok = await ui.login(RW)
    assert ok.status == 303 and ok.headers["Location"] == "/ui/"
    attrs = [a.strip().lower() for a in ok.headers["Set-Cookie"].split(";")]
    assert {"httponly", "secure", "samesite=strict", "path=/ui"} <= set(attrs), attrs
    assert ui.cookie is not None
    page = await ui.get("/ui/")
    assert page.status == 200 and 'id="queue"' in page.text
    assert (await ui.get("/ui/login")).headers["Location"] == "/ui/"  # already logged in

    # after login, back where the login page was sent from (only a console path)
    back = await ui.post("/ui/login", {"token": RW, "next": "/ui/failures"})
    assert back.headers["Location"] == "/ui/failures"
    for evil in ["//evil.example/ui/", "https://evil.example/", "/v1/queue"]:
        again = await ui.post("/ui/login", {"token": RW, "next": evil})
        assert again.headers["Location"] == "/ui/", evil

    csrf = await ui.csrf()
    out = await ui.post("/ui/logout", {"csrf": csrf})
    assert out.status == 303 and out.headers["Location"] == "/ui/login"
    assert f'{SESSION_COOKIE}=""' in out.headers["Set-Cookie"]
    ui.cookie = "forged.123.abc.def"
    assert (await ui.get("/ui/")).status == 303


async def test_posts_need_the_csrf_token_this_origin_and_a_write_session(
    ui: Browser, client: CampaignClient
) -> None:
    await populate(client)
    group = {"group": "onboard:nudge:Boom"}
    await ui.login(RO)
    ro_csrf = await ui.csrf("/ui/failures")
    ro_page = await ui.get("/ui/failures")
    assert "onboard:nudge:Boom" in ro_page.text and "Replay" not in ro_page.text
    timeline = await ui.get("/ui/enrollments/onboard:n0")
    assert 'id="replay"' not in timeline.text and 'id="cancel"' not in timeline.text
    refused = await ui.post("/ui/failures/replay", {**group, "csrf": ro_csrf})
    assert refused.status == 403 and "read-only" in refused.text
    assert (await ui.post("/ui/logout", {"csrf": ro_csrf})).status == 303  # reading is enough

    await ui.login(RW)
    csrf = await ui.csrf("/ui/failures")
    assert csrf != ro_csrf
    for data, headers, why in [
        (group, {}, "CSRF"),
        ({**group, "csrf": "0" * 64}, {}, "CSRF"),
        ({**group, "csrf": ro_csrf}, {}, "CSRF"),
        ({**group, "csrf": csrf}, {"Origin": "http://evil.example"}, "another site"),
        ({**group, "csrf": csrf}, {"Origin": "null"}, "another site"),
        ({**group, "csrf": csrf}, {"Sec-Fetch-Site": "cross-site"}, "another site"),
    ]:
        got = await ui.post("/ui/failures/replay", data, headers=headers)
        assert got.status == 403 and why in got.text, (data, headers, got.text[:300])
        assert got.headers["Content-Type"].startswith("text/html")
    assert len((await client.list_enrollments("onboard", state="failed")).items) == 2
    cross_login = await ui.post("/ui/login", {"token": RW}, headers={"Origin": "http://x.example"})
    assert cross_login.status == 403

    # behind a proxy that rewrites Host: the public host in X-Forwarded-Host passes
    # (422: the check let it through to the unknown group)
    proxied = {"Origin": "https://console.example", "X-Forwarded-Host": "console.example"}
    got = await ui.post("/ui/failures/replay", {"group": "none", "csrf": csrf}, headers=proxied)
    assert got.status == 422, got.text[:300]
    origin = {"Origin": ui.base, "Sec-Fetch-Site": "same-origin"}
    done = await ui.post("/ui/failures/replay", {**group, "csrf": csrf}, headers=origin)
    assert done.status == 303 and done.headers["Location"].startswith("/ui/failures?")
    shown = await ui.get(done.headers["Location"])
    assert "Replayed 2 of 2 in onboard:nudge:Boom." in shown.text
    assert "No failed enrollment." in shown.text
    assert (await client.list_enrollments("onboard", state="failed")).items == []


# -- pages ---------------------------------------------------------------------------------


async def test_graph_counts_are_the_clients(ui: Browser, client: CampaignClient) -> None:
    await populate(client)
    await ui.login(RO)
    page = await ui.get("/ui/campaigns/onboard")
    assert page.status == 200
    drawn = GraphCounts.of(page.text)
    by_node, complete = await node_counts(client.redis, client.service.keys, "onboard")
    assert complete and drawn.nodes == nonzero(by_node) | {"welcome": {}}
    assert drawn.nodes["reply"] == {"waiting": 4, "cancelled": 1}  # w2..w4, EVIL; w5
    assert drawn.nodes["nudge"] == {"scheduled": 1, "failed": 2}
    assert ("reply", "nudge", "on_timeout") in drawn.edges
    assert ("nudge", "done", "outcomes.bounced") in drawn.edges
    assert ("nudge", "reply", "outcomes.snoozed") in drawn.edges  # a loop back
    assert ">timeout</text>" in page.text and ">bounced</text>" in page.text
    counts = await client.service.store.count_by_state("onboard")
    for state, n in counts.items():
        assert re.search(rf'data-state="{state}">(<a [^>]*>)?{n}<', page.text), state
    assert 'href="/ui/campaigns/onboard/enrollments?node=nudge"' in page.text
    assert "v1 (latest)" in page.text

    listed = await ui.get("/ui/campaigns/onboard/enrollments?node=nudge&state=failed")
    ids = re.findall(r'data-enrollment="([^"]+)"', listed.text)
    assert sorted(ids) == ["onboard:n0", "onboard:n1"]

    await client.register_campaign({**GRAPH, "nodes": {**GRAPH["nodes"], "welcome": {  # type: ignore[dict-item]
        "type": "action", "action": "log", "next": "reply", "params": {"v": 2}}}})  # fmt: skip
    latest = await ui.get("/ui/campaigns/onboard")
    assert "v2 (latest)" in latest.text and "&#34;v&#34;: 2" in latest.text
    first = await ui.get("/ui/campaigns/onboard?version=1")
    assert "Definition of version 1" in first.text and "&#34;v&#34;: 2" not in first.text
    assert (await ui.get("/ui/campaigns/onboard?version=3")).status == 422


async def test_pages_list_page_by_page_and_show_the_timeline(
    ui: Browser, client: CampaignClient
) -> None:
    await populate(client)
    await client.enroll_many("onboard", [{"contact_id": f"bulk{i:03}"} for i in range(120)])
    await ui.login(RW)
    seen: list[str] = []
    path: str | None = "/ui/campaigns/onboard/enrollments?state=scheduled"
    pages = 0
    while path:
        got = await ui.get(path)
        assert got.status == 200
        seen += re.findall(r'data-enrollment="([^"]+)"', got.text)
        nxt = re.search(r'id="next" rel="next" href="([^"]+)"', got.text)
        path = nxt.group(1).replace("&amp;", "&") if nxt else None
        pages += 1
    assert pages >= 3 and len(seen) == len(set(seen))
    assert set(seen) == {f"onboard:bulk{i:03}" for i in range(120)} | {"onboard:n2"}

    found = await ui.get("/ui/enrollments?campaign=onboard&id=n0")
    assert found.status == 303 and found.headers["Location"] == "/ui/enrollments/onboard%3An0"
    timeline = await ui.get(found.headers["Location"])
    assert timeline.status == 200
    assert "&lt;b&gt;broke&lt;/b&gt; 0" in timeline.text and "<b>broke" not in timeline.text
    assert f'href="http://jaeger.example:16686/trace/{TRACE_ID}"' in timeline.text
    assert re.search(r'<pre class="traceback">Traceback[^<]*&lt;frame&gt;', timeline.text)
    assert 'id="replay"' in timeline.text and 'id="cancel"' not in timeline.text
    assert timeline.text.count("<tr>") >= 3  # enrolled, running, failed

    waiting = await ui.get("/ui/enrollments/onboard:w2")
    assert 'id="cancel"' in waiting.text and 'id="replay"' not in waiting.text
    csrf = await ui.csrf()
    cancelled = await ui.post("/ui/enrollments/onboard%3Aw2/cancel", {"csrf": csrf})
    assert cancelled.headers["Location"] == "/ui/enrollments/onboard%3Aw2?done=cancelled"
    assert "Cancelled." in (await ui.get(cancelled.headers["Location"])).text
    assert (await client.status("onboard:w2")).state == "cancelled"
    replayed = await ui.post("/ui/enrollments/onboard%3An0/replay", {"csrf": csrf})
    assert replayed.status == 303 and (await client.status("onboard:n0")).state == "scheduled"

    queue = await ui.get("/ui/")
    assert re.search(r'<tr data-campaign="onboard">', queue.text)
    assert (await ui.get("/ui/dead-letters")).status == 200


async def test_ids_are_escaped_and_errors_are_html_pages(
    ui: Browser, client: CampaignClient
) -> None:
    await populate(client)
    slashed = await client.enroll("onboard", "a/b?c#d", node="reply")
    await ui.login(RW)
    evil_id = f"onboard:{EVIL}"
    listing = await ui.get("/ui/campaigns/onboard/enrollments?state=waiting")
    page = await ui.get("/ui/enrollments/" + quote(evil_id, safe=""))
    assert page.status == 200
    for got in (listing, page):
        assert "<script>" not in got.text
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;/?#" in got.text
    assert f'href="/ui/enrollments/{quote(evil_id, safe="")}"' in listing.text
    got = await ui.get("/ui/enrollments/" + quote(slashed.enrollment_id, safe=""))
    assert got.status == 200 and "a/b?c#d" in got.text

    for path, status, title in [
        ("/ui/campaigns/nope", 404, "CampaignNotFound"),
        ("/ui/campaigns/nope/enrollments", 404, "CampaignNotFound"),
        ("/ui/enrollments/" + quote("onboard:<i>gone</i>", safe=""), 404, "EnrollmentNotFound"),
        ("/ui/campaigns/onboard/enrollments?state=sleepy", 422, "InvalidRequest"),
        ("/ui/campaigns/onboard/enrollments?cursor=zzz", 422, "InvalidRequest"),
        ("/ui/enrollments?id=", 422, "InvalidRequest"),
        ("/ui/no/such/page", 404, "NotFound"),
    ]:
        got = await ui.get(path)
        assert got.status == status, (path, got.text[:300])
        assert got.headers["Content-Type"].startswith("text/html"), path
        assert f"{status} · {title}" in got.text and "Traceback" not in got.text, path
        assert "<i>gone" not in got.text
    csrf = await ui.csrf()
    conflict = await ui.post("/ui/enrollments/onboard%3Aw2/replay", {"csrf": csrf})
    assert conflict.status == 409 and "409 · InvalidState" in conflict.text
    unknown = await ui.post("/ui/failures/replay", {"group": "nonsense", "csrf": csrf})
    assert unknown.status in (404, 422) and unknown.headers["Content-Type"].startswith("text/html")


async def test_odd_query_values_and_cookies_are_answered_not_crashed_on(
    ui: Browser, client: CampaignClient
) -> None:
    """Found in review: Unicode digits (str.isdigit() takes them, int() does not), a login
    link whose next= carries CR/LF, and a malformed session cookie."""
    await populate(client)
    await ui.login(RW)
    for path in ("/ui/campaigns/onboard?version=%C2%B2", "/ui/campaigns/onboard?version=99"):
        got = await ui.get(path)
        assert got.status == 422 and "422 · InvalidRequest" in got.text, (path, got.text[:300])
    got = await ui.get("/ui/failures?replayed=%C2%B2&total=1")
    assert got.status == 200 and "Replayed" not in got.text
    ui.cookie = None
    got = await ui.request("POST", "/ui/login", {"token": RW,
                                                 "next": "/ui/\r\nSet-Cookie: a=b"})  # fmt: skip
    assert got.status == 303 and got.headers["Location"] == "/ui/"
    for cookie in ("x", "0" * 12 + ".\u00b2.n." + "0" * 64, "a.b.c.d"):
        ui.cookie = cookie
        got = await ui.get("/ui/")
        assert got.status == 303 and got.headers["Location"].startswith("/ui/login")


async def test_a_huge_login_form_is_refused_unread(ui: Browser) -> None:
    """Found in review: the login form was read up to the API's largest body (64 MiB)."""
    got = await ui.request("POST", "/ui/login", {"token": "x" * 200_000})
    assert got.status == 413


@pytest.mark.parametrize(("body", "content_type"), [
    (b"token=\xff\xfe", "application/x-www-form-urlencoded"),
    (b"token=x", "application/x-www-form-urlencoded; charset=no-such-charset"),
    (b"--x\r\n\r\nvalue\r\n--x--\r\n", "multipart/form-data"),
])  # fmt: skip
async def test_a_form_that_cannot_be_read_is_a_400_page(
    ui: Browser, body: bytes, content_type: str
) -> None:
    """Found in review: aiohttp raises on these, which was a 500 before any login."""
    async with ui.http.post(ui.base + "/ui/login", data=body,
                            headers={"Content-Type": content_type}) as resp:  # fmt: skip
        text = await resp.text()
    assert resp.status == 400 and "400 · BadRequest" in text, text[:300]


# -- in a real browser ---------------------------------------------------------------------

SCREENSHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS") or ROOT / "artifacts" / "console")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _chromium() -> tuple[str, str]:
    """Chromium and its driver, or skip saying how to get them (fail under
    ``REQUIRE_CHROMIUM=1``, which ``.ci/run`` sets)."""
    browser = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).is_file() else None)
    driver = shutil.which("chromedriver") or (
        CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else None
    )
    if browser and driver:
        return browser, driver
    why = ("chromium and chromedriver are needed for the browser test: "
           "sudo apt-get install -y chromium chromium-driver (scripts/ensure-chromium.sh)")  # fmt: skip
    if os.environ.get("REQUIRE_CHROMIUM") == "1":
        pytest.fail(why + " (REQUIRE_CHROMIUM=1)")
    pytest.skip(why)


def test_missing_chromium_skips_or_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(f"{__name__}.CHROMEDRIVER", "/nonexistent/chromedriver")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("REQUIRE_CHROMIUM", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium chromium-driver"):
        _chromium()
    monkeypatch.setenv("REQUIRE_CHROMIUM", "1")
    with pytest.raises(pytest.fail.Exception, match=r"REQUIRE_CHROMIUM=1"):
        _chromium()


def flaky(svc: FakeService) -> dict[str, Any]:
    """welcome (log) -> reply (wait) -> done; a timeout goes to nudge, an http call that
    fails while ``svc.failing`` (two quick tries)."""
    retry = {"max_attempts": 2, "backoff": "fixed", "base_delay": 0.05, "max_delay": 0.05,
             "jitter": False}  # fmt: skip
    nudge = {"type": "action", "action": "http", "params": {"url": svc.url("/toggle")},
             "next": "done", "outcomes": {"snoozed": "reply"}, "retry": retry}  # fmt: skip
    return {**GRAPH, "id": "console", "nodes": {**GRAPH["nodes"], "nudge": nudge}}


async def test_an_operator_replays_a_failure_group_in_chromium(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService
) -> None:
    browser_path, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(redis_server.url, CAMPAIGN_JOB_TIMEOUT="5").start()
    api = await ApiProcess(redis_server.url, CAMPAIGN_TRACE_URL=TRACE_URL).start()
    driver: Any = None
    try:
        await client.register_campaign(flaky(svc))
        # 6 wait for a reply; 4 are moved past the wait (as an import would) and fail
        await client.enroll_many("console", [{"contact_id": f"c{i}"} for i in range(6)])
        for i in range(4):
            await client.enroll("console", f"late{i}", node="nudge")

        async def settled() -> dict[str, int] | None:
            counts = await client.service.store.count_by_state("console")
            return counts if counts["failed"] == 4 and counts["waiting"] == 6 else None

        await eventually(settled, 20, 0.05, "4 failed and 6 waiting")

        options = webdriver.ChromeOptions()
        options.binary_location = browser_path
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1366,900",
                    "--disable-dev-shm-usage"):  # fmt: skip
            options.add_argument(arg)
        driver = await asyncio.to_thread(
            webdriver.Chrome, options=options, service=Service(executable_path=driver_path)
        )
        # A click that navigates may return before the next page has loaded: after each
        # one, an element only that page has is looked up, which this makes wait for it.
        driver.implicitly_wait(10)

        async def run(fn: Callable[..., Any], *args: Any) -> Any:
            # Selenium blocks; this loop must keep serving the fake service meanwhile
            return await asyncio.to_thread(fn, *args)

        async def shot(name: str) -> None:
            await run(driver.save_screenshot, str(SCREENSHOTS / f"{name}.png"))

        async def text(css: str) -> str:
            return str(await run(lambda: driver.find_element(By.CSS_SELECTOR, css).text))

        # log in (Chromium keeps a Secure cookie over plain http on a loopback address)
        base = api.base
        await run(driver.get, base + "/ui/")
        assert "/ui/login" in driver.current_url
        await shot("1-login")
        await run(lambda: driver.find_element(By.ID, "token").send_keys(RW))
        await run(lambda: driver.find_element(By.ID, "login").click())
        assert (await text("#campaigns tr[data-campaign=console] td[data-state=failed]")) == "4"
        await shot("2-overview")

        # the campaign's graph shows what the client counts
        await run(lambda: driver.find_element(By.LINK_TEXT, "console").click())
        await run(driver.find_element, By.ID, "graph")
        by_node, _ = await node_counts(client.redis, client.service.keys, "console")
        drawn = GraphCounts.of(driver.page_source).nodes
        assert drawn == nonzero(by_node) | {"welcome": {}, "done": {}}
        assert drawn["reply"] == {"waiting": 6} and drawn["nudge"] == {"failed": 4}
        await shot("3-campaign-graph")

        # a failed enrollment's timeline, reached from the nudge box
        await run(lambda: driver.find_element(By.CSS_SELECTOR, 'g[data-node="nudge"] rect').click())
        await run(driver.find_element, By.ID, "enrollments")
        assert "node=nudge" in unquote(driver.current_url)
        await shot("4-enrollments-at-nudge")
        await run(lambda: driver.find_element(By.CSS_SELECTOR, "#enrollments tbody a").click())
        assert (await text("#state")) == "failed"
        assert "attempt 2 of 2" in await text("#error")
        assert await run(lambda: driver.find_elements(By.ID, "replay"))
        await shot("5-timeline")
        await run(lambda: driver.find_element(By.ID, "timeline").location_once_scrolled_into_view)
        await shot("5b-timeline-history")

        # the failure group; the service recovers; one click replays the group
        await run(driver.get, base + "/ui/failures")
        assert (await text('tr[data-group="console:nudge:TransientError"] .count')) == "4"
        await shot("6-failures")
        svc.failing = False
        await run(lambda: driver.find_element(By.CSS_SELECTOR, "button.replay").click())
        assert (await text("#result")).startswith("Replayed 4 of 4 in console:nudge:TransientError")
        await shot("7-replayed")

        async def all_completed() -> bool:
            await run(driver.get, base + "/ui/campaigns/console")
            drawn = GraphCounts.of(driver.page_source).nodes
            return drawn.get("nudge") == {} and drawn.get("done") == {"completed": 4}

        await eventually(all_completed, 20, 0.1, "the replayed enrollments to complete")
        await shot("8-graph-after-replay")
        await run(driver.get, base + "/ui/failures")
        assert await run(lambda: driver.find_elements(By.ID, "no-failures"))
        counts = await client.service.store.count_by_state("console")
        assert (counts["completed"], counts["failed"], counts["waiting"]) == (4, 0, 6)
    finally:
        if driver is not None:
            await asyncio.to_thread(driver.quit)
        assert api.stop() == 0
        assert worker.stop() == 0
    assert len(list(SCREENSHOTS.glob("[1-8]*-*.png"))) >= 9


async def test_console_writes_are_logged_like_the_apis(
    ui: Browser, client: CampaignClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worker.api")
    await populate(client)
    await ui.login(RW)
    csrf = await ui.csrf()
    got = await ui.post("/ui/enrollments/onboard%3Aw2/cancel", {"csrf": csrf})
    assert got.status == 303, got.text[:300]
    writes = [r for r in caplog.records if r.getMessage() == "api write"]
    assert [(r.operation, r.enrollment_id) for r in writes] == [  # type: ignore[attr-defined]
        ("console:cancel", "onboard:w2")
    ]
    assert RW not in str(writes[0].__dict__)
