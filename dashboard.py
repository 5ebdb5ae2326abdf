"""The operator dashboard: server-rendered pages under /admin.

Owns the pages, their routes, the session an admin key opens, and the
CSRF tokens of their forms; not the figures (``insights`` and the stores)
nor the actions, which are the API's own handlers (``wsgi_routes``,
``flow``, ``accounts``), called as the admin the session belongs to, so a
retry from a page follows exactly the rules, money included, of a retry by
the API, and a limit set on a page is checked as the API checks it. A
schedule is its owner's: pausing or deleting one acts on the owner's, and
is audited under the session's key.

- **Sessions.** The login form takes an admin API key (never a managed
  one) and answers with a cookie holding a random token; the database keeps
  only the token's SHA-256 digest, the admin key's fingerprint, the
  session's CSRF token and its expiry (``ADMIN_SESSION_TTL``), so every
  worker and every host sees the session, and logout ends it everywhere.
  The key itself is neither kept nor sent back. A session whose key is no
  longer configured is refused.
- **CSRF.** Every form that changes something carries the session's CSRF
  token, compared in constant time; the login form, before there is a
  session, carries a token that must equal a cookie set with the form
  (double submit). Cookies are ``HttpOnly``, ``SameSite=Strict``, ``Path=/admin``
  and, in production, ``Secure``.
- **Escaping.** ``render`` is the one place a value becomes HTML: every
  value is escaped unless it is ``Markup`` that ``render`` itself made.
  No page has inline script or style, so the Content-Security-Policy
  (``middleware.ADMIN_CSP``) forbids both.
- **Limits.** Reads take the API's read bucket; the login form, its own
  per-address and global buckets (RATE_ANON, RATE_ANON_GLOBAL), so failed
  logins are rate-limited, and audited; other forms the write buckets.
"""

import datetime
import hashlib
import hmac
import html
import io
import json
import re
import secrets
import string
import time
from urllib.parse import parse_qs, quote, urlencode

import costs
import engine
import flow
import ratelimit
import wsgi_routes
from jobstore import JOB_FINAL, JOB_STATUSES, WORKFLOW_NAME_PATTERN
from middleware import STORAGE_ERRORS
from schemas import validate
from storage import StorageError
from web import STATUS_LINES, VERSION, HTTPError, Request, json_body, whole_number

# ---------------------------------------------------------------------------
# HTML: the one place values are escaped
# ---------------------------------------------------------------------------


class Markup(str):
    """HTML made by ``render``: inserted as it is, never escaped again."""


def render(template, **values):
    """``template`` (a string.Template) with every value escaped, except Markup."""
    return Markup(template.substitute({
        k: v if isinstance(v, Markup) else html.escape("" if v is None else str(v), quote=True)
        for k, v in values.items()}))


def join(parts):
    return Markup("".join(parts))


def tpl(text):
    return string.Template(text)


LAYOUT = tpl("""<!doctype html>
<html lang="en-GB">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · Levqor operator</title>
<link rel="stylesheet" href="/public/assets/admin.css">
<script src="/public/assets/admin.js" defer></script>
</head>
<body>
<header class="bar"><a class="brand" href="/admin">Levqor <span>operator</span></a>$nav</header>
<main$refresh>
$flash<h1>$title</h1>
$content
</main>
<footer>Levqor $version · $who · rendered <time>$now</time> UTC</footer>
</body>
</html>
""")
NAV = tpl('<nav>$links<form method="post" action="/admin/logout" class="inline">'
          '<input type="hidden" name="csrf" value="$csrf"><button class="link">Log out</button></form></nav>')
NAV_LINK = tpl('<a href="$href"$current>$label</a>')
FLASH = tpl('<p class="flash $kind" role="status">$text</p>\n')
TABLE = tpl('<div class="scroll"><table$cls><thead><tr>$head</tr></thead><tbody>$rows</tbody></table></div>')
TH = tpl('<th$cls>$text</th>')
TR = tpl('<tr>$cells</tr>')
TD = tpl('<td$cls>$text</td>')
EMPTY_ROW = tpl('<tr><td colspan="$span" class="empty">$text</td></tr>')
LINK = tpl('<a href="$href">$text</a>')
BADGE = tpl('<span class="badge $status">$status</span>')
CODE = tpl('<code>$text</code>')
PRE = tpl('<pre>$text</pre>')
CARD = tpl('<div class="card"><span class="label">$label</span><span class="value $cls">$value</span>'
           '<span class="note">$note</span></div>')
HIDDEN = tpl('<input type="hidden" name="$name" value="$value">')
OPTION = tpl('<option value="$value"$selected>$label</option>')
SELECT = tpl('<label>$label<select name="$name">$options</select></label>')
INPUT = tpl('<label>$label<input type="$type" name="$name" value="$value"$extra></label>')
ACTION = tpl('<form method="post" action="$action" class="inline" data-confirm="$confirm">'
             '<input type="hidden" name="csrf" value="$csrf">$fields<button class="$cls">$label</button></form>')
CLIPPED = tpl('<span title="$full">$shown</span>')
SUB = tpl('<span class="sub">$text</span>')

# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def when(ts):
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def span(seconds):
    """A duration as a person says it: 0.42 s, 12 s, 3 min 5 s, 2 h 10 min."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600)} h"


def usd(micro):
    """Micro-dollars as dollars: cents always, and smaller digits when there are any."""
    whole, _, frac = f"{(micro or 0) / 1_000_000:,.6f}".partition(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"


def period(seconds):
    """A period of whole units when it is one: 30 s, 5 min, 2 h, 1 d; else seconds."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def pretty(value):
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def clip(text, most=24):
    """Long text cut to ``most`` characters, whole on hover."""
    if text is None:
        return "—"
    if len(text) <= most:
        return text
    return render(CLIPPED, full=text, shown=text[:most - 1] + "…")


def attr(flag, text):
    return Markup(text) if flag else ""


def table(head, rows, empty="Nothing here yet.", cls=""):
    """A table: ``head`` is column titles (a title starting with '#' is a
    number column), ``rows`` lists of cell values (text or Markup)."""
    numeric = [h.startswith("#") for h in head]
    head_html = join(render(TH, text=h.lstrip("#"), cls=attr(n, ' class="num"'))
                     for h, n in zip(head, numeric))
    body = join(render(TR, cells=join(render(TD, text=c, cls=attr(n, ' class="num"'))
                                      for c, n in zip(row, numeric))) for row in rows)
    if not rows:
        body = render(EMPTY_ROW, span=len(head), text=empty)
    return render(TABLE, head=head_html, rows=body, cls=attr(cls, f' class="{cls}"'))


def pager(path, kept, cursor, next_cursor, first, more):
    """Links to the first page (when not on it) and the next (when there is one),
    keeping the filters ``kept``."""
    links = []
    if cursor is not None:
        links.append(render(LINK, href=f"{path}?{urlencode(kept)}", text=first))
    if next_cursor is not None:
        links.append(render(LINK, href=f"{path}?{urlencode({**kept, 'cursor': next_cursor})}", text=more))
    return join(links)


def kept_filters(query, names):
    return {k: v for k, v in query.items() if k in names and v}


def options(choices, current):
    """<option>s of (value, label); a current value not among them is added,
    so the filter in force is the one shown."""
    if current and current not in [v for v, _ in choices]:
        choices = [*choices, (current, current)]
    return join(render(OPTION, value=v, label=label, selected=attr(v == current, " selected"))
                for v, label in choices)


# ---------------------------------------------------------------------------
# Charts: inline SVG drawn here
# ---------------------------------------------------------------------------

BAR_CHART = tpl('<figure class="chart"><svg viewBox="0 0 $w $h" role="img" aria-label="$label" '
                'preserveAspectRatio="none">$bars</svg>'
                '<figcaption><span>$first</span><span class="legend">$legend · $peak</span>'
                '<span>$last</span></figcaption></figure>')
RECT = tpl('<rect x="$x" y="$y" width="$w" height="$h" class="$cls"><title>$title</title></rect>')
KEY = tpl('<i class="swatch $cls"></i>$text ')
METER = tpl('<figure class="meter"><svg viewBox="0 0 100 8" role="img" aria-label="$label" '
            'preserveAspectRatio="none"><rect x="0" y="0" width="100" height="8" class="track"></rect>'
            '$parts</svg><figcaption>$caption</figcaption></figure>')


