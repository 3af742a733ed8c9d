"""The web pages over plain HTTP (no browser): headers, escaping of hostile text, the
same permissions as the API, sessions and their invalidation, CSRF, the job list's
filters and pages, big logs read a window at a time. tests/test_web.py drives the same
pages in a real browser."""

import http.client
import json
import re
import time
import urllib.parse

import pytest
import yaml

from apiutil import api_config, api_labs, in_thread, run_job, wait_for
from conftest import job_yaml
from lavacore.logformat import make_line, result_line
from lavacore.models import Job
from lavacore.states import DeviceHealth, JobHealth, JobState
from lavacore.web import logview, session

DEVICES = (("qemu01", "qemu", "worker1", ()), ("bbb01", "bbb", "worker1", ()))
PAGES = ["/", "/jobs", "/jobs/1", "/devices", "/devices/qemu01", "/workers",
         "/workers/worker1", "/queue", "/login"]


@pytest.fixture
def api(tmp_path):
    yield from api_labs(tmp_path)


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers              # [(name, value)], every one
        self.body = body
        self.text = body.decode("utf-8", "replace")

    def header(self, name):
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def cookies(self):
        return [v for k, v in self.headers if k.lower() == "set-cookie"]

    def csrf(self):
        found = re.search(r'name="csrf" value="([^"]+)"', self.text)
        assert found, self.text[:2000]
        return found.group(1)

    def job_ids(self):
        return [int(i) for i in re.findall(r'<tr class="job" data-id="(\d+)"', self.text)]


def _raw(url, method, path, body, headers):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return Response(response.status, response.getheaders(), response.read())
    finally:
        conn.close()


class Client:
    """A browser's part in HTTP: it keeps cookies, sends forms, follows nothing."""

    def __init__(self, lab):
        self.lab = lab
        self.jar = {}

    def request(self, method, path, form=None, headers=None):
        send = {"Accept": "text/html,application/xhtml+xml"}
        send.update(headers or {})
        if self.jar:
            send["Cookie"] = "; ".join("%s=%s" % item for item in self.jar.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            send.setdefault("Content-Type", "application/x-www-form-urlencoded")
        answer = in_thread(_raw, self.lab.url, method, path, body, send)
        for text in answer.cookies():
            name, _, rest = text.partition("=")
            value = rest.split(";")[0]
            if "Max-Age=0" in text:
                self.jar.pop(name, None)
            else:
                self.jar[name] = value
        return answer

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, form, **kwargs):
        return self.request("POST", path, form=form, **kwargs)

    def login(self, user, token=None):
        page = self.get("/login")
        answer = self.post("/login", {"csrf": page.csrf(), "username": user, "next": "/",
                                      "token": token or self.lab.token(user)})
        assert answer.status == 303, answer.text[:2000]
        return answer


def insert_jobs(lab, specs):
    """Jobs straight into the storage: (state, health, device type, submitter) each."""
    now = time.time() - 3600
    records = [Job(None, state=state, health=health, requested_device_type=device_type,
                   submitter=submitter, description="job %d" % i, submit_time=now + i,
                   definition="device_type: %s\n" % device_type,
                   original_definition="device_type: %s\n" % device_type)
               for i, (state, health, device_type, submitter) in enumerate(specs)]
    return lab.storage.insert_jobs(records)


def _personal(text):
    return text.replace("visibility: public", "visibility: personal")


# -- headers, addresses -------------------------------------------------------------------

