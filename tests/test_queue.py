"""The FCFS wait queue, black-box: real `canhazgpu reserve` processes waiting on a real
Redis, checked through their output, exit status and the keys they leave (SPEC §4-§6).

Every test polls for the state it expects with a deadline; none asserts on timing."""

import json
import os
import pty
import pwd
import re
import select
import signal
import subprocess
import time
import uuid

import pytest
from poolstate import gpu, wait_for

QUEUE = "canhazgpu:queue"
ENTRY = "canhazgpu:queue:entry:"
EVENTS = "canhazgpu:events"
ME = pwd.getpwuid(os.getuid()).pw_name  # the OS account every test command runs as


# --------------------------------------------------------------------------- helpers


def entries(r):
    """Queue entries in queue order."""
    return [json.loads(r.get(ENTRY + qid) or "null") for qid in r.zrange(QUEUE, 0, -1)]


def entry_of(r, proc):
    """The queue entry written by waiter process `proc` (ours record the pid)."""
    return next((e for e in entries(r) if e and e.get("pid") == proc.pid), None)


def partial_gpus(r, qid, count=8):
    return [i for i in range(count) if gpu(r, i).get("partial_queue_id") == qid]


def go_time(t, offset_hours=0):
    """Unix seconds -> RFC 3339 with nanoseconds and an offset, as Go's time.Time writes."""
    shift = offset_hours * 3600
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t + shift))
    nanos = int(round((t % 1) * 1e9)) % 1_000_000_000
    if offset_hours == 0:
        zone = "Z"
    else:
        sign = "+" if offset_hours > 0 else "-"
        zone = f"{sign}{abs(offset_hours):02d}:00"
    return f"{base}.{nanos:09d}{zone}"


def go_entry(r, enqueued, heartbeat=None, count=1, ids=None, allocated=(), offset_hours=0):
    """A queue entry exactly as the Go implementation writes one (json.Marshal of QueueEntry)."""
    qid = str(uuid.uuid4())
    entry = {
        "id": qid,
        "user": "gopher",
        "actual_user": "gopher",
        "requested_count": count,
        "allocated_gpus": list(allocated),
        "reservation_type": "manual",
        "expiry_duration": 3600 * 10**9,
        "enqueue_time": go_time(enqueued, offset_hours),
        "last_heartbeat": go_time(heartbeat or enqueued, offset_hours),
    }
    if ids:
        entry["requested_ids"] = list(ids)
    r.set(ENTRY + qid, json.dumps(entry))
    r.zadd(QUEUE, {qid: float(int(enqueued * 1e9))})
    return qid


def go_partial(r, i, qid):
    """GPU `i` gathered by a Go waiter (its tryAllocateForQueueEntry's state)."""
    r.set(
        f"canhazgpu:gpu:{i}",
        json.dumps(
            {
                "user": "gopher",
                "actual_user": "gopher",
                "start_time": go_time(time.time()),
                "type": "manual",
                "expiry_time": go_time(time.time() + 3600),
                "partial_queue_id": qid,
            }
        ),
    )


class Waiters:
    """Background `canhazgpu reserve` processes, killed at the end of the test."""

    def __init__(self, cli, r):
        self.cli, self.r, self.procs = cli, r, []

    def start(self, *args, env=None, stderr=subprocess.PIPE, queued=True):
        proc = self.cli.popen(
            "reserve",
            *args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self.procs.append(proc)
        if queued:
            wait_for(
                what=f"reserve {' '.join(map(str, args))} to queue",
                condition=lambda: self.queued(proc),
            )
        return proc

    def queued(self, proc):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"waiter exited {proc.returncode}:\n{out}\n{err}", pytrace=False)
        return entry_of(self.r, proc)

    @staticmethod
    def finish(proc, timeout=15):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"waiter did not finish:\n{out}\n{err}", pytrace=False)
        assert "Traceback" not in (err or ""), err
        return out, err

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def waiters(cli, r):
    w = Waiters(cli, r)
    yield w
    w.cleanup()


@pytest.fixture
def pool(cli):
    """A 4-GPU fake pool with every GPU held by one manual reservation ("holder")."""
    cli("admin", "--gpus", 4, "--provider", "fake", check=True)
    cli("reserve", "--gpu-ids", "0,1,2,3", "--user", "holder", check=True)