def bar_chart(label, buckets, series, first, last, unit=str, width=600, height=140):
    """Stacked bars, one per bucket: ``series`` is [(css class, legend,
    [value per bucket])], drawn bottom up; ``buckets`` names each bar, and
    ``unit`` writes a value. The tallest bar is the chart's height."""
    peak = max([sum(s[2][i] for s in series) for i in range(len(buckets))] + [0])
    top = peak or 1
    plot = height - 4
    slot = width / max(1, len(buckets))
    bars = []
    for i, name in enumerate(buckets):
        y = height
        for cls, legend, values in series:
            value = values[i]
            if value:
                h = max(1.0, plot * value / top)
                y -= h
                bars.append(render(RECT, x=f"{i * slot + slot * 0.1:.2f}", y=f"{y:.2f}",
                                   w=f"{slot * 0.8:.2f}", h=f"{h:.2f}", cls=cls,
                                   title=f"{name}: {unit(value)} {legend}"))
    legend = join(render(KEY, cls=cls, text=text) for cls, text, _ in series)
    return render(BAR_CHART, w=width, h=height, label=label, bars=join(bars), first=first, last=last,
                  legend=legend, peak=f"peak {unit(peak)}" if peak else "nothing yet")


def meter(label, parts, limit, caption):
    """A horizontal bar of ``limit``: ``parts`` is [(css class, amount)] laid end to end."""
    x, rects = 0.0, []
    for cls, amount in parts:
        w = min(100.0 - x, 100.0 * amount / limit) if limit else 0.0
        if w > 0:
            rects.append(render(RECT, x=f"{x:.3f}", y="0", w=f"{w:.3f}", h="8", cls=cls, title=label))
            x += w
    return render(METER, label=label, parts=join(rects), caption=caption)


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------

SESSION_COOKIE = "levqor_session"
LOGIN_COOKIE = "levqor_login"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")
# Named statements, the same on SQLite and PostgreSQL.
SESSION_SQL = {
    "create": "INSERT INTO admin_sessions (digest, key_id, csrf, created_at, expires_at)"
              " VALUES (:digest, :key_id, :csrf, :now, :expires_at)",
    "get": "SELECT key_id, csrf, created_at, expires_at FROM admin_sessions"
           " WHERE digest = :digest AND expires_at > :now",
    "end": "DELETE FROM admin_sessions WHERE digest = :digest",
    "purge": "DELETE FROM admin_sessions WHERE expires_at <= :now",
}


def _digest(token):
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """Dashboard sessions in the database: a token's digest, never the token."""

    def __init__(self, db, ttl, clock=time.time):
        self.db = db
        self.ttl = ttl
        self.clock = clock

    def open(self, key_id):
        """A new session for ``key_id``: (its cookie token, the session)."""
        now = self.clock()
        self.db.write_one(SESSION_SQL["purge"], {"now": now})  # the expired go as new ones come
        token = secrets.token_urlsafe(32)
        session = {"key_id": key_id, "csrf": secrets.token_urlsafe(32), "created_at": now,
                   "expires_at": now + self.ttl}
        self.db.write_one(SESSION_SQL["create"], {"digest": _digest(token), "now": now, **session})
        return token, session

    def get(self, token):
        if not token or not _TOKEN.match(token):
            return None
        rows = self.db.query(SESSION_SQL["get"], {"digest": _digest(token), "now": self.clock()})
        return rows[0] if rows else None

    def end(self, token):
        if token and _TOKEN.match(token):
            self.db.write_one(SESSION_SQL["end"], {"digest": _digest(token)})


def cookie(environ, name):
    """A cookie's value from the Cookie header, or None (parsed by hand:
    http.cookies is lenient with malformed headers in surprising ways)."""
    for part in environ.get("HTTP_COOKIE", "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip('"')
    return None


def set_cookie(name, value, path, max_age, secure):
    return ("Set-Cookie", f"{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; "
                          f"SameSite=Strict{'; Secure' if secure else ''}")


def same(a, b):
    return bool(a) and bool(b) and hmac.compare_digest(a.encode("utf-8", "surrogatepass"),
                                                       b.encode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------------------
# Requests: forms, queries, answers
# ---------------------------------------------------------------------------

MAX_FORM = 64 * 1024
MAX_FORM_FIELDS = 210  # the bulk form: 200 job ids and its own fields
_SAFE_NEXT = re.compile(r"^/admin(?:/[A-Za-z0-9/_.-]*)?(?:\?[A-Za-z0-9=&%_.:+-]*)?$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_KEY_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_WORKFLOW = re.compile(WORKFLOW_NAME_PATTERN)
_WHEN = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2})?)?$")
_CURSOR = re.compile(r"^[0-9]{1,18}$")
_STATUSES = re.compile("^({0})(,({0}))*$".format("|".join(JOB_STATUSES)))
# What the list API takes for schedule and concurrency_key: text, here without control characters.
_TEXT = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
REFRESH = Markup(' data-refresh="5"')


class Page:
    """One request to the dashboard: the web.Request, the session, the form."""

    def __init__(self, req, dash):
        self.req = req
        self.dash = dash
        self.services = req.services
        self.session = None
        self.token = None
        self.form = {}

    def read_form(self):
        """The urlencoded body as {name: [values]}; 411, 413, 415, 400 as the API answers."""
        env = self.req.environ
        ctype = env.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise HTTPError(415, "unsupported_media_type", "a form must be sent urlencoded")
        length = env.get("CONTENT_LENGTH")
        if not length:
            raise HTTPError(411, "length_required", "a form needs a Content-Length")
        size = whole_number(length)
        if size is None:
            raise HTTPError(400, "bad_request", "Content-Length is not a whole number")
        if size > MAX_FORM:
            raise HTTPError(413, "payload_too_large", f"a form may be at most {MAX_FORM} bytes")
        try:
            raw = env["wsgi.input"].read(size)
        except OSError:
            raise HTTPError(408, "request_timeout", "the form did not arrive in time")
        if len(raw) != size:
            raise HTTPError(400, "incomplete_body", "the form is shorter than its Content-Length")
        try:
            self.form = parse_qs(raw.decode("ascii"), keep_blank_values=True,
                                 max_num_fields=MAX_FORM_FIELDS, errors="strict")
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "bad_request", "the form cannot be read")

    def field(self, name, default=""):
        values = self.form.get(name)
        if values is None:
            return default
        if len(values) != 1:
            raise HTTPError(400, "bad_request", f"the form field {name} is repeated")
        return values[0].strip()

    def query(self, name, pattern=None, default=None):
        """A query parameter (blank: absent), checked against ``pattern``."""
        value = self.req.query.get(name, "").strip()
        if not value:
            return default
        if pattern is not None and not pattern.match(value):
            raise HTTPError(400, "invalid_query", f"the {name} filter is not valid")
        return value

    def time_query(self, name):
        """A date (YYYY-MM-DD) or date and time (YYYY-MM-DDTHH:MM[:SS]), UTC, as Unix seconds."""
        value = self.query(name, _WHEN)
        if value is None:
            return None, ""
        try:
            parsed = datetime.datetime.fromisoformat(value).replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            raise HTTPError(400, "invalid_query", f"the {name} filter is not a valid date")
        return parsed.timestamp(), value

    def now(self):
        return self.services.clock()

    # -- answers -------------------------------------------------------------------------

    def page(self, title, content, status=200, refresh=True, flash=None, headers=()):
        flash_html = ""
        if flash:
            kind, text = flash
            flash_html = render(FLASH, kind=kind, text=text)
        nav = ""
        if self.session is not None:
            current = self.req.path
            nav = render(NAV, csrf=self.session["csrf"], links=join(
                render(NAV_LINK, href=href, label=label,
                       current=attr(current == href or (href != "/admin" and current.startswith(href)),
                                    ' aria-current="page"'))
                for href, label in PAGES))
        who = "not logged in" if self.session is None else f"key {self.session['key_id']}"
        body = render(LAYOUT, title=title, nav=nav, content=content, flash=flash_html,
                      refresh=REFRESH if refresh and self.req.method == "GET" else "",
                      version=VERSION, who=who,
                      now=when(self.now())).encode()
        return status, [("Content-Type", "text/html; charset=utf-8"),
                        ("Content-Length", str(len(body))), *headers], body

    def redirect(self, location, headers=()):
        return 303, [("Content-Type", "text/html; charset=utf-8"), ("Location", location),
                     ("Content-Length", "0"), *headers], b""

    def csrf_field(self):
        return render(HIDDEN, name="csrf", value=self.session["csrf"])

    def action(self, path, label, confirm, cls="", back=None):
        fields = "" if back is None else render(HIDDEN, name="back", value=back)
        return render(ACTION, action=path, label=label, confirm=confirm, csrf=self.session["csrf"],
                      cls=cls, fields=fields)

    def api_request(self, body=None, owner=None):
        """This request made ready for an API handler, as the admin of this
        session; with ``body``, a copy whose body is that JSON, read and
        checked by the API's own parser. ``owner``: the key whose records the
        handler acts on (a schedule's), when not the session's own."""
        req = self.req
        if body is not None:
            raw = json_body(body)
            environ = {k: v for k, v in req.environ.items()
                       if k not in ("HTTP_TRANSFER_ENCODING", "HTTP_CONTENT_ENCODING")}
            environ.update({"CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(raw)),
                            "wsgi.input": io.BytesIO(raw)})
            req = Request(environ, self.services)
        req.key_id, req.role, req.key = owner or self.session["key_id"], "admin", None
        return req

    def api(self, handler, *args):
        """What an API handler that reads answers this session's admin, as JSON."""
        return json.loads(handler(self.api_request(), *args)[2])

    def as_admin(self, handler, *args, body=None, owner=None):
        """Call an API handler as the admin of this session (see
        ``api_request``), audited under the session's key as the API audits
        it; its HTTPError is raised on."""
        req = self.api_request(body, owner)
        status = 500
        try:
            status = handler(req, *args)[0]
            return status
        except HTTPError as exc:
            status = exc.status
            raise
        finally:
            self.audit(status)

    def audit(self, status):
        req = self.req
        self.services.recorder.audit(self.session["key_id"], "POST", req.path, status, req.request_id)


