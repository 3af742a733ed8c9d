"""The job corpus of tests/jobs/ against the real submission path: every valid job (each
modelled on one of LAVA's documented examples) is queued; every invalid one is refused
with exactly the one-line error its first line states, naming the YAML line, and
nothing is queued. Also the three ways to ask without queueing: ``lavacore submit
--dry-run``, XML-RPC ``scheduler.jobs.validate`` and lavacli's ``jobs validate``."""

import glob
import json
import os
import textwrap

import pytest
import yaml

from apiutil import api_labs
from conftest import Lab, job_yaml, run_cli, write_config
from lavacore.jobs import JobError, Located, check_common, submit

pytestmark = pytest.mark.timeout(120)

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobs")
VALID = sorted(glob.glob(os.path.join(CORPUS, "valid", "*.yaml")))
INVALID = sorted(glob.glob(os.path.join(CORPUS, "invalid", "*.yaml")))

# Enough devices of every type the corpus asks for, with the tags its jobs need.
DEVICES = (
    ("qemu01", "qemu", "worker1", ()), ("qemu02", "qemu", "worker1", ("kvm",)),
    ("qemu03", "qemu", "worker1", ("kvm",)),
    ("bbb01", "beaglebone-black", "worker1", ("usb-eth",)),
    ("bbb02", "beaglebone-black", "worker1", ("usb-eth",)),
    ("cubie01", "cubietruck", "worker1", ()), ("hikey01", "hi6220-hikey", "worker1", ()),
    ("lxc01", "lxc", "worker1", ()), ("frdm01", "frdm-kw41z", "worker1", ()),
    ("x86-01", "x86", "worker1", ()), ("host01", "host", "worker1", ()),
    ("mustang01", "mustang", "worker1", ()),
)


def _name(path):
    return os.path.basename(path)


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def expected_error(path):
    first = _read(path).splitlines()[0]
    assert first.startswith("# refused: "), "%s: first line must state the error" % path
    return first[len("# refused: "):]


@pytest.fixture(scope="module")
def corpus_lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("corpus"), devices=DEVICES)
    for group in ("kernel-team", "lab-admins"):  # a group-visible job of the corpus names them
        lab.storage.add_group(group)
    yield lab
    lab.close()


def test_the_corpus_covers_both_verdicts():
    assert len(VALID) >= 12 and len(INVALID) >= 40
    assert any("multinode" in _name(p) for p in VALID)


@pytest.mark.parametrize("path", VALID, ids=_name)
def test_valid_jobs_are_queued(corpus_lab, path):
    text = _read(path)
    data = yaml.safe_load(text)
    before = corpus_lab.storage.count_jobs()
    jobs = submit(corpus_lab.storage, corpus_lab.master.hook, corpus_lab.master, text,
                  "alice", corpus_lab.master.clock.time())
    assert corpus_lab.storage.count_jobs() == before + len(jobs)
    roles = (data.get("protocols") or {}).get("lava-multinode", {}).get("roles")
    if roles:
        assert len(jobs) == sum(role.get("count", 1) for role in roles.values())
        assert len({job.target_group for job in jobs}) == 1
    else:
        assert [job.requested_device_type for job in jobs] == [data["device_type"]]
        assert jobs[0].definition == text


@pytest.mark.parametrize("path", INVALID, ids=_name)
def test_invalid_jobs_are_refused_with_their_line(corpus_lab, path):
    before = corpus_lab.storage.count_jobs()
    with pytest.raises(JobError) as refused:
        submit(corpus_lab.storage, corpus_lab.master.hook, corpus_lab.master, _read(path),
               "alice", corpus_lab.master.clock.time())
    assert str(refused.value) == expected_error(path)
    assert "\n" not in str(refused.value)
    assert corpus_lab.storage.count_jobs() == before


def test_timeout_maps_and_skip_were_refused_before(corpus_lab):
    """The per-action timeout maps most of LAVA's own jobs set (issue: every such job was
    refused with "use days/hours/minutes/seconds with whole numbers")."""
    text = job_yaml(extra=textwrap.dedent("""\
        context: {arch: amd64}
        """)).replace("timeouts:\n  job:\n    minutes: 5\n", textwrap.dedent("""\
        timeouts:
          job:
            minutes: 5
          actions:
            lava-test-shell:
              minutes: 2
          connections:
            lava-test-shell:
              seconds: 30
              skip: true
        """))
    check_common(Located(text))
    assert submit(corpus_lab.storage, corpus_lab.master.hook, corpus_lab.master, text,
                  "alice", corpus_lab.master.clock.time())


