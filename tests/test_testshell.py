"""LAVA's test shell helpers in lavacore-run: the runner on its own (real processes, a PULL
socket standing for the master's log socket), then through a real master and worker."""

import os
import subprocess
import sys

import pytest
import yaml

from lavacore.states import JobHealth, JobState
from test_runner import Run
from workerutil import job_yaml, process_gone

pytestmark = pytest.mark.timeout(60)


def test_test_sets_references_and_lavas_signal_lines(tmp_path):
    run = Run(tmp_path, job_yaml([
        "lava-test-case before-set --result pass",
        "lava-test-set start network",
        "lava-test-case ping --result pass",
        "lava-test-case speed --result pass --measurement 3.5 --units MB/s",
        "lava-test-reference datasheet --result pass --reference https://example.org/ds",
        "lava-test-set stop",
        "lava-test-case after-set --shell true",
        "lava-test-set start 'two words'; echo set-rc=$?",
        "lava-test-reference broken --result pass; echo ref-rc=$?",
        "lava-test-event firmware-loaded",
    ]))
    assert run.finish() == 0, run.stderr
    cases = run.cases()
    assert "set" not in cases["before-set"] and "set" not in cases["after-set"]
    assert cases["ping"] == {"definition": "0_smoke", "case": "ping", "result": "pass",
                             "set": "network"}
    assert cases["speed"]["measurement"] == 3.5 and cases["speed"]["units"] == "MB/s"
    assert cases["speed"]["set"] == "network"
    assert cases["datasheet"] == {"definition": "0_smoke", "case": "datasheet",
                                  "result": "pass", "reference": "https://example.org/ds",
                                  "set": "network"}
    assert "broken" not in cases
    targets = run.messages("target")
    for line in ("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=before-set RESULT=pass>",
                 "<LAVA_SIGNAL_TESTSET START network>",
                 "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=speed RESULT=pass UNITS=MB/s"
                 " MEASUREMENT=3.5>",
                 "<LAVA_SIGNAL_TESTREFERENCE datasheet pass https://example.org/ds>",
                 "<LAVA_SIGNAL_TESTSET STOP>", "<LAVA_SIGNAL_STARTTC after-set>",
                 "<LAVA_SIGNAL_ENDTC after-set>", "set-rc=1", "ref-rc=1",
                 "<LAVA_SIGNAL_TESTEVENT firmware-loaded>"):
        assert line in targets, line
    assert "firmware-loaded" in run.messages("event")
    assert any("starting test set network" in m for m in run.messages("info"))


def test_lava_test_raise_ends_the_job_with_a_test_error(tmp_path):
    run = Run(tmp_path, job_yaml(["echo before", "lava-test-raise the board fell over",
                                  "echo after"]))
    assert run.finish() == 1
    result = run.job_result()
    assert (result["result"], result["error_type"]) == ("fail", "Test")
    assert result["error_msg"] == "the board fell over"
    targets = run.messages("target")
    assert "<LAVA_SIGNAL_TESTRAISE the board fell over>" in targets
    assert "before" in targets and "after" not in targets
    assert run.cases("lava")["0_smoke"]["result"] == "fail"


def test_background_processes_start_stop_and_end_with_the_job(tmp_path):
    out = tmp_path / "out"
    pids = out / "lava-test" / "background"
    run = Run(tmp_path, job_yaml([
        "lava-background-process-start ticker --cmd sleep 300",
        "cp %s/ticker.pid ../ticker.first" % pids,
        "lava-background-process-start ticker --cmd sleep 300; echo again-rc=$?",
        "lava-background-process-stop ticker",
        "lava-background-process-stop ticker; echo stop-rc=$?",
        "lava-background-process-start left --cmd 'sleep 301; echo never'",
        "cp %s/left.pid ../left.pid" % pids,
    ]), output_dir=out)
    assert run.finish() == 0, run.stderr
    targets = run.messages("target")
    assert "again-rc=1" in targets and "stop-rc=1" in targets
    stopped = int((out / "lava-test" / "ticker.first").read_text())
    left = int((out / "lava-test" / "left.pid").read_text())
    assert process_gone(stopped)
    assert process_gone(left)  # stopped with the job
    info = run.messages("info")
    assert any("background process ticker started (pid %d)" % stopped in m for m in info)
    assert any("background process ticker stopped" in m for m in info)
    assert any("stopped 1 process group(s) left running" in m for m in info)


def test_the_v1_helpers_lava_dropped_are_refused(tmp_path):
    run = Run(tmp_path, job_yaml([
        "lava-test-case-attach smoke file.txt; echo rc=$?",
        "lava-test-run-attach file.txt; echo rc=$?",
        "lava-test-case-metadata smoke key=value; echo rc=$?",
        "lava-test-case still-works --result pass",
    ]))
    assert run.finish() == 0, run.stderr
    assert run.messages("target").count("rc=127") == 3
    warnings = run.messages("warning")
    for helper in ("lava-test-case-attach", "lava-test-run-attach", "lava-test-case-metadata"):
        assert any(w.startswith("0_smoke: %s (which" % helper) and
                   "removed from LAVA in 2017.12" in w for w in warnings), warnings
    assert run.cases()["still-works"]["result"] == "pass"