PAGES = (("/admin", "Overview"), ("/admin/jobs", "Jobs"), ("/admin/schedules", "Schedules"),
         ("/admin/workflows", "Workflows"), ("/admin/keys", "Keys"), ("/admin/spend", "Spend"),
         ("/admin/audit", "Audit"))

# ---------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------

LOGIN = tpl("""<form method="post" action="/admin/login" class="login">
<input type="hidden" name="csrf" value="$csrf"><input type="hidden" name="next" value="$next">
$field
<button>Log in</button>
</form>
<p class="note">$note</p>""")
KEY_FIELD = tpl('<label>Admin API key<input type="password" name="key" autocomplete="off" '
                'required autofocus></label>')


def login_form(p, status=200, flash=None):
    token = secrets.token_urlsafe(32)
    secure = p.services.settings.production
    field, note = render(KEY_FIELD), ("Use one of the operator's API_KEYS. The key opens a "
                                      "session; it is not kept in your browser.")
    if not p.dash.admin_keys:
        field, note = "", "Open development mode: no API_KEYS are set, so anyone may log in."
    next_path = p.req.query.get("next", "") if p.req.method == "GET" else p.field("next")
    content = render(LOGIN, csrf=token, field=field, note=note,
                     next=next_path if _SAFE_NEXT.match(next_path) else "")
    return p.page("Log in", content, status, refresh=False, flash=flash,
                  headers=[set_cookie(LOGIN_COOKIE, token, "/admin/login", 3600, secure)])


def login_get(p):
    if p.session is not None:
        return p.redirect("/admin")
    flash = ("ok", "You are logged out.") if p.req.query.get("bye") else None
    return login_form(p, flash=flash)


def login_post(p):
    req, services = p.req, p.services
    presented = p.field("key")
    fp = None
    if not p.dash.admin_keys:
        fp = "open"
    elif presented and not presented.startswith("lq_"):  # a managed key is never an admin's
        fp = services.keys.check(presented)
    if fp is None:
        services.recorder.audit("anonymous", "POST", req.path, 403, req.request_id)
        services.log.warning("admin login refused", request_id=req.request_id,
                             client_ip=req.environ["levqor.client_ip"],
                             reason="managed key" if presented.startswith("lq_") else "not an admin key")
        return login_form(p, 403, ("error", "That is not an admin API key."))
    token, _ = p.dash.sessions.open(fp)
    services.recorder.audit(fp, "POST", req.path, 303, req.request_id)
    next_path = p.field("next")
    secure = services.settings.production
    return p.redirect(next_path if _SAFE_NEXT.match(next_path) else "/admin", [
        set_cookie(SESSION_COOKIE, token, "/admin", services.settings.admin_session_ttl, secure),
        set_cookie(LOGIN_COOKIE, "", "/admin/login", 0, secure)])


def logout(p):
    p.dash.sessions.end(p.token)
    p.services.recorder.audit(p.session["key_id"], "POST", p.req.path, 303, p.req.request_id)
    return p.redirect("/admin/login?bye=1", [
        set_cookie(SESSION_COOKIE, "", "/admin", 0, p.services.settings.production)])


# -- overview -------------------------------------------------------------------------------

OVERVIEW = tpl("""<div class="cards">$cards</div>
<section class="split"><div><h2>Throughput, last hour</h2>$hour</div>
<div><h2>Throughput, last 24 hours</h2>$day</div></section>
<section><h2>Spend today</h2>$spend</section>
<section class="split"><div><h2>Jobs by workflow</h2>$workflows</div>
<div><h2>Run time by workflow, last 24 hours</h2>$runs</div></section>""")


