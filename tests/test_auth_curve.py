"""The auth_curve plugin: CURVE on the controller and log sockets, per-worker keys that come
and go without a restart, identity binding, and the key-file commands.

Key files are written by ``zmq.auth.create_certificates``: the format LAVA's
``create_certificate.py`` writes and lava-slave ``--encrypt`` reads. The clients below set
up their sockets exactly as lava-slave does (ROUTER, identity = hostname, CONNECT_RID
``master``, curve keys from ``--slave-cert`` and ``--master-cert``).
"""

import importlib.metadata
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import gevent
import pytest
import zmq.green as zmq
from zmq.auth.certs import create_certificates, load_certificate, load_certificates

from lavacore import certs, config as config_mod
from lavacore.config import ConfigError
from lavacore.states import JobHealth, JobState, WorkerState
from scripted import ScriptedWorker
from workerutil import job_yaml

HERE = os.path.dirname(os.path.abspath(__file__))
AUTH = "lavacore.auth_curve"
HOSTS = (("host01", "host", "worker1", ()),)


def _plugin_line():
    """Until setup.py lists auth_curve, load it by module path (never both: pluggy refuses
    a module registered twice)."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="lavacore.plugins")}
    return "" if "auth_curve" in names else \
        '[plugins]\nmodules = ["lavacore_plugins.auth_curve"]\n'


@pytest.fixture
def keys(tmp_path):
    """Key pairs for the master and three workers; worker1 and worker2 allowed."""
    store = tmp_path / "keys"
    allowed = tmp_path / "workers"
    store.mkdir()
    allowed.mkdir()
    for name in ("master", "worker1", "worker2", "stranger", "rack1"):
        create_certificates(str(store), name)
    for name in ("worker1", "worker2"):
        shutil.copy(store / (name + ".key"), allowed)

    class Keys:
        dir = store
        workers = allowed

        @staticmethod
        def pair(name):
            return str(store / (name + ".key_secret"))

        @staticmethod
        def public(name):
            return str(store / (name + ".key"))

    return Keys


def auth_toml(keys, poll=0.2, extra=""):
    return _plugin_line() + (
        '[auth_curve]\nmaster_cert = "%s"\nworkers_certs = "%s"\npoll_interval = %s\n%s'
        % (keys.pair("master"), keys.workers, poll, extra))


@pytest.fixture
def curve_lab(lab, keys):
    def make(poll=0.2, devices=HOSTS):
        instance = lab(devices=devices, extra=auth_toml(keys, poll))
        for hostname, *_ in devices:
            path = instance.tmp_path / "etc/dispatcher-config/devices" / (hostname + ".jinja2")
            path.write_text("{%% extends 'host.jinja2' %%}\n{%% set hostname = '%s' %%}\n"
                            % hostname)
        return instance
    return make


class CurveWorker(ScriptedWorker):
    """A scripted worker whose sockets are set up as lava-slave --encrypt sets them up."""

    def __init__(self, context, url, hostname, keypair, master_public, logs_url=None):
        public, secret = load_certificate(keypair)
        server, _ = load_certificate(master_public)

        def curve(sock):
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = server

        self.hostname = hostname
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.IDENTITY, hostname.encode())
        self.sock.setsockopt(zmq.CONNECT_RID, b"master")
        self.sock.setsockopt(zmq.LINGER, 0)
        curve(self.sock)
        self.sock.connect(url)
        self.held = []
        self.push = None
        if logs_url:
            self.push = context.socket(zmq.PUSH)
            self.push.setsockopt(zmq.LINGER, 0)
            curve(self.push)
            self.push.connect(logs_url)


def curve_worker(lab, keys, hostname, key_name=None, logs=False):
    worker = CurveWorker(lab.context, lab.master.controller.endpoint, hostname,
                         keys.pair(key_name or hostname), keys.public("master"),
                         lab.master.logs.endpoint if logs else None)
    lab.workers.append(worker)
    return worker


def greeted(worker, timeout=10.0):
    """HELLO, and True if HELLO_OK comes back within ``timeout``."""
    worker.send("HELLO", "3")
    try:
        return worker.expect("HELLO_OK", timeout=timeout) == [b"HELLO_OK"]
    except AssertionError:
        return False


def auth_of(lab):
    from lavacore_plugins import auth_curve

    return auth_curve.get(lab.master)


def warnings(caplog):
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.name in (AUTH, "lavacore.logs") and r.levelno >= logging.WARNING)


def worker_process(lab, tmp_path, hostname, keypair, master_public, extra=()):
    log = open(tmp_path / ("%s.log" % hostname), "w")
    return subprocess.Popen(
        [sys.executable, "-m", "lavacore.worker.cli", "--master",
         lab.master.controller.endpoint, "--logs", lab.master.logs.endpoint,
         "--hostname", hostname, "--work-dir", str(tmp_path / ("work-" + hostname)),
         "--runner", "%s -m lavacore.worker.runner" % sys.executable,
         "--hello-retry", "0.2", "--job-check", "0.2", "--poll-timeout", "0.1",
         "--encrypt", "--master-cert", master_public, "--worker-cert", keypair, *extra],
        stdout=subprocess.DEVNULL, stderr=log)


@pytest.fixture
def processes():
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


# -- end to end ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_allowed_worker_runs_a_job_end_to_end_encrypted(curve_lab, keys, tmp_path,
                                                        processes):
    lab = curve_lab()
    events = lab.context.socket(zmq.SUB)  # the events socket stays plaintext (lavacli)
    events.setsockopt(zmq.SUBSCRIBE, b"")
    events.connect(lab.master.events.endpoint)
    processes.append(worker_process(lab, tmp_path, "worker1", keys.pair("worker1"),
                                    keys.public("master")))
    job_id = lab.submit(job_yaml(["lava-test-case secret --result pass"]))
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, timeout=40,
                 what="the job to finish")
    job = lab.job(job_id)
    assert job.health == JobHealth.COMPLETE, job.failure_comment
    cases = {(c.suite, c.name): c.result for c in lab.storage.list_testcases(job_id)}
    # Results travel on the runner's log socket: it is encrypted with the same keys.
    assert cases[("0_smoke", "secret")] == "pass" and cases[("lava", "job")] == "pass"
    assert lab.storage.get_worker("worker1").state == WorkerState.ONLINE
    assert auth_of(lab).service.answered >= 2  # controller + at least one runner socket
    with gevent.Timeout(5):
        assert events.recv_multipart()  # a plaintext subscriber hears the events
    events.close(linger=0)


# -- refusals -----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_unknown_key_and_plaintext_client_are_refused(curve_lab, keys, caplog):
    caplog.set_level(logging.INFO)
    lab = curve_lab(poll=60)
    stranger = curve_worker(lab, keys, "worker1", key_name="stranger")
    assert not greeted(stranger, timeout=0.5)
    plain = lab.worker("worker1", connect=False)  # plaintext, as lava-slave without --encrypt
    assert not greeted(plain, timeout=0.5)
    lab.wait_for(lambda: "plaintext client" in warnings(caplog), what="plaintext logged")
    text = warnings(caplog)
    assert "refused a CURVE handshake from 127.0.0.1 on the controller socket: unknown key %s" \
        % load_certificate(keys.public("stranger"))[0].decode() in text
    assert "refused a connection on the controller socket" in text
    # The allowed key still gets in, and nothing reached the controller from the others.
    assert greeted(curve_worker(lab, keys, "worker1"))
    assert lab.storage.list_workers() and \
        [w.hostname for w in lab.storage.list_workers() if w.state == WorkerState.ONLINE] \
        == ["worker1"]


@pytest.mark.timeout(30)
def test_revoked_key_ends_the_established_session(curve_lab, keys, caplog):
    lab = curve_lab(poll=0.2)
    worker = curve_worker(lab, keys, "worker1", logs=True)
    assert greeted(worker)
    worker.send("PING")
    worker.expect("PONG")
    os.unlink(keys.workers / "worker1.key")
    lab.wait_for(lambda: "worker1" not in auth_of(lab).keys.by_name, timeout=3,
                 what="the poll to see the removal")
    worker.send("PING")  # same TCP connection, handshake long done: still refused
    lab.wait_for(lambda: "refused its traffic" in warnings(caplog), what="the refusal")
    worker.no_reply()
    text = warnings(caplog)
    assert "worker worker1: refused its traffic from key %s: revoked key (worker1.key " \
        "removed from" % load_certificate(keys.public("worker1"))[0].decode() in text
    # A new connection with the revoked key fails at the handshake, naming the reason.
    again = curve_worker(lab, keys, "worker1")
    assert not greeted(again, timeout=0.5)
    assert "refused a CURVE handshake from 127.0.0.1 on the controller socket: revoked key" \
        in warnings(caplog)


@pytest.mark.timeout(30)
def test_sighup_reloads_at_once(curve_lab, keys, caplog):
    lab = curve_lab(poll=60)  # the poll would take a minute: SIGHUP's reload() does not wait
    worker = curve_worker(lab, keys, "worker1")
    assert greeted(worker)
    os.unlink(keys.workers / "worker1.key")
    lab.master.reload()  # what the master's SIGHUP handler calls
    worker.send("PING")
    lab.wait_for(lambda: "refused its traffic" in warnings(caplog), what="the refusal")
    worker.no_reply()
    shutil.copy(keys.public("worker1"), keys.workers)
    lab.master.reload()
    worker.send("PING")
    worker.expect("PONG")


@pytest.mark.timeout(30)
def test_a_key_speaks_only_for_its_own_hostname(curve_lab, keys, caplog):
    lab = curve_lab(poll=60)
    worker1 = curve_worker(lab, keys, "worker1", logs=True)
    assert greeted(worker1)
    job_id = lab.submit(job_yaml(["true"]))
    start = worker1.expect("START")
    assert int(start[1]) == job_id
    worker1.send("START_OK", str(job_id))
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING, what="Running")
    # worker2's key, allowed for worker2, claiming to be worker1: refused, job untouched.
    impostor = curve_worker(lab, keys, "worker1", key_name="worker2", logs=True)
    impostor.end(job_id)
    impostor.log(job_id, '{"dt": "x", "lvl": "results", "msg": {"definition": "lava",'
                         ' "case": "job", "result": "fail"}}')
    worker1.log(job_id, '{"dt": "x", "lvl": "target", "msg": "from the real worker1"}')
    lab.wait_for(lambda: "dropped 1 log line(s)" in warnings(caplog), what="log refusal")
    lab.wait_for(lambda: "bound to another hostname" in warnings(caplog), what="refusal")
    assert lab.job(job_id).state == JobState.RUNNING and lab.job(job_id).result is None
    text = warnings(caplog)
    assert "worker worker1: refused its traffic from key %s: key bound to another hostname " \
        "(worker2.key)" % load_certificate(keys.public("worker2"))[0].decode() in text
    output = lab.job(job_id).output_dir(lab.master.output_root)
    lab.master.logs.flush(job_id)
    with open(os.path.join(output, "output.yaml")) as handle:
        log_text = handle.read()
    assert "from the real worker1" in log_text and '"fail"' not in log_text


@pytest.mark.timeout(40)
def test_real_master_revoke_command_and_sighup(tmp_path, keys, master_process):
    """``lavacore -c config.toml`` as a process: the key file removed by the revoke
    function, SIGHUP, and the worker's established session is refused at once."""
    from conftest import write_config

    path = write_config(tmp_path, devices=HOSTS, extra=auth_toml(keys, poll=60))
    master = master_process(path)
    context = zmq.Context()
    try:
        worker = CurveWorker(context, master.controller, "worker1", keys.pair("worker1"),
                             keys.public("master"))
        assert greeted(worker, timeout=5)
        certs.revoke_worker(config_mod.load(path), "worker1")
        master.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload (SIGHUP)" not in master.log_text():
            assert time.monotonic() < deadline, master.log_text()
            gevent.sleep(0.02)
        worker.send("PING")
        deadline = time.monotonic() + 10
        while "revoked key (worker1.key removed" not in master.log_text():
            assert time.monotonic() < deadline, master.log_text()
            gevent.sleep(0.02)
        worker.no_reply()
        worker.close()
    finally:
        context.destroy(linger=0)
    assert master.stop() == 0


