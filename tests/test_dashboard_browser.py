"""The dashboard in a real browser: Debian's chromium driven by selenium
against a real gunicorn (two workers sharing SQLite, so a session made by
one is seen by the other). Each page is photographed at 1280x800 and at a
phone's width into a folder of this run's (and /tmp/dashboard-shots/).

Without chromium and chromium-driver the tests skip, saying so; with
LEVQOR_REQUIRE_BROWSER=1 (as .ci/run sets) they fail instead."""

import base64
import os
import pathlib
import shutil
import sqlite3
import time

import pytest
import requests

from support import KEY, Server, wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SIZES = {"desktop": (1280, 800, False), "phone": (390, 844, True)}
SHOTS = pathlib.Path("/tmp/dashboard-shots")
XSS = {"note": "<script>alert(1)</script>", "name": '"><img src=x onerror=alert(2)>'}


def _browser_or_skip():
    missing = None
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "selenium is not installed (pip install -r requirements-dev.txt)"
    if missing is None and not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
        missing = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    if missing:
        if os.environ.get("LEVQOR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"a browser is required (LEVQOR_REQUIRE_BROWSER=1): {missing}")
        pytest.skip(f"browser test: {missing}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server with jobs of every kind the scenarios need, made through the API."""
    _browser_or_skip()
    tmp = tmp_path_factory.mktemp("dashboard")
    srv = Server(tmp, API_KEYS=KEY, JOB_STORE="sqlite", WEB_CONCURRENCY=2, RATE_BURST=10_000,
                 RATE_GLOBAL=10_000, RATE_READ=100_000).start()
    api = requests.Session()
    api.headers["X-Api-Key"] = KEY

    def intake(workflow, payload=None):
        r = api.post(srv.url + "/api/v1/intake", json={"workflow": workflow, "payload": payload or {}},
                     timeout=10)
        assert r.status_code == 202, r.text
        return r.json()["job_id"]

    done = [intake("echo", {"i": i}) for i in range(6)]
    reports = [intake("ext.report", {"page": i}) for i in range(12)]
    flaky = intake("ext.flaky")
    claim = api.post(srv.url + "/api/v1/jobs/claim", json={"workflows": ["ext.flaky"]}, timeout=10).json()
    api.post(f"{srv.url}/api/v1/jobs/{flaky}/fail", json={"lease_token": claim["job"]["lease_token"],
                                                           "error": "upstream said no", "retryable": False},
             timeout=10).raise_for_status()
    xss = intake("ext.xss", XSS)
    paid = api.post(srv.url + "/api/v1/intake", json={"workflow": "ext.paid", "payload": {},
                                                       "max_cost": 0.2}, timeout=10).json()["job_id"]
    lease = api.post(srv.url + "/api/v1/jobs/claim", json={"workflows": ["ext.paid"]}, timeout=10).json()
    api.post(f"{srv.url}/api/v1/jobs/{paid}/complete", json={"lease_token": lease["job"]["lease_token"],
                                                             "result": {"pages": 3}, "cost": 0.125},
             timeout=10).raise_for_status()
    # Its steps spend nothing: the spend page's figures are the paid job's alone.
    stepped = api.post(srv.url + "/api/v1/intake", json={"workflow": "ext.steps", "payload": {},
                                                          "max_cost": 0}, timeout=10).json()["job_id"]
    lease = api.post(srv.url + "/api/v1/jobs/claim", json={"workflows": ["ext.steps"]}, timeout=10).json()
    for name, cost in (("fetch page", 0), ("summarise", 0)):
        api.post(f"{srv.url}/api/v1/jobs/{stepped}/steps", timeout=10, json={
            "lease_token": lease["job"]["lease_token"], "name": name, "result": {"ok": name},
            "cost": cost}).raise_for_status()
    assert wait_until(lambda: all(api.get(f"{srv.url}/api/v1/status/{j}", timeout=10).json()["status"]
                                  == "succeeded" for j in done), 30)
    client_key = api.post(srv.url + "/api/v1/keys", json={"name": "acme", "role": "client"},
                          timeout=10).json()["key"]
    yield {"server": srv, "api": api, "reports": reports, "flaky": flaky, "xss": xss, "stepped": stepped,
           "client_key": client_key, "shots": tmp / "shots"}
    srv.stop()


@pytest.fixture(scope="module")
def driver(site, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-default-apps", "--window-size=1280,800",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(DRIVER))
    browser.set_page_load_timeout(30)
    browser.set_script_timeout(10)
    yield browser
    browser.quit()


def shot(driver, site, name):
    """Photograph the page at each size: the viewport, and the whole page."""
    site["shots"].mkdir(exist_ok=True)
    SHOTS.mkdir(exist_ok=True)
    for size, (width, height, mobile) in SIZES.items():
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
        time.sleep(0.2)
        full = driver.execute_script("return document.documentElement.scrollHeight")
        for kind, clip_height in (("", height), ("-full", max(height, min(full, 6000)))):
            data = driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": bool(kind),
                "clip": {"x": 0, "y": 0, "width": width, "height": clip_height, "scale": 1}})["data"]
            path = site["shots"] / f"{name}-{size}{kind}.png"
            path.write_bytes(base64.b64decode(data))
            shutil.copy(path, SHOTS / path.name)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def by_css(driver, selector):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_page(driver, site, path):
    driver.get(site["server"].url + path)


def replaced(element):
    """A wait condition: ``element``'s page has gone. Mid-navigation
    chromedriver may say so as an inspector error, not a stale element."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    def gone(driver):
        try:
            element.is_enabled()
            return False
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in str(exc):
                return True
            raise

    return gone


def log_in(driver, site, key=KEY):
    from selenium.webdriver.support.ui import WebDriverWait
    open_page(driver, site, "/admin/login")
    form = by_css(driver, "main h1")[0]
    by_css(driver, "input[name=key]")[0].send_keys(key)
    click(driver, "form.login button")
    # The login form's own page has an h1 too: wait until the answer replaced it.
    WebDriverWait(driver, 5).until(replaced(form))
    assert wait_until(lambda: driver.execute_script("return document.readyState") == "complete"
                      and by_css(driver, "main h1"), 5)


def title(driver):
    return by_css(driver, "main h1")[0].text


def cards(driver):
    return {c.find_element("css selector", ".label").text.lower(): c.find_element("css selector", ".value").text
            for c in by_css(driver, ".card")}


def job_ids_listed(driver):
    # One script: the page may refresh its <main> between two selenium calls.
    return driver.execute_script("return Array.from(document.querySelectorAll(\"td a[href*='/admin/jobs/']\"))"
                                 ".map(function (a) { return a.getAttribute('href').split('/').pop(); })")


def click(driver, selector):
    """Click the first match, looking again if a refresh replaced it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    for _ in range(3):
        try:
            return by_css(driver, selector)[0].click()
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError(f"{selector} kept going stale")


def stamp(driver):
    return driver.execute_script("return document.querySelector('footer time').textContent")


def accept_confirm(driver):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 5).until(expected_conditions.alert_is_present()).accept()