def overview(p):
    services, insights = p.services, p.services.insights
    now = p.now()
    counts = insights.by_status_workflow()
    by_status = dict.fromkeys(JOB_STATUSES, 0)
    by_workflow = {}
    for (status, workflow), n in counts.items():
        by_status[status] += n
        by_workflow.setdefault(workflow, dict.fromkeys(JOB_STATUSES, 0))[status] += n
    oldest = insights.oldest_queued()
    failing = insights.callbacks_failing(now - 86400)
    cards = [render(CARD, label=s, value=f"{by_status[s]:,}", cls=s,
                    note="held now" if s in ("queued", "running") else "kept for JOB_TTL")
             for s in JOB_STATUSES]
    cards.append(render(CARD, label="oldest queued", value=span(None if oldest is None else now - oldest),
                        cls="", note="waiting the longest"))
    cards.append(render(CARD, label="callbacks failing", value=f"{failing:,}", cls="bad" if failing else "",
                        note="retrying or given up, 24 h"))

    this_minute = int(now // 60)
    services.recorder.flush()  # this process's counts of the last second too (written every second)
    minutes = {r["minute"]: r for r in insights.minutes(this_minute - 1439)}

    def chart(label, count, width, fmt, first):
        done, bad = [], []
        for i in range(count):
            rows = [minutes.get(this_minute - (count - 1 - i) * width - j) for j in range(width)]
            finished = sum(r["finished"] for r in rows if r)
            failed = sum(r["failed"] for r in rows if r)
            bad.append(failed)
            done.append(max(0, finished - failed))
        names = [fmt((this_minute - (count - 1 - i) * width) * 60) for i in range(count)]
        return bar_chart(label, names, [("bad", "failed", bad), ("ok", "succeeded or canceled", done)],
                         first, "now", lambda n: f"{n:,}")

    hour = chart("Jobs finished per minute, last hour", 60, 1,
                 lambda t: "minute to " + time.strftime("%H:%M", time.gmtime(t + 60)), "60 min ago")
    day = chart("Jobs finished per hour, last 24 hours", 24, 60,
                lambda t: "hour to " + time.strftime("%H:%M", time.gmtime(t + 60)), "24 h ago")

    today = costs.utc_day(now)
    usage = services.ledger.usage(today, today, "day").get(today, {"spend": 0, "reserved": 0})
    limit = services.settings.max_cost_per_day
    spend = meter("Spend today against MAX_COST_PER_DAY",
                  [("ok", usage["spend"]), ("warn", max(0, usage["reserved"]))], limit,
                  f"{usd(usage['spend'])} spent and {usd(max(0, usage['reserved']))} reserved "
                  f"of {usd(limit)} (MAX_COST_PER_DAY, UTC day {today})")

    workflows = table(["Workflow", *(f"#{s}" for s in JOB_STATUSES)],
                      [[render(LINK, href="/admin/jobs?" + urlencode({"workflow": w}), text=w),
                        *(f"{c[s]:,}" for s in JOB_STATUSES)] for w, c in sorted(by_workflow.items())],
                      "No jobs are held.")
    runs = table(["Workflow", "#p50", "#p95", "#jobs"],
                 [[w, span(p50), span(p95), f"{n:,}"]
                  for w, (p50, p95, n) in sorted(insights.run_times(now - 86400).items())],
                 "No job finished in the last 24 hours.")
    return p.page("Overview", render(OVERVIEW, cards=join(cards), hour=hour, day=day, spend=spend,
                                     workflows=workflows, runs=runs))


# -- jobs -----------------------------------------------------------------------------------

JOBS = tpl("""<form method="get" action="/admin/jobs" class="filters">$filters
<button>Filter</button> <a href="/admin/jobs">Clear</a></form>
<form method="post" action="/admin/jobs/bulk" data-confirm="Apply this to every job ticked?">
$csrf<input type="hidden" name="back" value="$back">
$table
<p class="actions">$bulk<span class="pages">$pages</span></p>
</form>""")
BULK = tpl('<button name="action" value="cancel">Cancel ticked</button> '
           '<button name="action" value="retry">Retry ticked</button>')
TICK = tpl('<input type="checkbox" name="job_id" value="$job_id" aria-label="select $job_id">')
PAGE_SIZES = (10, 20, 50, 100)
STATUS_CHOICES = ([("", "any")] + [(s, s) for s in JOB_STATUSES]
                  + [("scheduled,waiting", "scheduled or waiting"),
                     ("scheduled,waiting,queued,running", "not finished"),
                     ("failed,canceled", "failed or canceled")])
JOB_FILTERS = ("status", "workflow", "key", "schedule", "concurrency_key", "from", "to", "limit")


def key_label(p, key_id):
    """A key id as the operator knows it: a managed key's name, or 'operator'."""
    name = p.dash.key_names().get(key_id)
    return f"{name} ({key_id})" if name else key_id


def key_name(p, key_id):
    """A key as a wide table names it: by name, its id on hover."""
    name = p.dash.key_names().get(key_id)
    return render(CLIPPED, full=key_id, shown=name) if name else key_id


def schedule_href(key_id, name):
    return f"/admin/schedules/{quote(key_id, safe='')}/{quote(name, safe='')}"


def status_cell(job, now):
    """A job's status badge, with when a scheduled one runs and what a waiting one waits on."""
    note = ""
    if job["status"] == "scheduled":
        at = job.get("run_at") or job["not_before"]
        note = render(SUB, text=render(CLIPPED, full=when(at) + " UTC",
                                       shown="due now" if at <= now else "runs in " + span(at - now)))
    elif job["status"] == "waiting":
        waits = len(job.get("depends_on") or ())
        note = render(SUB, text=f"on {waits} job{'s' * (waits != 1)}")
    return join([render(BADGE, status=job["status"]), note])


def jobs(p):
    query = p.req.query
    status = p.query("status", _STATUSES)
    workflow = p.query("workflow", _WORKFLOW)
    key_id = p.query("key", _KEY_ID)
    schedule = p.query("schedule", _TEXT)
    lane = p.query("concurrency_key", _TEXT)
    since, since_text = p.time_query("from")
    until, until_text = p.time_query("to")
    limit = int(p.query("limit", re.compile("^(" + "|".join(map(str, PAGE_SIZES)) + ")$"), "20"))
    cursor = p.query("cursor", _CURSOR)
    statuses = list(dict.fromkeys(status.split(","))) if status else []
    found, more = p.services.insights.list(statuses, workflow, key_id, since, until, limit,
                                           None if cursor is None else int(cursor), schedule, lane)
    keys = [("", "any key")] + [(k, key_label(p, k)) for k in sorted(p.dash.key_names())]
    filters = join([
        render(SELECT, label="Status", name="status", options=options(STATUS_CHOICES, status or "")),
        render(INPUT, label="Workflow", type="text", name="workflow", value=workflow or "",
               extra=Markup(' placeholder="any" maxlength="128"')),
        render(SELECT, label="Key", name="key", options=options(keys, key_id or "")),
        render(INPUT, label="Schedule", type="text", name="schedule", value=schedule or "",
               extra=Markup(' placeholder="any" maxlength="200"')),
        render(INPUT, label="Concurrency key", type="text", name="concurrency_key", value=lane or "",
               extra=Markup(' placeholder="any" maxlength="200"')),
        render(INPUT, label="Created from (UTC)", type="datetime-local", name="from", value=since_text,
               extra=""),
        render(INPUT, label="to", type="datetime-local", name="to", value=until_text, extra=""),
        render(SELECT, label="Per page", name="limit",
               options=options([(str(n), str(n)) for n in PAGE_SIZES], str(limit))),
    ])
    rows = [[render(TICK, job_id=j["job_id"]),
             render(LINK, href=f"/admin/jobs/{j['job_id']}", text=j["job_id"][:12] + "…"),
             j["workflow"], status_cell(j, p.now()), j["priority"], key_name(p, j["key_id"]),
             render(LINK, href=schedule_href(j["key_id"], j["schedule"]), text=clip(j["schedule"]))
             if j.get("schedule") else "—",
             render(LINK, href="/admin/jobs?" + urlencode({"concurrency_key": j["concurrency_key"]}),
                    text=clip(j["concurrency_key"])) if j.get("concurrency_key") is not None else "—",
             when(j["created_at"]), f"{j['attempts']}/{j['max_attempts']}", usd(j["cost_spent"])]
            for j in found]
    kept = kept_filters(query, JOB_FILTERS)
    pages = pager("/admin/jobs", kept, cursor, found[-1]["seq"] if more else None,
                  "« First page", "Next page »")
    flash = None
    done, ok, refused = query.get("bulk"), whole_number(query.get("ok", "")), whole_number(query.get("refused", ""))
    if done in ("cancel", "retry") and ok is not None and refused is not None:
        flash = ("ok" if not refused else "error",
                 f"{done.capitalize()}: {ok} done, {refused} refused (their state does not allow it).")
    back = p.req.path + ("?" + urlencode(kept) if kept else "")
    content = render(JOBS, filters=filters, csrf=p.csrf_field(), back=back,
                     table=table(["", "Job", "Workflow", "Status", "Priority", "Key", "Schedule",
                                  "Concurrency key", "Created (UTC)", "#Attempts", "#Spent"], rows,
                                 "No job matches these filters.", cls="jobs"),
                     bulk=render(BULK) if found else "", pages=pages)
    return p.page("Jobs", content, flash=flash)


def bulk(p):
    action = p.field("action")
    handler = {"cancel": wsgi_routes.job_cancel, "retry": wsgi_routes.job_retry}.get(action)
    if handler is None:
        raise HTTPError(400, "bad_request", "the action must be cancel or retry")
    ids = p.form.get("job_id", [])
    if len(ids) > 200:
        raise HTTPError(400, "bad_request", "at most 200 jobs at once")
    ok = refused = 0
    for job_id in dict.fromkeys(ids):
        try:
            p.as_admin(handler, job_id)
            ok += 1
        except HTTPError:
            refused += 1
    back = p.field("back")
    back = back if _SAFE_NEXT.match(back) and back.startswith("/admin/jobs") else "/admin/jobs"
    sep = "&" if "?" in back else "?"
    return p.redirect(f"{back}{sep}{urlencode({'bulk': action, 'ok': ok, 'refused': refused})}")


# -- one job --------------------------------------------------------------------------------

JOB = tpl("""<p class="actions">$actions</p>
<div class="scroll"><dl class="facts">$facts</dl></div>
<section class="split"><div><h2>Payload</h2>$payload</div><div><h2>$outcome</h2>$result</div></section>
$flow$steps<section><h2>Attempts</h2>$attempts<p class="note">$attempts_note</p></section>
<section><h2>Callback</h2>$callback</section>
<section><h2>Ledger</h2>$ledger</section>""")
FACT = tpl('<div><dt>$name</dt><dd>$value</dd></div>')
SECTION = tpl('<section><h2>$title</h2>$content</section>\n')
MORE_LINKS = tpl('<p class="note">And $count more: $links</p>')
MAX_CHILDREN_READ = 100  # dependents whose status the page reads; the rest are links
OUTCOMES = {"queued": "retried", "succeeded": "succeeded", "failed": "failed", "canceled": "canceled"}
ACTIONS = {"cancel": wsgi_routes.job_cancel, "retry": wsgi_routes.job_retry,
           "redeliver": wsgi_routes.job_redeliver}
DONE = {"cancel": "Cancel requested.", "retry": "Queued again.", "redeliver": "Callback sent again."}


def _job(p, job_id):
    if not _JOB_ID.match(job_id):
        raise HTTPError(404, "not_found", "no such job")
    job = p.services.jobs.get(job_id)
    if job is None:
        raise HTTPError(404, "not_found", "no such job (it may have been purged after JOB_TTL)")
    return job


def job_page(p, job_id, status=200, flash=None):
    job = _job(p, job_id)
    if flash is None and p.req.query.get("done") in DONE:
        flash = ("ok", DONE[p.req.query["done"]])
    actions = []
    if job["status"] not in JOB_FINAL:
        actions.append(p.action(f"/admin/jobs/{job_id}/cancel", "Cancel", "Cancel this job?", "danger"))
    if job["status"] in ("failed", "canceled"):
        actions.append(p.action(f"/admin/jobs/{job_id}/retry", "Retry", "Retry this job?"))
    if job["status"] in JOB_FINAL and job.get("callback_url"):
        actions.append(p.action(f"/admin/jobs/{job_id}/redeliver", "Redeliver callback",
                                "Send this job's callback again?"))
    facts = [("Job", render(CODE, text=job_id)), ("Status", render(BADGE, status=job["status"])),
             ("Workflow", job["workflow"]), ("Priority", job["priority"]),
             ("Key", key_label(p, job["key_id"])), ("Created", when(job["created_at"])),
             ("Queued", when(job.get("queued_at"))), ("Started", when(job["started_at"])),
             ("Finished", when(job["finished_at"])),
             ("Attempts", f"{job['attempts']} of {job['max_attempts']}"),
             ("Cost", f"{usd(job['cost_spent'])} spent of {usd(job['max_cost'])}"),
             ("Progress", "—" if not job.get("progress") else
              f"{job['progress'].get('fraction', 0):.0%} {job['progress'].get('note') or ''}"),
             ("Run at", when(job.get("run_at"))),
             ("Schedule", render(LINK, href=schedule_href(job["key_id"], job["schedule"]),
                                 text=job["schedule"]) if job.get("schedule") else "—"),
             ("Concurrency key", render(CODE, text=job["concurrency_key"])
              if job.get("concurrency_key") is not None else "—"),
             ("Trace", render(CODE, text=job.get("traceparent") or "—"))]
    log = job.get("attempt_log") or []
    rows = [[str(a["attempt"]), a["runner"] or "—", when(a["started_at"]), when(a["ended_at"]),
             span(None if a["started_at"] is None else a["ended_at"] - a["started_at"]),
             OUTCOMES.get(a["outcome"], a["outcome"]),
             f"{a['error']['type']}: {a['error']['message']}" if a["error"] else "—"] for a in log]
    if job["status"] == "running":
        rows.append([str(job["attempts"]), job.get("runner") or "—", when(job["started_at"]), "—",
                     span(p.now() - job["started_at"]), "running", "—"])
    attempts = table(["#Attempt", "Runner", "Started (UTC)", "Ended (UTC)", "#Duration", "Outcome",
                      "Error"], rows, "Not started yet.")
    unlogged = job["attempts"] - (job["status"] == "running") - len(log)
    note = "Attempts that ended before this version kept an attempt log are not listed." if unlogged > 0 else ""
    cb = job.get("callback")
    callback = table(["URL", "State", "#Attempts", "#Last status", "Last error", "Next attempt (UTC)"],
                     [[job.get("callback_url") or "—", cb["state"], str(cb["attempts"]),
                       str(cb["last_status"] or "—"), cb["last_error"] or "—", when(cb["next_attempt_at"])]]
                     if cb else [],
                     "No callback." if not job.get("callback_url") else "Not sent yet: the job has not finished.")
    ledger = table(["Time (UTC)", "Day", "Kind", "#Amount", "Note"],
                   [[when(r["ts"]), r["day"], r["kind"], usd(abs(r["amount"])) if r["amount"] >= 0
                     else "−" + usd(-r["amount"]), r["note"] or ""]
                    for r in p.services.insights.ledger_lines(job_id)], "No money moved for this job.")
    content = render(JOB, actions=join(actions), facts=join(render(FACT, name=n, value=v) for n, v in facts),
                     flow=dependencies(p, job), steps=steps(job),
                     payload=render(PRE, text=pretty(job["payload"])),
                     outcome="Error" if job["result"] is None and job["error"] else "Result",
                     result=render(PRE, text=pretty(job["result"])) if job["result"] is not None
                     else render(PRE, text=pretty(job["error"]) if job["error"] else "—"),
                     attempts=attempts, attempts_note=note, callback=callback, ledger=ledger)
    return p.page(f"Job {job_id[:12]}…", content, status, flash=flash)


def _related(p, job_ids):
    """Rows of the jobs named: a link, its workflow, status and end (gone if purged)."""
    rows = []
    for job_id in job_ids:
        other = p.services.jobs.get(job_id) if _JOB_ID.match(job_id) else None
        link = render(LINK, href=f"/admin/jobs/{job_id}", text=job_id[:12] + "…")
        rows.append([link, "—", "gone (purged after JOB_TTL)", "—"] if other is None else
                    [link, other["workflow"], render(BADGE, status=other["status"]),
                     when(other["finished_at"])])
    return rows


STEP_BADGE = tpl('<span class="badge $cls">$state</span>')
STEP_CLASSES = {"done": "succeeded", "waiting": "waiting", "timed_out": "failed"}  # badge colours


def steps(job):
    """The job's recorded durable steps, in order (ctx.step, sleeps and
    events): only for a job that has any."""
    recorded = job.get("steps") or []
    if not recorded:
        return ""
    rows = []
    for entry, view in zip(recorded, map(engine.step_view, recorded)):
        until = f"until {when(view['until'])}" if view.get("until") else ""
        waits = {"sleep": until, "event": " ".join(filter(None, [f"event {view.get('event')}", until]))}
        rows.append([view["name"], view["kind"],
                     render(STEP_BADGE, cls=STEP_CLASSES[view["state"]], state=view["state"]),
                     waits.get(view["kind"], ""), when(view["started_at"]), when(view["finished_at"]),
                     span(view["duration"]), usd(entry.get("cost"))])
    return render(SECTION, title=f"Steps ({len(recorded)})", content=table(
        ["Step", "Kind", "State", "Waits for", "Started (UTC)", "Finished (UTC)", "#Duration", "#Cost"],
        rows))


def dependencies(p, job):
    """The job's parents with their status, the results it received from
    them, and its dependents: only for a job that has any."""
    parts = []
    parents = job.get("depends_on") or []
    if parents:
        parts.append(render(SECTION, title=f"Depends on ({len(parents)})", content=table(
            ["Job", "Workflow", "Status", "Finished (UTC)"], _related(p, parents))))
    if job.get("parents"):
        parts.append(render(SECTION, title="Results received from its parents",
                            content=render(PRE, text=pretty(job["parents"]))))
    children = job.get("children") or []
    if children:
        more = children[MAX_CHILDREN_READ:]
        content = table(["Job", "Workflow", "Status", "Finished (UTC)"],
                        _related(p, children[:MAX_CHILDREN_READ]))
        if more:
            content = join([content, render(MORE_LINKS, count=len(more), links=join(
                render(LINK, href=f"/admin/jobs/{c}", text=c[:12] + "… ") for c in more))])
        parts.append(render(SECTION, title=f"Dependents ({len(children)})", content=content))
    return join(parts)


def job_action(p, job_id, action):
    handler = ACTIONS.get(action)
    if handler is None:
        raise HTTPError(404, "not_found", "no such action")
    _job(p, job_id)
    try:
        p.as_admin(handler, job_id)
    except HTTPError as exc:
        if exc.status == 404:
            raise
        return job_page(p, job_id, exc.status, ("error", exc.message))
    return p.redirect(f"/admin/jobs/{job_id}?done={action}")


# -- schedules ------------------------------------------------------------------------------

SCHEDULES = tpl("""<form method="get" action="/admin/schedules" class="filters">$filters
<button>Filter</button> <a href="/admin/schedules">Clear</a></form>
$table<p class="actions"><span class="pages">$pages</span></p>
<p class="note">Every key's schedules (each key sees only its own through the API). Pausing,
resuming and deleting here is the API's PATCH and DELETE, audited under your key; a resumed
schedule's next fire is counted from now.</p>""")
SCHEDULE = tpl("""<p class="actions">$actions</p>
<div class="scroll"><dl class="facts">$facts</dl></div>
<section><h2>Payload</h2>$payload</section>
<section><h2>Its newest jobs</h2>$jobs<p class="actions">$all</p></section>""")
_SCHEDULE_CURSOR = re.compile(r"^[^\x00-\x1f\x7f]{1,200}/[A-Za-z0-9_]{1,64}$")
SCHEDULE_DONE = {"pause": "Schedule paused.", "resume": "Schedule resumed.", "delete": "Schedule deleted."}


def timing_text(schedule, zone=False):
    """A schedule's clock as its owner wrote it: the cron expression (and,
    with ``zone``, its timezone under it), or every so long."""
    if schedule.get("cron") is not None:
        cron = render(CODE, text=schedule["cron"])
        return join([cron, render(SUB, text=timezone(schedule))]) if zone else cron
    return "every " + period(schedule["every"]) if schedule.get("every") is not None else "—"


def timezone(schedule):
    return schedule["timezone"] or "UTC" if schedule.get("cron") is not None else "—"


def state_badge(schedule):
    return render(BADGE, status="paused" if schedule["paused"] else "active")


def schedule_actions(p, schedule, back=None):
    href = schedule_href(schedule["key_id"], schedule["name"])
    toggle = ("resume", "Resume", "Resume this schedule? Its next fire is counted from now.") \
        if schedule["paused"] else ("pause", "Pause", "Pause this schedule? It makes no job until resumed.")
    return join([p.action(f"{href}/{toggle[0]}", toggle[1], toggle[2], back=back), " ",
                 p.action(f"{href}/delete", "Delete", f"Delete the schedule {schedule['name']}? "
                          "Jobs it made are kept.", "danger", back=back)])


def schedule_list(p):
    key_id = p.query("key", _KEY_ID)
    state = p.query("state", re.compile("^(active|paused)$"))
    cursor = p.query("cursor", _SCHEDULE_CURSOR)
    after = None if cursor is None else tuple(cursor.rsplit("/", 1))
    found, more = p.services.insights.schedules(key_id, None if state is None else state == "paused",
                                                50, after)
    kept = kept_filters(p.req.query, ("key", "state"))
    back = p.req.path + ("?" + urlencode(kept) if kept else "")
    rows = [[render(LINK, href=schedule_href(s["key_id"], s["name"]), text=s["name"]),
             key_name(p, s["key_id"]), s["workflow"], timing_text(s, zone=True), state_badge(s),
             "—" if s["paused"] else when(s["next_fire"]), when(s["last_fire"]),
             render(LINK, href=f"/admin/jobs/{s['last_job']}", text=s["last_job"][:12] + "…")
             if s["last_job"] else "—",
             schedule_actions(p, s, back)] for s in found]
    keys = [("", "any key")] + [(k, key_label(p, k)) for k in sorted(p.dash.key_names())]
    filters = join([
        render(SELECT, label="Key", name="key", options=options(keys, key_id or "")),
        render(SELECT, label="State", name="state",
               options=options([("", "any"), ("active", "active"), ("paused", "paused")], state or "")),
    ])
    last = found[-1] if more else None
    pages = pager("/admin/schedules", kept, cursor, None if last is None else f"{last['name']}/{last['key_id']}",
                  "« First page", "Next page »")
    flash = ("ok", SCHEDULE_DONE[p.req.query["done"]]) if p.req.query.get("done") in SCHEDULE_DONE else None
    content = render(SCHEDULES, filters=filters, pages=pages, table=table(
        ["Name", "Key", "Workflow", "When (timezone)", "State", "Next fire (UTC)", "Last fire (UTC)",
         "Last job", ""], rows, "No schedule matches these filters.", cls="schedules"))
    return p.page("Schedules", content, flash=flash)


def _schedule(p, key_id, name):
    found = p.services.schedules.get(key_id, name) if _KEY_ID.match(key_id) else None
    if found is None:
        raise HTTPError(404, "not_found", "no such schedule (it may have been deleted)")
    return found


def schedule_page(p, key_id, name, status=200, flash=None):
    s = _schedule(p, key_id, name)
    if flash is None and p.req.query.get("done") in SCHEDULE_DONE:
        flash = ("ok", SCHEDULE_DONE[p.req.query["done"]])
    facts = [("Name", s["name"]), ("Key", key_label(p, s["key_id"])), ("Workflow", s["workflow"]),
             ("When", timing_text(s)),
             ("Timezone", timezone(s)),
             ("State", state_badge(s)), ("Next fire", "—" if s["paused"] else when(s["next_fire"])),
             ("Last fire", when(s["last_fire"])),
             ("Last job", render(LINK, href=f"/admin/jobs/{s['last_job']}", text=render(CODE, text=s["last_job"]))
              if s["last_job"] else "—"),
             ("Priority", s["priority"] or "normal"),
             ("Max cost", "—" if s["max_cost"] is None else usd(costs.to_micro(s["max_cost"]))),
             ("Callback", s["callback_url"] or "—"),
             ("Created", when(s["created_at"])), ("Changed", when(s["updated_at"]))]
    made, _ = p.services.insights.list(key_id=s["key_id"], schedule=s["name"], limit=10)
    rows = [[render(LINK, href=f"/admin/jobs/{j['job_id']}", text=j["job_id"][:12] + "…"),
             status_cell(j, p.now()), when(j["created_at"]), when(j["finished_at"])] for j in made]
    everything = render(LINK, href="/admin/jobs?" + urlencode({"key": s["key_id"], "schedule": s["name"]}),
                        text="Every job of this schedule »")
    content = render(SCHEDULE, actions=schedule_actions(p, s),
                     facts=join(render(FACT, name=n, value=v) for n, v in facts),
                     payload=render(PRE, text=pretty(s["payload"])),
                     jobs=table(["Job", "Status", "Created (UTC)", "Finished (UTC)"], rows,
                                "It has made no job yet (or they were purged after JOB_TTL)."),
                     all=everything if made else "")
    return p.page(f"Schedule {s['name']}", content, status, flash=flash)


def schedule_action(p, key_id, name, action):
    """Pause, resume or delete a schedule: the API's PATCH and DELETE,
    acting on the owner's schedule, audited under the session's key."""
    if action not in SCHEDULE_DONE:
        raise HTTPError(404, "not_found", "no such action")
    try:
        _schedule(p, key_id, name)
        if action == "delete":
            p.as_admin(flow.schedule_delete, name, owner=key_id)
        else:
            p.as_admin(flow.schedule_patch, name, body={"paused": action == "pause"}, owner=key_id)
    except HTTPError as exc:
        if exc.status == 404:
            raise
        return schedule_page(p, key_id, name, exc.status, ("error", exc.message))
    back = p.field("back")
    if not (_SAFE_NEXT.match(back) and back.startswith("/admin/schedules")):
        back = "/admin/schedules" if action == "delete" else schedule_href(key_id, name)
    return p.redirect(f"{back}{'&' if '?' in back else '?'}{urlencode({'done': action})}")


# -- workflows and their limits ---------------------------------------------------------------

WORKFLOWS = tpl("""$table
<section><h2>Limits of another workflow</h2>
<form method="get" action="/admin/workflows" class="filters">$field<button>Open</button></form>
<p class="note">Limits apply at claim time to in-process and external workers alike, on every
process and host, within a second of a change: a job over one waits in the queue.</p></section>""")
WORKFLOW = tpl("""<div class="cards">$cards</div>
<section><h2>Limits</h2>
<form method="post" action="$action" class="filters limits">$csrf
$fields<button>Save limits</button></form>
<p class="note">A blank field is no limit. <b>Max concurrency</b> caps the workflow's jobs running at
once, everywhere; <b>per concurrency key</b>, those of each concurrency key (jobs without one are not
limited per key); <b>rate</b>, how many start in any so many seconds. Checked as
<code>PUT /api/v1/workflows/&lt;name&gt;/limits</code> checks them.</p>
<p class="actions">$clear</p></section>""")
LIMIT_FIELDS = ("max_concurrency", "max_concurrency_per_key", "rate_count", "rate_per")
_DECIMAL = re.compile(r"^[0-9]{1,9}\.[0-9]{1,9}$")


def limits_text(limits, name):
    if name == "rate":
        rate = limits.get("rate")
        return "—" if rate is None else f"{rate['count']:,} per {period(rate['per'])}"
    value = limits.get(name)
    return "—" if value is None else f"{value:,}"


def _workflow_name(name):
    if not _WORKFLOW.match(name):
        raise HTTPError(404, "not_found", "no such workflow: not a workflow name")
    return name


def workflows(p):
    wanted = p.query("workflow", _WORKFLOW)
    if wanted is not None:
        return p.redirect(f"/admin/workflows/{quote(wanted, safe='')}")
    found = p.api(flow.workflow_list)["workflows"]

    def count(w, status):
        n = w["counts"][status]
        return render(LINK, href="/admin/jobs?" + urlencode({"workflow": w["name"], "status": status}),
                      text=f"{n:,}") if n else "0"

    rows = [[render(LINK, href=f"/admin/workflows/{quote(w['name'], safe='')}", text=w["name"]),
             "in process" if w["in_process"] else "external workers",
             *(limits_text(w["limits"], n) for n in ("max_concurrency", "max_concurrency_per_key", "rate")),
             *(count(w, s) for s in ("scheduled", "queued", "running"))] for w in found]
    field = render(INPUT, label="Workflow", type="text", name="workflow", value="",
                   extra=Markup(' required maxlength="128" placeholder="name"'))
    content = render(WORKFLOWS, field=field, table=table(
        ["Workflow", "Runs", "#Max concurrency", "#Per concurrency key", "#Rate", "#Scheduled",
         "#Queued", "#Running"], rows, "No workflow is registered, limited or has jobs held."))
    return p.page("Workflows", content)


def workflow_page(p, name, status=200, flash=None, form=None):
    _workflow_name(name)
    if flash is None and p.req.query.get("saved"):
        flash = ("ok", "Limits saved: every process obeys them within a second.")
    known = {w["name"]: w for w in p.api(flow.workflow_list)["workflows"]}.get(name)
    limits = known["limits"] if known else {}
    counts = known["counts"] if known else dict.fromkeys(("scheduled", "queued", "running"), 0)
    if form is None:
        rate = limits.get("rate") or {}
        form = {"max_concurrency": limits.get("max_concurrency"),
                "max_concurrency_per_key": limits.get("max_concurrency_per_key"),
                "rate_count": rate.get("count"), "rate_per": rate.get("per")}
        form = {k: "" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for k, v in form.items()}
    cards = [render(CARD, label=s, value=f"{counts[s]:,}", cls=s, note="now") for s in counts]
    cards.append(render(CARD, label="runs", value="in process" if known and known["in_process"] else "elsewhere",
                        cls="", note="registered here" if known and known["in_process"]
                        else "by external workers, if any"))
    number = Markup(' inputmode="numeric" placeholder="no limit" maxlength="12"')
    fields = join([
        render(INPUT, label="Max concurrency", type="text", name="max_concurrency",
               value=form["max_concurrency"], extra=number),
        render(INPUT, label="Per concurrency key", type="text", name="max_concurrency_per_key",
               value=form["max_concurrency_per_key"], extra=number),
        render(INPUT, label="Rate: jobs", type="text", name="rate_count", value=form["rate_count"],
               extra=number),
        render(INPUT, label="per seconds", type="text", name="rate_per", value=form["rate_per"],
               extra=Markup(' inputmode="decimal" placeholder="no limit" maxlength="20"')),
    ])
    action = f"/admin/workflows/{quote(name, safe='')}/limits"
    clear = p.action(action, "Remove every limit", f"Remove every limit of {name}?", "danger") \
        if any(v is not None for v in limits.values()) else ""
    content = render(WORKFLOW, cards=join(cards), action=action, csrf=p.csrf_field(), fields=fields,
                     clear=clear)
    return p.page(f"Workflow {name}", content, status, refresh=False, flash=flash)


def _number(text, decimal=False):
    """A form's number as JSON would carry it; text that is none is passed
    on as text, for the API's validation to say what is wrong with it."""
    if not text:
        return None
    if whole_number(text) is not None:
        return int(text)
    if decimal and _DECIMAL.match(text):
        return float(text)
    return text


def workflow_limits(p, name):
    """Set or clear a workflow's limits: the API's PUT, every limit given
    (a blank one is null: removed), audited under the session's key."""
    _workflow_name(name)
    form = {f: p.field(f) for f in LIMIT_FIELDS}
    body = {"max_concurrency": _number(form["max_concurrency"]),
            "max_concurrency_per_key": _number(form["max_concurrency_per_key"]), "rate": None}
    if form["rate_count"] or form["rate_per"]:
        body["rate"] = {k: v for k, v in (("count", _number(form["rate_count"])),
                                          ("per", _number(form["rate_per"], decimal=True)))
                        if v is not None}
    try:
        p.as_admin(flow.workflow_limits, name, body=body)
    except HTTPError as exc:
        if exc.status == 404:
            raise
        return workflow_page(p, name, exc.status, ("error", exc.message), form)
    return p.redirect(f"/admin/workflows/{quote(name, safe='')}?saved=1")


# -- keys -----------------------------------------------------------------------------------

KEYS = tpl("""$secret<section><h2>Managed keys</h2>$table</section>
<section><h2>New key</h2><form method="post" action="/admin/keys" class="filters">$csrf
$fields<button>Create key</button></form>
<p class="note">A client key submits and reads its own jobs; a worker key claims and reports
jobs. The secret is shown once, on the next page; only its digest is kept.</p></section>""")
SECRET = tpl('<section class="secret"><h2>New key: $name</h2><p>Copy it now: it is not shown again.</p>'
             '<pre>$key</pre></section>')


def keys(p, status=200, flash=None, created=None, form=None):
    form = form or {}
    today = costs.utc_day(p.now())
    spent = p.services.ledger.usage(today, today, "key")
    if flash is None and p.req.query.get("revoked"):
        flash = ("ok", "Key revoked: it is refused from its next request.")
    rows = []
    for k in p.services.key_store.list():
        rows.append([k["name"], render(CODE, text=k["id"]), k["role"], render(CODE, text=k["prefix"] + "…"),
                     when(k["created_at"]), when(k["last_used_at"]),
                     usd(p.services.guardrails.daily_budget(k)),
                     usd(spent.get(k["id"], {}).get("spend", 0)), str(k["rate_per_minute"] or "—"),
                     ", ".join(k["workflows"] or []) or "any",
                     "revoked " + when(k["revoked_at"]) if k["revoked_at"] else
                     p.action(f"/admin/keys/{k['id']}/revoke", "Revoke",
                              f"Revoke the key {k['name']}? It is refused from its next request.",
                              "danger")])
    fields = join([
        render(INPUT, label="Name", type="text", name="name", value=form.get("name", ""),
               extra=Markup(' required maxlength="100"')),
        render(SELECT, label="Role", name="role",
               options=options([("client", "client"), ("worker", "worker")], form.get("role", "client"))),
        render(INPUT, label="Daily budget ($)", type="text", name="daily_budget",
               value=form.get("daily_budget", ""), extra=Markup(' inputmode="decimal" placeholder="default"')),
        render(INPUT, label="Requests per minute", type="text", name="rate_per_minute",
               value=form.get("rate_per_minute", ""), extra=Markup(' inputmode="numeric" placeholder="none"')),
        render(INPUT, label="Workflows (worker)", type="text", name="workflows",
               value=form.get("workflows", ""), extra=Markup(' placeholder="any, or a.*, b"')),
    ])
    secret = render(SECRET, name=created[0], key=created[1]) if created else ""
    content = render(KEYS, secret=secret, csrf=p.csrf_field(), fields=fields, table=table(
        ["Name", "Id", "Role", "Prefix", "Created (UTC)", "Last used (UTC)", "#Daily budget",
         "#Spent today", "#Per minute", "Workflows", ""], rows, "No managed keys yet."))
    return p.page("API keys", content, status, refresh=created is None and not form, flash=flash)


_DOLLARS = re.compile(r"^[0-9]{1,7}(\.[0-9]{1,6})?$")


def key_create(p):
    form = {name: p.field(name) for name in ("name", "role", "daily_budget", "rate_per_minute", "workflows")}
    body = {"name": form["name"], "role": form["role"]}
    try:
        if form["daily_budget"]:
            if not _DOLLARS.match(form["daily_budget"]):
                raise HTTPError(400, "validation_failed", "daily_budget: must be an amount of dollars")
            body["daily_budget"] = float(form["daily_budget"])
        if form["rate_per_minute"]:
            rate = whole_number(form["rate_per_minute"])
            body["rate_per_minute"] = rate if rate is not None else form["rate_per_minute"]
        if form["workflows"]:
            body["workflows"] = [w.strip() for w in form["workflows"].split(",") if w.strip()]
        validate("key_create", body)
    except HTTPError as exc:
        return keys(p, exc.status, ("error", exc.message), form=form)
    budget = body.get("daily_budget")
    record, secret = p.services.key_store.create(body["name"], body["role"],
                                                 None if budget is None else costs.to_micro(budget),
                                                 body.get("rate_per_minute"), body.get("workflows"))
    p.services.recorder.audit(p.session["key_id"], "POST", p.req.path, 201, p.req.request_id)
    p.dash.forget_key_names()
    return keys(p, 201, ("ok", f"Key {record['name']} created."), created=(record["name"], secret))


def key_revoke(p, key_id):
    if not _KEY_ID.match(key_id) or p.services.key_store.get(key_id) is None:
        raise HTTPError(404, "not_found", "no such key")
    p.services.key_store.revoke(key_id)
    p.services.recorder.audit(p.session["key_id"], "POST", p.req.path, 200, p.req.request_id)
    p.dash.forget_key_names()
    return p.redirect("/admin/keys?revoked=1")


# -- spend ------------------------------------------------------------------------------------

SPEND = tpl("""<section><h2>Spend per day, last 30 days (UTC)</h2>$chart$days</section>
<section><h2>Spend per key, last 30 days</h2>$keys</section>""")


def _outcomes(jobs):
    return ", ".join(f"{n} {s}" for s, n in sorted(jobs.items())) or "—"


def spend(p):
    now = p.now()
    last = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).date()
    first = last - datetime.timedelta(days=29)
    ledger = p.services.ledger
    per_day = ledger.usage(first.isoformat(), last.isoformat(), "day")
    days = [(first + datetime.timedelta(days=i)).isoformat() for i in range(30)]
    empty = {"spend": 0, "reserved": 0, "jobs": {}}
    chart = bar_chart("Dollars spent per day", days,
                      [("bad", "spent", [per_day.get(d, empty)["spend"] for d in days])],
                      days[0], days[-1], usd)
    limit = p.services.settings.max_cost_per_day
    day_rows = [[d, usd(g["spend"]), usd(max(0, g["reserved"])), f"{100 * g['spend'] / limit:.1f}%"
                 if limit else "—", _outcomes(g["jobs"])]
                for d in reversed(days) if (g := per_day.get(d))]
    per_key = ledger.usage(first.isoformat(), last.isoformat(), "key")
    key_rows = [[key_label(p, k), usd(g["spend"]), usd(max(0, g["reserved"])), _outcomes(g["jobs"])]
                for k, g in sorted(per_key.items(), key=lambda kv: -kv[1]["spend"])]
    content = render(SPEND, chart=chart, days=table(
        ["Day", "#Spent", "#Reserved", "#Of MAX_COST_PER_DAY", "Jobs finished"], day_rows,
        "Nothing spent in the last 30 days."),
        keys=table(["Key", "#Spent", "#Reserved", "Jobs finished"], key_rows,
                   "Nothing spent in the last 30 days."))
    return p.page("Spend", content)


