"""Every hook lavacore calls, in one place.

pluggy project name ``lavacore``. Implement a hook with ``@lavacore.hookimpl`` in a module
registered through the entry-point group ``lavacore.plugins`` (setup.py) or listed in
``[plugins] modules`` of config.toml. lavacore's own defaults are ``trylast``, so a
plugin that is merely installed overrides them.

All hooks run inside the master's single gevent loop. "May block" means the hook may do
cooperative I/O (green sockets, the database); no hook may block the OS thread for long
(no time.sleep, no plain sockets), or every worker, log line and API call waits with it.
"""

import pluggy

hookspec = pluggy.HookspecMarker("lavacore")
hookimpl = pluggy.HookimplMarker("lavacore")


# -- life cycle -----------------------------------------------------------------------

@hookspec
def configure(config, master):
    """The master is being built from ``config`` (a :class:`lavacore.config.Config`).

    Called once, in the main greenlet, before any socket is bound. Read your own table
    with ``config.section("name")`` and raise :class:`lavacore.config.ConfigError` with a
    one-line message for bad values. ``master`` is None when the command line, not the
    master, loads plugins (``lavacore submit`` ...). Results are ignored.
    """


@hookspec(firstresult=True)
def storage(config):
    """Return the storage backend for ``config.storage.backend``, or None if not yours.

    Called once per process, in the main greenlet, before any service starts. The first
    non-None result is used; it must implement :class:`lavacore.storage.Storage`. May block
    (open files, connect).
    """


@hookspec
def register_services(master):
    """Return a list of extra services to run in the master (or None).

    Each service has ``start()`` (spawn greenlets, bind sockets; must not block),
    ``stop()`` (graceful, idempotent) and a ``name``. Called once after the core services
    are built and before any is started; results of all plugins are collected.
    """


@hookspec
def secure_socket(master, role, socket):
    """A master socket is about to bind; ``role`` is "controller", "logs" or "events".

    Used by auth plugins to make it a CURVE server. Called in the main greenlet; may not
    block. Results are ignored.
    """


@hookspec(firstresult=True)
def authorize_worker(master, hostname, public_key):
    """May the peer with CURVE ``public_key`` (z85 text, or None for plaintext) speak as
    ``hostname``? Return True/False; None leaves the decision to the next plugin.

    Called by the controller greenlet for every message that carries a key, and by the
    logs greenlet once per job and key in each batch of log lines (``hostname`` is then
    the job's worker). Must not block. With no answer at all, the message is accepted,
    unless ``master.auth_required`` is set by an auth plugin.
    """


# -- worker protocol (controller greenlet) ----------------------------------------------

@hookspec
def on_hello(master, hostname, version, retry):
    """A worker greeted the master with a valid HELLO (``retry`` False) or HELLO_RETRY.

    ``version`` is the worker's own software version if it sent one (2020.04+ slaves
    do), else None. Called by the controller greenlet after HELLO_OK was sent; may block
    briefly. Results are ignored. The worker's Online state and a first-seen worker's
    record reach storage at the end of the controller's current batch of messages.
    """


@hookspec
def on_ping(master, hostname):
    """A worker sent PING (already answered with PONG). Controller greenlet; must not block
    for long. Results are ignored.
    """


@hookspec
def on_start_ok(master, hostname, job):
    """A worker confirmed it runs ``job`` (a :class:`lavacore.models.Job`, already moved to
    Running). Controller greenlet; may block briefly. Results are ignored."""


@hookspec
def on_end(master, hostname, job, errors, description):
    """A worker reported that ``job``'s process is gone. ``errors`` is its stderr text,
    ``description`` the decompressed description.yaml text ('' when the runner left none).
    Called once per job (duplicate ENDs are acked without calling it), by the controller
    greenlet, before the job is finished. Results are ignored.
    """


@hookspec
def on_cancel(master, flow, job):
    """``job`` was asked to stop (moved to Canceling, or finished Canceled from Submitted).
    ``flow`` is the :class:`lavacore.flow.Flow` that did it (use it for further changes:
    it works in the master and in the command line, where ``master`` is None). Called in
    the greenlet that canceled it; may block on storage. Results are ignored."""


