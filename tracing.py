"""W3C Trace Context: the ``traceparent`` a client sends with an intake is
kept with its job and handed on wherever the job goes next (an in-process
workflow's ``ctx.traceparent``, an external worker's claim, the callback
delivery's header), so the client's trace spans the whole job.

Levqor records no spans of its own: it passes the caller's span on as the
parent, which is what a hop that does not trace must do. A header that is
not a valid traceparent is ignored, as the specification asks.
"""

import re

# version-traceid-parentid-flags, lower-case hex. A version other than 00
# may add fields after the flags (the specification's forward compatibility);
# ff is no version at all.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?$")


def parse(header):
    """The traceparent to keep (version 00, as this service speaks it), or None."""
    if not header or len(header) > 512:
        return None
    m = _TRACEPARENT.match(header.strip(" \t"))
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} \
            or set(parent_id) == {"0"}:
        return None
    return f"00-{trace_id}-{parent_id}-{flags}"


def attach(job, environ):
    """Keep the request's traceparent, if it sent a valid one, with the new job."""
    traceparent = parse(environ.get("HTTP_TRACEPARENT"))
    if traceparent is not None:
        job["traceparent"] = traceparent
    return job
