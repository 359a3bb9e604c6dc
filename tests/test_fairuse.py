"""Fair use, black-box against a real redis-server: idle reservations (with the
nvidia-smi stand-in and short settings from the environment) and their reclaim,
`extend`, limits under concurrent requests, priority classes beside a Go waiter, and the
queue's estimated start."""

import grp
import json
import os
import re
import subprocess
import time

import pytest
from poolstate import KEY, gpu, history, hold, holders, init_pool, me, parse_table, wait_for

SHORT_IDLE = {"CANHAZGPU_IDLE_AFTER": "2s"}


@pytest.fixture
def pool(r):
    init_pool(r, 4)
    return r


def busy(fake_smi, *gpus, gpu_count=4):
    """The stand-in shows these GPUs in use by a compute process."""
    fake_smi.set(
        gpus=[{"memory_used": "9000" if i in gpus else "3"} for i in range(gpu_count)],
        processes=[{"pid": 4000 + i, "name": "python3", "gpu": i, "used_memory": "8990"}
                   for i in gpus],
    )  # fmt: skip


def status(cli, env=None):
    return {
        row["gpu_id"]: row
        for row in json.loads(cli("status", "--json", env=env, check=True).stdout)
    }


# --------------------------------------------------------------------------- idle


def test_idle_is_seen_from_the_hardware_and_shown_everywhere(cli, pool, fake_smi):
    busy(fake_smi)
    cli("reserve", "-G", "0,1", "-d", "1h", check=True)
    time.sleep(2.2)
    busy(fake_smi, 0)
    rows = status(cli, SHORT_IDLE)
    assert rows[0]["idle"] is False and rows[0]["idle_seconds"] == 0
    assert gpu(pool, 0)["last_active"] > time.time() - 5  # noted by status, for everyone
    assert rows[1]["idle"] is True and rows[1]["idle_seconds"] >= 2
    assert rows[2]["status"] == "AVAILABLE" and "idle" not in rows[2]
    _, table = parse_table(cli("status", "--no-color", env=SHORT_IDLE, check=True).stdout)
    assert table[1]["DETAILS"].endswith(", idle 0h 0m")
    assert "idle" not in table[0]["DETAILS"]
    # The default idle.after is 30 minutes: nothing is idle yet.
    assert not any(r.get("idle") for r in status(cli).values())

    # Released, each record carries its idle time: GPU 1's whole life, GPU 0's first span.
    busy(fake_smi)
    time.sleep(1)
    cli("release", env=SHORT_IDLE, check=True)
    idle = {rec["gpu_id"]: rec.get("idle_seconds", 0) for rec in history(pool)}
    assert idle[1] >= 3 and 2 <= idle[0] < idle[1]
    rep = json.loads(cli("report", "--days", 1, "--json", check=True).stdout)
    assert rep["users"][0]["idle_gpu_hours"] == pytest.approx((idle[0] + idle[1]) / 3600, abs=1e-3)


def test_a_runs_heartbeat_samples_its_gpus(cli, pool, fake_smi):
    busy(fake_smi)
    env = {"CANHAZGPU_HEARTBEAT_INTERVAL": "0.5s", "CANHAZGPU_HEARTBEAT_TIMEOUT": "10s",
           "CANHAZGPU_IDLE_SAMPLE_INTERVAL": "1s"}  # fmt: skip
    run = cli.popen("run", "--gpu-ids", "0,1", "--", "sleep", "4", env=env)
    try:
        wait_for(lambda: gpu(pool, 0).get("type") == "run", what="the run's reservation")
        busy(fake_smi, 0)  # its command starts using GPU 0
        start = gpu(pool, 0)["start_time"]
        wait_for(lambda: gpu(pool, 0).get("last_active", 0) > start + 0.9, what="a sample")
        assert "last_active" not in gpu(pool, 1)  # never seen in use
        rows = status(cli, SHORT_IDLE)
        assert rows[0]["idle"] is False
    finally:
        run.wait(30)