@hookspec
def on_job_state(master, flow, job, old_state):
    """``job`` moved from ``old_state`` to ``job.state`` (a JobState; None for a new job).
    Called after the change is committed, in the greenlet that made it, with the ``flow``
    that made it. May block briefly on storage. Results are ignored. ``master`` is None
    when the change was made by the command line.
    """


# -- scheduling and starting ----------------------------------------------------------

@hookspec(firstresult=True)
def schedule(master, queue):
    """Decide which queued jobs go to which idle devices in this pass.

    ``queue`` is a :class:`lavacore.scheduling.SchedulingView`: the devices available
    now (Idle, worker Online, schedulable health) by type, and an ordered iterator over
    the queued jobs of a device type. Return a list of ``(job_id, device_hostname)``
    pairs; the core checks and applies them in one transaction each, so a wrong pair is
    refused, never applied. The first non-None result wins: the builtin FIFO scheduler is
    trylast, so an installed scheduler plugin replaces it. Called by the scheduler
    greenlet; may block on the database.
    """


@hookspec(firstresult=True)
def allocate_groups(master, queue, groups):
    """Place multinode groups (and, if the policy wants, single jobs) in this pass.

    ``groups`` lists the queued groups in queue order, each a list of its sub-jobs (Job
    records; dynamic connections have no ``requested_device_type``). Return
    ``(assignments, device_types)``: the ``(job_id, hostname)`` pairs decided, and the
    device types this policy decided for, which the installed ``schedule`` hook will then
    not see. A group must be placed whole or not at all (the core never reserves devices
    for a waiting group). First non-None wins; the multinode plugin's policy is trylast.
    Called by the scheduler greenlet; may block on the database.
    """


@hookspec(firstresult=True)
def health_check_due(master, device, device_type, last_check, jobs_since, now):
    """Is a health check due on ``device`` before its next job? Return True/False, or None
    to defer to the next plugin (the builtin rule, LAVA's, is trylast). Called by the
    scheduler greenlet; must not block for long.
    """


@hookspec(firstresult=True)
def start_job(master, job, device):
    """Build the START messages for ``job`` on ``device`` (None for a dynamic connection).

    Return a list of :class:`lavacore.devices.StartMessage`; the core writes their files
    into the job's output directory and sends them. The builtin implementation renders the
    device dictionary with the job's context (:func:`device_config`) and loads the
    worker's dispatcher, env and env-dut files. Raise :class:`lavacore.devices.JobSetupError`
    to fail only this job (Incomplete, Infrastructure). Scheduler greenlet; may block.
    """


@hookspec(firstresult=True)
def device_config(master, device, context):
    """Return the device configuration (a dict) of ``device`` rendered for a job whose
    ``context`` is given. First non-None wins; raise JobSetupError on a broken template.
    """


# -- submission -----------------------------------------------------------------------

@hookspec(firstresult=True)
def split_job(master, storage, definition, submitter, now):
    """Turn one submitted definition into the list of Job records to queue, or return
    None if this plugin does not handle it (the multinode plugin handles ``protocols:
    lava-multinode``). ``definition`` is a :class:`lavacore.jobs.Located` (``.data`` the
    parsed mapping, ``.text`` the YAML, ``.node`` its YAML node tree, ``.error(key, msg)``
    and ``.error_at(path, msg)`` a JobError naming the line). Called only once the
    definition passed the job schema (lavacore/jobschema.py). Raise
    :class:`lavacore.jobs.JobError` to refuse the submission. Called in the submitting
    greenlet or process (``master`` None in the CLI); may block on storage.
    """


@hookspec
def validate_job(master, definition, submitter):
    """Return a list of problems (strings) with a submission, or None: a site's own
    rules, on a ``definition`` (the parsed mapping) that already passed the job schema.
    All results are collected; any problem refuses the submission with nothing queued."""