def release(cli, *ids):
    cli("release", "--gpu-ids", ",".join(map(str, ids)), check=True)


def reserved(out):
    """The ids printed by `reserve --short`."""
    return [int(x) for x in out.strip().split(",")]


# --------------------------------------------------------------------------- order


def test_fcfs_order_and_partial_gathering(cli, r, pool, waiters):
    first = waiters.start("--gpus", 2, "--short", "--user", "first")
    second = waiters.start("--gpus", 1, "--short", "--user", "second")
    a, b = entry_of(r, first), entry_of(r, second)
    assert [e["id"] for e in entries(r)] == [a["id"], b["id"]]

    release(cli, 2)
    # The earlier request gathers the freed GPU; the later one gets nothing.
    wait_for(
        what="GPU 2 to go to the first waiter", condition=lambda: partial_gpus(r, a["id"]) == [2]
    )
    state = gpu(r, 2)
    assert state["user"] == "first" and state["type"] == "manual"
    assert entry_of(r, first)["allocated_gpus"] == [2]
    assert partial_gpus(r, b["id"]) == [] and entry_of(r, second)["allocated_gpus"] == []
    assert first.poll() is None and second.poll() is None

    release(cli, 0)
    out, _ = waiters.finish(first)
    assert first.returncode == 0 and reserved(out) == [0, 2]
    for i in (0, 2):
        state = gpu(r, i)
        assert state["user"] == "first" and "partial_queue_id" not in state
        assert state["expiry_time"] > time.time() + 7 * 3600
    assert r.get(ENTRY + a["id"]) is None
    assert [e["id"] for e in entries(r)] == [b["id"]]
    assert second.poll() is None

    release(cli, 3)
    out, _ = waiters.finish(second)
    assert second.returncode == 0 and reserved(out) == [3]
    assert r.zcard(QUEUE) == 0


def test_a_newcomer_never_overtakes_a_waiter(cli, r, pool, waiters):
    first = waiters.start("--gpus", 2, "--short")
    qid = entry_of(r, first)["id"]
    first.send_signal(signal.SIGSTOP)  # it cannot poll: others' scripts must gather for it
    try:
        release(cli, 1)
        late = cli("reserve", "--nonblock", "--gpus", 1)
        assert late.returncode == 1
        assert "not enough GPUs available: requested 1, available 0" in late.stderr
        assert partial_gpus(r, qid) == [1]

        cli("release", "--gpu-ids", 3)  # free, and no one else may take it while first waits
        ids_late = cli("reserve", "--nonblock", "--gpu-ids", 0)
        assert ids_late.returncode == 1
        assert "GPU 0 is reserved by holder (manual)" in ids_late.stderr
        status = json.loads(cli("status", "--json", check=True).stdout)
        assert [g["status"] for g in status] == ["IN_USE"] * 4  # 3 went to first at once
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = waiters.finish(first)
    assert reserved(out) == [1, 3]


def test_a_blocking_newcomer_queues_behind_the_waiter(cli, r, pool, waiters):
    first = waiters.start("--gpus", 2, "--short")
    later = waiters.start("--gpus", 1, "--short")
    release(cli, 0, 1)
    assert reserved(waiters.finish(first)[0]) == [0, 1]
    assert later.poll() is None
    release(cli, 2)
    assert reserved(waiters.finish(later)[0]) == [2]


def test_a_waiter_for_a_busy_gpu_does_not_block_the_rest(cli, r, waiters):
    cli("admin", "--gpus", 4, "--provider", "fake", check=True)
    cli("reserve", "--gpu-ids", 0, "--user", "holder", check=True)
    specific = waiters.start("--gpu-ids", 0, "--short")
    assert entry_of(r, specific)["requested_ids"] == [0]

    others = cli("reserve", "--nonblock", "--gpus", 2, "--short", check=True)
    assert set(reserved(others.stdout)) <= {1, 2, 3}
    late = cli("reserve", "--nonblock", "--gpu-ids", 0)
    assert late.returncode == 1 and "GPU 0 is reserved by holder" in late.stderr

    release(cli, 0)
    assert reserved(waiters.finish(specific)[0]) == [0]