def test_an_idle_manual_reservation_is_reclaimed_only_if_the_admin_says_so(cli, pool, fake_smi):
    busy(fake_smi)
    cli("reserve", "-G", "1", "-d", "1h", check=True)
    hold(pool, 2, user="carol", kind="run", age=30, heartbeat_timeout=3600)  # a run: never
    time.sleep(2.2)
    status(cli)  # no policy: nothing ends, however idle
    assert set(holders(pool, 4)) == {1, 2}
    p = cli("admin", "--idle-reclaim-after", "2s", check=True)
    assert p.stdout == "Idle manual reservations are reclaimed after 2s\n"
    assert "reclaimed after 2s" in cli("admin", "--show-limits", check=True).stdout
    waiter = cli.popen("reserve", "-G", "1", "--short", stdout=subprocess.PIPE, text=True)
    try:
        p = cli("status", "--no-color", check=True)
        assert re.search(rf"^reclaimed GPU 1 from {me()}: idle for 0h 0m$", p.stderr, re.M)
        assert waiter.communicate(timeout=20)[0] == "1\n"  # the queue moved on
    finally:
        waiter.kill()
    assert cli("status", check=True).stderr == ""  # said once
    ended = [rec for rec in history(pool) if rec["gpu_id"] == 1]
    assert ended[0]["end_reason"] == "idle" and ended[0]["idle_seconds"] >= 2
    assert gpu(pool, 2)["user"] == "carol"  # the run is shown idle, never reclaimed
    cli("admin", "--idle-reclaim-after", "off", check=True)
    assert "never reclaimed" in cli("admin", "--show-limits", check=True).stdout


def test_a_user_setting_cannot_reclaim_anyone(cli, pool, fake_smi):
    """The policy lives in Redis, set by admin: a user's environment changes nothing."""
    hold(pool, 1, user="bob", kind="manual", age=7200)
    env = {"CANHAZGPU_IDLE_RECLAIM_AFTER": "1s", **SHORT_IDLE}
    cli("status", env=env, check=True)
    cli("reserve", "-g", 1, env=env, check=True)
    assert gpu(pool, 1)["user"] == "bob"


# --------------------------------------------------------------------------- extend


def test_extend_adds_time_to_the_callers_manual_reservations(cli, pool):
    cli("reserve", "-G", "0,2", "-d", "1h", check=True)
    hold(pool, 1, user="bob", kind="manual")
    before = gpu(pool, 0)["expiry_time"]
    p = cli("extend", "-d", "30m", check=True)
    assert re.fullmatch(r"Extended 2 GPU\(s\): \[0, 2\]; expires in 1h 29m 5\ds\n", p.stdout)
    assert gpu(pool, 0)["expiry_time"] == pytest.approx(before + 1800)
    assert gpu(pool, 0)["reservation_id"] == gpu(pool, 2)["reservation_id"]
    p = cli("extend", "-G", "1,2,3", "-d", "1h")
    assert p.returncode == 0 and "Extended 1 GPU(s): [2]" in p.stdout
    assert f"Error: GPU 1 is reserved by bob, not by you ({me()})" in p.stderr
    assert "Error: GPU 3 is not reserved" in p.stderr
    p = cli("extend", "-G", "1", "-d", "1h")
    assert p.returncode == 1 and p.stdout == ""
    assert cli("extend", "-G", "9", "-d", "1h").returncode == 2
    assert cli("extend", "-G", "0").returncode == 2  # --duration is needed
    cli("release", check=True)
    p = cli("extend", "-d", "1h")
    assert p.returncode == 1 and "you hold no manual reservation" in p.stderr


def test_extend_stays_within_the_longest_reservation(cli, pool):
    cli("admin", "--max-duration", "2h", check=True)
    cli("reserve", "-G", 0, "-d", "1h", check=True)
    cli("extend", "-d", "30m", check=True)
    p = cli("extend", "-d", "1h")
    assert p.returncode == 1
    assert f"Error: GPU 0 would last 2h30m; {me()} may reserve for at most 2h" in p.stderr


