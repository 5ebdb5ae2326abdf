"""The benchmark harness keeps working (a smoke run, no timing asserted)."""

import os
import shutil
import subprocess
import sys

import pytest

from support import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_bench_harness_smoke_run():
    result = subprocess.run([sys.executable, "bench/run.py", "--smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for endpoint in ("GET /health", "POST /api/v1/intake", "POST /api/v1/users/upsert"):
        assert f"| {endpoint} |" in result.stdout


def test_bench_harness_fails_clearly_without_wrk(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # nowhere to find wrk
    result = subprocess.run([sys.executable, "bench/run.py", "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "apt-get install wrk" in result.stderr


def test_microbenchmark_runs():
    result = subprocess.run([sys.executable, "bench/micro.py", "-n", "20"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "POST /api/v1/users/upsert" in result.stdout
