"""/metrics: the Prometheus exposition a lab's dashboards and alerts read. A real
in-process master with its HTTP API, real workers (scripted over the real sockets, and
lavacore's own worker running a real job), scraped over real HTTP and parsed with
prometheus_client's parsers."""

import gzip

import pytest
from prometheus_client.openmetrics.parser import \
    text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

import lavacore
import pgutil
from apiutil import ApiLab, api_labs, wait_for
from conftest import job_yaml
from lavacore import metrics
from lavacore.clock import FakeClock
from lavacore.logformat import result_line
from lavacore.states import JobState
from workerutil import job_yaml as host_job


@pytest.fixture
def api(tmp_path):
    yield from api_labs(tmp_path)


class Scrape:
    """The samples of one /metrics answer: ``get(name, **labels)``."""

    def __init__(self, text):
        self.text = text
        self.values = {}
        self.types = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name, **labels):
        return self.values.get((name, frozenset(labels.items())))

    def label_values(self, label):
        return {dict(key)[label] for _, key in self.values if label in dict(key)}


def scrape(lab, user=None, token=None, headers=None):
    status, head, body = lab.http("GET", "/metrics", user=user, token=token,
                                  headers=headers)
    assert status == 200, (status, body[:300])
    return Scrape(body.decode("utf-8"))


def scrape_until(lab, predicate, what, user=None, timeout=10):
    """Scrape until ``predicate(scrape)`` holds (the storage counts are at most a second
    old); returns that scrape."""
    found = []

    def check():
        found[:] = [scrape(lab, user=user)]
        return predicate(found[0])

    wait_for(check, timeout=timeout, what=what)
    return found[0]


def test_queue_depth_follows_submissions_and_a_job_run_fills_both_histograms(api):
    """Queue depth and jobs by state follow the database; START_OK observes the wait in
    the queue and END the run time, in the buckets their durations fall in (a fake clock
    makes them exact); messages, log lines, passes and statements are counted."""
    clock = FakeClock()
    lab = api(clock=clock, master={"worker_timeout": 100000})
    first = scrape(lab)
    assert first.get("lavacore_queued_jobs", device_type="qemu") == 0
    assert first.get("lavacore_devices", device_type="qemu", state="Idle", health="Good") == 1
    assert first.get("lavacore_workers", state="Offline", health="Active") == 1
    assert first.get("lavacore_storage_up") == 1
    assert first.types["lavacore_job_queue_seconds"] == "histogram"
    assert first.types["lavacore_messages_received"] == "counter"

    ids = [lab.submit(name="job %d" % n) for n in range(3)]  # no worker: all wait
    scrape_until(lab, lambda s: s.get("lavacore_queued_jobs", device_type="qemu") == 3,
                 "three jobs queued")
    clock.advance(42)
    worker = lab.worker()
    assert int(worker.expect("START")[1]) == ids[0]
    worker.send("START_OK", ids[0])
    lab.wait_for(lambda: lab.job(ids[0]).state == JobState.RUNNING, what="Running")
    running = scrape_until(lab, lambda s: s.get("lavacore_jobs", state="Running") == 1,
                           "one job Running")
    assert running.get("lavacore_queued_jobs", device_type="qemu") == 2
    assert running.get("lavacore_jobs", state="Submitted") == 2
    assert running.get("lavacore_job_queue_seconds_count", device_type="qemu") == 1
    assert running.get("lavacore_job_queue_seconds_sum", device_type="qemu") == 42
    assert running.get("lavacore_job_queue_seconds_bucket", device_type="qemu",
                       le="15.0") == 0
    assert running.get("lavacore_job_queue_seconds_bucket", device_type="qemu",
                       le="60.0") == 1
    assert running.get("lavacore_job_run_seconds_count", device_type="qemu") is None

    clock.advance(100)
    worker.log(ids[0], "hello from the job")
    worker.log(ids[0], result_line("lava", "job", "pass"))
    worker.end(ids[0])
    worker.expect("END_OK", hold=lambda frames: frames[0] == b"START")
    lab.wait_for(lambda: lab.job(ids[0]).state == JobState.FINISHED, what="Finished")
    # The device went back to Idle and took the next job (Scheduled now).
    done = scrape_until(lab, lambda s: s.get("lavacore_jobs", state="Running") == 0 and
                        s.get("lavacore_jobs", state="Scheduled") == 1, "the next job START")
    assert done.get("lavacore_jobs_finished_total", device_type="qemu",
                    health="Complete") == 1
    assert done.get("lavacore_job_run_seconds_count", device_type="qemu") == 1
    assert done.get("lavacore_job_run_seconds_sum", device_type="qemu") == 100
    assert done.get("lavacore_job_run_seconds_bucket", device_type="qemu", le="60.0") == 0
    assert done.get("lavacore_job_run_seconds_bucket", device_type="qemu", le="300.0") == 1
    assert done.get("lavacore_job_run_seconds_bucket", device_type="qemu", le="+Inf") == 1
    assert done.get("lavacore_queued_jobs", device_type="qemu") == 1
    assert done.get("lavacore_workers", state="Online", health="Active") == 1
    assert done.get("lavacore_messages_received_total", type="START_OK") == 1
    assert done.get("lavacore_messages_received_total", type="END") == 1
    assert done.get("lavacore_messages_received_total", type="HELLO") >= 1
    assert done.get("lavacore_log_lines_received_total") == 2
    assert done.get("lavacore_log_bytes_received_total") > len("hello from the job")
    assert done.get("lavacore_scheduling_pass_seconds_count", kind="wake") >= 1
    assert done.get("lavacore_storage_statement_seconds_count") > 10
    assert done.get("lavacore_event_loop_lag_seconds_count") >= 1
    assert done.get("process_resident_memory_bytes") > 0


