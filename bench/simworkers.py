"""Simulated protocol v3 workers, many per process, for the benchmarks.

Run as ``python -m bench.simworkers``; the benchmark drives it with one JSON command per
line on stdin and reads one JSON reply per line on stdout. Each simulated worker is a real
ROUTER socket (identity = hostname, ``CONNECT_RID=master``), as lava-slave's, all on one
plain pyzmq context served by one Poller loop, so this process costs the master's machine
one core at most. Jobs are trivial: on START a worker answers START_OK and, in "zero" mode,
at once pushes the job's ``lava``/``job`` result line and sends END, as a job of zero
length would.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process of the
machine), so the benchmark can compare them with its own.

Commands (``{"cmd": NAME, ...}``), each answered with a JSON object (``error`` on failure):

- ``spawn``: master, logs, hostnames, hello (bool), reconnect_ivl (ms). Creates and
  connects the sockets, sends HELLO if asked; answers at once with the times.
- ``mode``: start ("zero" | "hold" | "ignore"), status ("running" | "ignore").
- ``wait``: what (hello_ok | starts | end_oks | status | pongs), count, timeout; answers
  when the counter reaches ``count``.
- ``mark``: forget the "first after mark" times; ``first``: what, timeout -> the first
  time that kind of message arrived after the mark.
- ``job``: job, timeout -> START and END_OK times of one job (zero mode).
- ``pingpong``: window, duration, warmup, hostnames (optional) -> closed-loop PING/PONG.
- ``ping_every``: interval, hostnames (optional; all by default).
- ``logs``: jobs, lines, results_every -> pushes lines, one PUSH socket per job.
- ``end``: jobs -> result line and END for jobs held in "hold" mode.
- ``stats``; ``close``.
"""

import heapq
import json
import lzma
import os
import resource
import select
import sys
import time

import zmq

MASTER = b"master"
PING = [MASTER, b"PING"]
DESCRIPTION = lzma.compress(b"job: {}\n")
END_RESEND = 5.0


def _raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def log_line(lvl, msg):
    return json.dumps({"dt": "2024-01-01T00:00:00.000000", "lvl": lvl, "msg": msg},
                      separators=(", ", ": "))


def job_result_line():
    return log_line("results", {"definition": "lava", "case": "job", "result": "pass"})