def test_pages_are_html_with_a_strict_policy_and_no_inline_script(api):
    lab = api()
    lab.submit()
    client = Client(lab)
    for path in PAGES:
        page = client.get(path)
        assert page.status == 200, (path, page.text[:500])
        assert page.header("Content-Type") == "text/html; charset=utf-8"
        policy = page.header("Content-Security-Policy")
        assert "default-src 'none'" in policy and "script-src 'self'" in policy, path
        assert "unsafe" not in policy
        assert page.header("X-Content-Type-Options") == "nosniff"
        assert page.header("X-Frame-Options") == "DENY"
        assert page.header("Cache-Control") == "no-store"
        # The policy forbids inline script and style: the pages have none.
        assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), path
        assert " style=" not in page.text and "<style" not in page.text, path
        assert not re.search(r"<[^>]+\son[a-z]+=", page.text), path
    for name, kind in (("job.js", "text/javascript"), ("lavacore.css", "text/css")):
        answer = client.get("/static/" + name)
        assert answer.status == 200 and answer.header("Content-Type").startswith(kind)
    assert client.get("/static/../pages.py").status == 404
    assert client.get("/static/nosuch.js").status == 404
    # Clients that do not ask for HTML get JSON, as before the pages.
    assert lab.json("GET", "/")["xmlrpc"] == "/RPC2"
    status, headers, body = lab.http("GET", "/nosuch")
    assert status == 404 and json.loads(body)["error"] == "no such resource: /nosuch"
    assert headers["X-Content-Type-Options"] == "nosniff"
    missing = client.get("/nosuch")
    assert missing.status == 404 and "text/html" in missing.header("Content-Type")
    # LAVA's addresses lead to the same pages.
    for old, new in (("/scheduler/job/1", "/jobs/1"), ("/scheduler/alljobs", "/jobs"),
                     ("/scheduler/device/qemu01", "/devices/qemu01"),
                     ("/scheduler/allworkers", "/workers"), ("/scheduler/queue", "/queue"),
                     ("/scheduler/alljobs?state=Running", "/jobs?state=Running")):
        answer = client.get(old)
        assert (answer.status, answer.header("Location")) == (301, new), old
    assert client.request("DELETE", "/jobs").status == 405

    # HEAD: the headers of GET, no body (the connection stays usable).
    def head_then_get():
        parts = urllib.parse.urlsplit(lab.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
        try:
            conn.request("HEAD", "/jobs", headers={"Accept": "text/html"})
            head = conn.getresponse()
            answers = [(head.status, int(head.getheader("Content-Length")), head.read())]
            conn.request("GET", "/jobs", headers={"Accept": "text/html"})
            get = conn.getresponse()
            return answers + [(get.status, int(get.getheader("Content-Length")), get.read())]
        finally:
            conn.close()

    (head_status, head_length, head_body), (status, length, body) = in_thread(head_then_get)
    assert (head_status, head_body, status) == (200, b"", 200)
    assert head_length > 1000 and len(body) == length


# -- hostile text ---------------------------------------------------------------------------

HOSTILE_NAME = """<script>window.pwned=1</script> "quoted" 'single' &amp; <b>"""
HOSTILE_LINE = "<script>window.pwned=2</script><img src=x onerror=alert(1)>"
BAD_REFERENCES = ["javascript:alert(document.cookie)", "JaVaScRiPt:alert(1)",
                  " javascript:alert(1)", "data:text/html,<script>alert(1)</script>",
                  "java\tscript:alert(1)", "//evil.example/x"]


def test_hostile_text_is_shown_as_text_everywhere(api):
    lab = api()
    worker = lab.worker()
    job_id = lab.submit(job_yaml(name=HOSTILE_NAME.replace('"', '\\"').join('""')))
    lines = [make_line("target", HOSTILE_LINE)]
    lines += [result_line("smoke", "bad%d" % i, "pass", reference=ref)
              for i, ref in enumerate(BAD_REFERENCES)]
    lines.append(result_line("smoke", "good", "pass", reference="https://ci.example/run?a=1&b=2"))
    lines.append(result_line("smoke", '<i>"case"</i>', "<b>pass</b>", measurement="<u>1</u>",
                             units="<s>"))
    run_job(lab, worker, job_id, lines)
    lab.storage.update_job(job_id, failure_comment="<script>window.pwned=3</script>")
    lab.storage.update_device("qemu01", description="<script>window.pwned=4</script>")
    lab.storage.update_worker("worker1", description="<script>window.pwned=5</script>")
    client = Client(lab)
    page = client.get("/jobs/%d" % job_id).text
    for raw in ("<script>window.pwned", "<img src=x", "<b>pass</b>", "<i>", "<u>1</u>"):
        assert raw not in page, raw
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt; &#34;quoted&#34; &#39;single&#39;" \
        " &amp;amp; &lt;b&gt;" in page
    assert "&lt;script&gt;window.pwned=2&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;window.pwned=3" in page
    # Only the http(s) reference is a link; the others are text.
    links = re.findall(r'href="([^"]*)"', page)
    assert "https://ci.example/run?a=1&amp;b=2" in links
    assert not [link for link in links if not link.startswith(("/", "#", "https://ci."))]
    assert "javascript:alert(document.cookie)" in page and "JaVaScRiPt:alert(1)" in page
    for path in ("/jobs", "/", "/devices/qemu01", "/workers/worker1", "/devices", "/queue"):
        text = client.get(path).text
        assert "<script>window" not in text and "<b>" not in text, path
    assert "&lt;script&gt;window.pwned=4" in client.get("/devices/qemu01").text
    assert "&lt;script&gt;window.pwned=5" in client.get("/workers/worker1").text
    # The follow endpoint hands lines over as JSON data (the script sets them as text).
    answer = client.get("/jobs/%d/log?start=0" % job_id)
    assert answer.header("Content-Type") == "application/json"
    assert answer.header("X-Content-Type-Options") == "nosniff"
    assert json.loads(answer.body)["lines"][0]["msg"] == HOSTILE_LINE
    # What a visitor puts in an address comes back escaped.
    echoed = client.get("/jobs?submitter=%22%3E%3Cscript%3Ex%3C/script%3E").text
    assert "<script>x" not in echoed and 'value="&#34;&gt;&lt;script&gt;x' in echoed
    missing = client.get("/jobs/%d/%%3Cscript%%3E" % job_id).text
    assert "<script>" not in missing.replace('<script src="', "")
    assert client.get("/login?next=javascript:alert(1)").text.count(
        'name="next" value="/"') == 1


# -- permissions ------------------------------------------------------------------------------

def test_a_private_job_is_seen_by_whom_the_api_shows_it_to(api):
    lab = api(devices=DEVICES)
    admin = lab.rpc("admin")
    admin.auth.groups.add("bbb-team")
    admin.auth.users.add("dora")
    admin.auth.users.groups.add("dora", "bbb-team")
    admin.scheduler.device_types.perms_add("bbb", "bbb-team", "view_devicetype")
    public = lab.submit(user="bob")
    private = lab.submit(_personal(job_yaml(name="alice's secret")), user="alice")
    hidden_type = lab.submit(job_yaml(device_type="bbb", name="bbb job"), user="dora")
    anonymous, bob, alice, dora = Client(lab), Client(lab), Client(lab), Client(lab)
    bob.login("bob")
    alice.login("alice")
    dora.login("dora")
    for client in (anonymous, bob):
        assert client.get("/jobs/%d" % private).status == 404
        assert client.get("/jobs/%d/log?start=0" % private).status == 404
        assert client.get("/jobs/%d/output.yaml" % private).status == 404
        listing = client.get("/jobs")
        assert private not in listing.job_ids() and public in listing.job_ids()
        assert "alice&#39;s secret" not in listing.text
        assert client.get("/jobs/%d" % hidden_type).status == 404
        assert client.get("/devices/bbb01").status == 404
        assert "bbb01" not in client.get("/devices").text
        assert "bbb01" not in client.get("/workers/worker1").text
        assert "bbb job" not in client.get("/queue").text
    assert "alice&#39;s secret" in alice.get("/jobs/%d" % private).text
    assert alice.get("/jobs/%d/output.yaml" % private).status == 200
    assert private in alice.get("/jobs").job_ids()
    assert dora.get("/devices/bbb01").status == 200
    assert hidden_type in dora.get("/jobs").job_ids() and "bbb job" in dora.get("/queue").text
    assert "bbb01" in dora.get("/workers/worker1").text
    # The same answers as the API's.
    status, _, _ = lab.http("GET", "/api/v1/jobs/%d/" % private, user="bob")
    assert status == 404
    # Basic credentials work on the pages too, as on the API; wrong ones are refused.
    status, _, body = lab.http("GET", "/jobs/%d" % private, user="alice",
                               headers={"Accept": "text/html"})
    assert status == 200 and b"alice&#39;s secret" in body
    assert lab.http("GET", "/jobs", user="alice", token="wrong")[0] == 401


# -- sessions -------------------------------------------------------------------------------

def test_a_session_lasts_only_while_its_token_and_user_are_good(api):
    lab = api()
    private = lab.submit(_personal(job_yaml()), user="alice")
    client = Client(lab)
    wrong = client.post("/login", {"csrf": client.get("/login").csrf(), "username": "alice",
                                   "token": "nope", "next": "/"})
    assert wrong.status == 401 and "Login failed" in wrong.text
    assert session.SESSION_COOKIE not in client.jar
    answer = client.login("alice")
    assert answer.header("Location") == "/"
    cookie = [c for c in answer.cookies() if c.startswith(session.SESSION_COOKIE)][0]
    attributes = [part.strip() for part in cookie.split(";")]
    # Lax: a link from another site (a CI dashboard, a mail) opens the page logged in.
    assert {"HttpOnly", "SameSite=Lax", "Path=/"} <= set(attributes)
    assert "Secure" not in attributes
    csrf = [c for c in Client(lab).get("/login").cookies()
            if c.startswith(session.CSRF_COOKIE)][0]
    assert {"HttpOnly", "SameSite=Lax", "Path=/"} <= {p.strip() for p in csrf.split(";")}
    assert 0 < int([a for a in attributes if a.startswith("Max-Age=")][0][8:]) <= 12 * 3600
    assert client.get("/jobs/%d" % private).status == 200
    assert '<span class="user" id="user">alice</span>' in client.get("/").text
    value = client.jar[session.SESSION_COOKIE]

    # Signed with a secret in the database: another process's storage checks it too.
    from lavacore import plugins
    from lavacore.master import open_storage

    other = open_storage(lab.config, plugins.build(lab.config))
    try:
        assert session.Sessions(other).user([value], time.time()) == "alice"
        tampered = value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]
        assert session.Sessions(other).user([tampered], time.time()) is None
    finally:
        other.close()
    client.jar[session.SESSION_COOKIE] = value[:10] + value[11:]
    assert client.get("/jobs/%d" % private).status == 404
    assert session.SESSION_COOKIE not in client.jar  # a bad session cookie is removed

    # Revoked token: the session ends with it.
    client.jar[session.SESSION_COOKIE] = value
    token_id = lab.storage.list_tokens("alice")[0]["id"]
    lab.storage.delete_token(token_id)
    assert client.get("/jobs/%d" % private).status == 404
    # Expired token.
    lab.tokens.pop("alice")
    client.login("alice")
    assert client.get("/jobs/%d" % private).status == 200
    lab.storage._execute("UPDATE tokens SET expires = ? WHERE username = 'alice'",
                         (time.time() - 1,))
    assert client.get("/jobs/%d" % private).status == 404
    # Inactive user.
    lab.tokens.pop("alice")
    lab.storage._execute("UPDATE tokens SET expires = NULL WHERE username = 'alice'")
    client.login("alice")
    lab.storage.update_user("alice", is_active=False)
    assert client.get("/jobs/%d" % private).status == 404
    lab.storage.update_user("alice", is_active=True)
    # Logging out ends the session, also for a copy of its cookie.
    client.login("alice")
    copy = client.jar[session.SESSION_COOKIE]
    logout = client.post("/logout", {"csrf": client.get("/").csrf()})
    assert logout.status == 303 and session.SESSION_COOKIE not in client.jar
    client.jar[session.SESSION_COOKIE] = copy
    assert client.get("/jobs/%d" % private).status == 404