def test_multinode_helpers_in_a_single_node_job_say_so(tmp_path):
    run = Run(tmp_path, job_yaml(["lava-send ready; echo rc=$?", "lava-role; echo rc=$?",
                                  "lava-test-case after --result pass"]))
    assert run.finish() == 0, run.stderr
    targets = run.messages("target")
    assert targets.count("rc=1") == 2
    assert "lava-send: this job is not a MultiNode job (no protocols: lava-multinode), so it" \
        " has no group" in targets
    assert run.job_result()["result"] == "pass"
    assert run.cases()["after"]["result"] == "pass"


def _with_install(text, install, extra=None):
    data = yaml.safe_load(text)
    definition = data["actions"][0]["test"]["definitions"][0]
    definition["repository"]["install"] = install
    definition.update(extra or {})
    return yaml.safe_dump(data, sort_keys=False)


def test_install_steps_run_first_and_packages_are_not_installed(tmp_path):
    text = _with_install(job_yaml(["lava-test-case installed --shell test -f built"]),
                         {"deps": ["curl", "ntpdate"], "keys": ["7C751B3F"],
                          "steps": ["touch built", "echo installing"]})
    run = Run(tmp_path, text)
    assert run.finish() == 0, run.stderr
    assert run.cases()["installed"]["result"] == "pass"
    targets = run.messages("target")
    assert targets.index("installing") < targets.index("<LAVA_SIGNAL_STARTTC installed>")
    warnings = run.messages("warning")
    assert any("install: deps: lavacore-run does not install packages on the worker host"
               in w and w.endswith("curl ntpdate") for w in warnings), warnings
    assert any("install: keys:" in w for w in warnings)


def test_skip_install_and_failing_install_steps(tmp_path):
    data = yaml.safe_load(job_yaml(["echo first-ran"], name="first"))
    second = yaml.safe_load(job_yaml(["echo second-ran"], name="second"))
    third = yaml.safe_load(job_yaml(["echo third-ran"], name="third"))
    definitions = data["actions"][0]["test"]["definitions"]
    definitions[0]["repository"]["install"] = {"steps": ["false", "echo not-reached"]}
    definitions.append(second["actions"][0]["test"]["definitions"][0])
    definitions[1]["repository"]["install"] = {"steps": ["false"], "deps": ["curl"]}
    definitions[1]["skip_install"] = ["all"]
    definitions.append(third["actions"][0]["test"]["definitions"][0])
    run = Run(tmp_path, yaml.safe_dump(data, sort_keys=False))
    assert run.finish() == 1
    targets = run.messages("target")
    assert "first-ran" not in targets and "not-reached" not in targets
    assert "second-ran" in targets and "third-ran" in targets
    lava = run.cases("lava")
    assert (lava["0_first"]["result"], lava["1_second"]["result"],
            lava["2_third"]["result"]) == ("fail", "pass", "pass")
    result = run.job_result()
    assert result["error_type"] == "Test"
    assert result["error_msg"] == "the install steps of 0_first failed: their steps did" \
                                  " not run"
    assert any("0_first: install step 1 exited with 1: false" == m
               for m in run.messages("info"))
    assert not any("deps" in w for w in run.messages("warning"))


# -- through a real master and worker ------------------------------------------------------

@pytest.fixture
def host_lab(lab, tmp_path):
    instance = lab(devices=(("host01", "host", "worker1", ()),))
    log = open(tmp_path / "worker1.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lavacore.worker.cli", "--master",
         instance.master.controller.endpoint, "--logs", instance.master.logs.endpoint,
         "--hostname", "worker1", "--work-dir", str(tmp_path / "work"),
         "--runner", "%s -m lavacore.worker.runner" % sys.executable,
         "--hello-retry", "0.2", "--job-check", "0.2", "--poll-timeout", "0.1"],
        stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    yield instance
    proc.terminate()
    proc.wait(10)


def test_sets_and_raise_reach_the_master(host_lab):
    lab = host_lab
    job_id = lab.submit(job_yaml([
        "lava-test-set start boot",
        "lava-test-case console --result pass",
        "lava-test-reference log --result fail --reference https://example.org/log",
        "lava-test-set stop",
        "lava-test-raise kernel panic seen",
        "lava-test-case never --result pass",
    ]))
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, timeout=30,
                 what="the job to finish")
    job = lab.job(job_id)
    assert job.health == JobHealth.INCOMPLETE
    assert job.failure_comment == "Test: kernel panic seen"
    assert not job.infrastructure_error
    cases = {(c.suite, c.name): c for c in lab.storage.list_testcases(job_id)}
    assert yaml.safe_load(cases[("0_smoke", "console")].metadata) == {"set": "boot"}
    assert yaml.safe_load(cases[("0_smoke", "log")].metadata) == {
        "set": "boot", "reference": "https://example.org/log"}
    assert cases[("0_smoke", "log")].result == "fail"
    assert ("0_smoke", "never") not in cases
    assert cases[("lava", "job")].result == "fail"
    device = lab.storage.get_device("host01")
    assert device.health.display == "Good"  # a test error is not the device's fault
    assert os.path.isdir(lab.tmp_path / "work")