def test_login_then_the_overview_shows_the_jobs_made(driver, site):
    open_page(driver, site, "/admin")
    assert driver.current_url.startswith(site["server"].url + "/admin/login")
    shot(driver, site, "login")
    log_in(driver, site)
    assert title(driver) == "Overview"
    health = site["api"].get(site["server"].url + "/api/v1/ops/health", timeout=10).json()["jobs"]
    shown = cards(driver)
    assert {s: int(shown[s]) for s in health} == health
    assert health["succeeded"] == 7 and health["queued"] == 13 and health["failed"] == 1
    assert len(by_css(driver, "figure.chart svg rect")) >= 2  # this minute's bars
    shot(driver, site, "overview")


def test_filter_and_paginate(driver, site):
    from selenium.webdriver.support.ui import Select
    open_page(driver, site, "/admin/jobs")
    shot(driver, site, "jobs")
    by_css(driver, "input[name=workflow]")[0].send_keys("ext.report")
    Select(by_css(driver, "select[name=limit]")[0]).select_by_value("10")
    click(driver, "form.filters button")
    assert wait_until(lambda: "workflow=ext.report" in driver.current_url, 5)
    assert "limit=10" in driver.current_url
    first = job_ids_listed(driver)
    assert len(first) == 10
    click(driver, "a[href*='cursor=']")
    assert wait_until(lambda: "cursor=" in driver.current_url, 5)
    second = job_ids_listed(driver)
    assert "workflow=ext.report" in driver.current_url and len(second) == 2
    assert first + second == list(reversed(site["reports"]))
    shot(driver, site, "jobs-page-2")