def test_failed_logins_are_throttled_like_the_api(api):
    lab = api(api="max_auth_failures = 3")
    client = Client(lab)
    for _ in range(3):
        answer = client.post("/login", {"csrf": client.get("/login").csrf(),
                                        "username": "alice", "token": "wrong"})
        assert "Login failed" in answer.text
    lab.token("alice")
    answer = client.post("/login", {"csrf": client.get("/login").csrf(), "username": "alice",
                                    "token": lab.token("alice")})
    # What the API answers too (README, "Hostile input"): 429 and when to come back.
    assert answer.status == 429 and "Too many failed logins" in answer.text
    assert 1 <= int(answer.header("Retry-After")) <= 61
    assert session.SESSION_COOKIE not in client.jar


# -- CSRF -------------------------------------------------------------------------------

def test_cancel_from_the_page_needs_the_csrf_token_and_the_right(api):
    lab = api()
    job_id = lab.submit(user="alice")
    alice, bob, anonymous = Client(lab), Client(lab), Client(lab)
    alice.login("alice")
    bob.login("bob")
    page = alice.get("/jobs/%d" % job_id)
    assert 'id="cancel"' in page.text and 'id="cancel"' not in bob.get(
        "/jobs/%d" % job_id).text
    token = page.csrf()
    path = "/jobs/%d/cancel" % job_id
    for form, headers in (({}, None), ({"csrf": "x" * 43}, None),
                          ({"csrf": bob.get("/").csrf()}, None),
                          ({"csrf": token}, {"Origin": "http://evil.example"})):
        refused = alice.post(path, form, headers=headers)
        assert refused.status == 403, (form, headers)
    json_form = alice.request("POST", path, headers={"Content-Type": "application/json"})
    assert json_form.status == 400
    assert lab.job(job_id).state == JobState.SUBMITTED
    assert bob.post(path, {"csrf": bob.get("/").csrf()}).status == 403
    assert anonymous.post(path, {"csrf": anonymous.get("/login").csrf()}).status == 401
    assert alice.post("/logout", {}).status == 403
    assert alice.post("/login", {"username": "alice", "token": lab.token("alice")}).status == 403
    assert lab.job(job_id).state == JobState.SUBMITTED
    done = alice.post(path, {"csrf": token},
                      headers={"Origin": lab.url, "Host": lab.url.split("//")[1]})
    assert done.status == 303 and done.header("Location") == "/jobs/%d" % job_id
    job = lab.job(job_id)
    assert (job.state, job.health) == (JobState.FINISHED, JobHealth.CANCELED)


