"""HTTP primitives: the one error type, responses, strict JSON, and the
request object.

Handlers raise ``HTTPError``; one place (``middleware.ErrorGuard``) turns it
into the JSON error body. ``Request`` is a thin view over the WSGI environ
that parses the query and the JSON body lazily, once. Nothing here knows a
route, a store or a setting beyond the body size limit it is handed.
"""

import json
import re
from http import HTTPStatus
from urllib.parse import parse_qs

STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
VERSION = "1.0.0"  # the service's, as / and the OpenAPI document say

# ---------------------------------------------------------------------------
# Errors and responses
# ---------------------------------------------------------------------------

class HTTPError(Exception):
    """An error answer: status, a stable machine code, a human message.

    ``headers`` are added to the response (Allow, Retry-After, ...);
    ``extra`` fields are added to the JSON body beside error and message.
    """

    def __init__(self, status, code, message, headers=(), **extra):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)
        self.extra = extra

    def body(self, request_id):
        return {"error": self.code, "message": self.message, **self.extra, "request_id": request_id}


# PERF: one encoder, built once; json.dumps with arguments builds one per call.
# allow_nan=False: Infinity and NaN are not JSON, and nothing Levqor writes
# may hold them (SQLite's JSON functions reject such a document outright).
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def json_body(obj):
    return _encode(obj).encode()


