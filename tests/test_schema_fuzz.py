"""Schemathesis against real gunicorn and the service's own OpenAPI
document: all checks on, seeded, bounded in examples and time. No 5xx, every
response as the spec says, invalid input refused and valid input accepted."""

import os
import shutil
import subprocess
import sys

import pytest

from support import KEY, Server

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_schemathesis_finds_nothing(tmp_path):
    st = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    assert st, "schemathesis is a dev dependency (requirements-dev.txt)"
    srv = Server(tmp_path, API_KEYS=KEY, RATE_BURST=10**9, RATE_GLOBAL=10**9, RATE_READ=10**9,
                 RATE_WORKER=10**9, RATE_ANON=10**9, RATE_ANON_GLOBAL=10**9, MAX_COST_PER_DAY=10**6,
                 # A claim's "wait" would hold each fuzzed claim up to 30 s: with no
                 # waiters allowed, every claim answers at once (test_batches.py
                 # covers waiting).
                 CLAIM_WAITERS=0).start()
    try:
        result = subprocess.run(
            [st, "--config-file", os.path.join(os.path.dirname(__file__), "schemathesis.toml"),
             "run", srv.url + "/openapi.json", "--header", f"X-Api-Key: {KEY}", "--checks", "all",
             "--max-examples", "15", "--seed", "20261122", "--max-time", "75", "--no-shrink",
             "--request-timeout", "10", "--no-color"],
            cwd=tmp_path, capture_output=True, text=True, timeout=240)
    finally:
        srv.stop()
    (tmp_path / "schemathesis.txt").write_text(result.stdout + result.stderr)
    failures = result.stdout[result.stdout.find("FAILURES"):][:8000]
    assert result.returncode == 0, failures + result.stdout[-1500:] + result.stderr[-1000:]
