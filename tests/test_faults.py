"""Redis faults, each a test: unreachable at start, killed while `run` runs, a server
that accepts connections and never answers, and a restart while a waiter waits."""

import contextlib
import json
import subprocess
import time

import pytest
from conftest import free_port
from poolstate import KEY, holders, init_pool, wait_for

# Every command, each with what it exits when Redis fails it (run: 125, its own).
COMMANDS = [
    (["status"], 1),
    (["queue"], 1),
    (["report"], 1),
    (["release"], 1),
    (["release", "-G", "1"], 1),
    (["admin", "--gpus", "2", "--provider", "fake"], 1),
    (["reserve", "--nonblock"], 1),
    (["reserve", "--wait", "30s"], 1),
    (["run", "--nonblock", "--", "true"], 125),
    (["run", "--", "true"], 125),
]


@pytest.fixture
def pool(r):
    init_pool(r, 4, provider="fake")
    return r


def one_error(proc, code):
    """Exit `code`, nothing on stdout, one `Error:` line and at most a hint."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stdout == "" and lines and lines[0].startswith("Error: "), proc.stderr
    assert len(lines) <= 2 and all(ln.startswith("Hint: ") for ln in lines[1:]), proc.stderr


@pytest.mark.parametrize("args, code", COMMANDS, ids=[" ".join(a) for a, _ in COMMANDS])
def test_redis_unreachable_at_start(cli, args, code):
    port = free_port()
    start = time.monotonic()
    p = cli(*args, env={"CANHAZGPU_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert time.monotonic() - start < 5
    one_error(p, code)
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in p.stderr


@pytest.mark.parametrize("args, code", COMMANDS, ids=[" ".join(a) for a, _ in COMMANDS])
def test_a_server_that_never_answers(cli, redis_server, pool, args, code):
    """A frozen Redis (it accepts, never answers): every command ends within its
    3-second socket timeout with one line, and never hangs."""
    redis_server.freeze()
    try:
        start = time.monotonic()
        p = cli(*args, timeout=30)
        elapsed = time.monotonic() - start
    finally:
        redis_server.thaw()
    assert elapsed < 8, elapsed
    one_error(p, code)
    assert f"127.0.0.1:{redis_server.port}" in p.stderr


def test_redis_killed_while_run_runs_and_gone_at_its_end(cli, pool, r, redis_server):
    """The command is unaffected; the release at exit says exactly what it could not do."""
    run = cli.popen(
        "run", "--", "sh", "-c", "read line; echo done $line; exit 4",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"CANHAZGPU_HEARTBEAT_INTERVAL": "0.5s"},
    )  # fmt: skip
    try:
        wait_for(lambda: holders(r), what="the reservation")
        redis_server.stop()
        time.sleep(1.5)  # three heartbeats fail meanwhile; the command goes on
        out, err = run.communicate("ok\n", timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
        redis_server.start()
    assert run.returncode == 4 and out == "done ok\n"  # the command's own status and output
    assert err.count("heartbeat failed: cannot reach Redis") == 1  # said once
    assert "Warning: could not release GPU(s) [0]: cannot reach Redis" in err
    assert "they become free when their heartbeat expires (15m)" in err
    assert "Traceback" not in err


@contextlib.contextmanager
def waiting_for(cli, r, gpu):
    """GPU `gpu` held, and a `reserve` waiting for it: (the waiter, its queue entry)."""
    cli("reserve", "-G", gpu, check=True)
    waiter = cli.popen(
        "reserve", "-G", gpu, "--short", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: r.zcard(KEY + "queue") == 1, what="the waiter's entry")
        yield waiter, r.zrange(KEY + "queue", 0, -1)[0]
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


def test_a_waiter_keeps_its_place_over_a_redis_restart_and_is_served(cli, pool, r, redis_server):
    with waiting_for(cli, r, 0) as (waiter, entry):
        r.save()
        try:
            redis_server.restart()
        finally:
            (redis_server.workdir / "dump.rdb").unlink()
        client = redis_server.client()
        assert client.zrange(KEY + "queue", 0, -1) == [entry]  # its place survived
        released = time.monotonic()
        cli("release", "-G", 0, check=True)
        out, err = waiter.communicate(timeout=30)
        served_after = time.monotonic() - released
    assert waiter.returncode == 0 and out == "0\n", err
    assert served_after < 10, served_after
    assert json.loads(client.get(KEY + "gpu:0"))["type"] == "manual"
    assert "Traceback" not in err
    client.close()


def test_a_waiter_whose_entry_was_lost_queues_again_and_is_served(cli, pool, r, redis_server):
    """Redis restarted without the queue (a replica promoted, a flush): queue again."""
    with waiting_for(cli, r, 1) as (waiter, entry):
        r.delete(KEY + "queue", KEY + "queue:entry:" + entry)
        wait_for(lambda: r.zrange(KEY + "queue", 0, -1) not in ([], [entry]), 15, "a new entry")
        cli("release", "-G", 1, check=True)
        out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0 and out == "1\n", err
    assert "queueing again" in err