def test_pages_refresh_keeping_filters_and_scroll(driver, site):
    open_page(driver, site, "/admin/jobs?workflow=ext.report&limit=50")
    driver.set_window_size(600, 500)
    driver.execute_script("window.scrollTo(0, 300)")
    before = driver.execute_script("return window.scrollY")
    url = driver.current_url
    rendered = stamp(driver)
    job = site["api"].post(site["server"].url + "/api/v1/intake",
                           json={"workflow": "ext.report", "payload": {}}, timeout=10).json()["job_id"]
    assert wait_until(lambda: job in job_ids_listed(driver), 15)  # fetched, not reloaded
    assert stamp(driver) != rendered
    assert driver.current_url == url and driver.execute_script("return window.scrollY") == before
    site["reports"].append(job)
    driver.set_window_size(1280, 800)


def test_open_a_failed_job_and_retry_it(driver, site):
    open_page(driver, site, "/admin/jobs?status=failed")
    assert job_ids_listed(driver) == [site["flaky"]]
    click(driver, "td a[href*='/admin/jobs/']")
    assert wait_until(lambda: site["flaky"][:12] in title(driver), 5)
    assert "upstream said no" in driver.page_source
    shot(driver, site, "job-failed")
    click(driver, f"form[action$='/{site['flaky']}/retry'] button")
    accept_confirm(driver)
    assert wait_until(lambda: by_css(driver, ".flash.ok"), 5)
    assert "Queued again." in by_css(driver, ".flash.ok")[0].text
    assert by_css(driver, "dl.facts .badge")[0].text == "queued"
    status = site["api"].get(f"{site['server'].url}/api/v1/status/{site['flaky']}", timeout=10).json()
    assert status["status"] == "queued"


def test_pages_read_and_filter_with_javascript_off(driver, site):
    driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        open_page(driver, site, "/admin/jobs")
        by_css(driver, "input[name=workflow]")[0].send_keys("ext.flaky")
        click(driver, "form.filters button")
        assert wait_until(lambda: "workflow=ext.flaky" in driver.current_url, 5)
        assert job_ids_listed(driver) == [site["flaky"]]
        click(driver, "td a[href*='/admin/jobs/']")
        assert wait_until(lambda: site["flaky"][:12] in title(driver), 5)
        assert "upstream said no" in by_css(driver, "main table")[0].text  # the attempts
        open_page(driver, site, "/admin")
        health = site["api"].get(site["server"].url + "/api/v1/ops/health", timeout=10).json()["jobs"]
        assert {s: int(cards(driver)[s]) for s in health} == health
    finally:
        driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})


def test_a_hostile_payload_is_shown_as_text_and_runs_nothing(driver, site):
    from selenium.common.exceptions import NoAlertPresentException
    driver.get_log("browser")  # start from an empty log
    open_page(driver, site, f"/admin/jobs/{site['xss']}")
    time.sleep(1)  # time for anything injected to have run
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    payload = by_css(driver, "pre")[0].text
    assert XSS["note"] in payload and XSS["name"] in payload
    assert by_css(driver, "img") == [] and by_css(driver, "main script") == []
    assert driver.execute_script("return document.scripts.length") == 1  # admin.js alone
    messages = [e["message"] for e in driver.get_log("browser")]
    assert not [m for m in messages if "Content Security Policy" in m or "alert" in m or "/x " in m], messages
    shot(driver, site, "job-hostile-payload")


def test_a_post_without_the_csrf_token_is_refused(driver, site):
    job = site["reports"][0]
    open_page(driver, site, f"/admin/jobs/{job}")
    driver.execute_script("var f = document.querySelector(\"form[action$='/cancel']\");"
                          "f.querySelector('input[name=csrf]').remove(); f.submit();")
    assert wait_until(lambda: "403" in title(driver), 5)
    assert "security token" in driver.page_source
    shot(driver, site, "csrf-refused")
    status = site["api"].get(f"{site['server'].url}/api/v1/status/{job}", timeout=10).json()
    assert status["status"] == "queued"


