"""What the master's metrics learn from hooks (lavacore/metrics.py defines them).

- ``on_job_state``: a job Running observes its wait in the queue (submit -> START,
  ``lavacore_job_queue_seconds``); a job Finished is counted by health
  (``lavacore_jobs_finished_total``) and observes its run time (START -> END,
  ``lavacore_job_run_seconds``). Only in the master: the command line calls the hook
  with ``master`` None.
- ``register_services``: the storage times its statements and commits into
  ``lavacore_storage_statement_seconds`` (about 0.3 us each).

Disable it (``[plugins] disable = ["metrics"]``) and /metrics still answers, without
those numbers.
"""

import time

from lavacore import metrics
from lavacore.hookspecs import hookimpl
from lavacore.states import JobState


@hookimpl
def register_services(master):
    storage = master.storage
    if storage is not None:
        storage.statement_timer = (time.perf_counter,
                                   metrics.of(master).statements.observe)
    return None


@hookimpl
def on_job_state(master, flow, job, old_state):
    if master is None:
        return
    if job.state == JobState.RUNNING:
        metrics.of(master).job_started(job)
    elif job.state == JobState.FINISHED:
        metrics.of(master).job_finished(job)
