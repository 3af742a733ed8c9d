"""The job files the master keeps (lavacore/jobfiles.py): written by threads, in order,
readable before they reach the disk, and never lost to a directory removed meanwhile."""

import os
import shutil

import gevent
import pytest

from lavacore.jobfiles import JobFiles
from lavacore.models import Job

pytestmark = pytest.mark.timeout(30)


def job(job_id):
    return Job(job_id, submit_time=86400.0 * 365, definition="x")


@pytest.fixture
def files(tmp_path):
    jobfiles = JobFiles(str(tmp_path / "output"))
    yield jobfiles
    jobfiles.close(timeout=5)


def test_start_files_readable_at_once_and_on_disk_after(files):
    first = job(1)
    files.write_start(first, {"job.yaml": "job: 1\n", "device.yaml": "device: a\n",
                              "dispatcher.yaml": "", "env.yaml": "env: 1\n",
                              "env.dut.yaml": None})
    # Before the thread ran: answered from the queue.
    assert files.read(first, "job.yaml") == "job: 1\n"
    assert files.start_texts(first) == ["job: 1\n", "device: a\n", "", "env: 1\n", ""]
    assert files.flush(5)
    directory = files.directory(first)
    assert sorted(os.listdir(directory)) == ["device.yaml", "env.yaml", "job.yaml",
                                             "output.yaml"]
    with open(os.path.join(directory, "output.yaml")) as handle:
        assert handle.read() == ""  # created ahead of the log, empty
    assert files.start_texts(first)[3] == "env: 1\n"
    assert files.read(first, "dispatcher.yaml") is None  # empty: not written, as LAVA


def test_start_texts_none_without_job_yaml(files):
    assert files.start_texts(job(2)) is None


def test_end_callback_runs_once_the_file_is_written(files):
    ended = job(3)
    seen = []
    path = os.path.join(files.directory(ended), "description.yaml")
    files.write_end(ended, "compatibility: 7\n", then=lambda error: seen.append(
        (error, os.path.exists(path))))
    assert files.read(ended, "description.yaml") == "compatibility: 7\n"
    with gevent.Timeout(5):
        while not seen:
            gevent.sleep(0.01)
    assert seen == [(None, True)]


def test_end_callback_gets_the_error_when_the_file_cannot_be_written(files):
    # END_OK must wait when description.yaml is not on disk (a full disk, here a
    # directory that cannot be made): the callback is told.
    ended = job(5)
    os.makedirs(os.path.dirname(files.directory(ended)), exist_ok=True)
    with open(files.directory(ended), "w") as handle:  # a file where the directory goes
        handle.write("in the way")
    seen = []
    files.write_end(ended, "compatibility: 7\n", then=seen.append)
    with gevent.Timeout(5):
        while not seen:
            gevent.sleep(0.01)
    assert isinstance(seen[0], OSError)
    assert files.read(ended, "description.yaml") is None


def test_a_removed_directory_is_made_again(files):
    first = job(4)
    files.write(first, {"job.yaml": "a\n"})
    assert files.flush(5)
    shutil.rmtree(files.directory(first))  # an administrator cleaning up
    files.write(first, {"device.yaml": "b\n"})
    assert files.flush(5)
    with open(os.path.join(files.directory(first), "device.yaml")) as handle:
        assert handle.read() == "b\n"


def test_an_unwritable_directory_is_logged_not_raised(files, caplog):
    first = job(5)
    os.makedirs(os.path.dirname(files.directory(first)))
    with open(files.directory(first), "w"):
        pass  # a file where the job's directory should be
    done = []
    files.write(first, {"job.yaml": "a\n"}, then=lambda: done.append(1))
    assert files.flush(5)
    assert done == [1]
    assert "[job 5] cannot write job.yaml" in caplog.text
    assert files.read(first, "job.yaml") is None  # not kept as if written
