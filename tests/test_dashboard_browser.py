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
    assert wait_until(lambda: all(api.get(f"{srv.url}/api/v1/status/{j}", timeout=10).json()["status"]
                                  == "succeeded" for j in done), 30)
    client_key = api.post(srv.url + "/api/v1/keys", json={"name": "acme", "role": "client"},
                          timeout=10).json()["key"]
    yield {"server": srv, "api": api, "reports": reports, "flaky": flaky, "xss": xss,
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


def log_in(driver, site, key=KEY):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    open_page(driver, site, "/admin/login")
    form = by_css(driver, "main h1")[0]
    by_css(driver, "input[name=key]")[0].send_keys(key)
    click(driver, "form.login button")
    # The login form's own page has an h1 too: wait until the answer replaced it.
    WebDriverWait(driver, 5).until(expected_conditions.staleness_of(form))
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