# --------------------------------------------------------------------------- limits


def test_a_cap_holds_under_24_concurrent_requests(cli, r, fake_smi):
    init_pool(r, 8)
    cli("admin", "--max-gpus", 3, check=True)
    procs = [
        cli.popen("reserve", "-g", 1 + k % 2, "--wait", "5s", "-d", "1h",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(24)
    ]  # fmt: skip
    results = [(p.wait(60), *p.communicate()) for p in procs]
    held = holders(r, 8)
    assert 2 <= len(held) <= 3  # one 2 and one 1, or a 2 after a 1 that left room
    assert {code for code, _, _ in results} == {0, 1}
    refused = [err for code, _, err in results if code == 1]
    assert all(re.match(rf"Error: {me()} may hold at most 3 GPUs \(holds \d, asked for [12]\)", e)
               for e in refused), refused  # fmt: skip
    assert r.zcard(KEY + "queue") == 0  # refused at once: nobody waited behind their own


def test_a_users_own_limit_wins_over_its_groups_which_win_over_the_default(cli, pool):
    group = grp.getgrgid(os.getgid()).gr_name
    cli("admin", "--max-gpus", 1, check=True)
    cli("admin", "--max-gpus", 3, "--for-group", group, check=True)
    cli("reserve", "-g", 3, "--nonblock", check=True)
    cli("release", check=True)
    p = cli("admin", "--max-gpus", 2, "--for", me(), check=True)
    assert p.stdout == f"Limits of user {me()} in pool (default): max-gpus 2\n"
    p = cli("reserve", "-g", 3, "--nonblock")
    assert (
        p.returncode == 1 and f"{me()} may hold at most 2 GPUs (holds 0, asked for 3)" in p.stderr
    )
    cli("admin", "--max-gpus", "none", "--for", me(), check=True)
    cli("reserve", "-g", 4, "--nonblock", check=True)
    lines = cli("admin", "--show-limits", check=True).stdout.splitlines()
    assert lines[0] == "Limits of pool (default):"
    assert lines[2].split() == ["default", "1", "-", "-"]
    assert lines[3].split() == [f"group:{group}", "3", "-", "-"]
    assert lines[4].split() == [f"user:{me()}", "none", "-", "-"]
    cli("admin", "--clear", "--for", me(), check=True)
    assert f"user:{me()}" not in cli("admin", "--show-limits", check=True).stdout


def test_the_longest_reservation_trims_a_default_and_refuses_a_choice(cli, pool):
    cli("admin", "--max-duration", "2h", check=True)
    p = cli("reserve", "-d", "3h")
    assert p.returncode == 1
    assert p.stderr.startswith(f"Error: {me()} may reserve for at most 2h (asked for 3h)")
    p = cli("reserve", check=True)  # the default 8h: trimmed, and said
    assert "Reserved 1 GPU(s): [0] for 2h 0m 0s" in p.stdout
    assert "reservations here last 2h at most" in p.stderr
    p = cli("run", "-G", 1, "--", "true", check=True)
    assert "--timeout 2h applies" in p.stderr
    p = cli("run", "-G", 1, "--timeout", "3h", "--", "true")
    assert p.returncode == 125 and "may run for at most 2h (asked for 3h)" in p.stderr


def test_a_runs_timeout_is_its_deadline_in_redis(cli, pool):
    run = cli.popen("run", "-G", 2, "--timeout", "1h", "--", "sleep", "5")
    try:
        wait_for(lambda: gpu(pool, 2).get("timeout_at"), what="the run's timeout_at")
        assert gpu(pool, 2)["timeout_at"] == pytest.approx(time.time() + 3600, abs=10)
    finally:
        run.terminate()
        run.wait(30)


# --------------------------------------------------------------------------- priorities


def go_waiter(r, enqueued_ns):
    qid = "a3f1c2d4-0000-4000-8000-00000000go01"
    entry = {"id": qid, "user": "gopher", "requested_count": 1, "allocated_gpus": [],
             "reservation_type": "manual", "expiry_duration": 3600 * 10**9,
             "enqueue_time": time.time(), "last_heartbeat": time.time()}  # fmt: skip
    r.set(KEY + "queue:entry:" + qid, json.dumps(entry))
    r.zadd(KEY + "queue", {qid: enqueued_ns})
    return qid


def test_priority_classes_are_served_first_beside_a_go_waiter(cli, r, pool):
    for i in range(4):
        hold(r, i, user="bob", kind="manual")
    go = go_waiter(r, time.time_ns())
    waiters = []

    def wait_in_queue(*args):
        p = cli.popen("reserve", "-g", 1, "--short", *args, stdout=subprocess.PIPE, text=True)
        wait_for(lambda: r.zcard(KEY + "queue") == len(waiters) + 2, what="a new waiter")
        waiters.append(p)
        return p

    wait_in_queue()  # normal
    wait_in_queue("--priority", "low")
    cli("admin", "--priority", "high", "--for", me(), check=True)
    high = wait_in_queue()  # the account's class, high now
    try:
        order = [e["user"] + ":" + e["priority"] for e in
                 json.loads(cli("queue", "--json", check=True).stdout)["entries"]]  # fmt: skip
        assert order == [f"{me()}:high", "gopher:normal", f"{me()}:normal", f"{me()}:low"]
        # The class is in the score itself, so a Go waiter reading the set agrees.
        assert [m for m, _ in r.zrange(KEY + "queue", 0, -1, withscores=True)][1] == go
        r.set(KEY + "gpu:0", json.dumps({"last_released": time.time()}))
        cli("status", check=True)  # any script hands the free GPU to the first in line
        assert high.communicate(timeout=20)[0] == "0\n"
    finally:
        for p in waiters:
            p.kill()
            p.wait()
    cli("admin", "--priority", "low", "--for", me(), check=True)
    p = cli("reserve", "--priority", "high", "--nonblock")
    assert p.returncode == 2
    assert f"{me()}'s priority class is low: --priority may lower a request" in p.stderr


# --------------------------------------------------------------------------- ETA


def test_the_queue_estimates_each_start_from_known_deadlines(cli, r, pool):
    now = time.time()
    hold(r, 0, kind="manual", expiry_time=now + 3600)
    hold(r, 1, kind="manual", expiry_time=now + 7200)
    hold(r, 2, kind="run", timeout_at=now + 1800)
    hold(r, 3, kind="run")  # no timeout: frees at an unknown time
    procs = []
    try:
        for args in (["-g", 1, "-d", "4h"], ["-g", 2, "-d", "1h"], ["-G", 3]):
            procs.append(cli.popen("reserve", *args, "--short", stdout=subprocess.DEVNULL))
            wait_for(lambda: r.zcard(KEY + "queue") == len(procs), what="a waiter")
        etas = [e["eta"] for e in json.loads(cli("queue", "--json", check=True).stdout)["entries"]]
        # 1 GPU: the run's timeout, in 30 min.  2 GPUs: GPU 0 at 1h, then GPU 1 at 2h
        # (GPU 2 went to the first waiter, for 4 hours).  GPU 3: never known.
        assert at(etas[0]) == pytest.approx(now + 1800, abs=5)
        assert at(etas[1]) == pytest.approx(now + 7200, abs=5)
        assert etas[2] is None
        lines = cli("queue", check=True).stdout.splitlines()
        assert "starts by" in lines[1] and "starts by" in lines[2]
        assert lines[3].rstrip().endswith("unknown")
    finally:
        for p in procs:
            p.kill()
            p.wait()


def at(text):
    """An RFC 3339 time from JSON -> Unix seconds."""
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