# -- audit ------------------------------------------------------------------------------------

AUDIT = tpl("""<form method="get" action="/admin/audit" class="filters">$filters
<button>Filter</button> <a href="/admin/audit">Clear</a></form>
$table<p class="actions"><span class="pages">$pages</span></p>""")


def audit(p):
    key_id = p.query("key", re.compile(r"^[A-Za-z0-9_-]{1,64}$"))
    method = p.query("method", re.compile("^(POST|PATCH|PUT|DELETE)$"))
    status_text = p.query("status", re.compile(r"^[1-5][0-9]{2}$"))
    since, since_text = p.time_query("from")
    until, until_text = p.time_query("to")
    cursor = p.query("cursor", _CURSOR)
    rows, more = p.services.insights.audit(key_id, method, None if status_text is None else int(status_text),
                                           since, until, 50, None if cursor is None else int(cursor))
    filters = join([
        render(INPUT, label="Key", type="text", name="key", value=key_id or "",
               extra=Markup(' placeholder="any" maxlength="64"')),
        render(SELECT, label="Method", name="method", options=options(
            [("", "any")] + [(m, m) for m in ("POST", "PATCH", "PUT", "DELETE")], method or "")),
        render(INPUT, label="Status", type="text", name="status", value=status_text or "",
               extra=Markup(' placeholder="any" inputmode="numeric" maxlength="3"')),
        render(INPUT, label="From (UTC)", type="datetime-local", name="from", value=since_text, extra=""),
        render(INPUT, label="to", type="datetime-local", name="to", value=until_text, extra=""),
    ])
    kept = kept_filters(p.req.query, ("key", "method", "status", "from", "to"))
    pages = pager("/admin/audit", kept, cursor, rows[-1]["id"] if more else None, "« Newest", "Older »")
    content = render(AUDIT, filters=filters, pages=pages, table=table(
        ["Time (UTC)", "Key", "Method", "Path", "#Status", "Request id"],
        [[when(r["ts"]), key_label(p, r["key_id"]), r["method"], r["path"],
          render(BADGE, status=str(r["status"])) if r["status"] >= 400 else str(r["status"]),
          render(CODE, text=r["request_id"])] for r in rows], "No audit rows match these filters.",
        cls="audit"))
    return p.page("Audit log", content)


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------