# -- keys added while running ---------------------------------------------------------------

@pytest.mark.timeout(40)
def test_key_added_while_running_is_accepted_without_restart(curve_lab, keys, tmp_path,
                                                             processes, caplog):
    caplog.set_level(logging.INFO)
    lab = curve_lab(poll=60)  # no poll within the test: the handshake re-reads the dir
    create_certificates(str(keys.dir), "worker3")
    proc = worker_process(lab, tmp_path, "worker3", keys.pair("worker3"),
                          keys.public("master"))
    processes.append(proc)
    lab.wait_for(lambda: "unknown key" in warnings(caplog), timeout=10,
                 what="the first refusal")
    config = config_mod.load(lab.config_path)
    added = certs.allow_worker(config, "worker3", keys.public("worker3"))
    assert added.path == str(keys.workers / "worker3.key")
    # The worker comes back on a fresh socket after hello_retry (libzmq never retries a
    # refused handshake); the master re-reads workers_certs for the key it does not know.
    lab.wait_for(lambda: "worker3" in lab.master.controller.seen, timeout=15,
                 what="worker3 online")
    assert lab.storage.get_worker("worker3").state == WorkerState.ONLINE
    assert "picked up at its first handshake" in caplog.text


# -- a site's policy --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site_auth_installed(tmp_path_factory):
    """pip-install the site plugin from tests/authplugins, from a copy (no build litter)."""
    source = tmp_path_factory.mktemp("src") / "site_auth"
    shutil.copytree(os.path.join(HERE, "authplugins", "site_auth"), source)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target),
                    str(source)], check=True, capture_output=True)
    return str(target)


