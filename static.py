"""The public pages: files under ``public/`` and nothing outside it, with
ETag and Last-Modified revalidation."""

import email.utils
import os
import re

from web import not_found

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_BAD_PATH_CHARS = re.compile(r"[\\\x00-\x1f\x7f]")


def _resolve_static(root, rel):
    """The real path of ``rel`` inside ``root``, or None: nothing outside is reachable."""
    # PATH_INFO arrives percent-decoded, so %2e%2e and %2f are already '..' and '/'.
    if _BAD_PATH_CHARS.search(rel):
        return None
    parts = rel.split("/")
    if parts and parts[-1] == "":
        parts[-1] = "index.html"
    if any(p in ("", ".", "..") for p in parts):
        return None
    path = os.path.realpath(os.path.join(root, *parts))
    if os.path.isdir(path):
        path = os.path.join(path, "index.html")
    # realpath resolves symlinks: one pointing out of public/ fails this test.
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        return None
    return path


def _not_modified(req, etag, mtime):
    inm = req.environ.get("HTTP_IF_NONE_MATCH")
    if inm is not None:
        tags = [t.strip().removeprefix("W/") for t in inm.split(",")]
        return "*" in tags or etag in tags
    ims = req.environ.get("HTTP_IF_MODIFIED_SINCE")
    if ims:
        try:
            since = email.utils.parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
        return int(mtime) <= since
    return False


def static_file(req, path):
    root = req.services.settings.public_dir
    full = _resolve_static(root, path)
    ctype = full and CONTENT_TYPES.get(os.path.splitext(full)[1].lower())
    if not ctype:
        raise not_found("file")
    st = os.stat(full)
    etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
    headers = [("ETag", etag),
               ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
               ("Cache-Control", "public, max-age=300")]
    if _not_modified(req, etag, st.st_mtime):
        return 304, headers, b""
    with open(full, "rb") as f:
        body = f.read()
    return 200, [("Content-Type", ctype), ("Content-Length", str(len(body))), *headers], body


def robots(req):
    return static_file(req, "robots.txt")


def security_txt(req):
    return static_file(req, ".well-known/security.txt")
