"""The worker-facing ROUTER socket: protocol v3 (spec sections 3 and 5).

One greenlet reads the socket and dispatches each action to a small method. Anything the
peer sent that does not decode is logged with the peer's name and dropped. The liveness of
workers is tracked here (``seen``); the watchdog service marks silent ones Offline.
"""


import gevent
import zmq.green as zmq

from .. import protocol
from ..states import JobHealth, JobState
from ..storage import NotFound, StorageError
from .base import Service

MAX_COMMENT = 64 * 1024
LAST_PING_EVERY = 10.0
LAVA_LOGS = "lava-logs"
DRAIN = 1000


class Controller(Service):
    name = "controller"

    def __init__(self, master):
        super().__init__(master)
        self.socket = None
        self._plain = None
        self.endpoint = None
        # hostname -> monotonic time of its last valid message. Starts empty: a worker
        # first heard from after a master start gets STATUS for its running jobs.
        self.seen = {}
        self.curve = False
        self._written = {}
        self._dirty = set()  # workers heard from in this batch, to store (flush_alive)
        self._handlers = {
            protocol.HELLO: self.on_hello,
            protocol.HELLO_RETRY: self.on_hello,
            protocol.PING: self.on_ping,
            protocol.START_OK: self.on_start_ok,
            protocol.END: self.on_end,
        }

    def setup(self):
        self.socket, self.endpoint = self.bind(
            zmq.ROUTER, "controller", "[master] listen", self.master.config.master.listen,
            {zmq.IDENTITY: protocol.MASTER_IDENTITY, zmq.ROUTER_HANDOVER: 1,
             zmq.BACKLOG: 1024, zmq.LINGER: 0, zmq.RCVHWM: 0, zmq.SNDHWM: 0},
            "listening for workers")
        self.curve = bool(self.socket.getsockopt(zmq.CURVE_SERVER))
        self._plain = self.plain(self.socket)

    def teardown(self):
        self._plain = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    # -- the loop -----------------------------------------------------------------------

    def run(self):
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        sock = self._plain
        while not self.stopping.is_set():
            if not poller.poll(500):
                continue
            # Frame objects (copy=False) only under CURVE, to read each message's key.
            copy = not self.curve
            for _ in range(DRAIN):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
                except zmq.Again:
                    break
                if copy:
                    self.handle(frames)
                else:
                    self.handle([f.bytes for f in frames], _user_id(frames[0]))
            self.flush_alive()
            # A green Poller returns at once while the socket stays readable: without this
            # a busy socket would starve every other greenlet (the log service, the API).
            gevent.idle()

    def handle(self, frames, public_key=None):
        """One message: ``frames`` as bytes, the peer's CURVE key (z85) if encrypted."""
        hostname = protocol.peer_name(frames[0])
        try:
            protocol.check_hostname(frames[0].decode("utf-8", "replace"))
            message = protocol.decode_from_worker(frames[1:])
        except protocol.ProtocolError as exc:
            self.log.warning("worker %s: dropped a malformed message: %s", hostname, exc)
            return
        if public_key is not None or self.master.auth_required:
            allowed = self.master.hook.authorize_worker(master=self.master, hostname=hostname,
                                                        public_key=public_key)
            if allowed is False or (allowed is None and self.master.auth_required):
                self.log.warning("worker %s: refused %s from key %s (refused by"
                                 " authorize_worker)", hostname, message.action, public_key)
                return
        try:
            self._handlers[message.action](hostname, *message.args,
                                           retry=message.action == protocol.HELLO_RETRY)
        except NotFound as exc:
            self.log.warning("worker %s: %s: %s", hostname, message.action, exc)
        except StorageError as exc:
            # Nothing is acknowledged that was not stored: the worker resends END, the
            # master resends START (and so gets START_OK again) once the database is back.
            self.log.error("worker %s: %s not processed, will be resent: %s", hostname,
                           message.action, exc)

    def send(self, hostname, frames):
        if self._plain is None:
            return
        try:
            self._plain.send_multipart([hostname.encode()] + frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a full or gone peer: the protocol resends
            self.log.debug("worker %s: cannot send %s: %s", hostname, frames[0], exc)

    # -- liveness -----------------------------------------------------------------------

    def alive(self, hostname, greeting=False):
        """A valid message came from ``hostname``: it is Online. A worker not heard from
        since this master started (and not greeting) gets STATUS for its jobs. The
        database learns it at the end of the batch (``flush_alive``)."""
        master = self.master
        now = master.clock.monotonic()
        first = hostname not in self.seen
        if first or now - self._written.get(hostname, 0) >= LAST_PING_EVERY:
            # last_ping is kept to the nearest few seconds in the database; state changes
            # are written with the batch they arrive in.
            self._dirty.add(hostname)
            self._written[hostname] = now
        self.seen[hostname] = now
        if first and not greeting:
            self.log.info("worker %s: first message since the master started; asking the"
                          " status of its jobs", hostname)
            for job in master.storage.list_jobs(worker=hostname,
                                                state=[JobState.RUNNING, JobState.CANCELING]):
                self.send(hostname, protocol.status(job.id))

    def flush_alive(self):
        """Write the liveness of every worker heard from in this batch, in one
        transaction (a storm of 10,000 greetings costs a few statements, not 40,000)."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        master = self.master
        try:
            online, created = master.flow.workers_alive(sorted(dirty), master.clock.time())
        except StorageError as exc:
            # Not stored: these workers count as unheard, so their next message retries.
            for hostname in dirty:
                self.seen.pop(hostname, None)
                self._written.pop(hostname, None)
            self.log.error("liveness of %d worker(s) not stored, retried at their next"
                           " message: %s", len(dirty), exc)
            return
        for hostname in created:
            self.log.info("worker %s: new worker registered", hostname)
        for hostname in online:
            self.log.info("worker %s: Online", hostname)
        if online:
            master.workers_online(online)

    # -- actions ------------------------------------------------------------------------

    def on_hello(self, hostname, version, worker_version=None, retry=False):
        if version != protocol.PROTOCOL_VERSION:
            self.log.error("worker %s: speaks protocol version %d, this master speaks %d;"
                           " not answering HELLO", hostname, version, protocol.PROTOCOL_VERSION)
            return
        self.send(hostname, protocol.hello_ok())
        if hostname in self.seen:
            self.log.info("worker %s: %s", hostname,
                          "greeting again (HELLO_OK not seen)" if retry else "restarted")
        else:
            self.log.info("worker %s: connected%s", hostname,
                          " (version %s)" % worker_version if worker_version else "")
        self.alive(hostname, greeting=True)
        self.master.hook.on_hello(master=self.master, hostname=hostname,
                                  version=worker_version, retry=retry)

    def on_ping(self, hostname, retry=False):
        self.send(hostname, protocol.pong(self.master.config.master.ping_interval))
        if hostname == LAVA_LOGS:
            return  # an old lava-logs daemon; this master is its own lava-logs
        self.alive(hostname)
        self.master.hook.on_ping(master=self.master, hostname=hostname)

    def _own_job(self, hostname, job_id, action):
        try:
            job = self.master.storage.get_job(job_id)
        except NotFound:
            return None
        if job.worker != hostname:
            self.log.warning("worker %s: %s for job %d, which runs on %s; ignored",
                             hostname, action, job_id, job.worker)
            return False
        return job

    def on_start_ok(self, hostname, job_id, retry=False):
        job = self._own_job(hostname, job_id, "START_OK")
        if job is None:
            self.log.warning("worker %s: START_OK for unknown job %d", hostname, job_id)
            return
        self.alive(hostname)
        if job is False:
            return
        running = self.master.flow.running(job_id)
        if running is not None:
            self.log.info("[job %d] Running on %s", job_id, job.actual_device or hostname)
            self.master.hook.on_start_ok(master=self.master, hostname=hostname, job=running)

    def on_end(self, hostname, job_id, errors, description, retry=False):
        job = self._own_job(hostname, job_id, "END")
        if job is None:
            self.log.info("worker %s: END for unknown job %d; acknowledged", hostname, job_id)
            self.send(hostname, protocol.end_ok(job_id))
            return
        self.alive(hostname)
        text = ""
        if job is not False and description:
            try:
                text = protocol.decompress_description(description)
            except protocol.ProtocolError as exc:
                self.log.warning("[job %d] worker %s: %s", job_id, hostname, exc)
                description = b""
        if job is not False and job.state != JobState.FINISHED and job.end_seen is None:
            self.end_job(hostname, job, errors, description, text)
        elif job is False or not text or \
                self.master.files.read(job, "description.yaml") is not None:
            self.send(hostname, protocol.end_ok(job_id))
            return
        if not text:
            self.send(hostname, protocol.end_ok(job_id))
            return
        # END_OK once description.yaml is written (off the loop): a master killed before
        # that gets the END again from the worker, and writes it then.
        self.master.files.write_end(job, text,
                                    then=lambda: self.send(hostname, protocol.end_ok(job_id)))

    def end_job(self, hostname, job, errors, description, text):
        """Finish ``job`` from its END (``text``: the description, decompressed)."""
        master = self.master
        master.hook.on_end(master=master, hostname=hostname, job=job, errors=errors,
                           description=text)
        comment = _tail(errors) or None
        if not description:
            # The runner left no description: it crashed or was killed (spec 4.6).
            master.logs.flush(job.id)
            job = master.storage.get_job(job.id)
            if job.result is not None:
                master.finish_from_result(job, comment)
                return
            self.log.info("[job %d] ended without a description; Incomplete", job.id)
            master.flow.finish(job.id, JobHealth.INCOMPLETE,
                               comment=comment or "the job's runner crashed (no description)")
            return
        master.logs.flush(job.id)
        job = master.storage.get_job(job.id)
        if job.result is not None:
            master.finish_from_result(job, comment)
        elif job.state == JobState.CANCELING:
            master.flow.finish(job.id, JobHealth.CANCELED, comment=comment)
        else:
            # The log stream may trail END: wait a grace period for the lava/job result.
            master.storage.update_job(job.id, end_seen=master.clock.time(),
                                      failure_comment=comment)
            master.watch_result(job.id)


def _tail(text):
    text = (text or "").strip()
    return text if len(text) <= MAX_COMMENT else "..." + text[-MAX_COMMENT:]


def _user_id(frame):
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return None