# -- the job list -----------------------------------------------------------------------------

def test_job_list_filters_and_pages_by_key(api):
    lab = api(devices=DEVICES)
    specs = []
    for i in range(130):
        state, health = [(JobState.FINISHED, JobHealth.COMPLETE),
                         (JobState.FINISHED, JobHealth.INCOMPLETE),
                         (JobState.SUBMITTED, JobHealth.UNKNOWN)][i % 3]
        specs.append((state, health, ("qemu", "bbb")[i % 2], ("alice", "bob")[i % 5 == 0]))
    ids = insert_jobs(lab, specs)
    client = Client(lab)
    seen, path = [], "/jobs"
    while path:
        page = client.get(path)
        assert page.status == 200, page.text[:1000]
        seen.extend(page.job_ids())
        found = re.search(r'href="([^"]+)" id="page-older"', page.text)
        path = found.group(1).replace("&amp;", "&") if found else None
    assert seen == sorted(ids, reverse=True)
    first = client.get("/jobs")
    assert "130 jobs" in first.text and 'id="page-newer"' not in first.text
    second = client.get("/jobs?before=%d" % first.job_ids()[-1])
    newer = re.search(r'href="([^"]+)" id="page-newer"', second.text).group(1)
    assert client.get(newer.replace("&amp;", "&")).job_ids() == first.job_ids()
    assert client.get("/jobs?after=0").job_ids() == sorted(ids)[:50][::-1]
    expected = {
        "state=Submitted": lambda s: s[0] == JobState.SUBMITTED,
        "health=Incomplete": lambda s: s[1] == JobHealth.INCOMPLETE,
        "device_type=bbb": lambda s: s[2] == "bbb",
        "submitter=bob": lambda s: s[3] == "bob",
        "state=Finished&health=Complete&device_type=qemu&submitter=alice":
            lambda s: s[:4] == (JobState.FINISHED, JobHealth.COMPLETE, "qemu", "alice"),
    }
    for query, keep in expected.items():
        wanted = [i for i, spec in zip(ids, specs) if keep(spec)]
        page = client.get("/jobs?limit=200&" + query)
        assert page.job_ids() == sorted(wanted, reverse=True), query
        assert "%d job" % len(wanted) in page.text
    # Bad filters: a one-line answer naming the parameter.
    for query, word in (("state=Nope", "state"), ("limit=5000", "limit"),
                        ("before=x", "before"), ("device_type=../x", "device_type")):
        page = client.get("/jobs?" + query)
        assert page.status == 400 and word in re.search(
            r'id="problem">([^<]*)<', page.text).group(1), query


def test_counts_stop_at_the_cap(api, monkeypatch):
    from lavacore.web import pages

    monkeypatch.setattr(pages, "COUNT_CAP", 20)
    lab = api()
    insert_jobs(lab, [(JobState.SUBMITTED, JobHealth.UNKNOWN, "qemu", "alice")] * 30)
    page = Client(lab).get("/jobs")
    assert "More than 20 jobs" in page.text and len(page.job_ids()) == 30


# -- the job page and its log -----------------------------------------------------------------

