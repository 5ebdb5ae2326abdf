"""Fixtures shared by the tests; the helpers they use live in support.py."""

import pytest

from support import (KEY, NEXT_KEY, Client, Server, close_postgres_databases, drop_postgres,
                     make_app)


@pytest.fixture
def app(tmp_path):
    application = make_app(tmp_path)
    yield application
    application.stop()


@pytest.fixture
def client(app):
    return Client(app)


@pytest.fixture
def keyed(tmp_path):
    """A client of an app that has API keys (current and next) configured."""
    application = make_app(tmp_path, API_KEYS=KEY, API_KEYS_NEXT=NEXT_KEY)
    yield Client(application)
    application.stop()


@pytest.fixture
def server(tmp_path):
    # The validation script makes more writes than a minute's default budget.
    srv = Server(tmp_path, API_KEYS=KEY, RATE_BURST=200).start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _close_postgres():
    """Every PostgreSQL pool a test opened is closed after it."""
    yield
    close_postgres_databases()


def pytest_sessionfinish(session):
    drop_postgres()
