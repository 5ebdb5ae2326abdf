"""Every endpoint of the seed's contract, in-process."""

import io
import time

import pytest

from support import KEY, STORES, make_app, store_env, Client


def test_root_names_the_service(client):
    r = client.get("/")
    assert r.status == 200
    assert r.json() == {"ok": True, "service": "levqor-backend", "version": "1.0.0"}


def test_health_gives_integer_unix_time(client):
    before = int(time.time())
    body = client.get("/health").json()
    assert body["ok"] is True and isinstance(body["ts"], int)
    assert before <= body["ts"] <= int(time.time())


def test_intake_then_status(client):
    r = client.post("/api/v1/intake", {"workflow": "report.build", "payload": {"a": 1},
                                       "priority": "high", "callback_url": "https://example.com/cb"})
    assert r.status == 202
    body = r.json()
    assert body["status"] == "queued" and len(body["job_id"]) == 32
    assert r.headers["location"] == f"/api/v1/status/{body['job_id']}"
    status = client.get(f"/api/v1/status/{body['job_id']}").json()
    assert status["job_id"] == body["job_id"]
    assert status["status"] == "queued"
    assert status["workflow"] == "report.build" and status["priority"] == "high"
    assert status["attempts"] == 0 and status["max_attempts"] == 3 and status["progress"] is None
    assert status["started_at"] is None and status["finished_at"] is None
    assert status["result"] is None and status["error"] is None
    assert status["created_at"] <= status["updated_at"]
    # The payload and callback URL are the client's business, not every poller's.
    assert "payload" not in status and "callback_url" not in status


def test_intake_priority_defaults_to_normal(client):
    job_id = client.post("/api/v1/intake", {"workflow": "w", "payload": {}}).json()["job_id"]
    assert client.get(f"/api/v1/status/{job_id}").json()["priority"] == "normal"


def test_unknown_job_is_404_with_its_id(client):
    r = client.get("/api/v1/status/" + "ab" * 16)
    assert r.status == 404
    assert r.json()["error"] == "not_found" and r.json()["job_id"] == "ab" * 16
    assert client.get("/api/v1/status/not-a-job-id").status == 404


def test_dev_complete_marks_job_succeeded(client):
    job_id = client.post("/api/v1/intake", {"workflow": "w", "payload": {}}).json()["job_id"]
    r = client.post(f"/api/v1/_dev/complete/{job_id}", {"result": {"answer": 42}})
    assert r.status == 200 and r.json() == {"ok": True}
    status = client.get(f"/api/v1/status/{job_id}").json()
    assert status["status"] == "succeeded" and status["result"] == {"answer": 42}


def test_dev_complete_without_body_uses_default_result(client):
    job_id = client.post("/api/v1/intake", {"workflow": "w", "payload": {}}).json()["job_id"]
    assert client.request("POST", f"/api/v1/_dev/complete/{job_id}").status == 200
    assert client.get(f"/api/v1/status/{job_id}").json()["result"] == {"ok": True}


def test_dev_complete_unknown_job_is_404(client):
    assert client.post(f"/api/v1/_dev/complete/{'0' * 32}", {}).status == 404


def test_dev_endpoints_are_gone_in_production(tmp_path):
    app = make_app(tmp_path, LEVQOR_ENV="production", API_KEYS=KEY)
    c = Client(app)
    job_id = c.post("/api/v1/intake", {"workflow": "w", "payload": {}}, key=KEY).json()["job_id"]
    r = c.post(f"/api/v1/_dev/complete/{job_id}", {}, key=KEY)
    assert r.status == 404 and r.json()["error"] == "not_found"
    # In production a job's status is read with a key (its own, or an admin key).
    assert c.get(f"/api/v1/status/{job_id}", key=KEY).json()["status"] == "queued"
    app.stop()