# (method, pattern, handler): the dashboard's own route table, compiled by
# the API's router. Every route needs a session except the login form's.
ROUTES = [
    ("GET", "/admin", overview),
    ("GET", "/admin/login", login_get),
    ("POST", "/admin/login", login_post),
    ("POST", "/admin/logout", logout),
    ("GET", "/admin/jobs", jobs),
    ("POST", "/admin/jobs/bulk", bulk),
    ("GET", "/admin/jobs/<job_id>", job_page),
    ("POST", "/admin/jobs/<job_id>/<action>", job_action),
    ("GET", "/admin/schedules", schedule_list),
    ("GET", "/admin/schedules/<key_id>/<name>", schedule_page),
    ("POST", "/admin/schedules/<key_id>/<name>/<action>", schedule_action),
    ("GET", "/admin/workflows", workflows),
    ("GET", "/admin/workflows/<name>", workflow_page),
    ("POST", "/admin/workflows/<name>/limits", workflow_limits),
    ("GET", "/admin/keys", keys),
    ("POST", "/admin/keys", key_create),
    ("POST", "/admin/keys/<key_id>/revoke", key_revoke),
    ("GET", "/admin/spend", spend),
    ("GET", "/admin/audit", audit),
]
ROUTER = wsgi_routes.Router([(m, pattern, handler, wsgi_routes.PUBLIC, ()) for m, pattern, handler in ROUTES])
OPEN = frozenset({"/admin/login"})
ERROR = tpl('<p>$message</p><p class="note">Request id <code>$request_id</code>. $back</p>')


