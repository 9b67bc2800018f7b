"""The dashboard in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by selenium, against a real dispatcher and workers with a
token. One browser for the module. A screenshot of each view is kept under
tests/artifacts/ (ignored by git)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_support import REPO, Cluster, wait_for, write_manifest

pytestmark = pytest.mark.e2e
TOKEN = "browser-s3cret"
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the test extra installs it
    webdriver = None

if webdriver is None or not CHROMIUM or not DRIVER:
    pytest.skip("needs selenium and Debian's chromium + chromium-driver "
                "(`apt-get install chromium chromium-driver`; .ci/run tries)",
                allow_module_level=True)

PROGRESS = """
name: progress
version: "1"
symbols:
  - {name: setup, type: action, parameters: {handler: delay, ms: 300}}
""" + "".join(f"""  - {{name: step-{i}, type: action, dependencies: [setup],
     parameters: {{handler: delay, ms: 400}}}}
""" for i in range(12)) + """  - {name: finish, type: action, dependencies: [step-0, step-11],
     parameters: {handler: delay, ms: 200}}
"""
FAILING = """
name: failing
version: "1"
on_failure: continue
symbols:
  - {name: fine, type: action, parameters: {handler: noop}}
  - {name: broken, type: action, retries: 1, parameters: {handler: fail}}
"""
SLOW = """
name: slow
version: "1"
symbols:
  - {name: first, type: action, parameters: {handler: delay, ms: 100}}
  - {name: second, type: action, dependencies: [first], parameters: {handler: delay, ms: 1500}}
  - {name: third, type: action, dependencies: [second], parameters: {handler: delay, ms: 100}}
"""
XSS = """
name: hostile
version: "1"
symbols:
  - name: payload
    type: action
    parameters:
      handler: echo
      script: "<script>window.__xss = 1</script>"
      image: "<img src=x onerror=\\"window.__xss = 2\\">"
      svg: "<svg onload=\\"window.__xss = 3\\"></svg>"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("dash-browser")
    cl = Cluster(root, f'\n[security]\ntoken = "{TOKEN}"\n')
    try:
        cl.start_dispatcher()
        cl.start_worker("web-1", slots=3)
        cl.start_worker("web-2", slots=3)
        yield cl
    finally:
        cl.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    except WebDriverException as e:
        pytest.skip(f"chromium does not start here: {e.msg}")
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def http_url(cl: Cluster) -> str:
    return cl.url.replace("ws://", "http://", 1)


def until(driver: Any, cond: Any, what: str, timeout: float = 20) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: cond(d), message=f"waiting for {what}")


def shot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"dashboard-{name}.png"))