def test_a_big_log_is_shown_a_window_at_a_time(api):
    lab = api()
    worker = lab.worker()
    job_id = lab.submit()
    run_job(lab, worker, job_id, [make_line("info", "line %d" % i) for i in range(1, 1201)])
    total = 1201  # and the lava/job result line
    client = Client(lab)
    page = client.get("/jobs/%d" % job_id).text
    numbers = [int(n) for n in re.findall(r'<div class="line lvl-\w+" id="L(\d+)"', page)]
    assert numbers == list(range(total - 499, total + 1))
    assert 'data-follow="0"' in page  # finished: nothing to follow
    assert 'lines <span id="log-from">%d</span>–<span id="log-to">%d</span> of' % (
        total - 499, total) in page
    first = client.get("/jobs/%d?log_start=0" % job_id).text
    numbers = [int(n) for n in re.findall(r'id="L(\d+)"', first)]
    assert numbers == list(range(1, 501)) and ">line 1<" in first
    assert 'id="log-next"' in first and 'id="log-previous"' not in first
    middle = client.get("/jobs/%d?log_start=600" % job_id).text
    assert re.findall(r'id="L(\d+)"', middle)[0] == "601"
    data = json.loads(client.get("/jobs/%d/log?start=1190" % job_id).body)
    assert [line["msg"] for line in data["lines"][:2]] == ["line 1191", "line 1192"]
    assert data["next"] == total and data["finished"] and data["total"] == total
    assert json.loads(client.get("/jobs/%d/log?start=9999" % job_id).body)["lines"] == []
    assert client.get("/jobs/%d/log?start=-1" % job_id).status == 400
    assert client.get("/jobs/%d?log_start=x" % job_id).status == 400
    # The whole log to download, as LAVA's output.yaml, also at LAVA's address.
    assert 'href="/jobs/%d/output.yaml"' % job_id in page
    download = client.get("/jobs/%d/output.yaml" % job_id)
    assert download.status == 200
    assert download.header("Content-Disposition") == \
        'attachment; filename="job-%d-output.yaml"' % job_id
    entries = yaml.safe_load(download.body)
    assert len(entries) == total and entries[0]["msg"] == "line 1"
    assert entries[-1]["lvl"] == "results"
    head = client.request("HEAD", "/jobs/%d/output.yaml" % job_id)
    assert head.status == 200 and head.body == b""
    assert int(head.header("Content-Length")) == len(download.body)
    moved = client.get("/scheduler/job/%d/log_file/plain" % job_id)
    assert moved.status == 301
    assert moved.header("Location") == "/jobs/%d/output.yaml" % job_id
    queued = lab.submit()
    empty = client.get("/jobs/%d/output.yaml" % queued)
    assert empty.status == 200 and empty.body == b""


def test_log_view_indexes_a_growing_log_and_a_replaced_one(tmp_path, monkeypatch):
    monkeypatch.setattr(logview, "CHUNK", 4096)
    monkeypatch.setattr(logview, "INLINE_SCAN", 8192)
    path = tmp_path / "output.yaml"

    def lines(start, count, width=40):
        return "".join("- %s\n" % make_line("info", "%d %s" % (n, "x" * width))
                       for n in range(start, start + count))

    path.write_text(lines(0, 3000) + '- {"lvl": "info", "msg": "par')  # a partial line
    view = logview.LogView()
    assert view.count(str(path)) == 3000
    window, total = view.read(str(path), 2990, 50)
    assert total == 3000 and [w["msg"].split()[0] for w in window] == [
        str(n) for n in range(2990, 3000)]
    with open(path, "a") as handle:
        handle.write('tial"}\n' + lines(3001, 10))
    assert view.count(str(path)) == 3011
    assert view.read(str(path), 3000, 2)[0][0]["msg"] == "partial"
    # A line longer than a chunk, then more lines.
    with open(path, "a") as handle:
        handle.write(lines(3011, 1, width=20000) + lines(3012, 5))
    window, total = view.read(str(path), 3010, 10)
    assert total == 3017 and len(window[1]["msg"]) > 16000 and window[-1]["msg"].startswith(
        "3016 ")
    assert window[1]["msg"].endswith("more characters)")
    # Bounded by bytes too.
    assert len(view.read(str(path), 0, 3000, max_bytes=10000)[0]) < 200
    # Replaced by another file (the worker's copy): read from its own start.
    replacement = tmp_path / "new.yaml"
    replacement.write_text(lines(100, 5))
    replacement.replace(path)
    assert view.count(str(path)) == 5
    assert view.read(str(path), 0, 1)[0][0]["msg"].startswith("100 ")
    assert view.count(str(tmp_path / "none.yaml")) == 0


# -- devices, workers, queue ------------------------------------------------------------------

def test_device_worker_and_queue_pages(api):
    lab = api(devices=DEVICES)
    lab.master.flow.set_worker_health("worker1", lab.storage.get_worker("worker1").health,
                                      "admin", "check")
    from lavacore import health

    health.set_device_health(lab.master, "qemu01", DeviceHealth.MAINTENANCE, "admin",
                             "cable <loose>")
    low = lab.submit(priority="low", name="low one")
    high = lab.submit(priority="high", name="high one")
    other = lab.submit(job_yaml(device_type="bbb", name="bbb one"))
    client = Client(lab)
    device = client.get("/devices/qemu01").text
    assert "cable &lt;loose&gt;" in device and "Maintenance" in device
    assert "{% extends" in device  # its dictionary
    worker = client.get("/workers/worker1").text
    assert "qemu01" in worker and "bbb01" in worker
    queue = client.get("/queue").text
    assert "3 jobs waiting" in queue
    qemu = queue.split('data-type="qemu"')[1]
    assert qemu.index("high one") < qemu.index("low one")
    assert "bbb one" in queue.split('data-type="bbb"')[1]
    single = client.get("/queue?device_type=qemu")
    assert single.job_ids() == [high, low] and other not in single.job_ids()
    listing = client.get("/devices?health=Maintenance").text
    assert "qemu01" in listing and "bbb01" not in listing
    assert "qemu01" in client.get("/devices?worker=worker1").text
    assert client.get("/devices/nosuch").status == 404
    assert client.get("/workers/nosuch").status == 404


