"""The floor: the smallest WSGI app that answers like Levqor's /health.

Run under the same gunicorn settings as Levqor, it measures what gunicorn
itself costs; no app served by gunicorn can be faster.
"""

BODY = b'{"ok":true,"ts":1800000000}'
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    # Drain the body, as any real app must, so POSTs cost the floor what they cost Levqor.
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    start_response("200 OK", list(HEADERS))
    return [BODY]
