#!/usr/bin/env python3
"""Benchmark `canhazgpu web`: requests/second on /api/status with 20 concurrent
keep-alive clients, and how many provider (nvidia-smi) runs it took meanwhile.

Runs against a private redis-server on a unix socket and the nvidia-smi stand-in of
tests/bin (8 H100s, three reserved, one busy without a reservation), so it needs
no GPU.  Prints medians over the rounds and the ratio to the 500 req/s target.

    python3 bench/web.py [--clients 20] [--seconds 5] [--rounds 3]
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = 500  # requests/second
CACHE_SECONDS = 5.0  # canhazgpu.WEB_CACHE_SECONDS


def wait_for(what, check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"bench/web.py: {what} did not come up within {timeout:.0f}s")
        time.sleep(0.05)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Setup:
    """Redis, the nvidia-smi stand-in and a seeded pool, in a temporary directory."""

    def __init__(self):
        if shutil.which("redis-server") is None:
            sys.exit("bench/web.py: redis-server is not installed (make deps)")
        self.dir = Path(tempfile.mkdtemp(prefix="chg-bench-web-"))
        sock = self.dir / "redis.sock"
        self.redis = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "log")],
        )  # fmt: skip
        wait_for("redis-server", sock.exists)
        (self.dir / "bin").mkdir()
        (self.dir / "bin" / "nvidia-smi").symlink_to(REPO / "tests" / "bin" / "nvidia-smi")
        state = {
            "gpus": [{"memory_used": "30000"}] * 3 + [{"memory_used": "12000"}] + [{}] * 4,
            "processes": [{"pid": 1, "name": "python3", "gpu": 3, "used_memory": "11990"}],
        }
        (self.dir / "smi.json").write_text(json.dumps(state))
        self.smi_log = self.dir / "smi.log"
        self.env = dict(
            os.environ,
            CANHAZGPU_REDIS_URL=f"unix://{sock}",
            PATH=f"{self.dir / 'bin'}{os.pathsep}{os.environ['PATH']}",
            FAKE_NVIDIA_SMI_STATE=str(self.dir / "smi.json"),
            FAKE_NVIDIA_SMI_LOG=str(self.smi_log),
        )

    def seed(self):
        self.chg("admin", "--gpus", "8", "--provider", "nvidia", "--force")
        for gpu, note in ((0, "fine-tune"), (1, "eval"), (2, "notebook")):  # --force: busy GPUs
            self.chg("reserve", "-G", str(gpu), "-d", "2h", "-n", note, "--nonblock", "--force")

    def chg(self, *args):
        subprocess.run([sys.executable, str(REPO / "canhazgpu.py"), *args], env=self.env,
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip

    def provider_runs(self):
        """nvidia-smi runs so far, counted as provider queries (two per query)."""
        if not self.smi_log.exists():
            return 0
        return len(self.smi_log.read_text().splitlines()) / 2

    def close(self):
        self.redis.terminate()
        self.redis.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def client(port, stop, counts, errors):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    done = 0
    while not stop.is_set():
        conn.request("GET", "/api/status")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or not body.startswith(b"["):
            errors.append(resp.status)
        done += 1
    conn.close()
    counts.append(done)


def load(port, clients, seconds):
    stop, counts, errors = threading.Event(), [], []
    threads = [
        threading.Thread(target=client, args=(port, stop, counts, errors)) for _ in range(clients)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        sys.exit(f"bench/web.py: {len(errors)} failed requests, e.g. HTTP {errors[0]}")
    return sum(counts), elapsed


def measure(clients=20, seconds=3.0, rounds=3):
    """For bench/run.py: requests/second (median of the rounds) and provider runs."""
    from benchredis import figure

    setup = Setup()
    port = free_port()
    server = None
    try:
        setup.seed()
        server = subprocess.Popen(
            [sys.executable, str(REPO / "canhazgpu.py"), "web", "--host", "127.0.0.1", "--port",
             str(port)], env=setup.env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for("canhazgpu web", lambda: connects(port))
        load(port, clients, 1.0)  # warm-up: connections, script cache, threads
        runs_before = setup.provider_runs()
        rates, total = [], 0.0
        for _ in range(rounds):
            requests, elapsed = load(port, clients, seconds)
            rates.append(requests / elapsed)
            total += elapsed
        runs = setup.provider_runs() - runs_before
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(10)
        setup.close()
    rate = statistics.median(rates)
    return [
        figure(f"web /api/status, {clients} clients", rate, "req/s", "target", TARGET,
               f">= {TARGET} req/s", rate >= TARGET),
        figure("  nvidia-smi runs meanwhile", runs, "runs", "5 s windows", total / CACHE_SECONDS,
               "<= 1 per window", runs <= int(total / CACHE_SECONDS) + 1),
    ]  # fmt: skip


def main():
    from benchredis import print_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures = measure(args.clients, args.seconds, args.rounds)
    print_table(figures)
    return 0 if all(f["met"] is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