class Sim:
    def __init__(self, out):
        _raise_fd_limit()
        self.out = out
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, 65536)
        # epoll on the sockets' ZMQ_FD: a wake-up costs O(ready sockets), where zmq_poll
        # would look at all 10,000 of them (a syscall each) every time.
        self.epoll = select.epoll()
        self.by_fd = {}
        self.touched = set()     # sockets sent to outside their own drain: check them
        self.stdin = sys.stdin.fileno()
        os.set_blocking(self.stdin, False)
        self.epoll.register(self.stdin, select.EPOLLIN)
        self._inbuf = b""
        self.socks = {}          # socket -> hostname
        self.by_name = {}        # hostname -> socket
        self.push = None
        self.pushes = []
        self.logs_url = None
        self.start_mode = "hold"
        self.status_mode = "running"
        self.counts = {"hello_ok": 0, "starts": 0, "end_oks": 0, "status": 0, "pongs": 0,
                       "cancels": 0, "other": 0}
        self.started = {}        # job id -> START time (first one)
        self.job_workers = {}    # job id -> the worker it runs on (START or STATUS)
        self.ended = {}          # job id -> (worker, END sent at), until END_OK
        self.end_ok = {}         # job id -> END_OK time
        self.first_start = None
        self.last_end_ok = None
        self.mark_time = None
        self.first_after = {}
        self.waiter = None       # (predicate, reply builder, deadline)
        self.timers = []         # heap of (time, hostname) for periodic pings
        self.ping_interval = None
        self.result = job_result_line().encode()
        self.running = True

    # -- output ---------------------------------------------------------------------------

    def reply(self, data):
        self.out.write(json.dumps(data) + "\n")
        self.out.flush()

    # -- sockets ----------------------------------------------------------------------------

    def spawn(self, master, hostnames, logs=None, hello=True, reconnect_ivl=100):
        t0 = time.monotonic()
        if logs and self.push is None:
            self.logs_url = logs
            self.push = self.ctx.socket(zmq.PUSH)
            self.push.setsockopt(zmq.LINGER, 0)
            self.push.setsockopt(zmq.SNDHWM, 100000)
            self.push.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl)
            self.push.connect(logs)
        created = []
        for name in hostnames:
            sock = self.ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.IDENTITY, name.encode())
            sock.setsockopt(zmq.CONNECT_RID, MASTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl)
            sock.connect(master)
            self.socks[sock] = name
            self.by_name[name] = sock
            fd = sock.getsockopt(zmq.FD)
            self.by_fd[fd] = sock
            self.epoll.register(fd, select.EPOLLIN)
            created.append(sock)
        t1 = time.monotonic()
        if hello:
            for sock in created:
                sock.send_multipart([MASTER, b"HELLO", b"3"])
        self.touched.update(created)
        return {"t_begin": t0, "t_created": t1, "t_sent": time.monotonic(),
                "sockets": len(self.socks)}

    def send(self, name, frames):
        sock = self.by_name[name]
        self.touched.add(sock)
        try:
            sock.send_multipart([MASTER] + frames, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the master is gone or slow: the protocol resends

    def finish_job(self, name, job):
        """A zero-length job: its lava/job result on the log stream, then END."""
        if self.push is not None:
            self.push.send_multipart([job, self.result])
        self.send(name, [b"END", job, b"", DESCRIPTION])
        self.ended[job] = (name, time.monotonic())

    # -- the loop ---------------------------------------------------------------------------

    def handle(self, sock, frames, now):
        if len(frames) < 2 or frames[0] != MASTER:
            self.counts["other"] += 1
            return
        action = frames[1]
        name = self.socks[sock]
        if action == b"PONG":
            self.counts["pongs"] += 1
            kind = "pong"
        elif action == b"START":
            job = frames[2]
            self.job_workers[job] = name
            self.counts["starts"] += 1
            kind = "start"
            if self.first_start is None:
                self.first_start = now
            if self.start_mode == "ignore":
                pass
            elif job in self.ended:
                self.send(name, [b"END", job, b"", DESCRIPTION])
            else:
                self.started.setdefault(job, now)
                sock.send_multipart([MASTER, b"START_OK", job])
                if self.start_mode == "zero":
                    self.finish_job(name, job)
        elif action == b"END_OK":
            job = frames[2]
            self.counts["end_oks"] += 1
            kind = "end_ok"
            if self.ended.pop(job, None) is not None:
                self.end_ok[job] = now
                self.last_end_ok = now
        elif action == b"HELLO_OK":
            self.counts["hello_ok"] += 1
            kind = "hello_ok"
        elif action == b"STATUS":
            job = frames[2]
            self.job_workers[job] = name
            self.counts["status"] += 1
            kind = "status"
            if job in self.ended:
                self.send(name, [b"END", job, b"", DESCRIPTION])
            elif self.status_mode == "running":
                sock.send_multipart([MASTER, b"START_OK", job])
        elif action == b"CANCEL":
            self.counts["cancels"] += 1
            kind = "cancel"
            self.finish_job(name, frames[2])
        else:
            self.counts["other"] += 1
            kind = "other"
        if self.mark_time is not None and kind not in self.first_after:
            self.first_after[kind] = now

    def drain(self, sock, now):
        """Read until the socket has nothing; a send may have eaten the FD's signal, so
        ask ZMQ_EVENTS again before leaving (the ZMQ_FD contract)."""
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.handle(sock, frames, now)

    def run(self):
        while self.running:
            now = time.monotonic()
            timeout = 0.1
            if self.timers:
                timeout = max(0.0, min(timeout, self.timers[0][0] - now))
            if self.waiter is not None:
                timeout = min(timeout, 0.02)
            if self.touched:
                timeout = 0
            for fd, _ in self.epoll.poll(timeout):
                now = time.monotonic()
                if fd == self.stdin:
                    self.read_commands()
                else:
                    self.drain(self.by_fd[fd], now)
            now = time.monotonic()
            self.run_timers(now)
            if self.touched:
                touched, self.touched = self.touched, set()
                for sock in touched:
                    self.drain(sock, now)
            self.check_waiter(now)

    def run_timers(self, now):
        while self.timers and self.timers[0][0] <= now:
            _, name = heapq.heappop(self.timers)
            if self.ping_interval is None:
                self.timers = []
                break
            self.send(name, [b"PING"])
            heapq.heappush(self.timers, (now + self.ping_interval, name))
        if self.ended:
            for job, (name, sent) in list(self.ended.items()):
                if now - sent > END_RESEND:
                    self.send(name, [b"END", job, b"", DESCRIPTION])
                    self.ended[job] = (name, now)

    def check_waiter(self, now):
        if self.waiter is None:
            return
        predicate, build, deadline = self.waiter
        if predicate():
            self.waiter = None
            self.reply(build())
        elif now > deadline:
            self.waiter = None
            self.reply(dict(build(), error="timeout", counts=dict(self.counts)))

    def read_commands(self):
        try:
            chunk = os.read(self.stdin, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.running = False
            return
        self._inbuf += chunk
        while b"\n" in self._inbuf:
            line, self._inbuf = self._inbuf.split(b"\n", 1)
            if line.strip():
                try:
                    self.command(json.loads(line))
                except Exception as exc:  # report, never die: the benchmark decides
                    self.reply({"error": "%s: %s" % (type(exc).__name__, exc)})

    # -- commands -----------------------------------------------------------------------

    def wait_for(self, predicate, build, timeout):
        self.waiter = (predicate, build, time.monotonic() + timeout)
        self.check_waiter(time.monotonic())

    def command(self, msg):
        cmd = msg.pop("cmd")
        getattr(self, "cmd_" + cmd)(**msg)

    def cmd_spawn(self, master, hostnames, logs=None, hello=True, reconnect_ivl=100):
        self.reply(self.spawn(master, hostnames, logs, hello, reconnect_ivl))

    def cmd_mode(self, start=None, status=None):
        if start:
            self.start_mode = start
        if status:
            self.status_mode = status
        self.reply({"ok": True})

    def _count(self, what):
        if what == "jobs_done":      # distinct jobs whose END_OK came back
            return len(self.end_ok)
        if what == "jobs_started":   # distinct jobs that got START
            return len(self.started)
        return self.counts[what]

    def cmd_wait(self, what, count, timeout=60):
        self.wait_for(lambda: self._count(what) >= count,
                      lambda: {"count": self._count(what), "t": time.monotonic(),
                               "first_start": self.first_start,
                               "last_end_ok": self.last_end_ok}, timeout)

    def cmd_mark(self):
        self.mark_time = time.monotonic()
        self.first_after = {}
        self.reply({"t": self.mark_time})

    def cmd_first(self, what, timeout=30):
        self.wait_for(lambda: what in self.first_after,
                      lambda: {"t": self.first_after.get(what)}, timeout)

    def cmd_job(self, job, timeout=30):
        key = str(job).encode()
        self.wait_for(lambda: key in self.end_ok,
                      lambda: {"start": self.started.get(key), "end_ok": self.end_ok.get(key)},
                      timeout)

    def cmd_stats(self):
        self.reply({"counts": self.counts, "sockets": len(self.socks),
                    "first_start": self.first_start, "last_end_ok": self.last_end_ok,
                    "cpu": time.process_time()})

    def cmd_end_ok_times(self):
        self.reply({"times": list(self.end_ok.values())})

    def cmd_ping_all(self):
        t0 = time.monotonic()
        for name in self.by_name:
            self.send(name, [b"PING"])
        self.reply({"t": t0, "workers": len(self.by_name)})

    def cmd_ping_every(self, interval, hostnames=None):
        names = hostnames or list(self.by_name)
        self.ping_interval = interval
        now = time.monotonic()
        self.timers = [(now + interval * i / max(1, len(names)), name)
                       for i, name in enumerate(names)]
        heapq.heapify(self.timers)
        self.reply({"ok": True, "workers": len(names)})

    def cmd_end(self, jobs):
        for job in jobs:
            key = str(job).encode()
            name = self.job_workers.get(key)
            if name is not None:
                self.finish_job(name, key)
        self.reply({"ok": True})

    def cmd_pingpong(self, duration, warmup=0.5, window=1, hostnames=None):
        """Closed loop: every worker keeps ``window`` PINGs in flight; count the PONGs of
        the measured window. Nothing else is served meanwhile."""
        names = hostnames or list(self.by_name)
        socks = [self.by_name[n] for n in names]
        by_fd = {sock.getsockopt(zmq.FD): sock for sock in socks}
        for _ in range(window):
            for sock in socks:
                sock.send_multipart(PING)
        start = time.monotonic()
        measure_from = start + warmup
        stop = measure_from + duration
        counted = 0
        cpu0 = None
        now = start
        NOBLOCK, Again, EVENTS, POLLIN = zmq.NOBLOCK, zmq.Again, zmq.EVENTS, zmq.POLLIN
        pending = list(socks)
        # A window that saw nothing (a stalled machine) is extended, up to 10 s.
        while now < stop or (counted == 0 and now < stop + 10):
            ready = [by_fd[fd] for fd, _ in self.epoll.poll(0 if pending else 0.05)
                     if fd in by_fd] + pending
            pending = []
            now = time.monotonic()
            if cpu0 is None and now >= measure_from:
                cpu0, measure_from = time.process_time(), now
                counted = 0
            for sock in ready:
                while sock.getsockopt(EVENTS) & POLLIN:
                    while True:
                        try:
                            frames = sock.recv_multipart(NOBLOCK)
                        except Again:
                            break
                        if frames[1] == b"PONG":
                            counted += 1
                            sock.send_multipart(PING)
        seconds = now - measure_from
        cpu = time.process_time() - (cpu0 or 0)
        # Let the PONGs still in flight arrive, so later commands start clean.
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            self.epoll.poll(0.05)
            for sock in socks:
                while True:
                    try:
                        sock.recv_multipart(NOBLOCK)
                    except Again:
                        break
        self.reply({"round_trips": counted, "seconds": seconds,
                    "rate": counted / seconds if seconds > 0 else 0.0,
                    "sim_cpu": cpu / seconds if seconds > 0 else 0.0,
                    "workers": len(socks), "window": window})

    def cmd_logs(self, jobs, lines, results_every=10, hwm=10000, timeout=None):
        """Push ``lines`` log lines for each job, one PUSH socket per job (as lava-run),
        interleaved; every ``results_every``-th line is a test result. (``timeout`` is
        how long the benchmark waits for the answer.)"""
        pushes = []
        for job in jobs:
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDHWM, hwm)
            push.connect(self.logs_url)
            pushes.append((str(job).encode(), push))
        info = [log_line("info", "chatty line %d of a benchmark job: nothing to see" % i)
                .encode() for i in range(100)]
        results = [log_line("results", {"definition": "bench", "case": "case-%d" % i,
                                        "result": "pass"}).encode() for i in range(100)]
        total_bytes = 0
        per_line = [len(x) + 3 for x in info], [len(x) + 3 for x in results]
        time.sleep(0.2)  # let the PUSH sockets connect
        t0 = time.monotonic()
        sent = cases = 0
        for n in range(lines):
            is_result = results_every and n % results_every == results_every - 1
            line = results[n % 100] if is_result else info[n % 100]
            size = per_line[1][n % 100] if is_result else per_line[0][n % 100]
            for key, push in pushes:
                push.send_multipart((key, line))
            sent += len(pushes)
            total_bytes += size * len(pushes)
            if is_result:
                cases += len(pushes)
        t1 = time.monotonic()
        self.pushes.extend(p for _, p in pushes)
        self.reply({"t0": t0, "t1": t1, "sent": sent, "bytes": total_bytes,
                    "cases": cases})

    def cmd_close(self):
        self.reply({"ok": True})
        self.running = False


def main():
    out = sys.stdout
    sim = Sim(out)
    try:
        sim.run()
    finally:
        for sock in list(sim.socks):
            sock.close(linger=0)
        if sim.push is not None:
            sim.push.close(linger=0)
        for push in sim.pushes:
            push.close(linger=0)
        sim.ctx.term()


if __name__ == "__main__":
    main()