def test_keys_spend_and_audit_pages(driver, site):
    open_page(driver, site, "/admin/keys")
    by_css(driver, "input[name=name]")[0].send_keys("robot")
    click(driver, "form.filters button")
    assert wait_until(lambda: by_css(driver, ".secret pre"), 5)
    secret = by_css(driver, ".secret pre")[0].text
    assert secret.startswith("lq_") and len(secret) == 46
    shot(driver, site, "keys-new-secret")
    open_page(driver, site, "/admin/keys")
    assert secret not in driver.page_source and "robot" in driver.page_source
    shot(driver, site, "keys")
    open_page(driver, site, "/admin/spend")
    assert title(driver) == "Spend" and by_css(driver, "figure.chart svg rect")
    assert "$0.125" in by_css(driver, "main table")[0].text
    shot(driver, site, "spend")
    open_page(driver, site, "/admin/audit?method=POST")
    assert "/admin/jobs/" + site["flaky"] + "/retry" in driver.page_source
    shot(driver, site, "audit")


# -- flow control: delays, dependencies, schedules, workflow limits ---------------------------------


@pytest.fixture(scope="module")
def flow(site):
    """Jobs and schedules of every flow-control kind, made through the API
    after the tests above counted the site's jobs."""
    srv, api = site["server"], site["api"]
    url = srv.url

    def post(path, body, key=None, status=(201, 202, 200)):
        headers = {"X-Api-Key": key} if key else {}
        r = api.request("PUT" if path.endswith("/limits") else "POST", url + path, json=body,
                        headers=headers, timeout=10)
        assert r.status_code in status, r.text
        return r.json()

    def intake(workflow, **fields):
        return post("/api/v1/intake", {"workflow": workflow, "payload": fields.pop("payload", {}), **fields})["job_id"]

    def finish(workflow, result):
        lease = post("/api/v1/jobs/claim", {"workflows": [workflow]})["job"]
        post(f"/api/v1/jobs/{lease['job_id']}/complete", {"lease_token": lease["lease_token"], "result": result})
        return lease["job_id"]

    stages = [intake("ext.stage", payload={"part": i}, concurrency_key="customer-42") for i in range(2)]
    finish("ext.stage", {"rows": 120})
    finish("ext.stage", {"rows": 80})
    merged = intake("ext.merge", depends_on=stages, concurrency_key="customer-42")
    pending = intake("ext.stage", payload={"part": 3}, concurrency_key="customer-7")
    waiting = intake("ext.merge", depends_on=[pending], concurrency_key="customer-7")
    later = intake("ext.later", delay=3600, concurrency_key="customer-42")
    post("/api/v1/workflows/ext.stage/limits", {"max_concurrency": 4, "max_concurrency_per_key": 1,
                                                "rate": {"count": 100, "per": 60}})
    post("/api/v1/schedules", {"name": "nightly-report", "workflow": "report.build", "payload": {"account": 7},
                               "cron": "30 2 * * mon-fri", "timezone": "Europe/London", "max_cost": 0.2})
    post("/api/v1/schedules", {"name": "acme-sync", "workflow": "ext.sync", "payload": {"full": False},
                               "every": 900, "paused": True}, key=site["client_key"])
    post("/api/v1/schedules", {"name": "hourly-digest", "workflow": "ext.digest", "payload": XSS,
                               "cron": "@hourly"}, key=site["client_key"])
    # Due a minute ago, through the database: either worker's scheduler fires it within a second.
    with sqlite3.connect(srv.env["SQLITE_PATH"]) as db:
        db.execute("UPDATE schedules SET next_fire = ? WHERE name = 'nightly-report'", (time.time() - 60,))
    schedule = lambda: api.get(url + "/api/v1/schedules/nightly-report", timeout=10).json()["schedule"]  # noqa: E731
    assert wait_until(lambda: schedule()["last_job"], 10)
    return {"stages": stages, "merged": merged, "pending": pending, "waiting": waiting, "later": later,
            "fired": schedule()["last_job"]}