def test_ops_health_reports_database_and_job_counts(keyed):
    keyed.post("/api/v1/intake", {"workflow": "w", "payload": {}}, key=KEY)
    r = keyed.get("/api/v1/ops/health", key=KEY)
    assert r.status == 200
    body = r.json()
    assert body["ok"] is True and body["checks"]["database"] == "ok"
    assert body["jobs"]["queued"] == 1
    assert keyed.get("/api/v1/ops/health").status == 401


def test_ops_health_fails_when_database_is_unreachable(tmp_path):
    app = make_app(tmp_path, SQLITE_PATH=str(tmp_path / "missing-dir" / "x.db"))
    r = Client(app).get("/api/v1/ops/health")
    assert r.status == 503
    assert r.json()["ok"] is False and r.json()["checks"]["database"].startswith("failing")


# -- users ---------------------------------------------------------------------


def test_upsert_creates_then_updates_without_wiping(client):
    r = client.post("/api/v1/users/upsert", {"email": "  Ada@Example.COM ", "name": "Ada",
                                             "locale": "en-GB", "currency": "GBP",
                                             "meta": {"plan": "pro"}})
    assert r.status == 201
    user = r.json()["user"]
    assert r.json()["created"] is True
    assert user["email"] == "ada@example.com"
    assert set(user) == {"id", "email", "name", "locale", "currency", "meta", "created_at", "updated_at"}
    r = client.post("/api/v1/users/upsert", {"email": "ada@example.com", "currency": "EUR"})
    assert r.status == 200 and r.json()["updated"] is True
    updated = r.json()["user"]
    # The seed wiped fields an upsert did not mention; Levqor keeps them.
    assert updated["id"] == user["id"]
    assert (updated["name"], updated["locale"], updated["currency"]) == ("Ada", "en-GB", "EUR")
    assert updated["meta"] == {"plan": "pro"}


def test_upsert_merges_meta_and_null_removes_a_key(client):
    client.post("/api/v1/users/upsert", {"email": "m@example.com", "meta": {"a": 1, "b": 2}})
    r = client.post("/api/v1/users/upsert", {"email": "m@example.com", "meta": {"b": None, "c": 3}})
    assert r.json()["user"]["meta"] == {"a": 1, "c": 3}


def test_user_lookup_by_email_and_id(client):
    user = client.post("/api/v1/users/upsert", {"email": "look@example.com"}).json()["user"]
    assert client.get("/api/v1/users?email=LOOK%40example.com").json()["id"] == user["id"]
    assert client.get(f"/api/v1/users/{user['id']}").json()["email"] == "look@example.com"


def test_user_lookup_errors(client):
    assert client.get("/api/v1/users").json()["error"] == "missing_email"
    assert client.get("/api/v1/users?email=").status == 400
    r = client.get("/api/v1/users?email=nobody@example.com")
    assert r.status == 404 and r.json()["error"] == "not_found"
    r = client.get("/api/v1/users/" + "0" * 32)
    assert r.status == 404 and r.json()["user_id"] == "0" * 32


def test_patch_updates_and_merges_meta(client):
    user = client.post("/api/v1/users/upsert", {"email": "p@example.com", "name": "P",
                                                "meta": {"x": 1}}).json()["user"]
    r = client.request("PATCH", f"/api/v1/users/{user['id']}", json={"locale": "fr-FR", "meta": {"y": 2}})
    assert r.status == 200 and r.json()["updated"] is True
    assert r.json()["user"]["meta"] == {"x": 1, "y": 2}
    assert r.json()["user"]["name"] == "P" and r.json()["user"]["locale"] == "fr-FR"


def test_patch_refuses_email_unknown_fields_and_unknown_user(client):
    user = client.post("/api/v1/users/upsert", {"email": "q@example.com"}).json()["user"]
    r = client.request("PATCH", f"/api/v1/users/{user['id']}", json={"email": "new@example.com"})
    assert r.status == 400 and r.json()["field"] == "email"
    r = client.request("PATCH", f"/api/v1/users/{user['id']}", json={"role": "admin"})
    assert r.status == 400 and r.json()["field"] == "role"
    r = client.request("PATCH", f"/api/v1/users/{user['id']}", json={})
    assert r.status == 400
    assert client.request("PATCH", "/api/v1/users/" + "0" * 32, json={"name": "x"}).status == 404
    assert client.get(f"/api/v1/users/{user['id']}").json()["email"] == "q@example.com"