def test_an_ids_waiter_holds_back_only_its_ids(cli, r, waiters):
    cli("admin", "--gpus", 4, "--provider", "fake", check=True)
    cli("reserve", "--gpu-ids", 0, "--user", "holder", check=True)
    both = waiters.start("--gpu-ids", "0,1", "--short")
    qid = entry_of(r, both)["id"]
    assert partial_gpus(r, qid) == [1]  # gathered at once; 0 is still busy
    took = cli("reserve", "--nonblock", "--gpus", 2, "--short", check=True)
    assert reserved(took.stdout) == [2, 3]
    release(cli, 0)
    assert reserved(waiters.finish(both)[0]) == [0, 1]


# --------------------------------------------------------------------------- --wait, --nonblock


def test_wait_gives_up_and_returns_what_it_gathered(cli, r, pool, waiters):
    proc = waiters.start("--gpus", 2, "--wait", "3s")
    entry = entry_of(r, proc)
    release(cli, 3)
    wait_for(what="the partial GPU", condition=lambda: partial_gpus(r, entry["id"]) == [3])
    out, err = waiters.finish(proc)
    assert proc.returncode == 1 and out == ""
    assert "Error: gave up after waiting 3s for 2 GPUs (position 1 in the queue)" in err
    assert r.zcard(QUEUE) == 0 and r.get(ENTRY + entry["id"]) is None
    assert "user" not in gpu(r, 3) and "last_released" in gpu(r, 3)


def test_nonblock_fails_at_once_without_queueing(cli, r, pool):
    proc = cli("reserve", "--nonblock", "--gpus", 2)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Error: not enough GPUs available: requested 2, available 0" in proc.stderr
    assert r.zcard(QUEUE) == 0


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--gpus", 5], 2, "requested 5 GPUs but the pool has only 4"),
        (["--gpu-ids", "1,7"], 2, "GPU 7 is not in the pool (GPUs 0-3)"),
        (["--gpu-ids", "1,1"], 2, "GPU 1 is listed twice"),
        (["--gpus", 0], 2, ""),
    ],
)
def test_requests_that_can_never_be_met_fail_at_once(cli, r, pool, args, code, message):
    proc = cli("reserve", *args, timeout=10)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and proc.stderr.startswith("Error:")
    assert r.zcard(QUEUE) == 0


def test_no_pool_fails_at_once(cli, r):
    proc = cli("reserve", "--gpus", 1, timeout=10)
    assert proc.returncode == 1
    assert "the GPU pool is not initialised" in proc.stderr
    assert r.zcard(QUEUE) == 0


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_removes_the_entry_and_its_partial_gpus(cli, r, pool, waiters, signum):
    proc = waiters.start("--gpus", 3)
    qid = entry_of(r, proc)["id"]
    release(cli, 1, 2)
    wait_for(what="the partial GPUs", condition=lambda: partial_gpus(r, qid) == [1, 2])
    proc.send_signal(signum)
    out, err = waiters.finish(proc)
    assert proc.returncode == -signum, err
    assert out == ""
    assert r.zcard(QUEUE) == 0 and r.get(ENTRY + qid) is None
    for i in (1, 2):
        assert "user" not in gpu(r, i) and "last_released" in gpu(r, i)
    assert gpu(r, 0)["user"] == "holder" and gpu(r, 3)["user"] == "holder"
    # The partial GPUs' time is accounted for like any other reservation's.
    records = [json.loads(m) for m in r.zrange("canhazgpu:usage_history_sorted", 0, -1)]
    assert sorted(x["gpu_id"] for x in records if x["user"] != "holder") == [1, 2]


# --------------------------------------------------------------------------- stale entries


def stale_setup(r, heartbeat_age):
    """A hand-written entry last heard from `heartbeat_age` seconds ago, holding GPU 1 as a
    partial; its allocated_gpus also lists GPU 2, which has since passed to someone else."""
    now = time.time()
    qid = str(uuid.uuid4())
    r.set(
        ENTRY + qid,
        json.dumps(
            {
                "id": qid,
                "user": "ghost",
                "actual_user": "ghost",
                "requested_count": 2,
                "requested_ids": [1, 2],
                "allocated_gpus": [1, 2],
                "reservation_type": "run",
                "enqueue_time": now - 600,
                "last_heartbeat": now - heartbeat_age,
            }
        ),
    )
    r.zadd(QUEUE, {qid: (now - 600) * 1e9})
    r.set(
        "canhazgpu:gpu:1",
        json.dumps(
            {
                "user": "ghost",
                "actual_user": "ghost",
                "type": "run",
                "start_time": now - 60,
                "last_heartbeat": now,
                "partial_queue_id": qid,
            }
        ),
    )
    r.set(
        "canhazgpu:gpu:2",
        json.dumps(
            {
                "user": "other",
                "actual_user": "other",
                "type": "manual",
                "start_time": now - 30,
                "expiry_time": now + 3600,
            }
        ),
    )
    return qid