def test_untrusted_yaml_is_bounded_and_refused_in_one_line():
    with pytest.raises(JobError, match="nested more than"):
        Located("job_name: " + "[" * 100000)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in range(1, 8):
        bomb += "%s: &%s [%s]\n" % ("abcdefgh"[level], "abcdefgh"[level],
                                    ", ".join(["*" + "abcdefgh"[level - 1]] * 10))
    with pytest.raises(JobError, match="aliases are expanded") as refused:
        Located(bomb)
    assert "\n" not in str(refused.value)


def test_extra_context_variables_of_the_lab(tmp_path):
    text = job_yaml(extra="context:\n  board_serial: 'A1B2'\n")
    lab = Lab(tmp_path, extra='[jobs]\nextra_context_variables = ["board_serial"]\n')
    try:
        assert lab.submit(text)
        with pytest.raises(JobError, match=r"line 25: context.other: not a context variable"):
            lab.submit(text + "  other: 1\n")
    finally:
        lab.close()


def test_strict_adds_lavas_validate_checks(corpus_lab):
    from lavacore.jobs import prepare

    def dry(text, strict):
        return prepare(corpus_lab.storage, corpus_lab.master.hook, corpus_lab.master, text,
                       "alice", corpus_lab.master.clock.time(), strict=strict)

    long_action = job_yaml().replace("timeout:\n      minutes: 1", "timeout:\n      hours: 2")
    assert dry(long_action, False)
    with pytest.raises(JobError, match=r"line \d+: actions\[0\].test.timeout: longer than"
                                       " the job timeout"):
        dry(long_action, True)
    odd_method = job_yaml().replace("actions:\n", "actions:\n- deploy:\n    to: floppy\n")
    assert dry(odd_method, False)
    with pytest.raises(JobError, match="'floppy' is not a deploy method of LAVA 2020.05"):
        dry(odd_method, True)
    for path in VALID:
        dry(_read(path), True)


# -- asking without queueing --------------------------------------------------------------

@pytest.fixture
def config_path(tmp_path):
    from lavacore import config as config_mod
    from lavacore.master import Master

    path = write_config(tmp_path, devices=DEVICES)
    Master(config_mod.load(path)).start().stop()  # creates the database and the devices
    return path


def test_submit_dry_run_queues_nothing(config_path):
    group = os.path.join(CORPUS, "valid", "multinode-ssh-guests.yaml")
    done = run_cli(config_path, "submit", "--dry-run", group)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "valid: would queue 'ssh guests on a mustang' for device type mustang, role host",
        "valid: would queue 'ssh guests on a mustang' for a dynamic connection, role guest",
        "valid: would queue 'ssh guests on a mustang' for a dynamic connection, role guest"]
    bad = os.path.join(CORPUS, "invalid", "deploy-without-to.yaml")
    refused = run_cli(config_path, "submit", "--dry-run", bad)
    assert refused.returncode == 1
    assert refused.stderr.strip() == "lavacore: %s: %s" % (bad, expected_error(bad))
    listed = json.loads(run_cli(config_path, "jobs", "list", "--json").stdout)
    assert listed == []
    strict = run_cli(config_path, "submit", "--strict", group)
    assert strict.returncode == 1 and "--strict: only with --dry-run" in strict.stderr


@pytest.fixture
def api(tmp_path):
    yield from api_labs(tmp_path)


def test_xmlrpc_and_lavacli_validate(api, tmp_path):
    lab = api(devices=DEVICES)
    for group in ("kernel-team", "lab-admins"):
        lab.storage.add_group(group)
    alice, anonymous = lab.rpc("alice"), lab.rpc()
    for path in VALID:
        assert anonymous.scheduler.jobs.validate(_read(path)) == {}, path
    bad = os.path.join(CORPUS, "invalid", "mn-action-without-role.yaml")
    problem = alice.scheduler.jobs.validate(_read(bad), True)
    assert problem == {"path": "actions[1].boot", "msg": expected_error(bad)}
    assert lab.storage.count_jobs() == 0
    done = lab.lavacli("jobs", "validate", bad)
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["key: actions[1].boot",
                                        "msg: %s" % expected_error(bad)]
    good = lab.lavacli("jobs", "validate", "--strict", VALID[0])
    assert good.returncode == 0 and good.stdout == ""
