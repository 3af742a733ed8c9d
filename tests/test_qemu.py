"""A QEMU lab end to end: a real master, lavacore's worker (the lab's local worker, or a
``lavacore worker --lava-run-for qemu`` process), LAVA's lava-run (Debian's
lava-dispatcher) and qemu-system-x86_64 in software emulation, booting Debian's kernel and
a busybox initramfs (scripts/build-qemu-images, built once per session under
build/qemu-images, or $LAVACORE_QEMU_IMAGES).

Four boots in all: the README's job to Complete (with the time to the shell prompt and to
Complete), a canceled job, a kernel that never reaches the prompt, and lava-run crashing
mid-job. Nothing here sleeps for seconds: every wait is on a condition, with a bound.
"""

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import ROOT  # noqa: E402
from lavacore.worker import lavarun, procs  # noqa: E402
from test_e2e import WORKER, Lab  # noqa: E402
from test_lavarun import bridge_pid, lava_run_of, stored  # noqa: E402
from workerutil import PY, wait_until  # noqa: E402

IMAGES = os.environ.get("LAVACORE_QEMU_IMAGES") or os.path.join(ROOT, "build", "qemu-images")
SHIPPED_IMAGES = "/var/lib/lavacore/images"
PROMPT = "lavacore-guest:# "

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("lava-run")
    or not shutil.which("qemu-system-x86_64"),
    reason="needs root, Debian's lava-dispatcher and qemu-system-x86 (see .ci/run)")