def respond(obj, status=200, headers=()):
    body = json_body(obj)
    return status, [("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))), *headers], body


_WHOLE = re.compile(r"[0-9]{1,18}")


def whole_number(text):
    """``text`` as a non-negative int if it is 1 to 18 ASCII digits, else None.

    NOTE: str.isdigit() and int() also take superscripts and other scripts'
    digits ("\u00b2", "\u0661"); a number that came as text is ASCII or refused.
    """
    return int(text) if _WHOLE.fullmatch(text) else None


def not_found(what, **ids):
    return HTTPError(404, "not_found", f"{what} not found", **ids)


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

_MISSING = object()
MAX_JSON_DEPTH = 32
MAX_QUERY_FIELDS = 20
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def _finite_float(text):
    value = float(text)
    if value in (_INF, -_INF):  # 1e400 parses to infinity: refuse it like the literal
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _bounded_int(text):
    # An integer past a double's range becomes infinity in SQLite's JSON
    # functions and in most clients' parsers: refuse it as 1e400 is.
    if len(text) > 300 and abs(int(text)) > _MAX_DOUBLE:
        raise ValueError(f"number {text[:20]}... is out of range")
    return int(text)


_INF = float("inf")
_MAX_DOUBLE = 1.7976931348623157e308
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant,
                            parse_float=_finite_float, parse_int=_bounded_int)


def _check_tree(value, check_surrogates):
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings that are not UTF-8."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            if check_surrogates and any(_SURROGATE.search(k) for k in item):
                raise ValueError("string is not valid Unicode")
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif check_surrogates and isinstance(item, str) and _SURROGATE.search(item):
            raise ValueError("string is not valid Unicode")


def parse_json(raw):
    """Strict JSON: UTF-8, finite numbers only (no NaN, Infinity or 1e400),
    no duplicate keys, bounded depth."""
    try:
        text = raw.decode("utf-8")
        value = _DECODER.decode(text)
        surrogates = _LONE_SURROGATE_ESCAPE.search(text) is not None
        # PERF: the tree walk costs as much as parsing; only deep or escaped
        # documents can fail it, and counting brackets runs at C speed.
        if surrogates or text.count("[") + text.count("{") > MAX_JSON_DEPTH:
            _check_tree(value, surrogates)
        return value
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
        raise HTTPError(400, "invalid_json", f"request body is not valid JSON: {reason}"[:300])


class Request:
    """A thin view over the WSGI environ; query and JSON body parsed lazily, once."""

    __slots__ = ("environ", "services", "method", "path", "key_id", "role", "key", "audit_paths",
                 "_query", "_json")

    def __init__(self, environ, services):
        self.environ = environ
        self.services = services  # levqor.Services: settings, stores, the engine, the log
        self.method = environ["REQUEST_METHOD"]
        self.path = environ.get("PATH_INFO") or "/"
        self.key_id = None  # who: an API key's fingerprint, a managed key's id, or "open"
        self.role = None    # admin, client or worker
        self.key = None     # the managed key's record, if one was used
        # An audited route's rows, one per path: None is one for the request;
        # a handler sets a list (one row per job of a batch; none for a
        # claim that took nothing, which changed nothing).
        self.audit_paths = None
        self._query = None
        self._json = _MISSING

    @property
    def raw_path(self):
        """The path as the client sent it, still percent-encoded: what is
        routed. gunicorn gives it as RAW_URI (others as REQUEST_URI), which
        may be in absolute form; a server that gives neither leaves only
        the decoded PATH_INFO."""
        raw = self.environ.get("RAW_URI") or self.environ.get("REQUEST_URI")
        if not raw:
            return self.path
        raw = raw.split("?", 1)[0].split("#", 1)[0]
        if not raw.startswith("/"):
            raw = "/" + raw.split("://", 1)[-1].partition("/")[2]  # absolute form
        return raw

    @property
    def request_id(self):
        return self.environ.get("levqor.request_id", "-")

    @property
    def query(self):
        if self._query is None:
            try:
                parsed = parse_qs(self.environ.get("QUERY_STRING", ""), keep_blank_values=True,
                                  max_num_fields=MAX_QUERY_FIELDS, errors="strict")
            except (ValueError, UnicodeDecodeError):
                raise HTTPError(400, "invalid_query", "the query string cannot be parsed")
            repeated = sorted(k for k, v in parsed.items() if len(v) > 1)
            if repeated:  # which one would count is anyone's guess: refuse them all
                raise HTTPError(400, "invalid_query", f"query parameter {repeated[0]!r} is repeated")
            self._query = {k: v[0] for k, v in parsed.items()}
        return self._query

    def _read_body(self, optional, limit):
        environ = self.environ
        length = environ.get("CONTENT_LENGTH")
        chunked = self._transfer_coding() == "chunked"
        coding = environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower()
        if coding not in ("", "identity"):  # a body we would read as something it is not
            raise HTTPError(415, "unsupported_media_type",
                            "request bodies are not accepted with a Content-Encoding")
        if length:
            if whole_number(length) is None:
                raise HTTPError(400, "bad_request", "Content-Length is not a whole number")
            length = int(length)
            if length > limit:
                raise HTTPError(413, "payload_too_large", f"request body is over {limit} bytes")
            if length == 0:
                return b""
        elif not chunked:
            if optional:
                return b""
            raise HTTPError(411, "length_required", "a request body needs a Content-Length")
        self._check_content_type()
        try:
            # No length to trust when chunked: read one byte past the cap.
            raw = environ["wsgi.input"].read(limit + 1 if chunked and not length else length)
        except OSError:  # a client that stopped sending (the server's read timeout)
            raise HTTPError(408, "request_timeout", "the request body did not arrive in time")
        except Exception:  # the server could not parse the framing (bad chunks)
            raise HTTPError(400, "bad_request", "the request body's framing is malformed")
        if chunked and not length:
            if len(raw) > limit:
                raise HTTPError(413, "payload_too_large", f"request body is over {limit} bytes")
            return raw
        if len(raw) != length:
            raise HTTPError(400, "incomplete_body", "request body is shorter than its Content-Length")
        return raw

    def _transfer_coding(self):
        """'chunked', or '' for none; 501 for any coding Levqor does not
        apply (gzip, chunked would otherwise pass as if it were plain)."""
        codings = [c.strip().lower() for c in self.environ.get("HTTP_TRANSFER_ENCODING", "").split(",")]
        codings = [c for c in codings if c]
        if codings and codings != ["chunked"]:
            raise HTTPError(501, "unsupported_transfer_encoding",
                            "the only Transfer-Encoding accepted is chunked")
        return "chunked" if codings else ""

    def _check_content_type(self):
        ctype = self.environ.get("CONTENT_TYPE", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise HTTPError(415, "unsupported_media_type", "request body must be application/json")

    def json(self, optional=False, limit=None):
        """The body as JSON; with ``optional``, an absent body is ``{}``.
        At most ``limit`` bytes (default MAX_CONTENT_LENGTH) are read."""
        if self._json is _MISSING:
            raw = self._read_body(optional, limit or self.services.settings.max_content_length)
            if not raw.strip(b" \t\r\n"):  # JSON's whitespace; \x0b and the like are not
                if not optional:
                    raise HTTPError(400, "invalid_json", "request body is empty")
                self._json = {}
            else:
                self._json = parse_json(raw)
        return self._json