def test_user_reads_need_a_key_when_keys_exist(keyed):
    user = keyed.post("/api/v1/users/upsert", {"email": "r@example.com"}, key=KEY).json()["user"]
    assert keyed.get(f"/api/v1/users/{user['id']}").status == 401
    assert keyed.get("/api/v1/users?email=r@example.com").status == 401
    assert keyed.get(f"/api/v1/users/{user['id']}", key=KEY).status == 200


def test_public_user_reads_restores_the_seed(tmp_path):
    app = make_app(tmp_path, API_KEYS=KEY, PUBLIC_USER_READS="1")
    c = Client(app)
    user = c.post("/api/v1/users/upsert", {"email": "s@example.com"}, key=KEY).json()["user"]
    assert c.get(f"/api/v1/users/{user['id']}").status == 200
    assert c.post("/api/v1/users/upsert", {"email": "s@example.com"}).status == 401
    app.stop()


# -- metrics -------------------------------------------------------------------


def test_metrics_count_todays_jobs_and_audit(client, app):
    for _ in range(3):
        client.post("/api/v1/intake", {"workflow": "w", "payload": {}})
    body = client.get("/public/metrics").json()
    assert body["jobs_today"] == 3
    assert body["audit_coverage"] == 100.0
    assert 0 < body["uptime_rolling_7d"] <= 100
    assert abs(body["last_updated"] - time.time()) < 5
    app.services.recorder.flush()  # and the same once written to SQLite
    assert client.get("/public/metrics").json()["jobs_today"] == 3


@pytest.mark.parametrize("kind", STORES)
def test_requests_after_the_stop_began_are_503_and_write_nothing(tmp_path, kind):
    env = dict(store_env(kind), API_KEYS=KEY)
    app = make_app(tmp_path, **env)
    app.start()
    c = Client(app)
    assert c.post("/api/v1/intake", {"workflow": "w", "payload": {}}, key=KEY).status == 202
    app.stop(grace=0)
    for method, path, body in (("POST", "/api/v1/intake", {"workflow": "w", "payload": {}}),
                               ("POST", "/api/v1/users/upsert", {"email": "late@example.com"}),
                               ("GET", "/health", None)):
        r = c.request(method, path, json=body, key=KEY)
        assert r.status == 503 and r.json()["error"] == "shutting_down", (path, r.status, r.body)
        assert r.headers["retry-after"] == "1" and r.json()["request_id"]
    if kind != "memory":  # what the next start finds: the one job, no profile
        again = make_app(tmp_path, **env)
        again.start()
        try:
            assert again.services.jobs.counts()["by_status"]["queued"] == 1
            assert again.services.users.get_by_email("late@example.com", "admin") is None
        finally:
            again.stop(grace=0)
    else:
        assert app.services.jobs.counts()["by_status"]["queued"] == 1


def test_a_request_whose_database_closes_under_it_as_the_service_stops_is_503(tmp_path):
    # The stop's close of the pool meets a request already past the door:
    # its failure is the stop's, answered 503, not a 500 with a traceback.
    log = io.StringIO()
    app = make_app(tmp_path, log=log, API_KEYS=KEY, **store_env("postgres"))
    app.start()
    jobs, add_many = app.services.jobs, app.services.jobs.add_many

    def stopped_meanwhile(*args, **kwargs):
        app.stop(grace=0)
        return add_many(*args, **kwargs)

    jobs.add_many = stopped_meanwhile
    r = Client(app).post("/api/v1/intake", {"workflow": "w", "payload": {}}, key=KEY)
    assert r.status == 503 and r.json()["error"] == "shutting_down"
    assert "Traceback" not in log.getvalue() and "unhandled exception" not in log.getvalue()