@pytest.mark.parametrize(
    "command",
    [["status"], ["queue"], ["reserve", "--nonblock", "--gpu-ids", 2]],
    ids=["status", "queue", "allocation"],
)
def test_a_stale_entry_is_dropped_with_only_its_own_gpus(cli, r, command):
    cli("admin", "--gpus", 4, "--provider", "fake", check=True)
    qid = stale_setup(r, heartbeat_age=10)
    fast = {"CANHAZGPU_QUEUE_HEARTBEAT_TIMEOUT": "5s"}

    # A Go entry states no timeout: the built-in 2m applies, never the caller's own 5s,
    # which would drop every other user's waiter.
    cli(*command, env=fast)
    assert r.zrange(QUEUE, 0, -1) == [qid] and gpu(r, 1)["partial_queue_id"] == qid

    entry = json.loads(r.get(ENTRY + qid))
    r.set(ENTRY + qid, json.dumps(dict(entry, heartbeat_timeout=5)))  # its waiter's own 5s
    cli(*command)
    assert r.zcard(QUEUE) == 0 and r.get(ENTRY + qid) is None
    assert "user" not in gpu(r, 1) and "last_released" in gpu(r, 1)
    assert gpu(r, 2)["user"] == "other"  # listed in allocated_gpus, but not the entry's any more
    records = [json.loads(m) for m in r.zrange("canhazgpu:usage_history_sorted", 0, -1)]
    assert [(x["user"], x["gpu_id"]) for x in records] == [("ghost", 1)]


def test_a_live_waiter_stays_fresh_under_a_short_heartbeat_timeout(cli, r, pool, waiters):
    fast = {"CANHAZGPU_QUEUE_HEARTBEAT_TIMEOUT": "2s"}
    proc = waiters.start("--gpus", 2, "--short", env=fast)
    qid = entry_of(r, proc)["id"]
    release(cli, 0)
    wait_for(what="the partial GPU", condition=lambda: partial_gpus(r, qid) == [0])
    gathered_at = gpu(r, 0)["last_heartbeat"]
    # Over two heartbeat timeouts, others' commands see a live entry: same id, same place.
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        cli("status", env=fast, check=True)
        assert r.zrange(QUEUE, 0, -1) == [qid]
        assert gpu(r, 0).get("partial_queue_id") == qid
        time.sleep(0.5)
    # Its partial GPUs are heartbeated too (a Go client ends run-type GPUs by last_heartbeat).
    assert gpu(r, 0)["last_heartbeat"] > gathered_at
    release(cli, 1)
    assert reserved(waiters.finish(proc)[0]) == [0, 1]


# --------------------------------------------------------------------------- Go compatibility


def test_go_entries_keep_their_place_and_are_gathered_for(cli, r, pool, waiters):
    now = time.time()
    # Go writes RFC 3339 in local time: a negative offset catches a parser that ignores it.
    go_id = go_entry(r, enqueued=now - 30, heartbeat=now, offset_hours=-5)
    ours = waiters.start("--gpus", 1, "--short")
    mine = entry_of(r, ours)
    assert [e["id"] for e in entries(r)] == [go_id, mine["id"]]
    report = json.loads(cli("queue", "--json", check=True).stdout)
    assert [(e["position"], e["user"]) for e in report["entries"]] == [(1, "gopher"), (2, ME)]
    assert 25 <= report["entries"][0]["waiting_seconds"] <= 60

    release(cli, 2)
    wait_for(
        what="GPU 2 to be gathered for the Go entry",
        condition=lambda: partial_gpus(r, go_id) == [2],
    )
    state = gpu(r, 2)
    assert state["user"] == "gopher" and state["type"] == "manual"
    go = json.loads(r.get(ENTRY + go_id))
    assert go["allocated_gpus"] == [2]
    assert go["enqueue_time"] == go_time(now - 30, -5)  # its fields survive our rewrite
    assert ours.poll() is None

    # Complete but not yet finalised by its (slow-polling) Go waiter: it holds nothing back.
    release(cli, 3)
    assert reserved(waiters.finish(ours)[0]) == [3]
    assert partial_gpus(r, go_id) == [2]


