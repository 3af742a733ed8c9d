"""The physical limit of lavacore's own stack: a bare zmq.green ROUTER that answers
protocol v3 greetings and PINGs and does nothing else.

It has the master controller's shape (one greenlet, a green Poller waiting, then a
NOBLOCK drain through the plain pyzmq socket shadowing the green one, as the master's
services drain; the same socket options) without decoding, storage, hooks or logging, so
the master's PING/PONG rate divided by this one's is the share of the stack the master
keeps.

With ``--logs-dir DIR`` it is also the bare log sink: a zmq.green PULL socket drained the
same way, each ``[job_id, line]`` appended as ``- line`` to ``DIR/<job_id>/output.yaml``
(one write per job and batch), nothing parsed: the limit of the stack for scenario 5.

Run as ``python -m bench.echo [--listen tcp://127.0.0.1:*] [--logs-dir DIR]``; it prints
``listening for workers on ENDPOINT`` (and ``listening for job logs on ENDPOINT``) on
stderr and serves until SIGTERM.
"""

import collections
import os

import argparse
import signal
import sys

import gevent
import gevent.event
import zmq as plain_zmq
import zmq.green as zmq

REPLIES = {b"PING": [b"PONG", b"20"], b"HELLO": [b"HELLO_OK"], b"HELLO_RETRY": [b"HELLO_OK"]}
DRAIN = 1000


def serve(ctx, listen, stop):
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.IDENTITY, b"master")
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.BACKLOG, 1024)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(listen)
    print("listening for workers on %s" % sock.getsockopt_string(zmq.LAST_ENDPOINT),
          file=sys.stderr, flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    plain = plain_zmq.Socket.shadow(sock.underlying)
    while not stop.is_set():
        if not poller.poll(500):
            continue
        for _ in range(DRAIN):
            try:
                frames = plain.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            answer = REPLIES.get(frames[1]) if len(frames) > 1 else None
            if answer is not None:
                plain.send_multipart([frames[0]] + answer, zmq.NOBLOCK)
    sock.close(linger=0)


def sink(ctx, listen, directory, stop):
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10000)
    sock.bind(listen)
    print("listening for job logs on %s" % sock.getsockopt_string(zmq.LAST_ENDPOINT),
          file=sys.stderr, flush=True)
    files = {}
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    plain = plain_zmq.Socket.shadow(sock.underlying)
    while not stop.is_set():
        if not poller.poll(500):
            continue
        batch = collections.defaultdict(list)
        for _ in range(5000):
            try:
                job, line = plain.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            batch[job].append(line)
        for job, lines in batch.items():
            handle = files.get(job)
            if handle is None:
                path = os.path.join(directory, job.decode(), "output.yaml")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                handle = files[job] = open(path, "ab")
            handle.write(b"".join(b"- " + line + b"\n" for line in lines))
            handle.flush()
    for handle in files.values():
        handle.close()
    sock.close(linger=0)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.echo")
    parser.add_argument("--listen", default="tcp://127.0.0.1:*")
    parser.add_argument("--logs", default="tcp://127.0.0.1:*")
    parser.add_argument("--logs-dir", help="also be the bare log sink, writing here")
    args = parser.parse_args(argv)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    ctx = zmq.Context()
    if args.logs_dir:
        gevent.spawn(sink, ctx, args.logs, args.logs_dir, stop)
        gevent.sleep(0.1)
    serve(ctx, args.listen, stop)
    gevent.sleep(0.6)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
