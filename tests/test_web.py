"""The web pages in a real browser: Debian's chromium, headless, driven by selenium through
chromedriver, against an in-process master. Each test keeps screenshots of the pages it
saw in var/test-screenshots/.

The master runs on this thread's gevent loop, so every browser call runs in a real thread
(apiutil.in_thread) while the loop keeps serving; waits are WebDriverWait conditions with
a bound, never sleeps.
"""

import os
import shutil

import pytest

from apiutil import api_labs, in_thread, run_job
from conftest import ROOT, job_yaml
from lavacore.logformat import make_line, result_line
from lavacore.states import JobHealth, JobState
from test_web_http import HOSTILE_LINE, Client, insert_jobs

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = os.path.join(ROOT, "var", "test-screenshots")
WAIT = 20  # seconds: the longest any condition may take on a loaded 2-core machine

pytestmark = pytest.mark.timeout(180)


def _need_browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = "the browser tests need %s (apt-get install chromium chromium-driver;" \
                  " pip install selenium)" % ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class Browser:
    """Headless chromium; each call runs in a thread (the master's loop keeps running)."""

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         "--disable-extensions", "--no-first-run"):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = in_thread(lambda: webdriver.Chrome(
            options=options, service=Service(CHROMEDRIVER)))
        self.driver.set_page_load_timeout(WAIT)
        self.base = None

    def call(self, fn, *args):
        return in_thread(fn, *args)

    def open(self, path):
        self.call(self.driver.get, self.base + path)
        return self

    def text(self, css):
        from selenium.webdriver.common.by import By

        return self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).text)

    def texts(self, css):
        from selenium.webdriver.common.by import By

        return self.call(lambda: [e.text for e in
                                  self.driver.find_elements(By.CSS_SELECTOR, css)])

    def attributes(self, css, name):
        from selenium.webdriver.common.by import By

        return self.call(lambda: [e.get_attribute(name) for e in
                                  self.driver.find_elements(By.CSS_SELECTOR, css)])

    def click(self, css):
        from selenium.webdriver.common.by import By

        self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    def type(self, css, text):
        from selenium.webdriver.common.by import By

        def fill():
            element = self.driver.find_element(By.CSS_SELECTOR, css)
            element.clear()
            element.send_keys(text)
        self.call(fill)

    def choose(self, css, text):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        self.call(lambda: Select(self.driver.find_element(By.CSS_SELECTOR, css))
                  .select_by_visible_text(text))

    def wait(self, condition, what):
        """Wait (bounded) until ``condition(driver)`` is true; its value."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return self.call(lambda: WebDriverWait(self.driver, WAIT, 0.05).until(condition))
        except TimeoutException:
            raise AssertionError("browser: timed out waiting for %s" % what) from None

    def wait_text(self, css, text):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self.wait(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text),
                         "%r in %s" % (text, css))

    def wait_page(self, path_start):
        return self.wait(lambda d: d.execute_script(
            "return document.readyState") == "complete" and
            d.current_url.startswith(self.base + path_start), "the page %s" % path_start)

    def script(self, code):
        return self.call(self.driver.execute_script, code)

    def screenshot(self, name):
        os.makedirs(SHOTS, exist_ok=True)
        path = os.path.join(SHOTS, "%s.png" % name)
        assert self.call(self.driver.save_screenshot, path), path
        return path

    def console_errors(self):
        """What the browser reported as errors (a blocked script, a CSP violation...)."""
        return [entry["message"] for entry in self.call(self.driver.get_log, "browser")
                if entry["level"] == "SEVERE"]

    def login(self, user, token):
        self.open("/login")
        self.type("#username", user)
        self.type("#token", token)
        self.click("#submit")
        self.wait_text("#user", user)

    def logout(self):
        self.click("#logout")
        self.wait(lambda d: d.find_elements("css selector", "#login"), "logged out")

    def fresh(self, base):
        """A new visitor: no cookies, at ``base``."""
        self.base = base
        self.call(self.driver.delete_all_cookies)

    def quit(self):
        self.call(self.driver.quit)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    if os.path.isdir(SHOTS):
        shutil.rmtree(SHOTS)
    instance = Browser()
    yield instance
    instance.quit()


@pytest.fixture
def api(tmp_path, browser):
    def make(**kwargs):
        lab = labs_make(**kwargs)
        browser.fresh(lab.url)
        browser.call(browser.driver.get_log, "browser")  # forget earlier tests' entries
        return lab

    labs = api_labs(tmp_path)
    labs_make = next(labs)
    yield make
    next(labs, None)


HOST_DEVICES = (("host01", "host", "worker1", ()),)
LOCAL_WORKER = '[local_worker]\nhostname = "worker1"\nwork_dir = "var/worker"\n'


def test_every_page_with_a_real_job_of_the_local_worker(api, browser, tmp_path):
    """A host job run by the master's own worker; its page while it runs (the log followed
    live, a line written while the page is open appears) and once it is done (results,
    measurements, hostile text shown as text); then every other page."""
    from workerutil import job_yaml as host_job

    lab = api(devices=HOST_DEVICES, extra=LOCAL_WORKER)
    gate = tmp_path / "go"
    steps = [
        "echo '%s'" % HOSTILE_LINE,
        "lava-test-case speed --result pass --measurement 12.5 --units MB/s",
        "lava-test-reference evil --result pass --reference 'javascript:window.pwned=1'",
        "lava-test-reference docs --result pass --reference https://docs.example/lava",
        "for i in $(seq 1 1000); do [ -e %s ] && break; sleep 0.02; done" % gate,
        "echo 'written while the page is open'",
        "lava-test-case after-gate --result fail",
    ]
    job_id = lab.submit(host_job(steps).replace(
        "job_name: test job", "job_name: '<img src=x onerror=window.pwned=2> \"q\"'"))
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING, timeout=30,
                 what="the job running")
    browser.open("/jobs/%d" % job_id)
    browser.wait_text("#log", HOSTILE_LINE)          # the first lines, as text
    browser.wait_text("#follow-status", "Following")
    assert browser.text("#job-name") == '<img src=x onerror=window.pwned=2> "q"'
    browser.screenshot("job-running")
    gate.write_text("")
    browser.wait_text("#log", "written while the page is open")
    browser.wait_text("#follow-status", "The job finished")
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, timeout=30,
                 what="the job finished")
    assert lab.job(job_id).health == JobHealth.COMPLETE
    assert browser.script("return window.pwned === undefined")
    assert not browser.console_errors()

    browser.open("/jobs/%d" % job_id)
    results = browser.texts("#results tbody tr")
    assert any("speed" in row and "12.5" in row and "MB/s" in row for row in results)
    assert any("after-gate" in row and "fail" in row for row in results)
    links = browser.attributes("#results a", "href")
    assert links == ["https://docs.example/lava"]
    assert "javascript:window.pwned=1" in " ".join(results)
    assert browser.text("#job-state") == "Complete"
    browser.click("#definition summary")
    assert "lava-test-case speed" in browser.text("#definition pre")
    # Level filters hide and show lines.
    assert browser.call(lambda: browser.driver.find_element(
        "css selector", "#log .lvl-target").is_displayed())
    browser.click('input[data-level="target"]')
    assert not browser.call(lambda: browser.driver.find_element(
        "css selector", "#log .lvl-target").is_displayed())
    browser.click('input[data-level="target"]')
    browser.screenshot("job")
    assert browser.script("return window.pwned === undefined")

    pages = [("index", "/", "#active-count"), ("jobs", "/jobs", "#jobs"),
             ("devices", "/devices", "#devices"), ("device", "/devices/host01", "#details"),
             ("workers", "/workers", "#workers"), ("worker", "/workers/worker1", "#details"),
             ("queue", "/queue", "#count"), ("login", "/login", "#login-form")]
    for name, path, element in pages:
        browser.open(path)
        assert browser.text(element), name
        browser.screenshot(name)
    assert "host01" in browser.open("/workers/worker1").text("#devices")
    assert not browser.console_errors()


def test_filters_and_pages_of_the_job_list(api, browser):
    lab = api(devices=(("qemu01", "qemu", "worker1", ()), ("bbb01", "bbb", "worker1", ())))
    specs = [([(JobState.FINISHED, JobHealth.COMPLETE), (JobState.FINISHED, JobHealth.INCOMPLETE),
               (JobState.SUBMITTED, JobHealth.UNKNOWN)][i % 3][0],
              [(JobState.FINISHED, JobHealth.COMPLETE), (JobState.FINISHED, JobHealth.INCOMPLETE),
               (JobState.SUBMITTED, JobHealth.UNKNOWN)][i % 3][1],
              ("qemu", "bbb")[i % 2], ("alice", "bob")[i % 4 == 0]) for i in range(120)]
    ids = insert_jobs(lab, specs)
    browser.open("/jobs")
    shown = []
    while True:
        shown += [int(i) for i in browser.attributes("#jobs tr.job", "data-id")]
        if not browser.attributes("#page-older", "href"):
            break
        before = browser.script("return location.href")
        browser.click("#page-older")
        browser.wait(lambda d: d.current_url != before, "the next page")
    assert shown == sorted(ids, reverse=True)
    browser.screenshot("jobs-last-page")
    browser.click("#page-newest")
    browser.wait_text("#count", "120 jobs")

    browser.choose("#f-health", "Incomplete")
    browser.choose("#f-device-type", "bbb")
    browser.type("#f-submitter", "alice")
    browser.click("#f-apply")
    browser.wait_page("/jobs?")
    wanted = [i for i, s in zip(ids, specs)
              if s[1] == JobHealth.INCOMPLETE and s[2] == "bbb" and s[3] == "alice"]
    assert [int(i) for i in browser.attributes("#jobs tr.job", "data-id")] == \
        sorted(wanted, reverse=True)
    assert browser.text("#count").startswith("%d job" % len(wanted))
    assert browser.script('return document.getElementById("f-health").value') == "Incomplete"
    browser.screenshot("jobs-filtered")


def test_a_private_job_after_login_and_cancel_from_its_page(api, browser):
    lab = api()
    private = lab.submit(job_yaml(name="alice only").replace(
        "visibility: public", "visibility: personal"), user="alice")
    alice, bob = lab.token("alice"), lab.token("bob")
    browser.open("/jobs/%d" % private)
    assert browser.text("h1").startswith("404")
    assert "alice only" not in browser.open("/jobs").text("main")
    browser.screenshot("private-anonymous")
    browser.login("bob", bob)
    assert browser.open("/jobs/%d" % private).text("h1").startswith("404")
    browser.logout()
    browser.login("alice", alice)
    browser.open("/jobs/%d" % private)
    assert browser.text("#job-name") == "alice only"
    assert "alice only" in browser.open("/jobs").text("#jobs")
    browser.open("/jobs/%d" % private)
    browser.screenshot("private-submitter")
    browser.click("#cancel")
    browser.wait_text("#job-state", "Canceled")
    job = lab.job(private)
    assert (job.state, job.health) == (JobState.FINISHED, JobHealth.CANCELED)
    # The session cookie is out of the page's reach (HttpOnly).
    assert "lavacore_session" not in browser.script("return document.cookie")
    browser.logout()
    assert browser.open("/jobs/%d" % private).text("h1").startswith("404")


def test_a_big_log_is_paged_and_linked_by_line(api, browser):
    lab = api()
    worker = lab.worker()
    job_id = lab.submit()
    run_job(lab, worker, job_id, [make_line(("info", "debug", "target")[i % 3], "line %d" % i)
                                  for i in range(1, 1500)]
            + [result_line("smoke", "x", "pass")])
    browser.open("/jobs/%d" % job_id)
    numbers = browser.attributes("#log .line", "id")
    assert len(numbers) == 500 and numbers[-1] == "L1501"
    browser.click("#log-first")
    browser.wait_text("#log-pages", "lines 1–500")
    assert browser.attributes("#log .line", "id")[0] == "L1"
    browser.click("#log-next")
    browser.wait_text("#log-pages", "lines 501–1000")
    browser.screenshot("job-log-page")
    # A line's number is a link to it.
    browser.click("#L600 a.n")
    assert browser.script("return location.hash") == "#L600"
    client = Client(lab)
    assert client.get("/jobs/%d?log_start=1500" % job_id).status == 200


def test_a_link_from_another_site_opens_a_private_job_logged_in(api, browser):
    """A logged-in user who follows a link to a private job from another site (a CI
    dashboard, a mail) sees the job, not "not found" (the session cookie is Lax)."""
    lab = api()
    private = lab.submit(job_yaml(name="alice only").replace(
        "visibility: public", "visibility: personal"), user="alice")
    browser.login("alice", lab.token("alice"))
    target = "%s/jobs/%d" % (lab.url, private)
    elsewhere = "data:text/html,<title>dashboard</title><a id=go href='%s'>job</a>" % target
    browser.call(browser.driver.get, elsewhere)
    browser.click("#go")
    browser.wait_page("/jobs/%d" % private)
    assert browser.text("#job-name") == "alice only"
    browser.screenshot("private-from-another-site")
    browser.logout()


def test_lines_of_an_unknown_level_hide_and_control_characters_show(api, browser):
    lab = api()
    worker = lab.worker()
    job_id = lab.submit()
    run_job(lab, worker, job_id, [make_line("info", "an info line"),
                                  make_line("weird", "a line of a level nobody knows"),
                                  make_line("target", "nul\x00 esc\x1b[31m red")])
    browser.open("/jobs/%d" % job_id)
    assert browser.text("#L2 .lv") == "other"
    assert browser.text("#L3 .msg") == "nul\u2400 esc\u241b[31m red"

    def shown(css):
        return browser.call(lambda: browser.driver.find_element(
            "css selector", css).is_displayed())

    assert shown("#L2") and shown("#L1")
    browser.click('input[data-level="other"]')
    assert not shown("#L2") and shown("#L1")
    browser.click('input[data-level="other"]')
    assert shown("#L2")
    assert not browser.console_errors()
