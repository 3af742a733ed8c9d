"""SIGHUP applies the [[devices]] of config.toml: devices added, changed (a busy device
keeps its type and worker until its job ends), retired when they leave the file (and at
a restart too), their health when the file's changes; a config.toml that does not load
keeps the running one; changes that need a restart are named."""

import logging
import os
import signal
import sys

import pytest

from conftest import job_yaml, run_cli, write_config
from lavacore.logformat import result_line
from lavacore.states import DeviceHealth, DeviceState, JobHealth, JobState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workerutil import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _devices(*entries):
    """[[devices]] tables: (hostname, type, worker, tags, health)."""
    text = ""
    for hostname, device_type, worker, tags, health in entries:
        text += ('[[devices]]\nhostname = "%s"\ndevice_type = "%s"\nworker = "%s"\n'
                 'tags = [%s]\nhealth = "%s"\n' % (hostname, device_type, worker,
                                                   ", ".join('"%s"' % t for t in tags),
                                                   health))
    return text


def _rewrite(lab, *entries, extra=""):
    """config.toml with these devices instead of its own, keeping everything else."""
    text = open(lab.config_path).read()
    head = text.split("[[devices]]", 1)[0]
    tail = text.split("[coordinator]", 1)[1]
    open(lab.config_path, "w").write(head + extra + _devices(*entries) + "[coordinator]"
                                     + tail)


def _write_dictionary(lab, hostname, device_type="qemu"):
    (lab.tmp_path / "etc" / "dispatcher-config" / "devices" / ("%s.jinja2" % hostname)
     ).write_text("{%% extends '%s.jinja2' %%}\n" % device_type)


def test_sighup_adds_changes_and_retires_devices(lab, caplog):
    caplog.set_level(logging.INFO)
    lab = lab()
    worker = lab.worker()
    _write_dictionary(lab, "qemu02")
    _rewrite(lab, ("qemu01", "qemu", "worker1", ["usb"], "Good"),
             ("qemu02", "qemu", "worker1", [], "Good"))
    lab.master.reload()
    added = lab.storage.get_device("qemu02")
    assert (added.device_type, added.worker, added.health) == ("qemu", "worker1",
                                                               DeviceHealth.GOOD)
    assert lab.storage.get_device("qemu01").tags == ("usb",)
    assert "device qemu02 added from %s: type qemu, worker worker1, health Good" \
        % lab.config_path in caplog.text
    assert "device qemu01 changed in %s: tags - -> usb" % lab.config_path in caplog.text
    # The new device takes jobs at once.
    first, second = lab.submit(), lab.submit()
    started = {int(worker.expect("START")[1]), int(worker.expect("START")[1])}
    assert started == {first, second}
    # Gone from the file: Retired, not deleted; its running job goes on to its end.
    job_on_02 = lab.storage.get_device("qemu02").current_job
    _rewrite(lab, ("qemu01", "qemu", "worker1", ["usb"], "Good"))
    lab.master.reload()
    gone = lab.storage.get_device("qemu02")
    assert gone.health == DeviceHealth.RETIRED and gone.current_job == job_on_02
    entry = lab.storage.list_history("device", "qemu02")[0]
    assert (entry["new"], entry["user"]) == ("Retired", "config.toml")
    assert entry["reason"] == "no longer listed in %s; its job %d goes on" % (
        lab.config_path, job_on_02)
    assert "device qemu02 health Good -> Retired by config.toml: no longer listed in" \
        in caplog.text
    worker.send("START_OK", job_on_02)
    worker.log(job_on_02, result_line("lava", "job", "pass"))
    worker.end(job_on_02)
    worker.expect("END_OK", skip=(b"PONG", b"HELLO_OK", b"START_OK"))
    lab.wait_for(lambda: lab.job(job_on_02).state == JobState.FINISHED)
    assert lab.job(job_on_02).health == JobHealth.COMPLETE
    assert lab.storage.get_device("qemu02").health == DeviceHealth.RETIRED
    # Listed again: the file's health again.
    _rewrite(lab, ("qemu01", "qemu", "worker1", ["usb"], "Good"),
             ("qemu02", "qemu", "worker1", [], "Good"))
    lab.master.reload()
    assert lab.storage.get_device("qemu02").health == DeviceHealth.GOOD