def test_a_stale_go_entry_is_dropped(cli, r):
    cli("admin", "--gpus", 4, "--provider", "fake", check=True)
    now = time.time()
    # +02:00 local time: a parser that ignored the offset would think it fresh.
    stale = go_entry(r, enqueued=now - 600, heartbeat=now - 300, offset_hours=2)
    live = go_entry(r, enqueued=now - 500, heartbeat=now - 5, offset_hours=-7)
    go_partial(r, 0, stale)
    go_partial(r, 1, live)
    cli("status", check=True)
    assert r.zrange(QUEUE, 0, -1) == [live]
    assert "user" not in gpu(r, 0)
    assert gpu(r, 1)["partial_queue_id"] == live


def test_a_go_ids_entry_holds_back_its_ids(cli, r, waiters):
    cli("admin", "--gpus", 4, "--provider", "fake", check=True)
    cli("reserve", "--gpu-ids", "0,1", "--user", "holder", check=True)
    go_id = go_entry(r, enqueued=time.time() - 5, ids=[1, 2], count=2)
    late = cli("reserve", "--nonblock", "--gpu-ids", "1")  # runs the queue: 2 goes to the entry
    assert late.returncode == 1 and "GPU 1 is reserved by holder" in late.stderr
    assert partial_gpus(r, go_id) == [2]
    took = cli("reserve", "--nonblock", "--gpus", 1, "--short", check=True)
    assert reserved(took.stdout) == [3]


INT_FIELDS = {"requested_count", "expiry_duration", "idle_timeout", "pid"}
TIME_FIELDS = {"enqueue_time", "last_heartbeat", "wait_timeout"}


class Float(float):
    """A JSON number written with a fraction or exponent (Go's int fields reject those)."""


def go_unmarshal(raw, int_fields, int_lists, time_fields):
    """Check `raw` decodes the way Go's encoding/json would decode it into the Go structs."""
    doc = json.loads(raw, parse_float=lambda s: Float(s))
    for key in int_fields & doc.keys():
        assert type(doc[key]) is int, f"{key}={doc[key]!r} is not a JSON integer"
    for key in int_lists & doc.keys():
        assert isinstance(doc[key], list), f"{key} is not a JSON list: {doc[key]!r}"
        assert all(type(x) is int for x in doc[key]), f"{key} holds non-integers"
    for key in time_fields & doc.keys():
        value = doc[key]
        assert value is None or isinstance(value, (int, float)) or "T" in value, (key, value)
    return doc


def test_entries_we_write_parse_as_go_would(cli, r, pool, waiters):
    proc = waiters.start("--gpus", 3, "--wait", "10m", "--duration", "90m", "--note", "n")
    ids = waiters.start("--gpu-ids", "0,1")
    for raw_id in r.zrange(QUEUE, 0, -1):
        raw = r.get(ENTRY + raw_id)
        e = go_unmarshal(raw, INT_FIELDS, {"allocated_gpus", "requested_ids"}, TIME_FIELDS)
        assert e["id"] == raw_id and isinstance(e["user"], str) and e["actual_user"]
        assert e["reservation_type"] == "manual" and e["allocated_gpus"] == []
        score = r.zscore(QUEUE, raw_id)
        assert abs(score / 1e9 - e["enqueue_time"]) < 5  # zset score in nanoseconds
        assert e["last_heartbeat"] >= e["enqueue_time"]
    big, small = entry_of(r, proc), entry_of(r, ids)
    assert big["requested_count"] == 3 and "requested_ids" not in big
    assert big["expiry_duration"] == 90 * 60 * 10**9
    assert big["note"] == "n"
    # Go's wait_timeout is the deadline (a time), not a duration.
    assert abs(big["wait_timeout"] - (big["enqueue_time"] + 600)) < 5
    assert small["requested_ids"] == [0, 1] and small["requested_count"] == 2
    assert "wait_timeout" not in small

    release(cli, 3)
    wait_for(what="a partial GPU", condition=lambda: entry_of(r, proc)["allocated_gpus"] == [3])
    raw = r.get(ENTRY + big["id"])
    go_unmarshal(raw, INT_FIELDS, {"allocated_gpus", "requested_ids"}, TIME_FIELDS)
    state = r.get("canhazgpu:gpu:3")
    go_unmarshal(state, {"pid", "idle_timeout"}, set(), {"start_time", "last_heartbeat"})
    assert json.loads(state)["partial_queue_id"] == big["id"]


