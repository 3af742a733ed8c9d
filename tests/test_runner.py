"""``lavacore-run`` on its own: real processes, a real PULL socket standing for the master's
log socket, job files in tmp_path."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workerutil import PY, job_yaml, process_gone  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLO = os.path.join(ROOT, "examples", "hello.yaml")


class Run:
    """One runner process and the lines it sent, collected while it runs."""

    def __init__(self, tmp_path, job_text=None, job_path=None, device="device_type: host\n",
                 output_dir=None, job_id="17"):
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind("tcp://127.0.0.1:*")
        url = self.pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        if job_path is None:
            job_path = tmp_path / "job.yaml"
            job_path.write_text(job_text)
        (tmp_path / "device.yaml").write_text(device)
        (tmp_path / "dispatcher.yaml").write_text("")
        self.output_dir = str(output_dir or tmp_path / "out")
        self.job_id = job_id
        self.lines = []
        self.proc = subprocess.Popen(
            [PY, "-m", "lavacore.worker.runner",
             "--device=%s" % (tmp_path / "device.yaml"),
             "--dispatcher=%s" % (tmp_path / "dispatcher.yaml"),
             "--output-dir=%s" % self.output_dir, "--job-id=%s" % job_id,
             "--logging-url=%s" % url, str(job_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def pump(self, timeout=0.05):
        if self.pull.poll(int(timeout * 1000)):
            while True:
                try:
                    job_id, line = self.pull.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                assert job_id == self.job_id.encode()
                self.lines.append(json.loads(line))

    def wait_line(self, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if predicate(line):
                    return line
            self.pump()
        raise AssertionError("no matching line within %s s: %s" % (timeout, self.lines[-5:]))

    def finish(self, timeout=30):
        """Collect until the runner exits and its final result arrived; return the rc."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "runner still running after %s s" % timeout
            self.pump()
        self.stderr = self.proc.stderr.read().decode()
        self.proc.stdout.close()
        self.proc.stderr.close()
        while not self.job_result() and time.monotonic() < deadline:
            self.pump()
        self.pull.close(linger=0)
        self.ctx.term()
        return self.proc.returncode

    def job_result(self):
        found = [l["msg"] for l in self.lines if l["lvl"] == "results"
                 and l["msg"]["definition"] == "lava" and l["msg"]["case"] == "job"]
        return found[-1] if found else None

    def cases(self, definition="0_smoke"):
        return {l["msg"]["case"]: l["msg"] for l in self.lines
                if l["lvl"] == "results" and l["msg"]["definition"] == definition}

    def messages(self, lvl):
        return [l["msg"] for l in self.lines if l["lvl"] == lvl]


@pytest.mark.timeout(60)
def test_passing_job_from_the_example(tmp_path):
    run = Run(tmp_path, job_path=HELLO)
    assert run.finish() == 0, run.stderr
    assert run.job_result() == {"definition": "lava", "case": "job", "result": "pass"}
    assert run.lines[-1]["msg"] == run.job_result()  # the final line
    cases = run.cases()
    assert {c["result"] for c in cases.values()} == {"pass"}
    assert set(cases) == {"uname", "tmp-writable", "root-fs-usage", "always-passes"}
    assert isinstance(cases["root-fs-usage"]["measurement"], float)
    assert cases["root-fs-usage"]["units"] == "percent"
    assert run.cases("lava")["0_smoke"]["result"] == "pass"
    assert any(t.startswith("hello from ") for t in run.messages("target"))
    with open(os.path.join(run.output_dir, "description.yaml")) as f:
        description = yaml.safe_load(f)
    assert {"device", "job", "compatibility", "pipeline"} <= set(description)
    assert description["device"]["device_type"] == "host"
    assert all(set(l) == {"dt", "lvl", "msg"} for l in run.lines)


@pytest.mark.timeout(60)
def test_failing_steps_fail_cases_not_the_job(tmp_path):
    run = Run(tmp_path, job_yaml([
        "false",
        "sh -c 'exit 3'",
        "lava-test-case explicit --result fail",
        "lava-test-case shelled --shell false",
        "lava-test-case skipped --result SKIP",
        "lava-test-case nonsense --result maybe",
        "echo still running",
    ]))
    assert run.finish() == 0, run.stderr
    assert run.job_result()["result"] == "pass"
    cases = run.cases()
    assert cases["explicit"]["result"] == "fail"
    assert cases["shelled"]["result"] == "fail"
    assert cases["skipped"]["result"] == "skip"
    assert "nonsense" not in cases
    assert "still running" in run.messages("target")
    info = run.messages("info")
    assert "0_smoke: step 1 exited with 1: false" in info
    assert "0_smoke: step 2 exited with 3: sh -c 'exit 3'" in info
    assert any(m.startswith("0_smoke: steps ended with exit code 0") for m in info)


