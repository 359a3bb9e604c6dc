"""Chaos: 8 workers loop over random `run` (a probe that logs which GPUs it got and
when), `reserve`, `release`, `status`, `queue` and `run --wait`, while a killer
sends SIGKILL, SIGTERM and SIGINT to random canhazgpu processes (also during their
start-up) and Redis, with AOF on, is restarted once.

Invariants: no two holders on one GPU at overlapping times (excusing only a probe
whose `run` was SIGKILLed: its reservation may expire while it lives); once the
workers stop and the timeouts pass, every GPU is free and the queue is empty; no
traceback in any output; every exit code in the documented set.

CHAOS_SEED replays a run (the seed is printed, and named by every failure);
CHAOS_SECONDS sets its length (default 60)."""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import PROGRAM, RedisServer, base_env

GPUS = 4
HEARTBEAT = {"CANHAZGPU_HEARTBEAT_INTERVAL": "0.5s", "CANHAZGPU_HEARTBEAT_TIMEOUT": "3s"}
QUEUE_TIMEOUT = 3.0
DURATION = 2.0  # of a manual reservation
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
DEATHS = {-s for s in SIGNALS}
# The documented exit codes: 0, 1 (operational), 2 would be a usage error (none is made
# here); `run` gives 124 (timeout) and 125 (its own failure), else the probe's own.
EXITS = {
    "admin": {0},
    "run": {0, 124, 125} | DEATHS,
    "reserve": {0, 1} | DEATHS,
    "release": {0, 1} | DEATHS,
    "status": {0, 1} | DEATHS,
    "queue": {0, 1} | DEATHS,
}

# The probe logs when it starts and ends, and the GPUs it got; a signal ends it at
# once (logged), so a SIGKILLed `run`'s probe ends with its parent-death SIGTERM.
# A shell script: a Python probe, signalled while its interpreter starts, would print
# CPython's own start-up traceback.
PROBE = r"""#!/bin/sh
log=$1
note() {  # `date` may die of a signal sent to the group: ask again
    t=
    while [ -z "$t" ]; do t=$(date +%s.%N); done
    printf '{"kind": "%s", "pid": %s, "run": %s, "t": %s, "gpus": "%s"}\n' \
        "$1" $$ $PPID "$t" "$CUDA_VISIBLE_DEVICES" >> "$log"
}
trap 'note end; trap - TERM; kill -TERM $$' TERM
trap 'note end; trap - INT; kill -INT $$' INT
trap 'note end; trap - HUP; kill -HUP $$' HUP
note start
sleep "$2" & wait $!
note end
"""