# --------------------------------------------------------------------------- unreserved use


def test_force_claims_an_unreserved_gpu_past_a_count_waiter(cli, r, fake_smi, waiters):
    fake_smi.set(gpus=[{}, {}, {"memory_used": "5000"}, {}])
    cli("admin", "--gpus", 4, "--provider", "nvidia", check=True)
    cli("reserve", "--gpu-ids", "0,1,3", "--user", "holder", check=True)
    waiting = waiters.start("--gpus", 1, "--short")
    qid = entry_of(r, waiting)["id"]
    # The waiter cannot use GPU 2 (busy without a reservation); its owner may claim it.
    claim = cli("reserve", "--force", "--nonblock", "--gpu-ids", 2, "--short", check=True)
    assert reserved(claim.stdout) == [2]
    assert partial_gpus(r, qid) == [] and waiting.poll() is None
    fake_smi.set(gpus=4)
    release(cli, 2)
    assert reserved(waiters.finish(waiting)[0]) == [2]


def test_a_count_waiter_is_never_given_an_unreserved_gpu(cli, r, fake_smi, waiters):
    fake_smi.set(gpus=[{}, {}, {"memory_used": "5000"}, {}])
    cli("admin", "--gpus", 4, "--provider", "nvidia", check=True)
    cli("reserve", "--gpu-ids", "0,1,3", "--user", "holder", check=True)
    waiting = waiters.start("--gpus", 1, "--short")
    qid = entry_of(r, waiting)["id"]
    # Another user's --force allocation runs the queue too: it must not hand GPU 2 over.
    cli("reserve", "--force", "--nonblock", "--gpu-ids", 1)
    cli("status", check=True)
    assert partial_gpus(r, qid) == []
    release(cli, 3)
    assert reserved(waiters.finish(waiting)[0]) == [3]


# --------------------------------------------------------------------------- wake-up


def test_a_release_publishes_a_wake_up_event(cli, r, pool):
    events = r.pubsub(ignore_subscribe_messages=True)
    events.subscribe(EVENTS)
    try:
        wait_for(what="the subscription", condition=lambda: r.pubsub_numsub(EVENTS)[0][1] == 1)
        release(cli, 1)
        message = wait_for(what="an event", condition=lambda: events.get_message(timeout=0.1))
        assert message["channel"] == EVENTS
    finally:
        events.close()


# --------------------------------------------------------------------------- the waiting line


def read_pty(fd, until, timeout=15.0):
    """Read from a pty master until `until(text)` holds or the other side closes."""
    text = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every writer closed
                break
            if not chunk:
                break
            text += chunk
        if until(text.decode(errors="replace")):
            break
    return text.decode(errors="replace")


def test_a_terminal_gets_one_live_line(cli, r, pool, waiters):
    master, slave = pty.openpty()
    try:
        proc = waiters.start("--gpus", 1, "--short", stderr=slave)
        os.close(slave)
        slave = None
        seen = read_pty(master, lambda t: "waited 0h 0m 1s" in t)
        # The holders' reservations expire in 3 hours: the waiter starts by then.
        line = (
            "\r\x1b\\[KWaiting for 1 GPU: position 1 in the queue, starts by \\d\\d:\\d\\d, waited "
        )
        assert re.search(line + "0h 0m 0s", seen), seen
        assert re.search(line + "0h 0m 1s", seen), seen
        release(cli, 1)
        seen += read_pty(master, lambda t: False)
        out, _ = waiters.finish(proc)
        assert reserved(out) == [1]
        assert "\n" not in seen  # one line, rewritten in place
        assert seen.endswith("\r\x1b[K")  # and wiped before the result
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)