def test_a_busy_device_keeps_its_type_and_worker_until_its_job_ends(lab, caplog):
    caplog.set_level(logging.INFO)
    lab = lab(devices=(("qemu01", "qemu", "worker1", ()), ("bbb01", "bbb", "worker1", ())))
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING)
    _rewrite(lab, ("qemu01", "bbb", "worker2", [], "Good"),
             ("bbb01", "bbb", "worker1", [], "Good"))
    lab.master.reload()
    device = lab.storage.get_device("qemu01")
    assert (device.device_type, device.worker, device.state) == ("qemu", "worker1",
                                                                 DeviceState.RUNNING)
    assert "device qemu01 runs job %d: its device_type and worker changed in %s,"\
        " applied once it is idle" % (job_id, lab.config_path) in caplog.text
    worker.log(job_id, result_line("lava", "job", "pass"))
    worker.end(job_id)
    worker.expect("END_OK")
    lab.wait_for(lambda: lab.storage.get_device("qemu01").device_type == "bbb",
                 what="the change applied once idle")
    assert lab.storage.get_device("qemu01").worker == "worker2"
    assert "device qemu01 changed in %s, applied now that it is idle:" \
        " device_type qemu -> bbb; worker worker1 -> worker2" % lab.config_path in caplog.text
    assert lab.job(job_id).health == JobHealth.COMPLETE


def test_the_files_health_applies_when_the_file_changes_it(lab):
    lab = lab()
    lab.master.flow.set_device_health("qemu01", DeviceHealth.BAD, "admin", "broken")
    # The file says Good as before: the administrator's change is kept.
    _rewrite(lab, ("qemu01", "qemu", "worker1", ["x"], "Good"))
    lab.master.reload()
    assert lab.storage.get_device("qemu01").health == DeviceHealth.BAD
    _rewrite(lab, ("qemu01", "qemu", "worker1", ["x"], "Maintenance"))
    lab.master.reload()
    device = lab.storage.get_device("qemu01")
    assert device.health == DeviceHealth.MAINTENANCE
    entry = lab.storage.list_history("device", "qemu01")[0]
    assert (entry["user"], entry["reason"]) == ("config.toml", "health changed in %s"
                                                % lab.config_path)


def test_a_broken_config_keeps_the_running_one_and_restart_only_keys_are_named(lab,
                                                                               caplog):
    caplog.set_level(logging.INFO)
    lab = lab()
    good = open(lab.config_path).read()
    open(lab.config_path, "w").write(good + "[[devices]]\nhostname = 3\n")
    lab.master.reload()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["SIGHUP: [[devices]] #2 hostname: required, a non-empty string; the"
                      " running configuration is kept"]
    assert [d.hostname for d in lab.master.config.devices] == ["qemu01"]
    open(lab.config_path, "w").write(good + "[schedular]\n")
    lab.master.reload()
    assert "[schedular]: unknown table" in caplog.records[-1].getMessage()
    open(lab.config_path, "w").write(good.replace("ping_interval = 20",
                                                  "ping_interval = 5"))
    lab.master.reload()
    assert "SIGHUP: [master] ping_interval changed in %s: applied at the next restart" \
        % lab.config_path in caplog.text
    assert lab.master.config.master.ping_interval == 20


def test_a_device_left_out_while_the_master_was_stopped_is_retired_at_start(
        tmp_path, master_process):
    config_path = write_config(tmp_path, devices=(("qemu01", "qemu", "worker1", ()),
                                                  ("qemu02", "qemu", "worker1", ())))
    master = master_process(config_path)
    assert master.stop() == 0
    text = open(config_path).read()
    start = text.index('[[devices]]\nhostname = "qemu02"')
    end = text.index("[coordinator]")
    open(config_path, "w").write(text[:start] + text[end:])
    master = master_process(config_path)
    shown = run_cli(config_path, "devices", "show", "qemu02", "--json")
    assert '"health": "Retired"' in shown.stdout
    assert '"health": "Good"' in run_cli(config_path, "devices", "show", "qemu01",
                                         "--json").stdout
    # A real SIGHUP, with a file that does not parse: one line, the master goes on.
    open(config_path, "w").write(text + "[[devices]\n")
    master.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "the running configuration is kept" in master.log_text(),
               what="the SIGHUP handled")
    lines = [line for line in master.lines if "SIGHUP: " in line and "invalid TOML" in line]
    assert len(lines) == 1 and "the running configuration is kept" in lines[0]
    assert master.proc.poll() is None
    # It runs with what it had: a job submitted (with a config that loads) starts.
    open(config_path, "w").write(text)
    definition = tmp_path / "job.yaml"
    definition.write_text(job_yaml())
    assert run_cli(config_path, "submit", str(definition)).returncode == 0
    assert master.stop() == 0
