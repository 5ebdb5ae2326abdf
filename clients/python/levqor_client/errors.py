"""The one error type the client raises, its subclasses for the common
cases, and the mapping from an HTTP answer to them."""

from __future__ import annotations

from typing import Any, Mapping, Optional


class LevqorError(Exception):
    """An error answered by Levqor, or no answer at all.

    ``code`` is the server's ``error`` field (``validation_failed``,
    ``rate_limited``...), ``message`` its explanation, ``status`` the HTTP
    status (None when no answer came), ``request_id`` the id to quote to the
    operator, and ``body`` the whole error body (``field``, ``budget``...).
    """

    def __init__(self, message: str, *, code: str = "error", status: Optional[int] = None,
                 request_id: Optional[str] = None, body: Optional[Mapping[str, Any]] = None,
                 retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id
        self.body = dict(body or {})
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no answer"
        rid = f", request {self.request_id}" if self.request_id else ""
        return f"{self.code}: {self.message} ({where}{rid})"


class LevqorConnectionError(LevqorError):
    """No answer: the connection failed, was dropped or timed out."""


class AuthError(LevqorError):
    """401 (no key) or 403 (a key that is not valid, or may not do this)."""


class NotFound(LevqorError):
    """404: no such job, key or endpoint."""


class ValidationError(LevqorError):
    """400 or 422: the request was refused as malformed; ``body['field']``
    names the field when there is one."""


class Conflict(LevqorError):
    """409: the job is in the wrong state, or a worker's lease was lost."""


class RateLimited(LevqorError):
    """429 ``rate_limited``: too many requests; ``retry_after`` in seconds."""


class BudgetExceeded(LevqorError):
    """``budget_exceeded`` or ``cost_cap_exceeded`` (429, 409 or 422): the
    money would pass a job's cap or a daily budget."""


class ServerError(LevqorError):
    """5xx: the server failed or is overloaded (``queue_full``, ``storage_busy``)."""


_MONEY = ("budget_exceeded", "cost_cap_exceeded")


def error_for(status: int, body: Any, request_id: Optional[str],
              retry_after: Optional[float] = None) -> LevqorError:
    """The exception for an error answer: its class by status and code."""
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("error") or f"http_{status}")
    message = str(body.get("message") or f"HTTP {status}")
    request_id = body.get("request_id") or request_id
    if code in _MONEY:
        cls: type = BudgetExceeded
    elif status in (401, 403):
        cls = AuthError
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    elif status == 429:
        cls = RateLimited
    elif status in (400, 422):
        cls = ValidationError
    elif status >= 500:
        cls = ServerError
    else:
        cls = LevqorError
    return cls(message, code=code, status=status, request_id=request_id, body=body,
               retry_after=retry_after)


def unsupported(exc: LevqorError, fields: Any) -> bool:
    """Whether a 400 says the server does not know one of ``fields`` (an
    older server): then the caller does without them."""
    field = str(exc.body.get("field") or "")
    return exc.status == 400 and field in fields and "not an accepted field" in exc.message
