"""gunicorn.conf.py against real gunicorn: the worker hooks."""

import pytest

from conftest import Server


def test_a_worker_that_fails_to_boot_exits_cleanly(tmp_path):
    """The worker_exit hook runs even for a worker whose app never loaded."""
    srv = Server(tmp_path, LEVQOR_WORKFLOWS="no_such_module_xyz")
    try:
        # start() raises once the master has exited: the log is complete.
        with pytest.raises(RuntimeError, match="gunicorn exited"):
            srv.start(timeout=20)
    finally:
        srv.stop()
    log = srv.log()
    assert "Worker failed to boot" in log, log
    assert "no_such_module_xyz" in log
    assert "AttributeError" not in log, log
    assert "Exception during worker exit" not in log, log
