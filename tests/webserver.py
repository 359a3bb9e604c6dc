"""`canhazgpu web` for the web tests: started on a free loopback port (never 0.0.0.0),
ready when it accepts connections, stopped with SIGTERM; and a seeded pool to show."""

import http.client
import json
import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import assert_no_traceback, free_port

# Strings a user or a process controls, shaped to run script if ever put in as HTML.
XSS_NOTE = '<img src=x onerror="window.__xss=1">'
XSS_USER = "<script>window.__xss=2</script>"
XSS_QUEUE_NOTE = '<svg onload="window.__xss=3"></svg>'


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self):
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


class WebServer:
    def __init__(self, cli, workdir, *args, env=None):
        self.log = workdir / f"web-{time.monotonic_ns()}.log"
        for _ in range(3):  # a free port can be taken between our check and its bind
            self.port = free_port()
            with open(self.log, "w") as err:
                self.proc = cli.popen(
                    "web", "--host", "127.0.0.1", "--port", self.port, *args,
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                )  # fmt: skip
            if self._wait_ready():
                return
            if "cannot listen" not in self.stderr:
                pytest.fail(f"canhazgpu web exited at start:\n{self.stderr}", pytrace=False)
        pytest.fail(f"canhazgpu web found no free port:\n{self.stderr}", pytrace=False)

    def _wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.02)
        self.proc.kill()
        pytest.fail(f"canhazgpu web did not listen within {timeout}s:\n{self.stderr}")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def stderr(self):
        return self.log.read_text()

    def request(self, method, path, headers=None, body=None, timeout=15):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def get_json(self, path, status=200):
        resp = self.get(path)
        assert resp.status == status, f"GET {path}: {resp.status} {resp.text}"
        assert resp.headers["Content-Type"] == "application/json"
        return resp.json()

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Signal the server; returns its exit status once it is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"canhazgpu web ignored signal {sig} for {timeout}s", pytrace=False)
        assert_no_traceback(self.stderr, "the web server's stderr")
        return self.proc.returncode


def web_servers(cli, workdir):
    """The body of a `web` fixture: web(*args, env=None) -> a running WebServer,
    each stopped at the end of the test."""
    servers = []

    def start(*args, env=None):
        servers.append(WebServer(cli, workdir, *args, env=env))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def history(r, user, gpu, hours_ago, hours, kind="run"):
    """A finished reservation in the usage history, as release writes it."""
    end = time.time() - hours_ago * 3600
    record = {
        "user": user,
        "gpu_id": gpu,
        "start_time": end - hours * 3600,
        "end_time": end,
        "duration_seconds": hours * 3600,
        "reservation_type": kind,
    }
    r.zadd("canhazgpu:usage_history_sorted", {json.dumps(record): end})


def seed_pool(cli, r, fake_smi):
    """Five GPUs, one of each kind, a waiter and some history:
    0 reserved (manual) by XSS_USER with XSS_NOTE, 1 held by alice's run, 2 free,
    3 used by a process without a reservation, 4 an unreadable state in Redis."""
    fake_smi.set(
        gpus=[{}, {"memory_used": "30210"}, {}, {"memory_used": "5000"}, {}],
        processes=[
            {"pid": os.getpid(), "name": "python3", "gpu": 3, "used_memory": "4990"},
            {"pid": 999999, "name": "torchrun", "gpu": 1, "used_memory": "30200"},
        ],
    )
    cli("admin", "--gpus", "5", check=True)
    cli("reserve", "-G", "0", "-d", "4h", "--note", XSS_NOTE, "--user", XSS_USER,
        "--nonblock", check=True)  # fmt: skip
    now = time.time()
    run = {
        "user": "alice",
        "actual_user": "alice",
        "type": "run",
        "start_time": now - 3725,
        "last_heartbeat": now - 5,
        "note": "llama fine-tune, lr 3e-4",
        "reservation_id": "4f2c",
        "host": "node1",
        "pid": 999998,
    }
    r.set("canhazgpu:gpu:1", json.dumps(run))
    r.set("canhazgpu:gpu:2", json.dumps({"last_released": now - 1800}))
    r.set("canhazgpu:gpu:4", "{not json")
    entry = {
        "id": "0d9e5c1a-7f43-4a51-9b7e-3c2d1e0f9a8b",
        "user": "dave",
        "actual_user": "dave",
        "requested_count": 1,
        "requested_ids": [1],
        "allocated_gpus": [],
        "reservation_type": "run",
        "note": XSS_QUEUE_NOTE,
        "enqueue_time": now - 95,
        "last_heartbeat": now,
    }
    r.zadd("canhazgpu:queue", {entry["id"]: time.time_ns() - 95 * 10**9})
    r.set(f"canhazgpu:queue:entry:{entry['id']}", json.dumps(entry))
    history(r, "alice", 1, 30, 6)
    history(r, "bob", 2, 50, 2.5, "manual")
    history(r, "carol", 3, 24 * 20, 12)
    fake_smi.clear_calls()
