"""The benchmark harness keeps working (a smoke run, no timing asserted)."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from support import ROOT

pytestmark = pytest.mark.slow


def bench_env(**extra):
    """The environment for a benchmark: PostgreSQL from LEVQOR_TEST_DATABASE_URL
    when the suite has one (without it, the scripts skip those setups, saying why)."""
    env = dict(os.environ)
    if os.environ.get("LEVQOR_TEST_DATABASE_URL"):
        env["LEVQOR_BENCH_DATABASE_URL"] = os.environ["LEVQOR_TEST_DATABASE_URL"]
    return {**env, **extra}


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_bench_harness_smoke_run():
    result = subprocess.run([sys.executable, "bench/run.py", "--smoke"], cwd=ROOT, env=bench_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for endpoint in ("GET /health", "POST /api/v1/intake", "POST /api/v1/users/upsert"):
        assert f"| {endpoint} |" in result.stdout
    # The Falcon peer (requirements-dev.txt) answered all five endpoints:
    # wrk stops the run on any non-2xx answer.
    assert "| endpoint | Falcon req/s | Levqor req/s | Levqor ÷ Falcon |" in result.stdout


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_queue_benchmark_smoke_run():
    result = subprocess.run([sys.executable, "bench/jobqueue.py", "--smoke"], cwd=ROOT,
                            env=bench_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| SQLite, 1 host |" in result.stdout
    if os.environ.get("LEVQOR_REQUIRE_POSTGRES") == "1":
        assert "| PostgreSQL, 2 hosts, A runs none |" in result.stdout


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_queue_benchmark_without_postgres_measures_sqlite_and_says_why():
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = bench_env(LEVQOR_BENCH_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/postgres")
    result = subprocess.run([sys.executable, "bench/jobqueue.py", "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| SQLite, 1 host |" in result.stdout and "| PostgreSQL" not in result.stdout
    assert f"PostgreSQL: skipped, PostgreSQL at 127.0.0.1:{port} does not answer" in result.stdout


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


def test_limits_benchmark_smoke_run():
    result = subprocess.run([sys.executable, "bench/limits.py", "--smoke"], cwd=ROOT,
                            env=bench_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for store in ("memory", "SQLite"):
        assert f"| {store} |" in result.stdout


def _redis_answers():
    """Whether Redis answers on 127.0.0.1:6379 (the peers' broker)."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def test_throughput_benchmark_smoke_run():
    # The peers are not in requirements-dev.txt (bench/requirements-bench.txt
    # has them): without them, or without Redis, this is skipped.
    for name in ("rq", "celery", "redis"):
        pytest.importorskip(name, reason="pip install -r bench/requirements-bench.txt")
    if not _redis_answers():
        pytest.skip("no Redis on 127.0.0.1:6379")
    result = subprocess.run([sys.executable, "bench/throughput.py", "--smoke"], cwd=ROOT,
                            env=bench_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in ("| enqueue, 1 client thread |", "| RQ `enqueue_many` |", "| Celery `--pool=solo` |",
                "| in-process drain, SQLite, 2 processes",
                "| Levqor, memory: `Worker` of 1 slot, waiting claim |",
                "| idle external waiting-claim p50, SQLite, `Worker` of 1 slot"):
        assert row in result.stdout, row
