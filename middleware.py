"""The middleware Levqor stacks around its routes, innermost first.

Each is a class ``M(app, ...)`` with ``__call__(environ, start_response)``;
``levqor.create_app`` stacks them in the order they run, so the order is
readable in one place. Rate limits are taken inside ``wsgi_routes.Api``,
once the route and the caller are known.
"""

import ipaddress
import random
import re
import time
import traceback

from storage import StorageError
from web import STATUS_LINES, HTTPError, json_body

# What each kind of storage.StorageError answers.
STORAGE_ERRORS = {
    "busy": lambda msg: HTTPError(503, "storage_busy", msg, [("Retry-After", "1")]),
    "unavailable": lambda msg: HTTPError(503, "storage_unavailable", msg, [("Retry-After", "5")]),
    "full": lambda msg: HTTPError(507, "insufficient_storage", msg, [("Retry-After", "60")]),
    # A value the database cannot hold (PostgreSQL's text has no U+0000):
    # the request's fault, refused before anything was written.
    "refused": lambda msg: HTTPError(400, "validation_failed", msg),
}


def shutting_down():
    return HTTPError(503, "shutting_down", "the service is stopping; try again shortly",
                     [("Retry-After", "1")])


class ErrorGuard:
    """The one place errors become responses.

    An HTTPError becomes its JSON body; a storage failure becomes 503, 507
    or, for a value the database cannot hold, 400;
    anything else is logged with its traceback and the request id, and the
    client gets a generic 500 that leaks nothing. KeyboardInterrupt and
    SystemExit pass through.

    Once the service has begun to stop (``stopped()``), a request is answered
    503 without reaching a handler; and one in flight that failed as the
    stores closed under it is answered 503 too, not 500: the client may
    send it again, to this host once it is back or to another.
    """

    def __init__(self, app, log, stopped=lambda: False):
        self.app = app
        self.log = log
        self.stopped = stopped

    def __call__(self, environ, start_response):
        try:
            if self.stopped():
                raise shutting_down()
            return self.app(environ, start_response)
        except HTTPError as exc:
            error = exc
        except StorageError as exc:
            error = STORAGE_ERRORS[exc.kind](str(exc))
            self.log.warning("storage unavailable", request_id=environ["levqor.request_id"],
                             kind=exc.kind)
        except Exception as exc:
            if self.stopped():
                error = shutting_down()
                self.log.warning("request failed as the service stopped",
                                 request_id=environ["levqor.request_id"], error_type=type(exc).__name__)
            else:
                self.log.error("unhandled exception", request_id=environ["levqor.request_id"],
                               method=environ.get("REQUEST_METHOD"), path=environ.get("PATH_INFO"),
                               traceback=traceback.format_exc())
                error = HTTPError(500, "internal_error",
                                  "an unexpected error occurred; quote the request id when reporting it")
        body = json_body(error.body(environ["levqor.request_id"]))
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   *error.headers]
        start_response(STATUS_LINES[error.status], headers)
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]


API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
HTML_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'")
# The operator's pages (/admin) post forms to themselves and run one script
# of their own (refresh and confirmation): never an inline one.
ADMIN_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
             "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
EXPOSED = "X-Request-ID, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Location"


class SecureHeaders:
    """Adds the headers every response carries, errors and files included:
    security headers, a CSP fit for JSON or HTML, the request id, and CORS
    for origins listed in CORS_ORIGINS (matched exactly, never a pattern)."""

    def __init__(self, app, settings):
        self.app = app
        common = [("X-Content-Type-Options", "nosniff"),
                  ("X-Frame-Options", "DENY"),
                  ("Referrer-Policy", "strict-origin-when-cross-origin"),
                  ("Permissions-Policy", "geolocation=(), microphone=(), camera=()"),
                  ("Vary", "Origin")]
        if settings.production:
            common.append(("Strict-Transport-Security", "max-age=63072000; includeSubDomains"))
        # PERF: built once; each response copies one of these lists.
        self.api_headers = common + [("Content-Security-Policy", API_CSP)]
        self.html_headers = common + [("Content-Security-Policy", HTML_CSP)]
        self.admin_headers = common + [("Content-Security-Policy", ADMIN_CSP)]
        self.origins = frozenset(settings.cors_origins)
        self.preflight = [("Access-Control-Allow-Methods", "GET, POST, PATCH, DELETE, OPTIONS"),
                          ("Access-Control-Allow-Headers", "Content-Type, Authorization, X-Api-Key"),
                          ("Access-Control-Max-Age", "600")]

    def __call__(self, environ, start_response):
        origin = environ.get("HTTP_ORIGIN")

        def add_headers(status, headers, exc_info=None):
            # PERF: every response of ours names its Content-Type first, so
            # one look decides the CSP. A 304 (static files only) has no type
            # but must repeat the page's CSP: caches merge its headers into the
            # stored page's.
            html = status[0] == "3" or (bool(headers) and headers[0][1].startswith("text/html"))
            if html and environ.get("levqor.admin"):
                headers.extend(self.admin_headers)
            else:
                headers.extend(self.html_headers if html else self.api_headers)
            headers.append(("X-Request-ID", environ["levqor.request_id"]))
            if origin is not None and origin in self.origins:
                headers.append(("Access-Control-Allow-Origin", origin))
                headers.append(("Access-Control-Expose-Headers", EXPOSED))
                if (environ["REQUEST_METHOD"] == "OPTIONS"
                        and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ):
                    headers.extend(self.preflight)
            return start_response(status, headers, exc_info)

        return self.app(environ, add_headers)


_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class AccessLog:
    """Outermost: gives each request an id and a client IP, and logs one
    line when it is answered.

    The client IP is REMOTE_ADDR. X-Forwarded-For is believed only when the
    peer is one of TRUSTED_PROXIES, and then only up to the first address
    (from the right) that is not itself a trusted proxy: anything a client
    wrote further left is its own claim, and gains it nothing.
    """

    def __init__(self, app, settings, log):
        self.app = app
        self.log = log
        self.proxies = settings.trusted_proxies

    def _trusted(self, addr):
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.proxies)

    def client_ip(self, environ):
        peer = environ.get("REMOTE_ADDR") or "-"
        if not self.proxies or not self._trusted(peer):
            return peer
        hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        for hop in reversed(hops):
            if not self._trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # garbage in the header: fall back to who we can see
        return peer

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        rid = environ.get("HTTP_X_REQUEST_ID")
        if rid is None or not _SANE_REQUEST_ID.match(rid):
            rid = "%032x" % random.getrandbits(128)  # PERF: os.urandom gives up the GIL
        environ["levqor.request_id"] = rid
        environ["levqor.client_ip"] = ip = self.client_ip(environ)
        status = []

        def capture(line, headers, exc_info=None):
            status.append(line)
            return start_response(line, headers, exc_info)

        body = self.app(environ, capture)
        self.log.access(rid, environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                        int(status[-1][:3]) if status else 0,
                        (time.perf_counter() - started) * 1000,
                        ip, environ.get("HTTP_USER_AGENT", "")[:256])
        return body