@pytest.mark.timeout(60)
def test_site_plugin_replaces_the_identity_policy(curve_lab, keys, site_auth_installed,
                                                  monkeypatch, caplog):
    shutil.copy(keys.public("rack1"), keys.workers)
    # Without the site plugin: rack1.key speaks for rack1 only.
    lab = curve_lab(poll=60)
    assert not greeted(curve_worker(lab, keys, "rack1-a", key_name="rack1"), timeout=0.5)
    lab.close()
    caplog.clear()

    monkeypatch.syspath_prepend(site_auth_installed)
    lab = curve_lab(poll=60)
    assert lab.master.pm.has_plugin("site_auth")
    assert greeted(curve_worker(lab, keys, "rack1-a", key_name="rack1"))
    assert greeted(curve_worker(lab, keys, "rack1-b", key_name="rack1"))
    assert greeted(curve_worker(lab, keys, "worker1"))  # the default still answers the rest
    assert not greeted(curve_worker(lab, keys, "worker9", key_name="rack1"), timeout=0.5)
    # Revocation wins over any policy.
    rack = curve_worker(lab, keys, "rack1-c", key_name="rack1")
    assert greeted(rack)
    os.unlink(keys.workers / "rack1.key")
    lab.master.reload()
    rack.send("PING")
    lab.wait_for(lambda: "rack1-c: refused its traffic from key" in warnings(caplog),
                 what="the refusal")
    rack.no_reply()