def js_errors(driver: Any) -> list[str]:
    """Uncaught exceptions and CSP violations in the page since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and (e["source"] == "javascript" or "Content Security Policy" in e["message"])]


def signed_in(driver: Any, cl: Cluster) -> None:
    """Signs the browser in through the page, if it is not."""
    driver.get(http_url(cl) + "/#/")
    until(driver, lambda d: d.find_element(By.ID, "signin").is_displayed()
          or d.execute_script("return document.body.dataset.ready"), "the page")
    if driver.find_element(By.ID, "signin").is_displayed():
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "signin-button").click()
        until(driver, lambda d: d.execute_script("return document.body.dataset.ready")
              == "cluster", "the cluster view")


def open_run(driver: Any, cl: Cluster, run_id: str, symbol: str = "") -> None:
    driver.get(f"{http_url(cl)}/#/run/{run_id}" + (f"/s/{symbol}" if symbol else ""))
    until(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "run",
          f"run {run_id}")


def test_a_signed_out_browser_sees_nothing_and_can_do_nothing(browser: Any,
                                                              cluster: Cluster) -> None:
    run_id = cluster.detach(write_manifest(cluster.root, FAILING, "failing.yaml"))
    wait_for(lambda: cluster.run_status(run_id) == "failed", what="the run to fail")
    browser.delete_all_cookies()
    browser.get(http_url(cluster) + f"/#/run/{run_id}")
    until(browser, lambda d: d.find_element(By.ID, "signin").is_displayed(), "the sign-in form")
    assert browser.find_element(By.ID, "main").text == ""
    assert "broken" not in browser.page_source and run_id not in browser.find_element(
        By.TAG_NAME, "body").text
    # What a script in the page could try: no data, no socket.
    status = browser.execute_async_script(
        "const done = arguments[0];"
        "fetch('/api/runs', {headers: {'X-Swarm-Request': '1'}}).then(r => done(r.status));")
    assert status == 401
    opened = browser.execute_async_script(
        "const done = arguments[0];"
        "const ws = new WebSocket(`ws://${location.host}/ws/dashboard`);"
        "ws.onopen = () => done('open'); ws.onclose = () => done('refused');")
    assert opened == "refused"
    shot(browser, "signin")
    browser.find_element(By.ID, "token").send_keys("not the token")
    browser.find_element(By.ID, "signin-button").click()
    until(browser, lambda d: d.find_element(By.ID, "signin-error").text == "Wrong token.",
          "the refusal")
    cookies = browser.get_cookies()
    assert not cookies
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "signin-button").click()
    until(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "run",
          "the run view after signing in")
    (session,) = browser.get_cookies()
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert TOKEN not in session["value"]
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly


def test_a_run_progresses_live_to_completion(browser: Any, cluster: Cluster) -> None:
    signed_in(browser, cluster)
    run_id = cluster.detach(write_manifest(cluster.root, PROGRESS, "progress.yaml"))
    open_run(browser, cluster, run_id)
    browser.execute_script("window.__samePage = true")
    seen: set[str] = set()

    def finished(d: Any) -> bool:
        # The status first: the progress read after it is from the same redraw or a later one.
        done = d.find_element(By.ID, "run-status").text == "completed"
        seen.add(d.find_element(By.ID, "run-progress").text.strip())
        return bool(done)

    until(browser, finished, "the run to complete on the page", timeout=40)
    assert browser.execute_script("return window.__samePage") is True  # live, not reloaded
    assert "14 / 14 done" in seen
    assert any(s != "14 / 14 done" for s in seen), seen  # it was seen in progress
    shot(browser, "run-graph")
    browser.find_element(By.ID, "tab-water").click()
    until(browser, lambda d: "14 attempts on" in d.find_element(By.ID, "panel-water").text,
          "the waterfall")
    shot(browser, "run-waterfall")
    browser.find_element(By.ID, "tab-table").click()
    rows = until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#symbols .vrow"),
                 "the symbol table")
    assert len(rows) == 14
    header = browser.find_element(By.CSS_SELECTOR, ".vhead [data-sort=duration]")
    header.click()
    header.click()  # longest first
    until(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#symbols .vrow").get_attribute(
        "data-symbol").startswith("step-"), "sorting by duration")
    shot(browser, "run-symbols")
    browser.get(http_url(cluster) + "/#/runs")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"tr[data-run='{run_id}']"),
          "the runs list")
    shot(browser, "runs")
    browser.get(http_url(cluster) + "/#/")
    until(browser, lambda d: "web-1" in d.find_element(By.ID, "workers").text
          and "web-2" in d.find_element(By.ID, "workers").text, "the workers")
    shot(browser, "cluster")
    assert js_errors(browser) == []


def test_a_failed_symbol_shows_its_error(browser: Any, cluster: Cluster) -> None:
    signed_in(browser, cluster)
    run_id = cluster.detach(write_manifest(cluster.root, FAILING, "failing2.yaml"), "--new")
    wait_for(lambda: cluster.run_status(run_id) == "failed", what="the run to fail")
    open_run(browser, cluster, run_id)
    browser.find_element(By.ID, "tab-table").click()
    row = until(browser, lambda d: d.find_element(By.CSS_SELECTOR,
                                                  "#symbols .vrow[data-symbol=broken]"),
                "the failed symbol's row")
    row.click()
    error = until(browser, lambda d: d.find_element(By.ID, "symbol-error"), "the drawer")
    assert error.text == "failed on purpose"
    drawer = browser.find_element(By.ID, "drawer").text
    assert "#2" in drawer and "#1" in drawer and "attempt token" in drawer
    shot(browser, "symbol")


def test_pause_and_resume_from_the_page(browser: Any, cluster: Cluster) -> None:
    signed_in(browser, cluster)
    run_id = cluster.detach(write_manifest(cluster.root, SLOW, "slow.yaml"))
    open_run(browser, cluster, run_id)
    until(browser, lambda d: d.find_elements(By.ID, "act-pause"), "the pause button")[0].click()
    text = until(browser, lambda d: d.find_element(By.ID, "modal-text").text, "the confirmation")
    assert "running symbols finish" in text
    browser.find_element(By.ID, "modal-yes").click()
    wait_for(lambda: cluster.run_status(run_id) == "paused", what="the run to pause")
    until(browser, lambda d: d.find_element(By.ID, "run-status").text == "paused",
          "the paused badge")
    wait_for(lambda: cluster.tasks(run_id)["second"]["state"] == "completed",
             what="the running symbol to finish")
    open_run(browser, cluster, run_id, "third")
    why = until(browser, lambda d: d.find_element(By.ID, "symbol-why").text, "why it waits")
    assert "paused" in why
    shot(browser, "paused")
    browser.find_element(By.ID, "drawer-close").click()
    until(browser, lambda d: d.find_elements(By.ID, "act-resume"), "the resume button")[0].click()
    until(browser, lambda d: d.find_element(By.ID, "modal").is_displayed(), "the confirmation")
    browser.find_element(By.ID, "modal-yes").click()
    wait_for(lambda: cluster.run_status(run_id) == "completed", what="the run to complete")
    until(browser, lambda d: d.find_element(By.ID, "run-status").text == "completed",
          "the completed badge")


def test_outputs_and_parameters_cannot_inject_markup(browser: Any, cluster: Cluster) -> None:
    signed_in(browser, cluster)
    run_id = cluster.detach(write_manifest(cluster.root, XSS, "xss.yaml"))
    wait_for(lambda: cluster.run_status(run_id) == "completed", what="the run")
    open_run(browser, cluster, run_id, "payload")
    until(browser, lambda d: d.execute_script("return document.body.dataset.drawer")
          == "payload", "the drawer")
    drawer = browser.find_element(By.ID, "drawer")
    assert "<script>window.__xss = 1</script>" in drawer.text  # shown as text, in full
    assert "<img src=x onerror=" in drawer.text
    # No element was made of the payloads, so none has a handler that could ever fire.
    assert drawer.find_elements(By.TAG_NAME, "img") == []
    assert drawer.find_elements(By.TAG_NAME, "script") == []
    assert drawer.find_elements(By.TAG_NAME, "svg") == []
    assert browser.execute_script("return window.__xss") is None
    shot(browser, "xss")
    assert js_errors(browser) == []