class Dashboard:
    """/admin and below: the operator's pages. Any other path goes on to ``app``."""

    def __init__(self, app, services):
        self.app = app
        self.services = services
        settings = services.settings
        self.sessions = Sessions(services.db, settings.admin_session_ttl, services.clock)
        # Fingerprints of the operator's keys: a session of a key no longer
        # configured is refused.
        self.admin_keys = {wsgi_routes.fingerprint(k) for k in settings.api_keys + settings.api_keys_next}
        self.buckets = ratelimit.buckets(settings.rate_table_size)
        self._key_names = (0.0, {})

    def key_names(self):
        """{key_id: name} of the managed keys, and the operator's keys, read
        at most every few seconds (pages name keys on every row)."""
        read_at, names = self._key_names
        if time.monotonic() - read_at > 5:
            names = {k["id"]: k["name"] for k in self.services.key_store.list()}
            names.update({fp: "operator" for fp in self.admin_keys})
            self._key_names = (time.monotonic(), names)
        return names

    def forget_key_names(self):
        self._key_names = (0.0, {})

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path != "/admin" and not path.startswith("/admin/"):
            return self.app(environ, start_response)
        environ["levqor.admin"] = True  # middleware.SecureHeaders: the pages' own CSP
        req = Request(environ, self.services)
        page = Page(req, self)
        try:
            route, params = ROUTER.match(req.method, req.raw_path)
            environ["levqor.route"] = route.pattern
            status, headers, body = self._serve(page, route, params)
        except HTTPError as exc:
            status, headers, body = self._error(page, exc)
        except StorageError as exc:  # a page, not the API's JSON, says the database is away
            status, headers, body = self._error(page, STORAGE_ERRORS[exc.kind](str(exc)))
        headers.append(("Cache-Control", "no-store"))  # back after logout asks again
        start_response(STATUS_LINES[status], headers)
        return [] if req.method == "HEAD" else [body]

    def _serve(self, page, route, params):
        req, settings = page.req, self.services.settings
        post = req.method == "POST"
        page.token = cookie(req.environ, SESSION_COOKIE)
        page.session = self.sessions.get(page.token)
        if page.session is not None and self.admin_keys and page.session["key_id"] not in self.admin_keys:
            page.session = None  # the key that opened it is no longer configured
        ip = ratelimit.client_key(req.environ["levqor.client_ip"])
        if route.pattern in OPEN and post:
            limits = ((("login", ip), settings.rate_anon), (("login",), settings.rate_anon_global))
        elif post:
            limits = ((("w", ip), settings.rate_burst), (None, settings.rate_global))
        else:
            limits = ((("r", ip), settings.rate_read),)
        refused = self.buckets.take(limits)
        if refused is not None:
            raise wsgi_routes.rate_limited(refused, f"too many requests; try again in {refused[3]} s")
        if route.pattern not in OPEN and page.session is None:
            if post:
                raise HTTPError(403, "forbidden", "Your session has ended: log in again.")
            target = req.path + ("?" + req.environ["QUERY_STRING"] if req.environ.get("QUERY_STRING") else "")
            return page.redirect("/admin/login?" + urlencode({"next": target})
                                 if _SAFE_NEXT.match(target) and target != "/admin" else "/admin/login")
        if post:
            page.read_form()
            expected = cookie(req.environ, LOGIN_COOKIE) if route.pattern in OPEN else page.session["csrf"]
            if not same(page.field("csrf"), expected):
                if page.session is not None:
                    self.services.recorder.audit(page.session["key_id"], "POST", req.path, 403,
                                                 req.request_id)
                raise HTTPError(403, "forbidden", "This form's security token is missing or out of "
                                                  "date: reload the page and try again.")
        return route.handler(page, **params)

    def _error(self, page, exc):
        req = page.req
        back = (render(LINK, href="/admin", text="Back to the overview.") if page.session is not None
                else render(LINK, href="/admin/login", text="Log in."))
        content = render(ERROR, message=exc.message, request_id=req.request_id, back=back)
        title = STATUS_LINES.get(exc.status, str(exc.status))
        return page.page(title, content, exc.status, refresh=False, headers=exc.headers)