def test_jobs_filter_by_concurrency_key_and_status_list(driver, site, flow):
    from selenium.webdriver.support.ui import Select
    open_page(driver, site, "/admin/jobs")
    by_css(driver, "input[name=concurrency_key]")[0].send_keys("customer-42")
    Select(by_css(driver, "select[name=status]")[0]).select_by_value("scheduled,waiting,queued,running")
    click(driver, "form.filters button")
    assert wait_until(lambda: "concurrency_key=customer-42" in driver.current_url, 5)
    assert "status=scheduled%2Cwaiting%2Cqueued%2Crunning" in driver.current_url
    assert job_ids_listed(driver) == [flow["later"], flow["merged"]]
    text = by_css(driver, "main table")[0].text
    assert "runs " in text and "customer-42" in text
    shot(driver, site, "jobs-flow-filters")
    open_page(driver, site, "/admin/jobs?status=waiting")
    assert job_ids_listed(driver) == [flow["waiting"]] and "on 1 job" in by_css(driver, "main table")[0].text
    open_page(driver, site, "/admin/jobs?schedule=nightly-report")
    assert job_ids_listed(driver) == [flow["fired"]]
    shot(driver, site, "jobs-of-a-schedule")


def test_a_job_shows_its_parents_results_and_dependents(driver, site, flow):
    open_page(driver, site, f"/admin/jobs/{flow['merged']}")
    headings = [h.text for h in by_css(driver, "main h2")]
    assert "Depends on (2)" in headings and "Results received from its parents" in headings
    results = [p.text for p in by_css(driver, "pre") if '"rows"' in p.text][0]
    assert flow["stages"][0] in results and "120" in results and "80" in results
    facts = by_css(driver, "dl.facts")[0].text
    assert "customer-42" in facts
    shot(driver, site, "job-with-parents")
    # A parent keeps its dependents while it runs (one that had ended resolves them at once).
    open_page(driver, site, f"/admin/jobs/{flow['waiting']}")
    assert by_css(driver, "dl.facts .badge")[0].text == "waiting"
    assert "Results received from its parents" not in driver.page_source
    click(driver, f"td a[href='/admin/jobs/{flow['pending']}']")
    assert wait_until(lambda: flow["pending"][:12] in title(driver), 5)
    assert "Dependents (1)" in [h.text for h in by_css(driver, "main h2")]
    assert by_css(driver, f"td a[href='/admin/jobs/{flow['waiting']}']")
    shot(driver, site, "job-with-dependents")
    open_page(driver, site, f"/admin/jobs/{flow['later']}")
    assert by_css(driver, "dl.facts .badge")[0].text == "scheduled"
    shot(driver, site, "job-scheduled")