def test_malformed_worker_messages_are_counted_as_invalid(api):
    lab = api()
    worker = lab.worker()
    worker.send("START_OK", "not-a-job-id")
    worker.send("NOT_A_MESSAGE")
    worker.send("PING")
    worker.expect("PONG")
    counted = scrape(lab)
    assert counted.get("lavacore_messages_received_total", type="invalid") == 2
    assert counted.get("lavacore_messages_received_total", type="PING") == 1


@pytest.mark.timeout(90)
def test_a_real_job_on_lavacores_worker_is_counted(api):
    """lavacore's own worker (in the master's process) runs a job with the built-in
    runner: the histograms count it once, its log lines are counted."""
    lab = api(devices=(("host01", "host", "worker1", ()),),
              extra='[local_worker]\nhostname = "worker1"\nwork_dir = "var/worker"\n')
    status, _, body = lab.http("POST", "/api/v1/jobs/", body=host_job(
        ["echo one", "echo two", "lava-test-case smoke --result pass"]), user="alice")
    assert status == 201, body
    lab.wait_for(lambda: lab.storage.count_jobs(state=JobState.FINISHED) == 1, timeout=60,
                 what="the job Finished")
    job = lab.storage.list_jobs(state=JobState.FINISHED)[0]
    assert job.health.display == "Complete", job.failure_comment
    counted = scrape(lab)
    assert counted.get("lavacore_job_queue_seconds_count", device_type="host") == 1
    assert counted.get("lavacore_job_run_seconds_count", device_type="host") == 1
    assert 0 < counted.get("lavacore_job_run_seconds_sum", device_type="host") < 60
    assert counted.get("lavacore_jobs_finished_total", device_type="host",
                       health="Complete") == 1
    assert counted.get("lavacore_log_lines_received_total") > 5
    assert counted.get("lavacore_messages_received_total", type="START_OK") == 1
    assert counted.get("lavacore_messages_received_total", type="END") >= 1


def test_hidden_device_types_are_counted_without_their_names(api):
    """A type restricted for view shows as "(hidden)" to whoever may not see it, its
    numbers merged with other hidden types'; its group's members and superusers see
    its name; bad credentials are refused."""
    lab = api(devices=(("qemu01", "qemu", "worker1", ()), ("vault01", "vault", "worker1", ()),
                       ("crypt01", "crypt", "worker1", ())))
    storage = lab.storage
    storage.add_group("lab")
    for name in ("vault", "crypt"):
        storage.add_object_permission("devicetype", name, "lab", "view_devicetype")
    lab.token("bob")
    storage.add_member("lab", "bob")
    lab.master.permissions_changed()
    lab.submit(device_type="vault")
    lab.submit(device_type="vault")
    lab.submit(device_type="crypt")
    lab.submit(device_type="qemu")
    counted = metrics.of(lab.master)
    counted.job_queue.observe("vault", 2.0)
    counted.job_queue.observe("crypt", 200.0)

    anonymous = scrape_until(
        lab, lambda s: s.get("lavacore_queued_jobs", device_type="(hidden)") == 3,
        "the hidden types' queue")
    assert "vault" not in anonymous.text and "crypt" not in anonymous.text
    assert anonymous.get("lavacore_queued_jobs", device_type="qemu") == 1
    assert anonymous.get("lavacore_devices", device_type="(hidden)", state="Idle",
                         health="Good") == 2
    assert anonymous.get("lavacore_job_queue_seconds_count", device_type="(hidden)") == 2
    assert anonymous.get("lavacore_job_queue_seconds_sum", device_type="(hidden)") == 202
    assert anonymous.get("lavacore_job_queue_seconds_bucket", device_type="(hidden)",
                         le="5.0") == 1
    assert anonymous.get("lavacore_jobs", state="Submitted") == 4
    assert scrape(lab, user="alice").label_values("device_type") == {"qemu", "(hidden)"}
    for user in ("bob", "admin"):
        seen = scrape(lab, user=user)
        assert seen.label_values("device_type") == {"qemu", "vault", "crypt"}, user
        assert seen.get("lavacore_queued_jobs", device_type="vault") == 2
        assert seen.get("lavacore_job_queue_seconds_sum", device_type="crypt") == 200
    status, headers, body = lab.http("GET", "/metrics", user="bob", token="wrong")
    assert status == 401 and b"Authentication failed" in body
    assert headers.get("WWW-Authenticate")


