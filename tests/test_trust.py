"""The defects a new user found by following the README, and under signals and
faults: each test here failed before its fix.  (The double booking's own tests are
in test_canhazgpu.py and test_cli.py: `a_short_heartbeat_timeout_ends_no_one_elses_run`.)"""

import json
import os
import pty
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port
from poolstate import KEY, history, hold, holders, init_pool, me, wait_for
from test_run import proc_state


@pytest.fixture
def pool(r):
    init_pool(r, 4)
    return r


# --------------------------------------------------------------------------- Redis address


def test_the_environment_beats_a_url_in_a_config_file(cli, redis_server, tmp_path):
    home = Path(cli.env["HOME"])
    (home / ".canhazgpu.json").write_text(
        json.dumps({"redis": {"url": f"redis://127.0.0.1:{free_port()}/0"}})
    )
    env = {"CANHAZGPU_REDIS_URL": None, "CANHAZGPU_REDIS_PORT": redis_server.port}
    p = cli("admin", "--gpus", 2, "--provider", "fake", env=env)
    assert p.returncode == 0, p.stderr  # the file's host, the environment's port
    # When it fails, the one line says which sources made the address.
    dead = free_port()
    p = cli("status", env={"CANHAZGPU_REDIS_URL": None, "CANHAZGPU_REDIS_PORT": dead})
    assert p.returncode == 1
    first = p.stderr.splitlines()[0]
    assert f"127.0.0.1:{dead}/0" in first
    assert "config file" in first and "redis.url" in first and "CANHAZGPU_REDIS_PORT" in first


def test_redis_db_and_host_flags_apply_to_a_url(cli, redis_server, r):
    r.select(3)
    init_pool(r, 2)  # in db 3 only
    try:
        url = f"redis://nowhere.invalid:{redis_server.port}/0"
        p = cli(
            "status",
            "-j",
            "--redis-host",
            "127.0.0.1",
            "--redis-db",
            3,
            env={"CANHAZGPU_REDIS_URL": url},
        )
        assert p.returncode == 0, p.stderr
        assert len(json.loads(p.stdout)) == 2
    finally:
        r.flushdb()
        r.select(0)


def test_a_password_with_at_and_slash_is_never_half_printed(cli):
    p = cli("status", "--redis-url", f"redis://:p@ss/w0rd@127.0.0.1:{free_port()}/0")
    assert p.returncode == 1
    assert "w0rd" not in p.stderr and "ss/" not in p.stderr and ":***@127.0.0.1" in p.stderr


# --------------------------------------------------------------------------- terminal escapes

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\nFAKE  9  AVAILABLE\u202e"


def test_other_users_text_reaches_no_terminal_raw(cli, pool, r):
    hold(pool, 0, user=HOSTILE, actual="mallory", kind="manual", note=HOSTILE)
    entry = {"id": "e1", "user": HOSTILE, "actual_user": "mallory", "requested_count": 1,
             "allocated_gpus": [], "reservation_type": "run", "enqueue_time": time.time(),
             "last_heartbeat": time.time(), "note": HOSTILE}  # fmt: skip
    r.set(KEY + "queue:entry:e1", json.dumps(entry))
    r.zadd(KEY + "queue", {"e1": time.time_ns()})
    add = {"user": HOSTILE, "gpu_id": 1, "start_time": time.time() - 60,
           "end_time": time.time() - 1, "reservation_type": "run"}  # fmt: skip
    r.zadd(KEY + "usage_history_sorted", {json.dumps(add): time.time() - 1})
    for args in (["status"], ["queue"], ["report"], ["release", "-G", 0]):
        p = cli(*args)
        text = p.stdout + p.stderr
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, args
        assert "\\x1b]0;pwned\\x07" in text, args
    status = cli("status", check=True).stdout.splitlines()
    assert len(status) == 5  # the newline in the note broke no row
    # JSON keeps the text exactly, escaped by the encoder.
    assert json.loads(cli("status", "-j", check=True).stdout)[0]["note"] == HOSTILE


@pytest.mark.parametrize("option", ["--note", "--user"])
def test_control_characters_are_refused_at_input(cli, pool, r, option):
    p = cli("reserve", option, "line\nbreak", "--nonblock")
    assert p.returncode == 2 and "control characters" in p.stderr
    p = cli("run", option, "\x1b[2J", "--", "true")
    assert p.returncode == 2 and "\x1b" not in p.stderr
    assert holders(r) == {}