@pytest.mark.timeout(60)
def test_job_timeout(tmp_path):
    pidfile = tmp_path / "sleep.pid"
    run = Run(tmp_path, job_yaml(["echo before", "sleep 60 & echo $! > %s; wait" % pidfile,
                                  "echo never"], job_seconds=1))
    began = time.monotonic()
    assert run.finish() == 1
    assert time.monotonic() - began < 6
    result = run.job_result()
    assert result["result"] == "fail" and result["error_type"] == "Job"
    assert "job timed out after 1 seconds" in result["error_msg"]
    assert "never" not in run.messages("target")
    assert run.cases("lava")["0_smoke"]["result"] == "fail"
    assert "timed out" in run.stderr
    assert process_gone(int(pidfile.read_text()))


@pytest.mark.timeout(60)
def test_action_timeout(tmp_path):
    run = Run(tmp_path, job_yaml(["sleep 30"], job_seconds=60, action_seconds=1))
    assert run.finish() == 1
    result = run.job_result()
    assert result["error_type"] == "Job"
    assert "lava-test-shell (action 1) timed out after 1 seconds" in result["error_msg"]


@pytest.mark.timeout(60)
def test_binary_garbage(tmp_path):
    run = Run(tmp_path, job_yaml([
        "head -c 200000 /dev/urandom; echo",
        r"printf 'nul\000byte \377\376 bad utf8\n'",
        "lava-test-case after-garbage --result pass",
    ]))
    assert run.finish() == 0, run.stderr
    assert run.job_result()["result"] == "pass"
    assert run.cases()["after-garbage"]["result"] == "pass"
    targets = run.messages("target")
    assert all(isinstance(t, str) for t in targets)
    assert "nul\x00byte \ufffd\ufffd bad utf8" in targets


@pytest.mark.timeout(60)
def test_megabytes_of_output_are_streamed_and_long_lines_split(tmp_path):
    line = "0123456789" * 9 + "abcdefghi"  # 99 characters + newline
    run = Run(tmp_path, job_yaml([
        "yes %s | head -c 5000000" % line,
        "head -c 300000 /dev/zero | tr '\\0' x; echo",
        "lava-test-case done --result pass",
    ]))
    assert run.finish(timeout=50) == 0, run.stderr
    targets = run.messages("target")
    assert sum(1 for t in targets if t == line) == 5000000 // 100
    pieces = [t for t in targets if t and set(t) == {"x"}]
    assert sum(len(p) for p in pieces) == 300000
    assert max(len(p) for p in pieces) == 64 * 1024
    assert run.cases()["done"]["result"] == "pass"
    assert run.job_result()["result"] == "pass"


@pytest.mark.timeout(60)
def test_sigterm_cancels_promptly(tmp_path):
    pidfile = tmp_path / "sleep.pid"
    run = Run(tmp_path, job_yaml(["sleep 60 & echo $! > %s; echo ready; wait" % pidfile]))
    run.wait_line(lambda l: l["lvl"] == "target" and l["msg"] == "ready")
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 1
    assert time.monotonic() - sent < 3
    result = run.job_result()
    assert result["result"] == "fail" and result["error_type"] == "Canceled"
    assert "SIGTERM" in result["error_msg"]
    assert process_gone(int(pidfile.read_text()))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text, expected", [
    ("actions:\n- test: {definitions: [\n", "not valid YAML: line"),
    ("job_name: no actions\n", "actions: expected a non-empty list"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    (job_yaml(["true"]).replace("from: inline", "from: tar"), "'from: tar' is not supported"),
    (job_yaml(["echo a: b"]).replace("'echo a: b'", "echo a: b"), "a step must be a string"),
    (job_yaml(["true"]).replace("seconds: 60", "fortnights: 1"), "timeouts.job: unknown unit"),
])
def test_invalid_job_definition(tmp_path, text, expected):
    run = Run(tmp_path, text)
    assert run.finish() == 1
    result = run.job_result()
    assert result["error_type"] == "Job"
    assert expected in result["error_msg"]
    assert expected in run.stderr


@pytest.mark.timeout(60)
def test_output_dir_that_cannot_be_created_is_an_infrastructure_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run = Run(tmp_path, job_yaml(["true"]), output_dir=blocker / "out")
    assert run.finish() == 1
    result = run.job_result()
    assert result["error_type"] == "Infrastructure"
    assert "cannot create the output dir" in result["error_msg"]


@pytest.mark.timeout(60)
def test_invalid_device_config_is_a_configuration_error(tmp_path):
    run = Run(tmp_path, job_yaml(["true"]), device="device_type: [unclosed\n")
    assert run.finish() == 1
    assert run.job_result()["error_type"] == "Configuration"


# -- deploy and boot: what the runner does and does not do --------------------------------

HOST_DEVICE = """device_type: host
hostname: host01
actions:
  deploy:
    methods:
      host:
        lavacore-run: true
  boot:
    methods:
      host:
        lavacore-run: true
"""
CORPUS_HOST_JOB = os.path.join(ROOT, "tests", "jobs", "valid", "host-deploy-boot-test.yaml")


def _with_actions(text, *actions):
    """The job ``text`` with ``actions`` (YAML list items) before its test action."""
    return text.replace("actions:\n", "actions:\n" + "".join(actions), 1)