def test_only_get_and_head_without_a_body(api):
    lab = api()
    status, headers, body = lab.http("POST", "/metrics", body=b"x=1")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, body = lab.http("PUT", "/metrics")
    assert status == 405
    status, _, body = lab.http("GET", "/metrics", body=b"payload")
    assert status == 400 and body == b"/metrics takes no request body\n"
    status, headers, body = lab.http("HEAD", "/metrics")
    assert status == 200 and body == b"" and headers["Content-Type"].startswith("text/plain")
    # Query strings are ignored, whatever they hold.
    status, _, body = lab.http("GET", "/metrics?name[]=x&%ff%00=%zz&" + "a" * 3000)
    assert status == 200 and b"lavacore_queued_jobs" in body
    status, _, body = lab.http("GET", "/metrics/")
    assert status == 404


def test_openmetrics_gzip_and_hostile_negotiation(api):
    lab = api()
    status, headers, body = lab.http("GET", "/metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8,"
                  "text/plain;version=0.0.4;q=0.5", "Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(body).decode()
    assert text.endswith("# EOF\n")
    names = {family.name for family in openmetrics_families(text)}
    assert {"lavacore_jobs_finished", "lavacore_job_run_seconds", "lavacore_queued_jobs",
            "lavacore_storage_statement_seconds"} <= names
    for accept in ("application/openmetrics-text; version=banana", "\x00" * 2000,
                   "text/plain; version=1.0.0; escaping=nonsense"):
        status, headers, body = lab.http("GET", "/metrics", headers={
            "Accept": accept, "Accept-Encoding": "gzip;q=0"})
        assert status == 200 and "Content-Encoding" not in headers, accept
        assert b"lavacore_queued_jobs" in body


def test_every_master_has_its_own_registry(api, tmp_path):
    """Two masters in one process: what one counts never shows in the other."""
    one = api()
    other = ApiLab(tmp_path / "other")
    try:
        assert metrics.of(one.master).registry is not metrics.of(other.master).registry
        worker = one.worker()
        worker.send("PING")
        worker.expect("PONG")
        assert scrape(one).get("lavacore_messages_received_total", type="PING") == 1
        assert scrape(other).get("lavacore_messages_received_total", type="PING") == 0
        assert scrape(other).get("lavacore_messages_received_total", type="HELLO") == 0
    finally:
        other.close()


@pytest.fixture
def pg_schema():
    yield from pgutil.schema_for_test()


def test_metrics_on_postgresql(pg_schema, api):
    lab = api(storage=pgutil.storage_lines(pg_schema), extra=pgutil.plugin_extra())
    lab.submit()
    lab.submit(text=job_yaml(name="second"))
    counted = scrape_until(lab, lambda s: s.get("lavacore_queued_jobs", device_type="qemu")
                           == 2, "two jobs queued")
    assert counted.get("lavacore_info", version=lavacore.__version__,
                       storage="postgres") == 1
    assert counted.get("lavacore_jobs", state="Submitted") == 2
    assert counted.get("lavacore_devices", device_type="qemu", state="Idle",
                       health="Good") == 1
    assert counted.get("lavacore_storage_up") == 1
    assert counted.get("lavacore_storage_statement_seconds_count") > 5
    assert counted.get("lavacore_storage_statement_seconds_sum") > 0
