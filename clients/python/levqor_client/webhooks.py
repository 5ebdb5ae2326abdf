"""Verifying Levqor's signed callbacks, as the Standard Webhooks scheme
defines them: ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` headers; HMAC-SHA256 of ``{id}.{timestamp}.{body}``
under the base64 key after ``whsec_``; signatures ``v1,<base64>``
separated by spaces (two during a secret rotation)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any, Mapping, Optional, Sequence, Union

from .errors import LevqorError

_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class WebhookVerificationError(LevqorError):
    """A delivery that must not be trusted: a header missing, a timestamp
    outside the window, or no signature made with any of the secrets."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="webhook_verification_failed")


def _key(secret: str) -> bytes:
    encoded = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    """A header from a plain mapping in any case, or from a WSGI environ."""
    wsgi = "HTTP_" + name.upper().replace("-", "_")
    if wsgi in headers:
        return headers[wsgi]
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def verify_webhook(secret: Union[str, Sequence[str]], headers: Mapping[str, str],
                   body: Union[bytes, str], tolerance: float = 300,
                   now: Optional[float] = None) -> Any:
    """Check a callback delivery; its parsed JSON body.

    ``secret`` is the ``whsec_...`` secret, or a list of them while you
    rotate (any one may match). ``headers`` maps header names in any case,
    or is the request's WSGI environ; ``body`` is the raw body exactly as
    received. Raises ``WebhookVerificationError`` if a header is missing,
    the timestamp is more than ``tolerance`` seconds from now (a replay),
    or no signature matches; signatures are compared in constant time.
    """
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets:
        raise ValueError("verify_webhook needs at least one secret")
    keys = [_key(s) for s in secrets]
    msg_id, stamp, signatures = (_header(headers, h) for h in _HEADERS)
    if not msg_id or not stamp or not signatures:
        raise WebhookVerificationError("missing webhook headers")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("malformed webhook-timestamp") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise WebhookVerificationError("timestamp outside the tolerance window")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    signed = f"{msg_id}.{timestamp}.".encode() + raw
    expected = [hmac.new(k, signed, hashlib.sha256).digest() for k in keys]
    matched = False
    for entry in signatures.split(" "):
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # Every comparison runs, so timing says nothing about which key or
        # signature came close.
        for mac in expected:
            matched |= hmac.compare_digest(mac, given)
    if not matched:
        raise WebhookVerificationError("no matching signature")
    try:
        return json.loads(raw)
    except ValueError:
        raise WebhookVerificationError("the signed body is not JSON") from None
