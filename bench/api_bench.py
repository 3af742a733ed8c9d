"""API requests per second: ``scheduler.jobs.show`` and ``scheduler.jobs.submit`` over
XML-RPC against a real master process (SQLite, in a temporary directory).

    python bench/api_bench.py [--seconds 5] [--clients 1,4,16]

Each client is a separate process with one keep-alive HTTP connection sending requests
back to back; a request counts if it is answered 200 without a fault. The master and the
clients share the machine, so on a 2-core box the figures are whole-machine figures.
"""

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import http.client
import urllib.parse
import xmlrpc.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOB = textwrap.dedent("""\
    device_type: qemu
    job_name: bench
    priority: medium
    visibility: public
    timeouts:
      job:
        minutes: 5
    actions:
    - test:
        definitions:
        - from: inline
          name: smoke
          path: inline/smoke.yaml
          repository:
            metadata:
              format: Lava-Test Test Definition 1.0
              name: smoke
            run:
              steps:
              - echo hello
    """)


def write_config(root):
    etc = os.path.join(root, "etc", "dispatcher-config")
    for sub in ("device-types", "devices", "health-checks"):
        os.makedirs(os.path.join(etc, sub), exist_ok=True)
    with open(os.path.join(etc, "device-types", "qemu.jinja2"), "w") as handle:
        handle.write("device_type: qemu\n")
    with open(os.path.join(etc, "devices", "qemu01.jinja2"), "w") as handle:
        handle.write("{% extends 'qemu.jinja2' %}\n")
    path = os.path.join(root, "config.toml")
    with open(path, "w") as handle:
        handle.write(textwrap.dedent("""\
            [master]
            listen = "tcp://127.0.0.1:*"
            logs = "tcp://127.0.0.1:*"
            events = "tcp://127.0.0.1:*"
            [storage]
            backend = "sqlite"
            url = "var/lavacore.db"
            [api]
            listen = "127.0.0.1:0"
            [[devices]]
            hostname = "qemu01"
            device_type = "qemu"
            worker = "worker1"
            """))
    return path


def start_master(config):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "lavacore.cli", "-c", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    found = {}
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            match = re.search(r"API listening on (\S+)", line)
            if match:
                found["url"] = match.group(1)
            if "master started" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(30) or "url" not in found:
        proc.kill()
        raise SystemExit("the master did not start")
    token = subprocess.run([sys.executable, "-m", "lavacore.cli", "-c", config, "tokens",
                            "create", "bench"], capture_output=True, text=True, env=env,
                           check=True).stdout.strip()
    return proc, found["url"], token


def client(url, token, body_of, seconds, start, counts, index):
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    import base64

    headers = {"Content-Type": "text/xml", "Authorization": "Basic " + base64.b64encode(
        ("bench:%s" % token).encode()).decode()}
    done = errors = 0
    start.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.request("POST", "/RPC2", body=body_of(), headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status == 200 and b"<fault>" not in data:
            done += 1
        else:
            errors += 1
    counts[index] = (done, errors)


def show_body(job_id):
    body = xmlrpc.client.dumps((job_id,), "scheduler.jobs.show").encode()
    return lambda: body


def submit_body():
    body = xmlrpc.client.dumps((JOB,), "scheduler.jobs.submit").encode()
    return lambda: body


def measure(url, token, make_body, clients, seconds):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    counts = ctx.Manager().dict()
    procs = [ctx.Process(target=client, args=(url, token, make_body, seconds, start, counts, i))
             for i in range(clients)]
    for proc in procs:
        proc.start()
    time.sleep(0.3)
    began = time.monotonic()
    start.set()
    for proc in procs:
        proc.join()
    elapsed = time.monotonic() - began
    done = sum(c[0] for c in counts.values())
    errors = sum(c[1] for c in counts.values())
    return done / elapsed, errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", default="1,4,16")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lavacore-api-bench-") as root:
        proc, url, token = start_master(write_config(root))
        try:
            rpc = xmlrpc.client.ServerProxy(url.replace("://", "://bench:%s@" % token)
                                            + "/RPC2", allow_none=True)
            job_id = rpc.scheduler.jobs.submit(JOB)
            print("lavacore API at %s (%s), %d cores" % (url, rpc.system.version(),
                                                        os.cpu_count()))
            for clients in [int(c) for c in args.clients.split(",")]:
                for name, body in (("scheduler.jobs.show", show_body(job_id)),
                                   ("scheduler.jobs.submit", submit_body())):
                    rate, errors = measure(url, token, body, clients, args.seconds)
                    print("%-24s %3d client(s): %8.0f requests/s%s" % (
                        name, clients, rate, " (%d errors)" % errors if errors else ""))
            print("jobs queued by the benchmark: %d"
                  % rpc.scheduler.jobs.list(None, None, 0, 1)[0]["id"])
        finally:
            proc.terminate()
            proc.wait(15)


if __name__ == "__main__":
    main()