def test_the_page_of_a_multinode_sub_job(api):
    lab = api(devices=(("qemu01", "qemu", "worker1", ()), ("qemu02", "qemu", "worker1", ())))
    from test_multinode import group_yaml

    ids = lab.submit(group_yaml({"a": (1, "qemu", {}), "b": (1, "qemu", {})}))
    page = Client(lab).get("/jobs/%d.1" % ids[0])
    assert page.status == 200 and 'id="group"' in page.text
    assert "/jobs/%d.0" % ids[0] in page.text


# -- redirects --------------------------------------------------------------------------------

def test_login_goes_back_to_any_address_as_an_ascii_location(api):
    lab = api()
    insert_jobs(lab, [(JobState.SUBMITTED, JobHealth.UNKNOWN, "qemu", "Łukasz"),
                      (JobState.SUBMITTED, JobHealth.UNKNOWN, "qemu", "alice")])
    client = Client(lab)
    for target, location in (
            ("/jobs?submitter=Łukasz", "/jobs?submitter=%C5%81ukasz"),
            ("/é", "/%C3%A9"),
            ("/jobs?submitter=a b&x=\"<>`", "/jobs?submitter=a%20b&x=%22%3C%3E%60"),
            ("/jobs?submitter=%C5%81ukasz", "/jobs?submitter=%C5%81ukasz")):
        answer = client.post("/login", {"csrf": client.get("/login").csrf(),
                                        "username": "alice", "token": lab.token("alice"),
                                        "next": target})
        assert (answer.status, answer.header("Location")) == (303, location), target
    # Where it leads: the list of Łukasz's jobs, the filter showing his name.
    page = client.get("/jobs?submitter=%C5%81ukasz")
    assert page.status == 200 and len(page.job_ids()) == 1
    assert 'id="f-submitter" value="Łukasz"' in page.text
    # The login link of a page whose address a client sent with raw UTF-8 bytes.
    raw = in_thread(_raw_bytes, lab.url, b"GET /jobs?submitter=\xc5\x81ukasz HTTP/1.1\r\n"
                    b"Host: lab\r\nAccept: text/html\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    assert b'href="/login?next=%2Fjobs%3Fsubmitter%3D%25C5%2581ukasz"' in raw


def _raw_bytes(url, data):
    import socket

    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk


# -- behind a reverse proxy -------------------------------------------------------------------

def test_behind_a_proxy_that_does_not_keep_host_with_public_url(api):
    lab = api(api='public_url = "https://lava.example.org"')
    private = lab.submit(_personal(job_yaml()), user="alice")
    client = Client(lab)
    # The proxy sends Host: 127.0.0.1:PORT (what http.client sends); the browser, the
    # Origin of the address it shows.
    proxied = {"Origin": "https://lava.example.org"}
    page = client.get("/login")
    assert page.cookies() and all("; Secure" in c for c in page.cookies())
    answer = client.post("/login", {"csrf": page.csrf(), "username": "alice",
                                    "token": lab.token("alice"), "next": "/"},
                         headers=proxied)
    assert answer.status == 303, answer.text[:500]
    assert [c for c in answer.cookies() if c.startswith(session.SESSION_COOKIE)][0] \
        .endswith("; Secure")
    job_page = client.get("/jobs/%d" % private)
    assert job_page.status == 200
    token = job_page.csrf()
    cancel = "/jobs/%d/cancel" % private
    # Any other origin is refused, whatever the X-Forwarded-* headers claim.
    for origin, extra in (("https://evil.example", {}),
                          ("https://evil.example", {"X-Forwarded-Host": "evil.example",
                                                    "X-Forwarded-Proto": "https"}),
                          ("http://lava.example.org", {}),
                          ("https://lava.example.org:8443", {}),
                          ("https://lava.example.org.evil.example", {}),
                          ("null", {})):
        refused = client.post(cancel, {"csrf": token}, headers=dict(extra, Origin=origin))
        assert refused.status == 403 and "another site" in refused.text, origin
    assert lab.job(private).state == JobState.SUBMITTED
    # Straight to the master (its own address) still works.
    done = client.post(cancel, {"csrf": token}, headers={"Origin": lab.url})
    assert done.status == 303
    assert lab.job(private).health == JobHealth.CANCELED
    logout = client.post("/logout", {"csrf": client.get("/").csrf()}, headers=proxied)
    assert logout.status == 303 and session.SESSION_COOKIE not in client.jar
    # The REST API's links to the next page use the public address too.
    lab.submit(), lab.submit()
    listing = lab.json("GET", "/api/v1/jobs/?limit=1")
    assert listing["next"].startswith("https://lava.example.org/api/v")


def test_without_public_url_forwarded_headers_change_nothing(api):
    # The proxy's address is another site, and X-Forwarded-Proto (anyone can send it)
    # does not make cookies Secure.
    lab = api()
    client = Client(lab)
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "lava.example.org"}
    page = client.get("/login", headers=forwarded)
    assert page.cookies() and not any("Secure" in c for c in page.cookies())
    refused = client.post("/login", {"csrf": page.csrf(), "username": "alice",
                                     "token": lab.token("alice")},
                          headers=dict(forwarded, Origin="https://lava.example.org"))
    assert refused.status == 403 and session.SESSION_COOKIE not in client.jar