@pytest.fixture(scope="session")
def images():
    """The example's images, built (or found up to date) once per session."""
    done = subprocess.run([os.path.join(ROOT, "scripts", "build-qemu-images"), IMAGES],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return IMAGES


def unique_prefix():
    """lava-run's tmp dir is /var/lib/lava/dispatcher/tmp/<prefix><job id>, shared by every
    lab on this machine: each test gets a prefix of its own."""
    return "lavacore-test-%d-%d-" % (os.getpid(), time.monotonic_ns())


def qemu_processes(prefix):
    """Pids of live qemu processes of the jobs of this prefix (their image paths hold it)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            argv = procs.cmdline(int(name))
            if argv and b"qemu-system" in argv[0] and any(prefix.encode() in a
                                                          for a in argv):
                found.append(int(name))
    return found


def guest_job(images, steps, boot_seconds=120, append="console=ttyS0 loglevel=6"):
    """examples/qemu.yaml on these images, with other test steps, boot timeout or kernel
    command line."""
    with open(os.path.join(ROOT, "examples", "qemu.yaml"), encoding="utf-8") as f:
        job = yaml.safe_load(f.read().replace(SHIPPED_IMAGES, images))
    deploy, boot, test = (action[kind] for action, kind in zip(
        job["actions"], ("deploy", "boot", "test")))
    kernel = deploy["images"]["kernel"]
    kernel["image_arg"] = '-kernel {kernel} -append "%s"' % append
    boot["timeout"] = {"seconds": boot_seconds}
    test["definitions"][0]["repository"]["run"]["steps"] = list(steps)
    return yaml.safe_dump(job, sort_keys=False)


def _utc(text):
    return datetime.datetime.fromisoformat(text)


@pytest.mark.timeout(180)
def test_readme_boot_a_real_kernel(tmp_path, master_process, images):
    """README, "Boot a real kernel": `lavacore -c etc/qemu-lab.toml`, `submit
    examples/qemu.yaml`, `jobs logs --follow`, `jobs results`, on copies of the shipped
    files with only the ports (OS-chosen), the API, the tmp dir prefix and the images'
    directory changed."""
    for name in ("etc", "examples"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name)
    config = tmp_path / "etc" / "qemu-lab.toml"
    text = config.read_text()
    text, count = re.subn(r'(?m)^(listen|logs|events) = "tcp://\*:\d+"',
                          r'\1 = "tcp://127.0.0.1:*"', text)
    assert count == 3
    config.write_text(text.replace("[api]\n", "[api]\nenabled = false\n", 1))
    prefix = unique_prefix()
    (tmp_path / "etc" / "qemu-lab.d" / "worker01.yaml").write_text("prefix: %s\n" % prefix)
    example = tmp_path / "examples" / "qemu.yaml"
    assert SHIPPED_IMAGES in example.read_text()
    example.write_text(example.read_text().replace(SHIPPED_IMAGES, images))
    master = master_process(str(config))

    def lavacore(*args, timeout=60):
        # As the README types it, in the directory of the copied files.
        return subprocess.run([PY, "-m", "lavacore.cli", "-c", "etc/qemu-lab.toml", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=timeout)

    submitted_at = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    began = time.monotonic()
    submitted = lavacore("submit", "examples/qemu.yaml")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[0]
    followed = lavacore("jobs", "logs", job_id, "--follow", timeout=150)
    complete_after = time.monotonic() - began
    assert followed.returncode == 0, followed.stderr
    assert followed.stderr.strip().endswith("job %s: Finished, Complete" % job_id), \
        followed.stderr + master.log_text()[-3000:]
    out = followed.stdout
    assert "runs LAVA's lava-run" in out and "Linux version 6." in out
    assert "lavacore guest: Linux" in out and "Job finished correctly" in out

    results = json.loads(lavacore("jobs", "results", job_id, "--json").stdout)
    cases = {(s["name"], c["name"]): c for s in results["suites"] for c in s["tests"]}
    for case in ("kernel-release", "proc-mounted", "memory-total", "uptime"):
        assert cases[("0_guest-smoke", case)]["result"] == "pass", case
    assert cases[("0_guest-smoke", "memory-total")]["unit"] == "kB"
    assert float(cases[("0_guest-smoke", "memory-total")]["measurement"]) > 100000
    assert cases[("lava", "execute-qemu")]["result"] == "pass"
    assert cases[("lava", "job")]["result"] == "pass"

    raw = lavacore("jobs", "logs", job_id, "--raw").stdout.splitlines()
    lines = [yaml.safe_load(line) for line in raw]
    prompt = next(line for line in lines
                  if line["lvl"] == "target" and PROMPT.strip() in str(line["msg"]))
    booted = next(line for line in lines
                  if line["lvl"] == "info" and str(line["msg"]).startswith("Boot command:"))
    assert lines[-1]["lvl"] == "results" and lines[-1]["msg"]["case"] == "job"
    assert not qemu_processes(prefix)
    print("\nQEMU job: submit -> qemu started %.1f s, -> shell prompt %.1f s (guest boot"
          " %.1f s), -> Complete %.1f s; %d log lines"
          % ((_utc(booted["dt"]) - submitted_at).total_seconds(),
             (_utc(prompt["dt"]) - submitted_at).total_seconds(),
             (_utc(prompt["dt"]) - _utc(booted["dt"])).total_seconds(), complete_after,
             len(lines)))


@pytest.fixture
def qemu_lab(tmp_path, master_process):
    """A master process and a `lavacore worker --lava-run-for qemu` process (cancels
    escalated at lava-slave's pace, scaled down) with one `qemu01` device of the shipped
    type. Yields (lab, prefix); qemu processes a failed test left are stopped."""
    labs = []
    prefix = unique_prefix()

    def make():
        lab = Lab(tmp_path, master_process, devices=(("qemu01", "qemu", WORKER, ()),))
        labs.append(lab)
        etc = tmp_path / "etc"
        # The lab's config gave the qemu type a test template: the shipped one back (the
        # master reads templates and worker files at each START).
        shutil.copy(os.path.join(ROOT, "etc", "dispatcher-config", "device-types",
                                 "qemu.jinja2"), etc / "dispatcher-config" / "device-types")
        (etc / "dispatcher.d").mkdir(exist_ok=True)
        (etc / "dispatcher.d" / ("%s.yaml" % WORKER)).write_text("prefix: %s\n" % prefix)
        env = yaml.safe_load((etc / "env.yaml").read_text()) or {}
        # A Python that dies of a signal prints where it was on stderr.
        env.setdefault("overrides", {})["PYTHONFAULTHANDLER"] = "1"
        (etc / "env.yaml").write_text(yaml.safe_dump(env))
        lab.start_worker(extra=["--lava-run-for", "qemu", "--cancel-term-again", "30",
                                "--cancel-kill", "60"])
        return lab

    yield make, prefix
    for lab in labs:
        lab.close()
    for pid in qemu_processes(prefix):
        os.kill(pid, signal.SIGKILL)


def _wait_for_guest_step(lab, job_id, text, timeout=90):
    wait_until(lambda: text in stored(lab, job_id), timeout=timeout,
               what="%r in the job's log" % text)


@pytest.mark.timeout(150)
def test_a_canceled_qemu_job_stops_qemu(qemu_lab, images):
    make, prefix = qemu_lab
    lab = make()
    job_id = lab.submit(guest_job(images, ["echo guest-sleeping", "sleep 600"]))
    _wait_for_guest_step(lab, job_id, "+ sleep 600")
    running = qemu_processes(prefix)
    assert len(running) == 1
    began = time.monotonic()
    assert "Canceling" in lab.cli("jobs", "cancel", str(job_id))
    job = lab.finished(job_id, timeout=60)
    canceled_after = time.monotonic() - began
    assert job["health"] == "Canceled", job
    wait_until(lambda: not qemu_processes(prefix), timeout=10, what="qemu stopped")
    # lava-run canceled the job itself (the worker's first SIGTERM, passed on).
    assert "JobCanceled" in stored(lab, job_id) or "canceled" in job["failure_comment"]
    result = lab.results(job_id)[("lava", "job")]
    assert result["result"] == "fail"
    device = json.loads(lab.quick("devices", "list", "--json"))[0]
    assert device["state"] == "Idle"
    print("\nQEMU job canceled: Finished %.1f s after the cancel" % canceled_after)


@pytest.mark.timeout(150)
def test_a_kernel_that_never_reaches_the_prompt_times_out(qemu_lab, images):
    make, prefix = qemu_lab
    lab = make()
    # The guest's init is `sleep 3600`: the kernel boots, no shell ever comes.
    job_id = lab.submit(guest_job(images, ["true"], boot_seconds=15,
                                  append="console=ttyS0 loglevel=6 rdinit=/bin/sleep -- 3600"))
    job = lab.finished(job_id, timeout=120)
    assert job["health"] == "Incomplete"
    # lava-run's error, as lava-run words it ("wait for prompt timed out", or "login-action
    # timed out after N seconds", whichever of its timers fires first), and in the log.
    comment = job["failure_comment"]
    assert comment.startswith("Job: ") and "timed out" in comment, job
    log = stored(lab, job_id)
    assert "Linux version 6." in log                      # the kernel did boot
    assert '"lvl": "exception", "msg": "%s"' % comment[len("Job: "):] in log
    login = re.search(r'"lvl": "results", "msg": \{"case": "auto-login-action", "definition":'
                      r' "lava", "duration": "([0-9.]+)".*"result": "fail"', log)
    assert login and 14.5 <= float(login.group(1)) <= 20, login   # the boot timeout
    assert ("lava", "job") in lab.results(job_id)
    wait_until(lambda: not qemu_processes(prefix), timeout=10, what="qemu stopped")


@pytest.mark.timeout(150)
def test_lava_run_crashing_mid_job_ends_it_incomplete_with_its_stderr(qemu_lab, images):
    make, prefix = qemu_lab
    lab = make()
    job_id = lab.submit(guest_job(images, ["echo guest-sleeping", "sleep 600"]))
    _wait_for_guest_step(lab, job_id, "+ sleep 600")
    bridge = bridge_pid(lab.work_dir(), job_id)
    lava_run = lava_run_of(bridge)
    assert lava_run and len(qemu_processes(prefix)) == 1
    work_space = os.path.join(lavarun.LAVA_TMP, "%s%d" % (prefix, job_id))
    assert os.path.isdir(work_space)   # lava-run's downloads, which it cannot clean now
    # Killed by a signal it cannot clean up after; Python's fault handler prints where it
    # was on stderr first.
    os.kill(lava_run, signal.SIGSEGV)
    job = lab.finished(job_id, timeout=60)
    assert job["health"] == "Incomplete"
    comment = job["failure_comment"]
    assert comment.startswith("Infrastructure: lava-run was killed by SIGSEGV before it sent"
                              " the job's result; its stderr: "), comment
    assert "Fatal Python error: Segmentation fault" in comment
    assert "Fatal Python error: Segmentation fault" in stored(lab, job_id)
    # Nothing lava-run started outlives it (qemu goes with its console's hang-up, the
    # rest the bridge stops).
    wait_until(lambda: not qemu_processes(prefix), timeout=10, what="qemu stopped")
    wait_until(lambda: procs.cmdline(bridge) == [], timeout=10, what="the bridge gone")
    assert not os.path.exists(work_space)   # removed, as lava-worker would
