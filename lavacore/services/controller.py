"""The worker-facing ROUTER socket: protocol v3 (spec sections 3 and 5).

One greenlet reads the socket and dispatches each action to a small method. Anything the
peer sent that does not decode is logged with the peer's name and dropped. The liveness of
workers is tracked here (``seen``); the watchdog service marks silent ones Offline.
"""


import collections

import gevent
import zmq.green as zmq

from .. import metrics, protocol
from ..ratelog import RateLimitedLog
from ..states import JobHealth, JobState
from ..storage import NotFound, StorageError
from .base import Service, recv_bounded

MAX_COMMENT = 64 * 1024
LAST_PING_EVERY = 10.0
MAX_NAMES = 100000  # worker identities remembered as checked
LAVA_LOGS = "lava-logs"
DRAIN = 1000
MAX_FRAMES = 8         # the most any protocol v3 message has (START: 7), with room
REFUSED_CACHE = 4096   # unknown hostnames refused lately (auto_register false)
REFUSED_FOR = 60.0
# How long the master waits for the lines of a job still on their way when END comes,
# before it counts them as missing and asks for the worker's copy.
LATE_LINES = (0.05, 0.2, 0.5, 1.0)


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
        self._instances = {}  # hostname -> instance token of its last HELLO (our workers)
        self._refused = collections.OrderedDict()  # hostname -> when (auto_register off)
        # Jobs whose END is being settled: job id -> the greenlet waiting for its late
        # lines, or None while the worker's copy of its log is being taken.
        self._ending = {}
        self._drops = RateLimitedLog(self.log)
        # Identity frames already checked -> their hostname: a worker's name is read and
        # checked once, not at every PING (bounded: a flood of names empties it).
        self._names = {}
        self._versions = {}  # hostname -> version its HELLO gave, not stored yet
        self._pong = protocol.pong(master.config.master.ping_interval)
        # Counted per message, read at scrape time (lavacore/metrics.py): a dict
        # increment, not a prometheus_client Counter (which takes a lock).
        self._received = metrics.of(master).messages_received
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
             zmq.BACKLOG: 1024, zmq.LINGER: 0, zmq.RCVHWM: 1000, zmq.SNDHWM: 0,
             # A larger frame disconnects its sender before it is read whole.
             zmq.MAXMSGSIZE: int(self.master.config.master.max_message)},
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
                    frames, total = recv_bounded(sock, MAX_FRAMES, copy=copy)
                except zmq.Again:
                    break
                if total > MAX_FRAMES:
                    self._received[metrics.INVALID] += 1
                    self._drops.warning(("frames", bytes(frames[0])[:64]),
                                        "worker %s: dropped a message of %d frames",
                                        protocol.peer_name(bytes(frames[0])), total)
                elif copy:
                    self.handle(frames)
                else:
                    self.handle([f.bytes for f in frames], _user_id(frames[0]))
            self.flush_alive()
            # A green Poller returns at once while the socket stays readable: without this
            # a busy socket would starve every other greenlet (the log service, the API).
            gevent.idle()

    def handle(self, frames, public_key=None):
        """One message: ``frames`` as bytes, the peer's CURVE key (z85) if encrypted.
        Whatever happens while handling it stays here: the message is dropped with one
        line naming the peer and the reason, and the next one is read."""
        hostname = self._names.get(frames[0])
        try:
            if hostname is not None and public_key is None and len(frames) == 2 and \
                    frames[1] == b"PING" and hostname in self.seen and \
                    not self.master.auth_required:
                # The commonest message of all, from a worker already known and checked:
                # what on_ping does, without decoding and dispatching (the same outcome).
                self._received[protocol.PING] += 1
                self.on_ping(hostname)
                return
            if hostname is None:
                hostname = protocol.peer_name(frames[0])
            self._handle(hostname, frames, public_key)
        except StorageError as exc:
            # Nothing is acknowledged that was not stored: the worker resends END, the
            # master resends START (and so gets START_OK again) once the database is back.
            self.master.storage_fault("a message of worker %s, resent by the protocol"
                                      % hostname, exc)
        except Exception as exc:  # noqa: BLE001 - the boundary of what peers send
            self._drops.error(("bug", hostname), "worker %s: dropped a message: %s: %s",
                              hostname, type(exc).__name__, exc, exc_info=True)

    def _handle(self, hostname, frames, public_key):
        try:
            if frames[0] not in self._names:
                protocol.check_hostname(frames[0].decode("utf-8", "replace"))
                if len(self._names) >= MAX_NAMES:
                    self._names.clear()
                self._names[frames[0]] = hostname  # valid: peer_name gave it as it is
            message = protocol.decode_from_worker(frames[1:])
        except protocol.ProtocolError as exc:
            self._received[metrics.INVALID] += 1
            self._drops.warning(("malformed", hostname),
                                "worker %s: dropped a malformed message: %s", hostname, exc)
            return
        self._received[message.action] += 1
        if public_key is not None or self.master.auth_required:
            allowed = self.master.hook.authorize_worker(master=self.master, hostname=hostname,
                                                        public_key=public_key)
            if allowed is False or (allowed is None and self.master.auth_required):
                self._drops.warning(("refused", hostname),
                                    "worker %s: refused %s from key %s (refused by"
                                    " authorize_worker)", hostname, message.action,
                                    public_key)
                return
        if hostname not in self.seen and not self._registered(hostname, message.action):
            return
        try:
            self._handlers[message.action](hostname, *message.args,
                                           retry=message.action == protocol.HELLO_RETRY)
        except NotFound as exc:
            self._drops.warning(("notfound", hostname), "worker %s: %s: %s", hostname,
                                message.action, exc)

    def _registered(self, hostname, action):
        """With ``[master] auto_register = false``, only workers the database knows may
        speak; the others are refused with a log line and leave nothing behind (a
        refusal is remembered a while, bounded, so a flood costs no queries)."""
        if self.master.config.master.auto_register or hostname == LAVA_LOGS:
            return True
        now = self.master.clock.monotonic()
        when = self._refused.get(hostname)
        if when is not None and now - when < REFUSED_FOR:
            return False
        try:
            self.master.storage.get_worker(hostname)
            self._refused.pop(hostname, None)
            return True
        except NotFound:
            pass
        self._refused[hostname] = now
        self._refused.move_to_end(hostname)
        while len(self._refused) > REFUSED_CACHE:
            self._refused.popitem(last=False)
        self._drops.warning(("unknown", hostname), "worker %s: refused %s: not a registered"
                            " worker and [master] auto_register is false", hostname, action)
        return False

    def send(self, hostname, frames):
        if self._plain is None:
            return
        try:
            self._plain.send_multipart([hostname.encode(), *frames], zmq.NOBLOCK)
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
            # Not stored: written with the next batch (whoever it comes from).
            self._dirty |= dirty
            self.master.storage_fault("the liveness of %d worker(s)" % len(dirty), exc)
            return
        versions, self._versions = self._versions, {}
        if versions:
            try:
                with master.storage.transaction():
                    for hostname, version in sorted(versions.items()):
                        master.storage.update_worker(hostname, version=version)
            except (StorageError, NotFound) as exc:
                self.log.warning("cannot store the version of %d worker(s): %s",
                                 len(versions), exc)
        master.storage_works()
        for hostname in created:
            self.log.info("worker %s: new worker registered", hostname)
        for hostname in online:
            self.log.info("worker %s: Online", hostname)
        if online:
            master.workers_online(online)

    # -- actions ------------------------------------------------------------------------

    def on_hello(self, hostname, version, worker_version=None, instance=None, retry=False):
        if version != protocol.PROTOCOL_VERSION:
            self._drops.error(("version", hostname),
                              "worker %s: speaks protocol version %d, this master speaks %d;"
                              " not answering HELLO", hostname, version,
                              protocol.PROTOCOL_VERSION)
            return
        self.send(hostname, protocol.hello_ok())
        previous = self._instances.get(hostname)
        if instance:
            self._instances[hostname] = instance
        last = self.seen.get(hostname)
        if last is not None:
            ago = self.master.clock.monotonic() - last
            if instance and previous and instance != previous:
                # Two processes of one name: ROUTER_HANDOVER gives the name to the last
                # one to connect, and the other is cut off until it reconnects.
                self.log.warning("worker %s: another worker process (instance %s) took this"
                                 " name over from instance %s, heard from %.1f s ago; two"
                                 " workers may be running with the same hostname",
                                 hostname, instance, previous, ago)
            elif retry:
                self.log.info("worker %s: greeting again (HELLO_OK not seen)", hostname)
            elif instance and instance == previous:
                self.log.info("worker %s: reconnected", hostname)
            else:
                self.log.warning("worker %s: greeted again while online (last message %.1f s"
                                 " ago): it restarted, or another worker with this name took"
                                 " its connection over", hostname, ago)
        else:
            self.log.info("worker %s: connected%s", hostname,
                          " (version %s)" % worker_version if worker_version else "")
        if worker_version:
            self._versions[hostname] = worker_version  # stored with the batch
        self.alive(hostname, greeting=True)
        self.master.hook.on_hello(master=self.master, hostname=hostname,
                                  version=worker_version, retry=retry)

    def on_ping(self, hostname, retry=False):
        self.send(hostname, self._pong)
        if hostname == LAVA_LOGS:
            return  # an old lava-logs daemon; this master is its own lava-logs
        self.alive(hostname)
        hook = self.master.hook.on_ping
        if hook.get_hookimpls():  # most sites have none: no call per PING
            hook(master=self.master, hostname=hostname)

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

    def on_end(self, hostname, job_id, errors, description, log_info=None, log_copy=None,
               retry=False):
        job = self._own_job(hostname, job_id, "END")
        if job is None:
            self.log.info("worker %s: END for unknown job %d; acknowledged", hostname, job_id)
            self.send(hostname, protocol.end_ok(job_id))
            return
        self.alive(hostname)
        if job is False:
            self.send(hostname, protocol.end_ok(job_id))
            return
        if job_id in self._ending:
            waiter = self._ending[job_id]
            if waiter is None or not log_copy:
                return  # settling an earlier END of this job; the worker sends it again
            waiter.kill(block=False)  # waiting for late lines: the copy settles it now
            del self._ending[job_id]
        text, refused = "", None
        if description:
            try:
                text = protocol.decompress_description(
                    description, int(self.master.config.master.max_description))
            except protocol.TooLarge as exc:
                refused = "the job's description.yaml is too large: %s" % exc
                self.log.warning("[job %d] worker %s: %s", job_id, hostname, refused)
            except protocol.ProtocolError as exc:
                self.log.warning("[job %d] worker %s: %s", job_id, hostname, exc)
                description = b""
        end = (hostname, errors, description, text, refused)
        if job.state != JobState.FINISHED and job.end_seen is None:
            missing = self.master.logs.check(job, log_info)
            if missing is not None:
                self._log_missing(job, end, missing, log_info, log_copy)
                return
            self.end_job(job, *end)
        self._acknowledge(job, end)

    def _acknowledge(self, job, end):
        """END_OK, once the description is on disk (written off the loop): a master
        killed before gets the END again from the worker, and writes it then."""
        hostname, _, _, text, _ = end
        if not text or self.master.files.read(job, "description.yaml") is not None:
            self.send(hostname, protocol.end_ok(job.id))
            return

        def written(error):
            if error is None:
                self.send(hostname, protocol.end_ok(job.id))
            else:  # a full disk: the worker's next END tries again
                self._drops.error(("description", job.id), "[job %d] description.yaml not"
                                  " written (%s); END_OK waits for the next END", job.id,
                                  error)

        self.master.files.write_end(job, text, written)

    def _log_missing(self, job, end, missing, log_info, log_copy):
        """END came, but the master does not hold the job's whole log yet (``missing``:
        (reason, whether the worker's copy helps)). Lines still on their way get a moment;
        a copy the worker attached replaces the log; otherwise nothing is acknowledged and
        the worker's next END (with its copy) settles it."""
        reason, copy_helps = missing
        if copy_helps and log_copy:
            self._ending[job.id] = None
            self.log.warning("[job %d] the master has %s; taking the worker's copy of the"
                             " log", job.id, reason)
            self.master.logs.replace(job, log_copy,
                                     lambda error: self._replaced(job.id, end, error))
            return
        if copy_helps:
            self._ending[job.id] = gevent.spawn(self._late_lines, job.id, end, log_info)
            return
        self._drops.warning(("missing", job.id), "[job %d] END not acknowledged yet: %s",
                            job.id, reason)

    def _late_lines(self, job_id, end, log_info):
        """Give lines still on their way (another socket than END's) a moment to come."""
        try:
            for delay in LATE_LINES:
                if self.stopping.wait(delay):
                    return
                job = self.master.storage.get_job(job_id)
                if job.state == JobState.FINISHED or job.end_seen is not None:
                    return
                missing = self.master.logs.check(job, log_info)
                if missing is None:
                    self.end_job(job, *end)
                    self._acknowledge(job, end)
                    return
            self.log.warning("[job %d] the master has %s; END_OK waits for the worker's"
                             " copy of the log", job_id, missing[0])
        except (StorageError, NotFound) as exc:
            self._drops.error(("late", job_id), "[job %d] END not settled now: %s", job_id,
                              exc)
        finally:
            if self._ending.get(job_id) is gevent.getcurrent():
                del self._ending[job_id]

    def _replaced(self, job_id, end, error):
        try:
            if error is not None:
                self._drops.error(("replace", job_id), "[job %d] the worker's copy of the log"
                                  " was not taken (%s); END_OK waits for the next END",
                                  job_id, error)
                return
            job = self.master.storage.get_job(job_id)
            if job.state != JobState.FINISHED and job.end_seen is None:
                self.end_job(job, *end)
            self._acknowledge(job, end)
        except (StorageError, NotFound) as exc:
            self._drops.error(("replace", job_id), "[job %d] END not settled now: %s",
                              job_id, exc)
        finally:
            self._ending.pop(job_id, None)

    def end_job(self, job, hostname, errors, description, text, refused=None):
        """Finish ``job`` from its END (``text``: the description, decompressed;
        ``refused``: why the description could not be taken)."""
        master = self.master
        if job.state < JobState.RUNNING:
            # END implies the START_OK that was lost: the job ran. Running now, so START
            # is never sent for it again.
            master.flow.running(job.id)
        master.hook.on_end(master=master, hostname=hostname, job=job, errors=errors,
                           description=text)
        comment = _tail(errors) or None
        if refused:
            master.flow.finish(job.id, JobHealth.INCOMPLETE,
                               comment=refused + ("\n" + comment if comment else ""))
            return
        job = master.storage.get_job(job.id)
        if not description:
            # The runner left no description: it crashed or was killed.
            if job.result is not None:
                master.finish_from_result(job, comment)
                return
            self.log.info("[job %d] ended without a description; Incomplete", job.id)
            master.flow.finish(job.id, JobHealth.INCOMPLETE,
                               comment=comment or "the job's runner crashed (no description)")
            return
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
    # NUL has no place in a comment (and PostgreSQL's TEXT refuses it).
    text = (text or "").strip().replace("\x00", "\ufffd")
    return text if len(text) <= MAX_COMMENT else "..." + text[-MAX_COMMENT:]


def _user_id(frame):
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return None