# -- configuration ---------------------------------------------------------------------------

def _load(tmp_path, text):
    path = tmp_path / "auth.toml"
    path.write_text(text)
    return config_mod.load(str(path))


def _parse(tmp_path, text):
    from lavacore_plugins.auth_curve import settings

    return settings.parse(_load(tmp_path, text))


@pytest.mark.timeout(10)
def test_config_errors_name_the_toml_key(tmp_path, keys):
    ok = '[auth_curve]\nmaster_cert = "%s"\nworkers_certs = "%s"\n' % (
        keys.pair("master"), keys.workers)
    parsed = _parse(tmp_path, ok)
    assert parsed.public_key == load_certificate(keys.public("master"))[0].decode()
    assert parsed.poll_interval == 2.0
    assert _parse(tmp_path, "") is None
    assert _parse(tmp_path, ok + "enabled = false\n") is None
    cases = [
        ('[auth_curve]\nmaster_cert = "nope.key_secret"\nworkers_certs = "%s"\n'
         % keys.workers, r"\[auth_curve\] master_cert: no such file .*nope.key_secret"),
        ('[auth_curve]\nmaster_cert = "%s"\nworkers_certs = "%s"\n'
         % (keys.public("master"), keys.workers),
         r"\[auth_curve\] master_cert: .*master.key holds no secret key"),
        ('[auth_curve]\nworkers_certs = "%s"\n' % keys.workers,
         r"\[auth_curve\] master_cert: missing"),
        ('[auth_curve]\nmaster_cert = "%s"\nworkers_certs = "gone"\n' % keys.pair("master"),
         r"\[auth_curve\] workers_certs: no such directory .*gone"),
        (ok + "poll_interval = 0\n", r"\[auth_curve\] poll_interval: expected a number"),
        (ok + "pol_interval = 1\n", r"\[auth_curve\] pol_interval: unknown key"),
    ]
    for text, message in cases:
        with pytest.raises(ConfigError, match=message):
            _parse(tmp_path, text)
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"master_cert: .*garbage.key_secret: not a zmq"):
        _parse(tmp_path, '[auth_curve]\nmaster_cert = "%s"\nworkers_certs = "%s"\n'
               % (garbage, keys.workers))