def test_a_pipe_gets_one_plain_line(cli, r, pool, waiters):
    proc = waiters.start("--gpus", 2, "--short")
    entry = entry_of(r, proc)
    release(cli, 0)
    wait_for(what="a partial GPU", condition=lambda: entry_of(r, proc)["allocated_gpus"] == [0])
    wait_for(
        what="over a second of waiting", condition=lambda: time.time() - entry["enqueue_time"] > 1.2
    )
    release(cli, 1)
    out, err = waiters.finish(proc)
    assert reserved(out) == [0, 1]
    assert err == "Waiting for 2 GPUs: position 1 in the queue\n"


# --------------------------------------------------------------------------- queue command


def test_queue_command_table_and_json(cli, r, pool, waiters):
    empty = cli("queue", check=True)
    assert empty.stdout == "The queue is empty.\n"
    assert json.loads(cli("queue", "--json", check=True).stdout) == {
        "entries": [],
        "total": 0,
        "oldest_wait_seconds": 0,
    }

    go_id = go_entry(r, enqueued=time.time() - 3700, heartbeat=time.time())
    count = waiters.start("--gpus", 2, "--user", "alice", "--note", "training")
    ids = waiters.start("--gpu-ids", "1,3")
    release(cli, 0, 2)
    wait_for(what="the gathering", condition=lambda: entry_of(r, count)["allocated_gpus"] == [2])

    report = json.loads(cli("queue", "--json", check=True).stdout)
    assert report["total"] == 3
    assert report["oldest_wait_seconds"] >= 3700
    go, alice, mine = report["entries"]
    assert (go["position"], go["id"], go["user"], go["allocated_gpus"]) == (1, go_id, "gopher", [0])
    assert go["requested_count"] == 1 and go["requested_ids"] is None
    assert go["reservation_type"] == "manual" and go["waiting_seconds"] >= 3700
    assert go["enqueue_time"].endswith("Z")
    assert (alice["position"], alice["user"], alice["actual_user"]) == (2, "alice", ME)
    assert alice["requested_count"] == 2 and alice["allocated_gpus"] == [2]
    assert alice["note"] == "training"
    assert (mine["position"], mine["requested_ids"], mine["allocated_gpus"]) == (3, [1, 3], [])
    assert mine["id"] == entry_of(r, ids)["id"]

    lines = cli("queue", check=True).stdout.splitlines()
    header = ["POS", "USER", "REQUESTED", "GATHERED", "TYPE", "PRIORITY", "WAITING", "ETA"]
    assert lines[0].split() == header
    assert lines[1].split()[:9] == [
        "1",
        "gopher",
        "1",
        "GPU(s)",
        "0",
        "MANUAL",
        "normal",
        "1h",
        "1m",
    ]
    assert lines[2].split()[:7] == ["2", ME, "(alice)", "2", "GPU(s)", "2", "MANUAL"]
    assert lines[3].split()[:5] == ["3", ME, "GPUs", "1,3", "-"]
    assert lines[4] == "Total: 3 waiting"


def test_completing_a_waiter_for_it_wakes_it(cli, r, fake_smi, waiters):
    """A GPU that stops being busy without a reservation frees no reservation; the first
    script that sees it gathers it for the waiter, and must wake it (not leave it to the
    slow poll)."""
    fake_smi.set(gpus=[{}, {"memory_used": "5000"}])
    cli("admin", "--gpus", 2, "--provider", "nvidia", check=True)
    cli("reserve", "--gpu-ids", 0, "--user", "holder", check=True)
    waiting = waiters.start("--gpus", 1, "--short")
    qid = entry_of(r, waiting)["id"]
    waiting.send_signal(signal.SIGSTOP)  # so that its own slow poll cannot take GPU 1 first
    events = r.pubsub(ignore_subscribe_messages=True)
    events.subscribe(EVENTS)
    try:
        fake_smi.set(gpus=2)
        wait_for(what="the subscription", condition=lambda: r.pubsub_numsub(EVENTS)[0][1] == 2)
        cli("reserve", "--nonblock", "--gpu-ids", 0)  # fails, but gathers GPU 1 for the waiter
        assert partial_gpus(r, qid) == [1]
        assert wait_for(what="an event", condition=lambda: events.get_message(timeout=0.1))
    finally:
        events.close()
        waiting.send_signal(signal.SIGCONT)
    assert reserved(waiters.finish(waiting)[0]) == [1]
