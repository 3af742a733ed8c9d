"""Helpers for the API tests: an in-process master with the HTTP API on an OS-chosen port,
HTTP clients that do not block the gevent loop the master runs in, and lavacli itself.

The master runs on the test's gevent loop; a client that used blocking sockets in the
same thread would stall it. So HTTP calls run in gevent's thread pool (real OS threads
with plain sockets) and lavacli runs as a real subprocess through gevent.subprocess.
"""

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client

import gevent
import gevent.subprocess
import pytest

from conftest import Lab, write_config
from lavacore import tokens

# Tests try many wrong credentials from one address on purpose: throttling has its own test.
API_ON = '[api]\nenabled = true\nlisten = "127.0.0.1:0"\nmax_auth_failures = 1000'


def api_config(tmp_path, api=None, **kwargs):
    """write_config with the API enabled on an OS-chosen port of 127.0.0.1 (``api``: more
    keys of its table, as TOML text)."""
    path = write_config(tmp_path, **kwargs)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert "[api]\nenabled = false" in text
    table = API_ON if api is None else API_ON.split("\nmax_auth_failures")[0] + "\n" + api
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace("[api]\nenabled = false", table))
    return path


class ApiLab(Lab):
    """conftest's Lab with the API enabled; ``url``, ``token(user)``, ``rpc(user)``."""

    def __init__(self, tmp_path, clock=None, **kwargs):
        # No periodic full pass (it resends START) in the middle of a slow lavacli test.
        kwargs["master"] = dict({"schedule_interval": 600}, **kwargs.get("master", {}))
        from lavacore import config as config_mod
        from lavacore.master import Master
        import zmq.green as zmq

        self.tmp_path = tmp_path
        self.config_path = api_config(tmp_path, **kwargs)
        self.config = config_mod.load(self.config_path)
        self.clock = clock
        self.master = Master(self.config, clock=clock).start()
        self.context = zmq.Context()
        self.workers = []
        self.tokens = {}

    @property
    def url(self):
        return self.master.api.url

    def token(self, user="alice"):
        """A token of ``user`` (made a plain user); the user "admin" is a superuser."""
        if user not in self.tokens:
            self.tokens[user] = tokens.create(self.storage, user, "tests", time.time())[1]
            if user == "admin":
                self.storage.update_user(user, is_superuser=True)
        return self.tokens[user]

    def rpc_url(self, user=None, token=None):
        host = self.url.split("://", 1)[1]
        if user is None:
            return "http://%s/RPC2" % host
        return "http://%s:%s@%s/RPC2" % (user, self.token(user) if token is None else token,
                                              host)

    def rpc(self, user=None, token=None):
        return Rpc(self.rpc_url(user, token))

    def http(self, method, path, body=None, user=None, token=None, headers=None):
        """(status, headers, body bytes) of one REST/HTTP request (body: bytes, str or a
        JSON-able value)."""
        send = dict(headers or {})
        if user is not None:
            credentials = "%s:%s" % (user, self.token(user) if token is None else token)
            send["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            send.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode("utf-8")
        return in_thread(_request, method, self.url + path, body, send)

    def json(self, method, path, body=None, user=None, token=None, expect=200):
        status, _, data = self.http(method, path, body, user, token)
        assert status == expect, (status, data[:500])
        return json.loads(data)

    def lavacli(self, *args, user="alice", token=None, timeout=30, anonymous=False):
        uri = self.rpc_url(None if anonymous else user, token)
        return lavacli(uri, *args, timeout=timeout)


def in_thread(fn, *args):
    """Run a blocking call in a real thread while the gevent loop keeps serving; its
    exception, if any, is raised here (and not printed by the thread pool)."""
    def guarded():
        try:
            return True, fn(*args)
        except BaseException as exc:  # handed to the caller
            return False, exc

    ok, value = gevent.get_hub().threadpool.spawn(guarded).get()
    if not ok:
        raise value
    return value


def _request(method, url, body, headers):
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class Rpc:
    """xmlrpc.client.ServerProxy whose calls run in a thread: ``rpc.scheduler.jobs.show(1)``."""

    def __init__(self, url, name=""):
        self._url = url
        self._name = name

    def __getattr__(self, part):
        return Rpc(self._url, "%s.%s" % (self._name, part) if self._name else part)

    def __call__(self, *args):
        def call():
            proxy = xmlrpc.client.ServerProxy(self._url, allow_none=True)
            try:
                return getattr(proxy, self._name)(*args)
            finally:
                proxy("close")()
        return in_thread(call)


def lavacli_command():
    pytest.importorskip("lavacli", reason="lavacli (pip install lavacli==3.1.0) is needed")
    return [sys.executable, "-m", "lavacli"]


def lavacli(uri, *args, timeout=30):
    """Run the real lavacli with ``--uri``; returns a CompletedProcess (text)."""
    env = dict(os.environ, XDG_CONFIG_HOME="/nonexistent", PYTHONUNBUFFERED="1")
    return gevent.subprocess.run(lavacli_command() + ["--uri", uri] + list(args),
                                 capture_output=True, text=True, timeout=timeout, env=env)


def spawn_lavacli(uri, *args):
    """lavacli as a running process (for ``events listen``/``wait``), stdout piped."""
    env = dict(os.environ, XDG_CONFIG_HOME="/nonexistent", PYTHONUNBUFFERED="1")
    return gevent.subprocess.Popen(lavacli_command() + ["--uri", uri] + list(args),
                                   stdout=gevent.subprocess.PIPE,
                                   stderr=gevent.subprocess.PIPE, text=True, env=env)


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        gevent.sleep(0.01)


def run_job(lab, worker, job_id, lines=(), result="pass"):
    """Take ``job_id`` through START, START_OK, log lines, its lava/job result and END."""
    from lavacore.logformat import result_line
    from lavacore.states import JobState

    worker.expect("START")
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING, what="Running")
    for line in lines:
        worker.log(job_id, line)
    worker.log(job_id, result_line("lava", "job", result))
    worker.end(job_id)
    worker.expect("END_OK")
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, what="Finished")


def api_labs(tmp_path):
    """The body of the ``api`` fixture: yields ``make(**write_config kwargs)`` -> a
    running ApiLab; every lab made is closed afterwards."""
    labs = []

    def make(**kwargs):
        instance = ApiLab(tmp_path, **kwargs)
        labs.append(instance)
        return instance

    yield make
    for instance in labs:
        instance.close()