@pytest.mark.timeout(60)
def test_own_deploy_and_boot_methods_of_the_device_type_run(tmp_path):
    run = Run(tmp_path, job_path=CORPUS_HOST_JOB, device=HOST_DEVICE)
    assert run.finish() == 0, run.stderr
    assert run.job_result()["result"] == "pass"
    info = run.messages("info")
    assert any(m.startswith("start: 1 deploy to host (lavacore-run's own method") for m in info)
    assert any(m.startswith("start: 2 boot with host") for m in info)
    assert any(m.startswith("start: 3 lava-test-shell") for m in info)
    assert {c["result"] for c in run.cases("0_host-checks").values()} == {"pass"}
    assert set(run.cases("0_host-checks")) == {"shell-works", "params"}
    with open(os.path.join(run.output_dir, "description.yaml")) as f:
        pipeline = yaml.safe_load(f)["pipeline"]
    assert [(p["level"], p["name"]) for p in pipeline] == [
        ("1", "host-deploy"), ("2", "host-boot"), ("3", "lava-test-shell")]
    assert pipeline[2]["timeout"] == 120  # timeouts.actions.lava-test-shell: 2 minutes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device, actions, expected", [
    # A device type that does not declare host as the runner's own.
    ("device_type: host\n", (), "actions[0].deploy: lavacore-run cannot deploy to 'host':"
                                " device type host does not declare it as lavacore-run's own"),
    (HOST_DEVICE, ("- deploy:\n    to: tftp\n    kernel: {url: http://example.org/k}\n",),
     "actions[0].deploy: lavacore-run cannot deploy to 'tftp': device type host does not"
     " declare it as lavacore-run's own (its own deploy methods: host)"),
    (HOST_DEVICE, ("- boot:\n    method: u-boot\n    commands: nfs\n",),
     "actions[0].boot: lavacore-run cannot boot with 'u-boot'"),
    (HOST_DEVICE, ("- command:\n    name: pdu_reboot\n",),
     "actions[0].command: lavacore-run cannot run command 'pdu_reboot'"),
])
def test_an_action_the_runner_cannot_perform_fails_the_job_before_anything_runs(
        tmp_path, device, actions, expected):
    if actions:
        text = _with_actions(job_yaml(["lava-test-case ran --result pass"]), *actions)
    else:
        with open(CORPUS_HOST_JOB) as handle:
            text = handle.read()
    run = Run(tmp_path, text, device=device)
    assert run.finish() == 1
    result = run.job_result()
    assert result["result"] == "fail" and result["error_type"] == "Job"
    assert result["error_msg"].startswith(expected), result["error_msg"]
    assert run.messages("target") == [] and run.cases() == {}


@pytest.mark.timeout(60)
def test_a_misspelled_steps_key_is_an_error_not_an_empty_pass(tmp_path):
    text = job_yaml(["lava-test-case ran --result pass"]).replace("steps:", "stepz:")
    run = Run(tmp_path, text)
    assert run.finish() == 1
    assert run.job_result()["error_msg"] == (
        "actions[0].test.definitions[0].repository.run: unknown key 'stepz' (the only one"
        " is 'steps')")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["job actions", "job retry", "device actions"])
def test_named_action_timeouts_are_honoured(tmp_path, where):
    text = job_yaml(["sleep 30"], job_seconds=60)
    device = "device_type: host\n"
    one_second = "    %s:\n      seconds: 1\n"
    if where == "job actions":
        text = text.replace("timeouts:\n", "timeouts:\n  actions:\n" +
                            one_second % "lava-test-shell")
    elif where == "job retry":
        text = text.replace("timeouts:\n", "timeouts:\n  action:\n    minutes: 5\n"
                            "  actions:\n" + one_second % "lava-test-retry")
    else:
        device += "timeouts:\n  actions:\n" + one_second % "lava-test-shell"
    run = Run(tmp_path, text, device=device)
    assert run.finish() == 1
    assert "lava-test-shell (action 1) timed out after 1 seconds" in \
        run.job_result()["error_msg"]


@pytest.mark.timeout(60)
def test_a_timeout_with_skip_goes_on_to_the_next_action(tmp_path):
    text = job_yaml(["sleep 30"], job_seconds=60)
    text = text.replace("- test:\n", "- test:\n    timeout:\n      seconds: 1\n"
                        "      skip: true\n", 1)
    text += yaml.safe_dump([{"test": {"definitions": [{
        "from": "inline", "name": "after", "path": "inline/after.yaml",
        "repository": {"metadata": {"name": "after"},
                       "run": {"steps": ["lava-test-case after-skip --result pass"]}}}]}}])
    run = Run(tmp_path, text)
    assert run.finish() == 0, run.stderr
    assert run.job_result()["result"] == "pass"
    assert run.cases("lava")["0_smoke"]["result"] == "fail"
    assert run.cases("1_after")["after-skip"]["result"] == "pass"
    assert any("its timeout has skip" in m for m in run.messages("warning"))
