"""Corpus jobs end to end on ``host`` devices: an in-process master, a real worker
process and the built-in runner. What the runner cannot do ends the job Incomplete
naming the action; what the device type declares as its own runs."""

import os

import pytest

from lavacore.states import JobHealth, JobState
from test_jobschema import CORPUS
from test_multinode_e2e import _host_lab, workers  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(120)


def _corpus(name):
    with open(os.path.join(CORPUS, "valid", name), encoding="utf-8") as handle:
        return handle.read()


def _finished(lab, job_id):
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, timeout=60,
                 what="job %s to finish" % job_id)
    return lab.job(job_id)


def test_host_job_with_deploy_boot_and_test_completes(lab, workers):  # noqa: F811
    lab = _host_lab(lab)
    workers(lab, "worker1")
    job = _finished(lab, lab.submit(_corpus("host-deploy-boot-test.yaml")))
    assert job.health == JobHealth.COMPLETE, job.failure_comment
    results = {(c.suite, c.name): c.result for c in lab.storage.list_testcases(job.id)}
    assert results[("0_host-checks", "shell-works")] == "pass"
    assert results[("0_host-checks", "params")] == "pass"


def test_a_deploy_the_runner_cannot_do_makes_the_job_incomplete(lab, workers):  # noqa: F811
    lab = _host_lab(lab)
    workers(lab, "worker1")
    text = _corpus("host-deploy-boot-test.yaml").replace(
        "- deploy:\n    to: host\n",
        "- deploy:\n    to: tftp\n    kernel:\n      url: http://example.org/bzImage\n")
    job = _finished(lab, lab.submit(text))
    assert job.health == JobHealth.INCOMPLETE
    assert job.error_type == "Job"
    assert "actions[0].deploy: lavacore-run cannot deploy to 'tftp'" in job.failure_comment
    assert lab.storage.list_testcases(job.id) == [] or all(
        c.suite == "lava" for c in lab.storage.list_testcases(job.id))
