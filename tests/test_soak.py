"""The soak script, run for 30 s against real gunicorn (the README shows a
longer run). It asserts its own checks; this test asserts it passed."""

import base64
import os
import subprocess
import sys

import pytest

from support import KEY, ROOT, Server

pytestmark = [pytest.mark.slow, pytest.mark.server]

SECRET = "whsec_" + base64.b64encode(b"soak-test-secret-0123456789ab").decode()


def test_soak_30_seconds(tmp_path):
    srv = Server(tmp_path, API_KEYS=KEY, CALLBACK_SECRET=SECRET, CALLBACK_ALLOW_PRIVATE=1, JOB_TTL=5,
                 RATE_BURST=1_000_000, RATE_GLOBAL=1_000_000, RATE_READ=1_000_000,
                 RATE_WORKER=1_000_000).start()
    try:
        result = subprocess.run(
            [sys.executable, "scripts/soak.py", "--seconds", "30", "--server-pid", str(srv.proc.pid)],
            cwd=ROOT, env={**os.environ, "BASE_URL": srv.url, "API_KEY": KEY, "CALLBACK_SECRET": SECRET},
            capture_output=True, text=True, timeout=180)
    finally:
        srv.stop()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "soak: 5 passed, 0 failed" in result.stdout