# -- key files (the command line's functions) ----------------------------------------------

@pytest.mark.timeout(10)
def test_certs_create_allow_revoke(tmp_path, keys):
    made = certs.create_keypair("lab-worker.1", str(tmp_path / "new"))
    secret = made.path + "_secret"
    # zmq.auth reads them (LAVA's lava-slave and lava-master load keys with it).
    public, secret_key = load_certificate(secret)
    assert public.decode() == made.public_key and secret_key
    assert load_certificate(made.path) == (public, None)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    with pytest.raises(certs.CertError, match="already exists"):
        certs.create_keypair("lab-worker.1", str(tmp_path / "new"))
    for bad in ("../x", "a/b", "", "x y"):
        with pytest.raises(certs.CertError, match="invalid key name"):
            certs.create_keypair(bad, str(tmp_path / "new"))

    config = _load(tmp_path, '[auth_curve]\nmaster_cert = "%s"\nworkers_certs = "%s"\n'
                   % (keys.pair("master"), keys.workers))
    added = certs.allow_worker(config, "lab-worker.1", made.path)
    assert added.replaced is None
    assert load_certificates(str(keys.workers))[public] is True
    with pytest.raises(certs.CertError, match="holds a secret key"):
        certs.allow_worker(config, "worker9", secret)
    junk = tmp_path / "junk.key"
    junk.write_text("hello\n")
    with pytest.raises(certs.CertError, match="not a zmq.auth certificate"):
        certs.allow_worker(config, "worker9", str(junk))
    replaced = certs.allow_worker(config, "worker1", made.path)
    assert replaced.replaced == load_certificate(keys.public("worker1"))[0].decode()
    names = [k.name for k in certs.allowed_workers(config)]
    assert names == ["lab-worker.1", "worker1", "worker2"]
    assert not [n for n in os.listdir(keys.workers) if n.startswith(".")]  # no temp left

    gone = certs.revoke_worker(config, "lab-worker.1")
    assert gone.public_key == made.public_key and not os.path.exists(gone.path)
    with pytest.raises(certs.CertError, match="has no key"):
        certs.revoke_worker(config, "lab-worker.1")
    with pytest.raises(certs.CertError, match=r"\[auth_curve\] workers_certs: not set"):
        certs.revoke_worker(_load(tmp_path, ""), "worker1")