# -- connections --------------------------------------------------------------------------

WAIT = 20  # seconds any awaited answer may take on a loaded machine


def _connect(address, source):
    import gevent.socket

    return gevent.socket.create_connection(address, timeout=WAIT,
                                           source_address=(source, 0))


def _ask(address, source, path, headers=""):
    """The whole answer to one GET that closes its connection (gevent sockets: the
    master in this process keeps serving)."""
    sock = _connect(address, source)
    try:
        sock.sendall(("GET %s HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n%s\r\n"
                      % (path, headers)).encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    finally:
        sock.close()


def _watch(socks):
    """Greenlets reading each socket's first answer: [(index, bytes)] as they come (b""
    for a connection closed without an answer)."""
    import gevent

    seen = []

    def read(index, sock):
        sock.settimeout(None)  # the waits on ``seen`` are bounded; closing ends these
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        seen.append((index, data))

    return seen, [gevent.spawn(read, i, s) for i, s in enumerate(socks)]


def test_slow_clients_from_many_addresses_do_not_shut_out_health_or_pages(api):
    # 9 addresses x 32 connections (the per-address limit) that send part of a request
    # head and wait: more than [api] max_connections.
    lab = api(api="header_timeout = 600\nmax_connections = 256")
    address = lab.master.api.address
    slow = []
    for n in range(9 * 32):
        sock = _connect(address, "127.0.0.%d" % (2 + n // 32))
        sock.sendall(b"GET /jobs HTTP/1.1\r\nHost: lab\r\n")
        slow.append(sock)
    seen, readers = _watch(slow)
    try:
        # Each connection past 256 made room by closing the one that had waited longest.
        wait_for(lambda: len(seen) >= 32, WAIT, "32 connections closed")
        assert sorted(i for i, _ in seen) == list(range(32))
        assert all(data == b"" for _, data in seen)
        # A load balancer's check and a person's page are answered.
        health = _ask(address, "127.0.0.100", "/health")
        assert health.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in health
        page = _ask(address, "127.0.0.101", "/jobs", "Accept: text/html\r\n")
        assert page.startswith(b"HTTP/1.1 200") and b'id="count"' in page
        # The newest slow client is served once its head is whole.
        slow[-1].sendall(b"\r\n")
        wait_for(lambda: any(i == len(slow) - 1 for i, _ in seen), WAIT, "its answer")
        assert dict(seen)[len(slow) - 1].startswith(b"HTTP/1.1 200")
    finally:
        for sock in slow:
            sock.close()
        gevent_joinall(readers)


def test_requests_in_progress_leave_room_for_health(api):
    # 64 requests whose bodies do not come: all connections [api] max_connections allows.
    lab = api(api="max_connections = 64\nmax_client_connections = 8")
    address = lab.master.api.address
    held = []
    for n in range(64):
        sock = _connect(address, "127.0.0.%d" % (2 + n // 8))
        sock.sendall(b"POST /RPC2 HTTP/1.1\r\nHost: lab\r\nContent-Type: text/xml\r\n"
                     b"Content-Length: 1000\r\n\r\n<?xml")
        held.append(sock)
    seen, readers = _watch(held)
    try:
        # All but 8 connections may hold a request in progress: the last 8 are told to
        # come back, and /health still gets in.
        wait_for(lambda: len(seen) >= 8, WAIT, "8 requests refused")
        assert all(data.startswith(b"HTTP/1.1 503") and b"Retry-After: " in data
                   for _, data in seen), seen[:2]
        health = _ask(address, "127.0.0.100", "/health")
        assert health.startswith(b"HTTP/1.1 200"), health[:300]
        busy = _ask(address, "127.0.0.101", "/jobs", "Accept: text/html\r\n")
        assert busy.startswith(b"HTTP/1.1 503") and b"Retry-After: " in busy
    finally:
        for sock in held:
            sock.close()
        gevent_joinall(readers)
    # Once they are gone, pages are served again.
    wait_for(lambda: _ask(address, "127.0.0.101", "/jobs").startswith(b"HTTP/1.1 200"),
             WAIT, "the pages served again")


def gevent_joinall(greenlets):
    import gevent

    gevent.joinall(greenlets, timeout=WAIT)


# -- what bad requests leave in the log ---------------------------------------------------------

def test_bad_requests_are_a_line_each_in_the_log_without_tracebacks(tmp_path, master_process):
    import socket

    master = master_process(api_config(tmp_path))
    port = int(re.search(r"API listening on http://127\.0\.0\.1:(\d+)",
                         master.log_text()).group(1))

    def send(source, data):
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT,
                                      source_address=(source, 0)) as sock:
            sock.sendall(data)
            answer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return answer
                answer += chunk

    headers = "".join("X-Header-%d: %d\r\n" % (i, i) for i in range(101))
    too_many = ("GET /jobs HTTP/1.1\r\nHost: lab\r\n%s\r\n" % headers).encode()
    for _ in range(20):
        assert send("127.0.0.2", too_many).startswith(b"HTTP/1.1 400")
    for _ in range(3):
        assert send("127.0.0.3", b"NOT A REQUEST LINE AT ALL\r\n\r\n").startswith(
            b"HTTP/1.1 400")
    # The log is in order: once 127.0.0.3's lines are there, 127.0.0.2's are too.
    wait_for(lambda: master.log_text().count("client 127.0.0.3:") >= 3, WAIT,
             "the lines about 127.0.0.3")
    text = master.log_text()
    assert "Traceback" not in text and "HTTPException" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if "127.0.0.2" in line]
    # A few lines a minute per peer and kind of fault, each saying what was wrong.
    assert len(lines) == 5, lines
    assert all("client 127.0.0.2: malformed request (got more than 100 headers);"
               " answered 400" in line for line in lines), lines
    # Still serving.
    assert send("127.0.0.4", b"GET /health HTTP/1.1\r\nHost: lab\r\nConnection: close"
                b"\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_an_internal_error_goes_to_the_log_with_its_traceback(api, caplog, capfd):
    import logging

    lab = api()
    server = lab.master.api.server

    def broken(environ, start_response):
        raise RuntimeError("a bug of ours")

    caplog.set_level(logging.INFO, logger="lavacore.api")
    server.application = broken
    for _ in range(8):
        assert _ask(lab.master.api.address, "127.0.0.2", "/jobs").startswith(
            b"HTTP/1.1 500")
    records = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(records) == 5  # at most a few a minute of one kind
    assert all(r.levelname == "ERROR" and r.exc_info and r.exc_info[0] is RuntimeError
               for r in records)
    assert "HTTP GET /jobs from 127.0.0.2: internal error (RuntimeError: a bug of ours)" \
        in records[0].getMessage()
    assert "Traceback" not in capfd.readouterr().err


# -- where it says it listens ---------------------------------------------------------------

def _listening_master(tmp_path, listen):
    from lavacore import config as config_mod
    from lavacore.master import Master

    path = api_config(tmp_path)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace('listen = "127.0.0.1:0"', 'listen = "%s"' % listen, 1))
    return Master(config_mod.load(path)).start()


def _has_ipv6():
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("listen, said", [
    ("*:0", "API listening on http://*:%d (every IPv4 address of this host)"),
    ("[::]:0", "API listening on http://[::]:%d (every IPv6"),
    ("[::1]:0", "API listening on http://[::1]:%d (XML-RPC http://[::1]:%d/RPC2"),
])
def test_the_start_line_says_where_it_listens(tmp_path, caplog, listen, said):
    import logging

    if "::" in listen and not _has_ipv6():
        pytest.skip("no IPv6 on this host")
    caplog.set_level(logging.INFO, logger="lavacore.api")
    master = _listening_master(tmp_path, listen)
    try:
        port = master.api.address[1]
        assert said.replace("%d", str(port)) in caplog.text, caplog.text
        assert "http://127.0.0.1:%d (XML" % port not in caplog.text
        # And the address it gives its own clients reaches it.
        status, _, body = in_thread(_get, master.api.url + "/health")
        assert status == 200
    finally:
        master.stop()


def _get(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=WAIT) as answer:
        return answer.status, dict(answer.headers), answer.read()


# -- methods, references, levels, control characters ------------------------------------------

def test_methods_references_unknown_levels_and_control_characters(api):
    lab = api()
    worker = lab.worker()
    job_id = lab.submit()
    run_job(lab, worker, job_id, [
        make_line("weird", "a line of a level nobody knows"),
        make_line("target", "nul\x00 esc\x1b[31m red\x1b[0m del\x7f csi\x9b"),
        result_line("smoke", "dict-ref", "pass",
                    reference={"url": "https://x.example/", "n": 1}),
        result_line("smoke", "list-ref", "pass", reference=["https://y.example/", 2]),
    ])
    client = Client(lab)
    page = client.get("/jobs/%d" % job_id)
    assert page.status == 200
    # Control characters are shown, never sent raw.
    for raw in ("\x00", "\x1b", "\x7f", "\x9b"):
        assert raw not in page.text, repr(raw)
    assert "nul\u2400 esc\u241b[31m red\u241b[0m del\u2421 csi\\x9b" in page.text
    lines = json.loads(client.get("/jobs/%d/log?start=0" % job_id).body)["lines"]
    assert lines[1]["msg"] == "nul\u2400 esc\u241b[31m red\u241b[0m del\u2421 csi\\x9b"
    # A level it does not know is "other", with its own box to hide it.
    assert 'class="line lvl-other"' in page.text
    assert '<input type="checkbox" data-level="other" checked>' in page.text
    css = client.get("/static/lavacore.css").text
    assert ".log.hide-other .lvl-other" in css
    # A reference that is not a text is shown as JSON, and is no link.
    assert "{&#34;n&#34;: 1, &#34;url&#34;: &#34;https://x.example/&#34;}" in page.text
    assert "[&#34;https://y.example/&#34;, 2]" in page.text
    assert "{&#39;" not in page.text and "[&#39;" not in page.text
    assert "x.example" not in " ".join(re.findall(r'href="([^"]*)"', page.text))
    # What a page answers, it says in Allow: HEAD with GET.
    for method, path, allowed in (("DELETE", "/jobs", "GET, HEAD"),
                                  ("GET", "/logout", "POST"),
                                  ("PUT", "/login", "GET, HEAD, POST"),
                                  ("POST", "/static/job.js", "GET, HEAD")):
        answer = client.request(method, path)
        assert (answer.status, answer.header("Allow")) == (405, allowed), (method, path)
    status, headers, _ = lab.http("DELETE", "/jobs/%d" % job_id)
    assert (status, headers.get("Allow")) == (405, "GET, HEAD")
    assert client.request("POST", "/static/nosuch.js").status == 404