# --------------------------------------------------------------------------- uninitialised pool


def test_queue_and_report_fail_on_an_uninitialised_pool_as_status_does(cli, r):
    for args in (["status"], ["queue"], ["queue", "-j"], ["report"], ["report", "-j"]):
        p = cli(*args)
        assert p.returncode == 1 and p.stdout == "", args
        assert p.stderr.startswith("Error: the GPU pool is not initialised"), args


# --------------------------------------------------------------------------- half-failed nvidia-smi


def test_a_failed_process_query_keeps_the_memory_answer(cli, pool, fake_smi):
    fake_smi.set(gpus=[{"memory_used": "12000"}, {}, {}, {}],
                 modes={"query-compute-apps": "driver-failure"})  # fmt: skip
    p = cli("reserve", "-G", 0, "--nonblock")
    assert p.returncode == 1 and "GPU 0 is in use without a reservation" in p.stderr
    warnings = [line for line in p.stderr.splitlines() if line.startswith("Warning")]
    assert len(warnings) == 1 and "incomplete" in warnings[0]
    p = cli("reserve", "--nonblock", check=True)
    assert "[1]" in p.stdout  # a free one, not the busy GPU 0
    p = cli("status", "-j", check=True)
    assert json.loads(p.stdout)[0]["status"] == "UNRESERVED"
    assert len([line for line in p.stderr.splitlines() if line.startswith("Warning")]) == 1


# --------------------------------------------------------------------------- admin --force


