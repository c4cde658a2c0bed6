"""The console at ``/ui/``: server-rendered HTML pages over the same client as ``/v1``.

What an operator looks for: the queue and workers, each campaign drawn as its node graph
with how many enrollments sit at each node, an enrollment's timeline, failure groups
with a replay button, dead letters. Plain HTML forms, no JavaScript.

Security: a login with one of ``CAMPAIGN_API_TOKENS`` opens a signed session cookie
(HttpOnly, Secure, SameSite=Strict, Path=/ui; see :mod:`worker.api.auth`). Every POST
must carry the session's CSRF token in a hidden field and, when the browser sends an
``Origin``, come from this host; a read-only (``ro:``) session may not POST anything but
logout. Templates autoescape everything: ids come from users.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
import orjson
from aiohttp import web
from redis.exceptions import RedisError

from app.campaigns import ActionNode, Campaign, DelayNode, WaitNode
from app.connection import REDIS_DOWN_ERRORS
from app.durations import format_duration
from app.errors import CampaignError, EnrollmentNotFound, InvalidRequest
from app.failures import failure_groups, replay_group
from app.models import ACTIVE_STATES, State
from worker.api.auth import SESSION_COOKIE, SESSION_SECONDS, Principal
from worker.api.problems import from_campaign_error
from worker.api.routes import Api, campaign_overview, failure_group_out
from worker.dead_letters import list_dead_letters

__all__ = ["Graph", "layout", "setup_console"]

log = logging.getLogger("worker.api.console")
audit = logging.getLogger("worker.api")

#: Enrollments per page of the enrollment list.
PAGE_SIZE = 50
#: Dead letters the dead-letter page shows at most.
DEAD_LETTER_LIMIT = 200
#: States a node box counts, in this order (active ones first, then how they ended).
NODE_STATES = (State.SCHEDULED, State.RUNNING, State.WAITING, State.COMPLETED,
               State.FAILED, State.CANCELLED)  # fmt: skip

_STATIC = "/ui/static/console.css"
_REDIS_ERRORS: tuple[type[BaseException], ...] = (*REDIS_DOWN_ERRORS, RedisError)
# Pages are HTML only: no scripts at all, styles from our own stylesheet, forms posting
# back here, never framed. SVG presentation attributes are not styles, so the graph works.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Session:
    """The caller of one console request: who, and the CSRF token their forms carry."""

    principal: Principal
    csrf: str

    @property
    def may_write(self) -> bool:
        return self.principal.may_write


# -- the node graph ------------------------------------------------------------------------

_BOX_W = 210
_GAP_X = 90
_GAP_Y = 26
_PAD = 24
_HEAD_H = 40
_LINE_H = 16
_NAME_CHARS = 26


@dataclass
class Box:
    """One node drawn as a box at ``(x, y)``: name, type, and its counts by state."""

    name: str
    label: str
    kind: str
    detail: str
    x: int
    y: int
    h: int
    counts: list[tuple[str, int]]
    w: int = _BOX_W

    @property
    def total(self) -> int:
        return sum(n for _, n in self.counts)


@dataclass
class Edge:
    """A line from one box to another (an SVG path), labelled with the edge kind if any."""

    source: str
    target: str
    kind: str
    label: str
    path: str
    lx: float
    ly: float
    back: bool


@dataclass
class Graph:
    """A campaign laid out in layers (columns) by BFS depth from the entry node."""

    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)


def _short(text: str, width: int = _NAME_CHARS) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _detail(node: Any) -> str:
    if isinstance(node, ActionNode):
        return node.action
    if isinstance(node, WaitNode):
        events = ", ".join(sorted(node.events))
        return f"{events} ≤ {format_duration(node.timeout)}"
    if isinstance(node, DelayNode):
        return format_duration(node.duration) + (" business" if node.business_time else "")
    return ""


def _edge_label(node: Any, kind: str) -> str:
    if kind.startswith("outcomes."):
        return kind.removeprefix("outcomes.")
    if kind == "next":
        # the fallback of an action with outcomes; otherwise the only way on: no label
        return "otherwise" if isinstance(node, ActionNode) and node.outcomes else ""
    return kind.removeprefix("on_")  # "event", "timeout"


def layout(campaign: Campaign, by_node: dict[str, dict[str, int]]) -> Graph:
    """Place each node in the column of its BFS depth from the entry, in BFS order down
    the column, and route the edges: straight to a later column, curved out to the right
    within a column, curved below the boxes back to an earlier column (a loop)."""
    depth: dict[str, int] = {campaign.entry: 0}
    order = [campaign.entry]
    queue = deque([campaign.entry])
    while queue:
        name = queue.popleft()
        for _, target in campaign.nodes[name].successors():
            if target is not None and target in campaign.nodes and target not in depth:
                depth[target] = depth[name] + 1
                order.append(target)
                queue.append(target)
    last = max(depth.values())
    for name in campaign.nodes:  # validation makes every node reachable; stay safe anyway
        if name not in depth:
            depth[name] = last + 1
            order.append(name)

    columns: dict[int, list[str]] = {}
    for name in order:
        columns.setdefault(depth[name], []).append(name)
    boxes: dict[str, Box] = {}
    bottom = 0
    for col, names in sorted(columns.items()):
        y = _PAD
        for name in names:
            node = campaign.nodes[name]
            per = by_node.get(name, {})
            counts = [(s.value, per.get(s.value, 0)) for s in NODE_STATES if per.get(s.value)]
            h = _HEAD_H + _LINE_H * max(1, len(counts)) + 8
            boxes[name] = Box(name, _short(name), node.type, _short(_detail(node), 30),
                              _PAD + col * (_BOX_W + _GAP_X), y, h, counts)  # fmt: skip
            y += h + _GAP_Y
        bottom = max(bottom, y)

    edges: list[Edge] = []
    loops = 0
    x1: float
    y1: float
    x2: float
    y2: float
    for name in order:
        node = campaign.nodes[name]
        src = boxes[name]
        outgoing = [(k, t) for k, t in node.successors() if t is not None and t in boxes]
        for i, (kind, target) in enumerate(outgoing):
            dst = boxes[target]
            label = _edge_label(node, kind)
            if dst.x > src.x:
                x1, y1 = src.x + src.w, src.y + src.h / 2
                x2, y2 = dst.x, dst.y + dst.h / 2
                # several edges leave one box: spread their labels along the lines
                t = 0.5 if len(outgoing) == 1 else 0.3 + 0.4 * i / (len(outgoing) - 1)
                path = f"M{x1:.0f},{y1:.0f} L{x2 - 2:.0f},{y2:.0f}"
                edges.append(Edge(name, target, kind, label, path,
                                  x1 + (x2 - x1) * t, y1 + (y2 - y1) * t - 4, False))  # fmt: skip
            elif dst.x == src.x:
                # same column (or itself): bulge out into the gap on the right
                bulge = 34 + 16 * i
                x1, y1 = src.x + src.w, src.y + src.h * (0.35 if dst is src else 0.5)
                x2, y2 = dst.x + dst.w, dst.y + dst.h * (0.65 if dst is src else 0.5)
                path = (f"M{x1:.0f},{y1:.0f} C{x1 + bulge:.0f},{y1:.0f} {x2 + bulge:.0f},{y2:.0f}"
                        f" {x2 + 2:.0f},{y2:.0f}")  # fmt: skip
                edges.append(Edge(name, target, kind, label, path,
                                  x1 + bulge * 0.75, (y1 + y2) / 2 + 4, True))  # fmt: skip
            else:
                # to an earlier column (a loop back): under the boxes, one lane per loop
                loops += 1
                dip = bottom + 14 * loops
                x1, y1 = src.x + src.w / 2 + 12, src.y + src.h
                x2, y2 = dst.x + dst.w / 2 - 12, dst.y + dst.h
                path = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{dip} {x2:.0f},{dip} {x2:.0f},{y2 + 2:.0f}"
                edges.append(Edge(name, target, kind, label, path,
                                  (x1 + x2) / 2, dip - 0.25 * (dip - max(y1, y2)) - 3, True))  # fmt: skip
    width = _PAD * 2 + (max(columns) + 1) * (_BOX_W + _GAP_X)  # a gap for edges on the right
    height = bottom + _PAD + 14 * loops
    return Graph(width, height, list(boxes.values()), edges)


# -- rendering -----------------------------------------------------------------------------


def _when(value: datetime | float | None) -> str:
    """A UTC time to the second ("-" for none)."""
    if value is None:
        return "-"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _relative(value: datetime | None) -> str:
    """ "in 3m 20s" / "12s ago", for a due time next to its absolute time."""
    if value is None:
        return ""
    seconds = (value - datetime.now(UTC)).total_seconds()
    n = abs(int(seconds))
    parts = [(n // 86400, "d"), (n % 86400 // 3600, "h"), (n % 3600 // 60, "m"), (n % 60, "s")]
    text = " ".join(f"{v}{u}" for v, u in [p for p in parts if p[0]][:2]) or "0s"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _qs(**params: Any) -> str:
    """A query string of the given parameters that are not None or empty ("" for none)."""
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("worker.api", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # ids may hold "/", "?", "#": a path segment quotes every one of them
    env.filters["seg"] = lambda value: quote(str(value), safe="")
    env.filters["when"] = _when
    env.filters["relative"] = _relative
    env.filters["pretty"] = lambda v: orjson.dumps(v, option=orjson.OPT_INDENT_2).decode()
    env.globals["qs"] = _qs
    env.globals["states"] = list(State)
    env.globals["stylesheet"] = _STATIC
    return env


class Console:
    """The console's handlers, sharing the :class:`Api` with the ``/v1`` routes."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.env = _environment()
        self.css = resources.files("worker.api").joinpath("static/console.css").read_bytes()

    # -- plumbing ----------------------------------------------------------------------

    def render(self, template: str, *, status: int = 200, session: Session | None = None,
               **context: Any) -> web.Response:  # fmt: skip
        html = self.env.get_template(template).render(session=session, **context)
        return web.Response(status=status, text=html, content_type="text/html",
                            headers=_SECURITY_HEADERS)  # fmt: skip

    def error(self, status: int, title: str, detail: str,
              session: Session | None = None) -> web.Response:  # fmt: skip
        return self.render("error.html", status=status, session=session, title=title,
                           detail=detail, code=status)  # fmt: skip

    def session_of(self, request: web.Request) -> Session | None:
        found = self.api.tokens.session(request.cookies.get(SESSION_COOKIE))
        return Session(*found) if found is not None else None

    def origin_problem(self, request: web.Request) -> str | None:
        """Why a POST is refused as cross-site, or None. Browsers send ``Origin`` with
        every POST; one naming another host (or ``null``) is a forged form. A proxy that
        rewrites ``Host`` may say the public one in ``X-Forwarded-Host``: a cross-site
        form cannot set that header, so accepting it keeps the check sound."""
        origin = request.headers.get("Origin")
        hosts = {request.host.lower()}
        forwarded = request.headers.get("X-Forwarded-Host")
        if forwarded:
            hosts.add(forwarded.split(",")[0].strip().lower())
        if origin is not None and urlsplit(origin).netloc.lower() not in hosts:
            return "this form was posted from another site (Origin does not match the host)"
        fetch_site = request.headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return "this form was posted from another site (Sec-Fetch-Site)"
        return None

    def plain_http_remote(self, request: web.Request) -> bool:
        """True when the page came over plain HTTP to a host that is not loopback: a
        browser then drops the Secure session cookie, so the login page says so."""
        if request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https":
            return False
        host = urlsplit("//" + request.host).hostname or ""
        return host != "localhost" and not host.startswith("127.") and host != "::1"

    def page(
        self,
        handler: Callable[[web.Request, Session], Awaitable[web.StreamResponse]],
        *,
        write: bool = False,
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Wrap ``handler``: a session is required (else 303 to the login page), a POST is
        checked (origin, CSRF, and a read-write session when ``write``), and the client's
        errors become an HTML error page with their status, never a traceback."""

        async def handle(request: web.Request) -> web.StreamResponse:
            session = self.session_of(request)
            if session is None:
                target = request.path_qs if request.method == "GET" else None
                return _see_other("/ui/login" + _qs(next=target if _safe_next(target) else None))
            if request.method == "POST":
                form = await _form(request)
                if form is None:
                    return self.error(400, "BadRequest", _BAD_FORM, session)
                problem = self.origin_problem(request)
                if problem is None and form.get("csrf") != session.csrf:
                    problem = "the form's CSRF token is missing or stale; reload the page"
                if problem is None and write and not session.may_write:
                    problem = "this session is read-only (ro: token); log in with another"
                if problem is not None:
                    return self.error(403, "Forbidden", problem, session)
            try:
                response = await handler(request, session)
                if write and request.method == "POST":  # as the API logs its writes
                    audit.info("api write", extra={
                        "operation": f"console:{handler.__name__}",
                        "token_id": session.principal.token_id, **request.match_info})  # fmt: skip
                return response
            except web.HTTPException:
                raise
            except CampaignError as exc:
                p = from_campaign_error(exc)
                return self.error(p.status, p.title, p.detail, session)
            except _REDIS_ERRORS as exc:
                return self.error(503, "Unavailable",
                                  f"Redis is unreachable or refusing: {type(exc).__name__}",
                                  session)  # fmt: skip
            except Exception:
                log.exception("console page failed", extra={"path": request.path[:200]})
                return self.error(500, "InternalError", "an unexpected error; see the API's log",
                                  session)  # fmt: skip

        return handle

    # -- login -------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self.session_of(request) is not None:
            return _see_other("/ui/")
        return self.render("login.html", error=None, next=_next_of(request.query.get("next")),
                           insecure=self.plain_http_remote(request))  # fmt: skip

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await _form(request)
        if form is None:
            return self.error(400, "BadRequest", _BAD_FORM)
        target = _next_of(_text(form.get("next")))
        problem = self.origin_problem(request)
        if problem is not None:
            return self.error(403, "Forbidden", problem)
        cookie = self.api.tokens.open_session(_text(form.get("token")).strip())
        if cookie is None:
            return self.render("login.html", status=401, error="That token is not valid.",
                               next=target, insecure=self.plain_http_remote(request))  # fmt: skip
        resp = _see_other(target)
        resp.set_cookie(SESSION_COOKIE, cookie, max_age=SESSION_SECONDS, path="/ui",
                        httponly=True, secure=True, samesite="Strict")  # fmt: skip
        return resp

    async def logout(self, request: web.Request, session: Session) -> web.StreamResponse:
        resp = _see_other("/ui/login")
        resp.del_cookie(SESSION_COOKIE, path="/ui", secure=True, httponly=True,
                        samesite="Strict")  # fmt: skip
        return resp

    # -- pages -------------------------------------------------------------------------

    async def overview(self, request: web.Request, session: Session) -> web.StreamResponse:
        view, campaigns = await campaign_overview(self.api)
        return self.render("overview.html", session=session, view=view, campaigns=campaigns)

    async def campaign(self, request: web.Request, session: Session) -> web.StreamResponse:
        client = self.api.client
        campaign = await client.get_campaign(request.match_info["campaign_id"])
        counts = await client.service.store.count_by_state(campaign.id)
        by_node, complete = await self.api.node_counts(campaign.id)
        elsewhere = {n: c for n, c in sorted(by_node.items()) if n not in campaign.nodes}
        wanted = request.query.get("version", "")
        if wanted and not (_number(wanted) and 1 <= int(wanted) <= (campaign.version or 1)):
            raise InvalidRequest(f"version: {wanted[:40]!r} is not a version of {campaign.id}")
        # the graph is always the latest version's; ?version=N shows an older definition
        shown = await client.get_campaign(campaign.id, int(wanted)) if wanted else campaign
        return self.render(
            "campaign.html", session=session, campaign=campaign, counts=counts,
            graph=layout(campaign, by_node), complete=complete, elsewhere=elsewhere,
            versions=list(range(campaign.version or 1, 0, -1)),
            shown_version=shown.version, definition=shown.definition(),
        )  # fmt: skip

    async def enrollments(self, request: web.Request, session: Session) -> web.StreamResponse:
        client = self.api.client
        cid = request.match_info["campaign_id"]
        campaign = await client.get_campaign(cid)
        state = request.query.get("state") or None
        node = request.query.get("node") or None
        cursor = request.query.get("cursor") or None
        page = await client.list_enrollments(cid, state=state, node=node, limit=PAGE_SIZE,
                                             cursor=cursor)  # fmt: skip
        found = await client.service.store.summaries([eid for eid, _, _ in page.items])
        rows = [s for s in found if s is not None]
        return self.render(
            "enrollments.html", session=session, campaign=campaign, rows=rows,
            state=state, node=node, next_cursor=page.next_cursor, first=cursor is None,
            nodes=sorted(campaign.nodes),
        )  # fmt: skip

    async def lookup(self, request: web.Request, session: Session) -> web.StreamResponse:
        """``?id=`` an enrollment id, or a contact id of ``?campaign=``: its page."""
        wanted = request.query.get("id", "").strip()
        cid = request.query.get("campaign", "")
        if not wanted:
            raise InvalidRequest("id: give an enrollment id (CAMPAIGN:CONTACT) or a contact id")
        client = self.api.client
        try:
            status = await client.status(wanted)
        except EnrollmentNotFound:
            if not cid:
                raise
            status = await client.status(f"{cid}:{wanted}")  # a contact id of that campaign
        return _see_other(f"/ui/enrollments/{quote(status.enrollment_id, safe='')}")

    async def enrollment(self, request: web.Request, session: Session) -> web.StreamResponse:
        status = await self.api.client.status(request.match_info["enrollment_id"])
        err = status.error
        trace = (self.api.settings.trace_url.replace("{trace_id}", quote(err.trace_id, safe=""))
                 if err is not None and err.trace_id and self.api.settings.trace_url
                 else None)  # fmt: skip
        return self.render(
            "enrollment.html", session=session, st=status, trace_link=trace,
            active=status.state in ACTIVE_STATES,
            done=_DONE.get(request.query.get("done", "")),
        )  # fmt: skip

    async def replay(self, request: web.Request, session: Session) -> web.StreamResponse:
        eid = request.match_info["enrollment_id"]
        await self.api.client.replay(eid)
        return _see_other(f"/ui/enrollments/{quote(eid, safe='')}?done=replayed")

    async def cancel(self, request: web.Request, session: Session) -> web.StreamResponse:
        eid = request.match_info["enrollment_id"]
        done = await self.api.client.cancel(eid, "cancelled from the console")
        return _see_other(f"/ui/enrollments/{quote(eid, safe='')}"
                          f"?done={'cancelled' if done else 'not-cancelled'}")  # fmt: skip

    async def failures(self, request: web.Request, session: Session) -> web.StreamResponse:
        groups = [failure_group_out(g) for g in await failure_groups(self.api.client)]
        q = request.query
        result = None
        if _number(q.get("replayed", "")) and _number(q.get("total", "")):
            result = {"group": q.get("group", ""), "replayed": int(q["replayed"]),
                      "total": int(q["total"]),
                      "skipped": int(q["skipped"]) if _number(q.get("skipped", "")) else 0}  # fmt: skip
        trace_url = self.api.settings.trace_url
        return self.render("failures.html", session=session, groups=groups, result=result,
                           trace_url=trace_url)  # fmt: skip

    async def replay_failures(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await _form(request) or {}
        report = await replay_group(self.api.client, _text(form.get("group")))
        # the outcome travels in the redirect as numbers; the page words it (no free text)
        return _see_other("/ui/failures" + _qs(group=report.group, replayed=report.replayed,
                                               total=report.total, skipped=len(report.skipped)))  # fmt: skip

    async def dead_letters(self, request: web.Request, session: Session) -> web.StreamResponse:
        client = self.api.client
        await client.connect()
        letters, total = await list_dead_letters(client, DEAD_LETTER_LIMIT)
        return self.render("dead_letters.html", session=session, letters=letters, total=total,
                           shown=len(letters))  # fmt: skip

    async def stylesheet(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.css, content_type="text/css",
                            headers={"Cache-Control": "max-age=300",
                                     "X-Content-Type-Options": "nosniff"})  # fmt: skip

    async def not_found(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self.error(404, "NotFound", f"no console page at {request.path[:200]}", session)


_DONE = {
    "replayed": "Replayed: the enrollment is scheduled again from the step that failed.",
    "cancelled": "Cancelled.",
    "not-cancelled": "Not cancelled: the enrollment had already ended.",
}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


_BAD_FORM = "the form could not be read (send it as the page's form does)"


async def _form(request: web.Request) -> Any:
    """The posted form; None when aiohttp cannot read it (bytes that are not UTF-8, an
    unknown charset, a multipart body without a boundary or a field name)."""
    try:
        return await request.post()
    except (ValueError, KeyError, LookupError, AssertionError):
        return None


def _number(text: str) -> bool:
    """ASCII digits only (str.isdigit() also takes "²", which int() refuses)."""
    return re.fullmatch(r"[0-9]{1,10}", text) is not None


def _safe_next(target: str | None) -> bool:
    # only a console path of this site: never "//host" or a full URL (an open redirect),
    # nor a control character (it would end up in the Location header)
    return bool(target) and str(target).startswith("/ui/") and "\\" not in str(target) \
        and not str(target).startswith("/ui/login") \
        and not re.search(r"[\x00-\x20\x7f]", str(target))  # fmt: skip


def _next_of(target: str | None) -> str:
    return target if target is not None and _safe_next(target) else "/ui/"


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **_SECURITY_HEADERS})


def setup_console(app: web.Application, api: Api) -> None:
    """Add the console's routes to ``app`` (all under ``/ui``)."""
    c = Console(api)

    async def to_root(_: web.Request) -> web.StreamResponse:
        return _see_other("/ui/")

    r = app.router
    r.add_get("/ui", to_root)
    r.add_get(_STATIC, c.stylesheet)
    r.add_get("/ui/login", c.login_form)
    r.add_post("/ui/login", c.login)
    r.add_post("/ui/logout", c.page(c.logout))
    r.add_get("/ui/", c.page(c.overview))
    r.add_get("/ui/campaigns/{campaign_id}", c.page(c.campaign))
    r.add_get("/ui/campaigns/{campaign_id}/enrollments", c.page(c.enrollments))
    r.add_get("/ui/enrollments", c.page(c.lookup))
    r.add_get("/ui/enrollments/{enrollment_id}", c.page(c.enrollment))
    r.add_post("/ui/enrollments/{enrollment_id}/replay", c.page(c.replay, write=True))
    r.add_post("/ui/enrollments/{enrollment_id}/cancel", c.page(c.cancel, write=True))
    r.add_get("/ui/failures", c.page(c.failures))
    r.add_post("/ui/failures/replay", c.page(c.replay_failures, write=True))
    r.add_get("/ui/dead-letters", c.page(c.dead_letters))
    r.add_route("*", "/ui/{tail:.*}", c.page(c.not_found))