class Chaos:
    def __init__(self, seed, workdir, redis_url):
        self.seed, self.workdir = seed, Path(workdir)
        home = self.workdir / "home"
        home.mkdir()
        bindir = self.workdir / "bin"
        bindir.mkdir()  # no nvidia-smi: the fake provider
        self.env = base_env(redis_url, home, bindir, (HEARTBEAT,))
        self.env["CANHAZGPU_QUEUE_HEARTBEAT_TIMEOUT"] = f"{QUEUE_TIMEOUT:g}s"
        self.probe = self.workdir / "probe.sh"
        self.probe.write_text(PROBE)
        self.probe.chmod(0o755)
        self.log = self.workdir / "probes.log"
        self.lock = threading.Lock()
        self.live = {}  # pid -> Popen, what the killer may hit
        self.kills = []  # (time, pid, signal, command)
        self.results = []  # (command, argv, exit code, stderr)
        self.manual = []  # (gpu, asked, printed, expiry at the latest) of each reserve
        self.releases = []  # (began, finished) of each `release` (of all manual ones)
        self.stop = threading.Event()
        self.stderr = {}  # pid -> what that canhazgpu process said
        self.exited = {}  # pid -> when it had exited
        self.outage = None  # (down, up) of the Redis restart

    def fail(self, message):
        pytest.fail(f"chaos (CHAOS_SEED={self.seed}): {message}", pytrace=False)

    # -- the workers

    def cli(self, *args, timeout=30):
        argv = [sys.executable, str(PROGRAM), *map(str, args)]
        proc = subprocess.Popen(
            argv, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        with self.lock:
            self.live[proc.pid] = proc
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.results.append((args[0], args, "hung", err))
            self.stderr[proc.pid] = err
            return proc.returncode, out
        finally:
            with self.lock:
                self.live.pop(proc.pid, None)
        self.results.append((args[0], args, proc.returncode, err))
        self.stderr[proc.pid] = err
        self.exited[proc.pid] = time.time()
        return proc.returncode, out

    def worker(self, rng):
        while not self.stop.is_set():
            action = rng.choice(
                ["run", "run", "run-wait", "reserve", "reserve", "release", "status", "queue"]
            )
            if action.startswith("run"):
                count = rng.choice([1, 1, 2])
                how = ["--wait", "3s"] if action == "run-wait" else ["--nonblock"]
                seconds = f"{rng.uniform(0.1, 1.5):.2f}"
                self.cli("run", "--gpus", count, *how, "--", self.probe, self.log, seconds)
            elif action == "reserve":
                asked = time.time()
                code, out = self.cli("reserve", "--nonblock", "--short", "-d", f"{DURATION:g}s")
                if code == 0 and out.strip():
                    with self.lock:
                        for gpu in out.strip().split(","):
                            self.manual.append((int(gpu), asked, time.time(), asked + DURATION))
            elif action == "release":
                # Every worker is one account: this ends every worker's manual
                # reservations (never a run's), so it bounds their holding intervals.
                began = time.time()
                self.cli("release")
                self.releases.append((began, time.time()))
            else:
                self.cli(action)

    # -- the killer

    def killer(self, rng, redis, restart_at):
        restarted = False
        while not self.stop.is_set():
            time.sleep(rng.uniform(0.05, 0.4))
            if not restarted and time.monotonic() >= restart_at:
                down = time.time()
                redis.restart()  # AOF on: the state survives
                self.outage = (down, time.time())
                restarted = True
            with self.lock:
                victims = list(self.live.values())
            if not victims:
                continue
            proc = rng.choice(victims)
            if not started_importing(proc.pid):
                continue  # CPython's own start-up: not ours to handle
            time.sleep(rng.choice([0.0, 0.0, rng.uniform(0, 0.3)]))  # often at start-up
            sig = rng.choice(SIGNALS)
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                continue
            self.kills.append((time.time(), proc.pid, sig, proc.args[2]))
        return restarted

    # -- the invariants

    def intervals(self):
        """{gpu: [(start, end, who)]} of every probe and manual reservation."""
        starts, ends = {}, {}
        for line in self.log.read_text().splitlines() if self.log.exists() else ():
            try:
                event = json.loads(line)
            except ValueError:  # cut short by a kill: a start not logged, or an end
                continue
            (starts if event["kind"] == "start" else ends).setdefault(event["pid"], event)
        by_gpu = {g: [] for g in range(GPUS)}
        for pid, start in starts.items():
            # No end logged: it lasted until its run exited at the latest.
            end = ends.get(pid, {"t": self.exited.get(start["run"], float("inf"))})["t"]
            for gpu in start["gpus"].split(","):
                by_gpu[int(gpu)].append((start["t"], end, ("run", start["run"])))
        for gpu, asked, start, end in self.manual:
            # Certainly held from when it was printed; a release that finished after the
            # reserve began may have ended it at any time since (even before it printed).
            end = min([end, *(max(b, start) for b, f in self.releases if f > asked)])
            if end > start:
                by_gpu[gpu].append((start, end, ("reserve", None)))
        return by_gpu

    def check_no_double_booking(self):
        sigkilled = {pid: t for t, pid, sig, _ in self.kills if sig == signal.SIGKILL}
        checked = 0
        for gpu, spans in self.intervals().items():
            spans.sort()
            for k, (start, end, who) in enumerate(spans):
                checked += 1
                for later_start, _, other in spans[k + 1 :]:
                    if later_start >= end:
                        break
                    excused = who[0] == "run" and sigkilled.get(who[1], later_start) < later_start
                    if not excused:
                        kills = [
                            (round(t, 3), sig) for t, pid, sig, _ in self.kills if pid == who[1]
                        ]
                        self.fail(
                            f"GPU {gpu} had two holders: {who} from {start:.3f} to {end:.3f} "
                            f"and {other} from {later_start:.3f}; signals to the first: {kills}; "
                            f"Redis down {self.outage}; the first said: "
                            f"{self.stderr.get(who[1], '?')!r}"
                        )
        return checked

    def check_outputs(self):
        for command, args, code, err in self.results:
            if "Traceback" in err or "KeyboardInterrupt" in err:
                self.fail(f"a traceback from {args}:\n{err}")
            if code not in EXITS[command]:
                self.fail(f"{args} exited {code}, not one of {sorted(EXITS[command])}:\n{err}")


def started_importing(pid):
    """The program runs its own imports (past CPython's start-up): _json is mapped."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "/_json." in f.read()
    except OSError:
        return False


@pytest.mark.slow
def test_chaos():
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    seconds = float(os.environ.get("CHAOS_SECONDS", "60"))
    print(f"\nchaos: CHAOS_SEED={seed} CHAOS_SECONDS={seconds:g}")
    workdir = tempfile.mkdtemp(prefix="chg-chaos-")
    redis = RedisServer(workdir, extra=["--appendonly", "yes", "--appendfsync", "always"])
    redis.start()
    try:
        chaos = Chaos(seed, workdir, redis.url)
        code, _ = chaos.cli("admin", "--gpus", GPUS, "--provider", "fake")
        assert code == 0
        rng = random.Random(seed)
        workers = [
            threading.Thread(target=chaos.worker, args=(random.Random(rng.random()),))
            for _ in range(8)
        ]
        restart_at = time.monotonic() + seconds * rng.uniform(0.3, 0.7)
        outcome = {}
        killer = threading.Thread(
            target=lambda: outcome.update(restarted=chaos.killer(rng, redis, restart_at))
        )
        for t in [*workers, killer]:
            t.start()
        time.sleep(seconds)
        chaos.stop.set()
        for t in [*workers, killer]:
            t.join(60)
        assert outcome.get("restarted"), "Redis was never restarted"
        # Once the timeouts pass, whatever a SIGKILL left behind has expired.
        time.sleep(max(3.0, QUEUE_TIMEOUT, DURATION) + 1.0)
        code, out = chaos.cli("status", "--json")
        states = [row["status"] for row in json.loads(out)]
        if states != ["AVAILABLE"] * GPUS:
            chaos.fail(f"GPUs left held after the chaos: {out}")
        code, out = chaos.cli("queue", "--json")
        if json.loads(out)["total"] != 0:
            chaos.fail(f"the queue is not empty after the chaos: {out}")
        chaos.check_outputs()
        checked = chaos.check_no_double_booking()
        by_code = {}
        for command, _, code, _ in chaos.results:
            by_code[command, code] = by_code.get((command, code), 0) + 1
        print(
            f"chaos: {len(chaos.results)} operations, {len(chaos.kills)} kills "
            f"({sum(k[2] == signal.SIGKILL for k in chaos.kills)} SIGKILL), "
            f"{checked} holding intervals checked, Redis restarted once; exits: "
            + ", ".join(f"{c} {e}: {n}" for (c, e), n in sorted(by_code.items(), key=str))
        )
    finally:
        redis.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