def pty_run(cli, args, answer):
    """Run the CLI with a terminal on stdin; type `answer` once it asks."""
    master, slave = pty.openpty()
    proc = cli.popen(*args, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(slave)
    try:
        if answer is not None:
            wait_for(lambda: proc.poll() is not None or ask_shown(proc), what="the question")
            os.write(master, answer.encode())
        out, err = proc.communicate(timeout=20)
    finally:
        os.close(master)
    return proc.returncode, out.decode(), err.decode()


def ask_shown(proc):
    return select.select([proc.stderr], [], [], 0)[0] != []


def test_admin_force_asks_on_a_terminal(cli, pool, r):
    hold(pool, 1, user="bob", kind="manual")
    code, out, err = pty_run(cli, ["admin", "--gpus", 4, "--force", "-p", "fake"], "n\n")
    assert code == 1 and "This ends 1 reservation(s) of bob" in err and "nothing changed" in err
    assert list(holders(r)) == [1]
    code, out, err = pty_run(cli, ["admin", "--gpus", 4, "--force", "-p", "fake"], "y\n")
    assert code == 0 and "Ended 1 reservation(s)" in out
    hold(pool, 2)
    code, out, err = pty_run(cli, ["admin", "--gpus", 4, "--force", "--yes", "-p", "fake"], None)
    assert code == 0 and "Go on?" not in err and holders(r) == {}
    # Without a terminal (a script) it does not ask.
    hold(pool, 3)
    cli("admin", "--gpus", 4, "--force", "-p", "fake", check=True)
    assert holders(r) == {}


# --------------------------------------------------------------------------- reports by account


def test_a_display_name_is_shown_beside_its_account(cli, pool, r):
    cli("reserve", "--user", "eval-bot", "--nonblock", check=True)
    cli("reserve", "--nonblock", check=True)
    report = json.loads(cli("report", "-j", check=True).stdout)
    assert report["unique_users"] == 1
    assert sorted((u["name"], u["account"]) for u in report["users"]) == [
        ("eval-bot", me()),
        (me(), me()),
    ]
    text = cli("report", check=True).stdout
    assert f"{me()} (eval-bot)" in text and "Unique users: 1" in text


# --------------------------------------------------------------------------- Go's report window


def test_usage_records_are_scored_in_whole_seconds(cli, pool, r):
    cli("reserve", "--nonblock", check=True)
    cli("release", check=True)
    [(member, score)] = r.zrange(KEY + "usage_history_sorted", 0, -1, withscores=True)
    assert score == int(score)
    assert json.loads(member)["end_time"] != score  # the record keeps the exact time
    # What the Go tool asks for: records up to the current whole second.
    assert r.zrangebyscore(KEY + "usage_history_sorted", "-inf", int(time.time())) == [member]


# --------------------------------------------------------------------------- packaging


def test_the_systemd_unit_leaves_the_address_to_the_config():
    unit = (REPO / "contrib" / "canhazgpu-web.service").read_text()
    [start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert start == "ExecStart=/usr/local/bin/canhazgpu web"


def test_make_demo_installs_only_what_the_demo_needs():
    plan = subprocess.run(
        ["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "redis-server" in plan
    for test_only in ("chromium", "zsh", "fish", "groff", "python3-psutil", "playwright"):
        assert test_only not in plan, test_only


# --------------------------------------------------------------------------- signals at start-up


def importing(proc):
    """Wait until the program runs its own imports (`import json` maps _json), past
    the interpreter's start-up: a signal before that meets CPython's own start-up,
    which prints its own "Fatal Python error" and which no program can change."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/maps") as f:
                if "/_json." in f.read():
                    return
        except OSError:
            return
        time.sleep(0.0005)


@pytest.mark.parametrize(
    "args", [["status"], ["reserve", "--nonblock", "-d", "1h"], ["run", "--nonblock", "--", "true"]]
)
def test_a_signal_during_start_up_ends_quietly(cli, pool, r, args):
    """SIGINT in the first ~50 ms, while Python imports redis-py, printed a traceback."""
    rng = random.Random(os.environ.get("CHAOS_SEED", "start-up"))
    dead = {-signal.SIGINT, -signal.SIGTERM}
    allowed = dead | ({0, 1, 125} if args[0] == "run" else {0, 1})
    for _ in range(12):
        sig = rng.choice([signal.SIGINT, signal.SIGINT, signal.SIGTERM])
        proc = cli.popen(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        importing(proc)
        time.sleep(rng.uniform(0.0, 0.12))
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
        assert "Traceback" not in err.decode() and "KeyboardInterrupt" not in err.decode()
        assert proc.returncode in allowed, (proc.returncode, err)
        if proc.returncode in dead and b"export CUDA" not in out and args[0] == "reserve":
            assert holders(r) == {}  # ended before it said so: nothing kept
        cli("release")  # a reserve that finished
    assert not any(st["type"] == "run" for st in holders(r).values())


# --------------------------------------------------------------------------- run without psutil


def test_run_without_psutil_reserves_nothing(cli, pool, r, tmp_path):
    shadow = tmp_path / "no-psutil"
    shadow.mkdir()
    (shadow / "psutil.py").write_text("raise ImportError('psutil is not installed')\n")
    p = cli("run", "--", "true", env={"PYTHONPATH": shadow})
    assert p.returncode == 125
    assert p.stderr.startswith("Error: the Python package 'psutil' is not installed")
    assert "Reserved" not in p.stderr and holders(r) == {} and history(r) == []


# --------------------------------------------------------------------------- kill -TSTP


def test_tstp_without_a_terminal_stops_run_and_its_command(cli, pool, r):
    """A batch system pausing a job: the parent must see `run` stopped too."""
    proc = cli.popen(
        "run", "--", "sleep", "30",
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=os.setpgrp,
    )  # fmt: skip
    try:
        wait_for(lambda: holders(r), what="the reservation")
        child = wait_for(lambda: child_pid(proc.pid), what="the command")
        os.kill(proc.pid, signal.SIGTSTP)
        wait_for(lambda: proc_state(child) == "T" and proc_state(proc.pid) == "T", 10, "stops")
        pid, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)  # what a parent's wait(WUNTRACED) sees
        os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: proc_state(child) == "S" and proc_state(proc.pid) != "T", 10, "resumes")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert holders(r) == {}


def child_pid(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


if sys.platform != "linux":  # /proc is needed above
    pytestmark = pytest.mark.skip("Linux only")


# --------------------------------------------------------------------------- settings' sources


def test_a_count_from_a_file_does_not_fight_gpu_ids_on_the_command_line(cli, pool):
    """With run.gpus = 4 in a file, `run --gpu-ids 1,3` failed: "--gpus 4 does not match"."""
    home = Path(cli.env["HOME"])
    (home / ".canhazgpu.json").write_text(json.dumps({"run": {"gpus": 4}}))
    p = cli("run", "--gpu-ids", "1,3", "--", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES", check=True)
    assert p.stdout == "1,3\n"
    p = cli("run", "--gpus", 4, "--gpu-ids", "1,3", "--", "true")
    assert p.returncode == 2 and "--gpus 4 does not match the 2 GPU(s) of --gpu-ids" in p.stderr
    assert cli("run", "--", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES", check=True).stdout == (
        "0,1,2,3\n"
    )  # the file's count applies when nothing else is said