def test_schedules_of_every_key_pause_resume_and_delete(driver, site, flow):
    from selenium.common.exceptions import NoAlertPresentException
    api, url = site["api"], site["server"].url
    open_page(driver, site, "/admin/schedules")
    assert title(driver) == "Schedules"
    text = by_css(driver, "main table")[0].text
    for expected in ("nightly-report", "acme-sync", "hourly-digest", "30 2 * * mon-fri", "Europe/London",
                     "every 15 min", "paused", "acme"):
        assert expected in text, expected
    assert by_css(driver, f"td a[href='/admin/jobs/{flow['fired']}']")  # its last job
    shot(driver, site, "schedules")
    click(driver, "form[action$='/nightly-report/pause'] button")
    accept_confirm(driver)
    assert wait_until(lambda: by_css(driver, ".flash.ok"), 5)
    assert "Schedule paused." in by_css(driver, ".flash.ok")[0].text
    mine = api.get(url + "/api/v1/schedules/nightly-report", timeout=10).json()["schedule"]
    assert mine["paused"] is True
    click(driver, "td a[href$='/nightly-report']")
    assert wait_until(lambda: title(driver) == "Schedule nightly-report", 5)
    assert '"account": 7' in by_css(driver, "pre")[0].text
    assert job_ids_listed(driver) == [flow["fired"]]
    click(driver, "form[action$='/nightly-report/resume'] button")
    accept_confirm(driver)
    assert wait_until(lambda: "Schedule resumed." in driver.page_source, 5)
    assert api.get(url + "/api/v1/schedules/nightly-report", timeout=10).json()["schedule"]["paused"] is False
    shot(driver, site, "schedule")
    # A client's schedule with a hostile payload: text, and nothing runs.
    driver.get_log("browser")
    click(driver, "nav a[href='/admin/schedules']")
    assert wait_until(lambda: title(driver) == "Schedules", 5)
    click(driver, "td a[href$='/hourly-digest']")
    assert wait_until(lambda: title(driver) == "Schedule hourly-digest", 5)
    time.sleep(0.5)
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    assert XSS["note"] in by_css(driver, "pre")[0].text and by_css(driver, "img") == []
    assert not [e for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    shot(driver, site, "schedule-hostile-payload")
    click(driver, "form[action$='/hourly-digest/delete'] button")
    accept_confirm(driver)
    assert wait_until(lambda: "Schedule deleted." in driver.page_source, 5)
    assert "hourly-digest" not in by_css(driver, "main table")[0].text
    mine = requests.get(url + "/api/v1/schedules", headers={"X-Api-Key": site["client_key"]}, timeout=10)
    assert [s["name"] for s in mine.json()["schedules"]] == ["acme-sync"]


def test_workflow_limits_are_listed_and_set_with_the_form(driver, site, flow):
    api, url = site["api"], site["server"].url
    open_page(driver, site, "/admin/workflows")
    assert title(driver) == "Workflows"
    rows = {r.text.split(" ")[0]: r.text for r in by_css(driver, "main tbody tr")}
    assert "ext.stage external workers 4 1 100 per 1 min 0 1 0" == rows["ext.stage"]
    assert rows["echo"].startswith("echo in process")
    shot(driver, site, "workflows")
    click(driver, "td a[href='/admin/workflows/ext.stage']")
    assert wait_until(lambda: title(driver) == "Workflow ext.stage", 5)
    field = by_css(driver, "input[name=max_concurrency]")[0]
    assert field.get_attribute("value") == "4"
    field.clear()
    field.send_keys("6")
    for name in ("rate_count", "rate_per"):
        by_css(driver, f"input[name={name}]")[0].clear()
    click(driver, "form.limits button")
    assert wait_until(lambda: by_css(driver, ".flash.ok"), 5)
    limits = [w for w in api.get(url + "/api/v1/workflows", timeout=10).json()["workflows"]
              if w["name"] == "ext.stage"][0]["limits"]
    assert limits == {"max_concurrency": 6, "max_concurrency_per_key": 1, "rate": None}
    shot(driver, site, "workflow-limits")
    field = by_css(driver, "input[name=max_concurrency_per_key]")[0]
    field.clear()
    field.send_keys("0")
    click(driver, "form.limits button")
    assert wait_until(lambda: by_css(driver, ".flash.error"), 5)
    assert "max_concurrency_per_key: must be at least 1" in by_css(driver, ".flash.error")[0].text
    assert by_css(driver, "input[name=max_concurrency_per_key]")[0].get_attribute("value") == "0"
    shot(driver, site, "workflow-limits-refused")


def test_a_job_shows_its_recorded_steps(driver, site):
    open_page(driver, site, f"/admin/jobs/{site['stepped']}")
    if by_css(driver, "input[name=key]"):  # the session the tests above made is not there
        log_in(driver, site)
        open_page(driver, site, f"/admin/jobs/{site['stepped']}")
    sections = {h.text: h for h in by_css(driver, "section h2")}
    assert "Steps (2)" in sections
    rows = driver.execute_script(
        "var h = Array.from(document.querySelectorAll('section h2')).find(function (e) {"
        " return e.textContent.indexOf('Steps') === 0; });"
        "return Array.from(h.parentNode.querySelectorAll('tbody tr')).map(function (r) {"
        " return Array.from(r.cells).map(function (c) { return c.textContent; }); });")
    assert [(r[0], r[1], r[2], r[7]) for r in rows] == [("fetch page", "step", "done", "$0.00"),
                                                      ("summarise", "step", "done", "$0.00")]
    shot(driver, site, "job-steps")


def test_a_client_key_cannot_log_in(driver, site):
    driver.delete_all_cookies()
    log_in(driver, site, site["client_key"])
    assert driver.current_url.startswith(site["server"].url + "/admin/login")
    assert "That is not an admin API key." in by_css(driver, ".flash.error")[0].text
    shot(driver, site, "login-refused")
    open_page(driver, site, "/admin")
    assert title(driver) == "Log in"


def test_logout_then_back_is_refused(driver, site):
    log_in(driver, site)
    open_page(driver, site, "/admin/audit")
    assert title(driver) == "Audit log"
    click(driver, "nav button.link")
    assert wait_until(lambda: "You are logged out." in driver.page_source, 5)
    assert title(driver) == "Log in"
    driver.back()
    assert title(driver) == "Log in" and "Audit log" not in driver.page_source
    open_page(driver, site, "/admin/jobs")
    assert title(driver) == "Log in"
    assert not [c for c in driver.get_cookies() if c["name"] == "levqor_session"]
