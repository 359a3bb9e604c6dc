"""End-to-end tests: the real CLI as a subprocess, against a real redis-server and the
nvidia-smi / amd-smi stand-ins (see conftest.py).  Commands: admin, status, reserve,
release, report; configuration; failures of Redis; usage errors; help and version."""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import redis
from conftest import free_port
from poolstate import (
    KEY,
    add_record,
    dump,
    gpu_state,
    history,
    hold,
    holders,
    init_pool,
    me,
    parse_table,
    wait_for,
)

STATUS_COLUMNS = ["GPU", "STATUS", "USER", "DURATION", "TYPE", "DETAILS", "VALIDATION", "NOTE"]


@pytest.fixture
def pool(r):
    init_pool(r, 8)
    return r


@pytest.fixture
def spawn():
    """Start long-lived helper processes; all are killed at the end of the test."""
    procs = []

    def start(*argv):
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_error(proc, code, *needles):
    """Exit `code`, nothing on stdout, `Error: ...` (plus at most a hint) on stderr."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = error_lines(proc.stderr)
    assert 1 <= len(lines) <= 2, proc.stderr
    assert lines[0].startswith("Error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def private_python_path(tmp_path, *dirs):
    """A PATH with `python3` (for the stand-ins' #!) and `dirs` only: no real GPU tool."""
    pybin = tmp_path / "pybin"
    pybin.mkdir(exist_ok=True)
    if not (pybin / "python3").exists():
        (pybin / "python3").symlink_to(sys.executable)
    return os.pathsep.join([*map(str, dirs), str(pybin)])


# --------------------------------------------------------------------------- admin


def test_admin_initialises_a_fresh_pool(cli, r):
    p = cli("admin", "--gpus", 8, check=True)
    assert p.stdout == "Initialised the GPU pool: 8 GPU(s), provider nvidia\n"
    assert p.stderr == ""
    assert r.get(KEY + "gpu_count") == "8" and r.get(KEY + "provider") == "nvidia"
    assert cli("status", "--json", check=True).stdout.count('"AVAILABLE"') == 8


def test_admin_warns_when_the_count_differs_from_the_hardware(cli, r, fake_smi):
    fake_smi.set(gpus=8)
    p = cli("admin", "-g", 4, check=True)
    assert "Warning: nvidia-smi reports 8 GPU(s); the pool has 4" in p.stderr
    assert r.get(KEY + "gpu_count") == "4"


def test_admin_on_an_existing_pool_needs_force_and_changes_nothing(cli, pool):
    hold(pool, 2)
    before = dump(pool)
    p = cli("admin", "--gpus", 4)
    assert_one_error(p, 1, "already initialised with 8 GPUs", "--force")
    assert dump(pool) == before


def test_admin_force_ends_every_reservation_with_usage_records(cli, pool):
    hold(pool, 1, user="bob", kind="run")
    hold(pool, 3, user="carol", kind="manual")
    hold(pool, 6, user="dave", kind="manual")
    p = cli("admin", "--gpus", 4, "--force", check=True)
    assert "Re-initialised the GPU pool: 4 GPU(s), provider nvidia" in p.stdout
    assert "Ended 3 reservation(s)" in p.stdout
    assert pool.get(KEY + "gpu_count") == "4"
    assert holders(pool, 8) == {}
    assert [pool.get(f"{KEY}gpu:{i}") for i in range(4, 8)] == [None] * 4
    records = sorted((h["user"], h["gpu_id"], h["reservation_type"]) for h in history(pool))
    assert records == [("bob", 1, "run"), ("carol", 3, "manual"), ("dave", 6, "manual")]
    assert all(h["duration_seconds"] == pytest.approx(3600, abs=60) for h in history(pool))
    p = cli("admin", "--gpus", 4, "--force", check=True)
    assert "Ended 0 reservation(s)" in p.stdout


def test_admin_detects_nvidia(cli, r, tmp_path, fake_smi):
    path = private_python_path(tmp_path, fake_smi.bindir)
    cli("admin", "--gpus", 8, env={"PATH": path}, check=True)
    assert r.get(KEY + "provider") == "nvidia"


def test_admin_detects_amd(cli, r, tmp_path, fake_smi, fake_amd_smi):
    fake_smi.uninstall()
    fake_amd_smi.set(gpus=4)
    path = private_python_path(tmp_path, fake_smi.bindir)
    p = cli("admin", "--gpus", 4, env={"PATH": path}, check=True)
    assert "provider amd" in p.stdout and p.stderr == ""
    assert r.get(KEY + "provider") == "amd"


def test_admin_with_both_tools_asks_for_a_provider(cli, r, tmp_path, fake_smi, fake_amd_smi):
    fake_amd_smi.install()
    path = private_python_path(tmp_path, fake_smi.bindir)
    p = cli("admin", "--gpus", 8, env={"PATH": path})
    assert_one_error(p, 2, "both nvidia-smi and amd-smi", "--provider")
    assert r.keys("*") == []
    cli("admin", "--gpus", 8, "--provider", "amd", env={"PATH": path}, check=True)
    assert r.get(KEY + "provider") == "amd"


def test_admin_without_any_tool(cli, r, tmp_path, fake_smi):
    fake_smi.uninstall()
    path = private_python_path(tmp_path, fake_smi.bindir)
    p = cli("admin", "--gpus", 2, env={"PATH": path})
    assert_one_error(p, 1, "neither nvidia-smi nor amd-smi", "--provider fake")
    assert r.keys("*") == []
    p = cli("admin", "--gpus", 2, "-p", "fake", env={"PATH": path}, check=True)
    assert r.get(KEY + "provider") == "fake"
    rows = json.loads(cli("status", "--json", env={"PATH": path}, check=True).stdout)
    assert [row["status"] for row in rows] == ["AVAILABLE"] * 2


# --------------------------------------------------------------------------- status


def test_status_uninitialised(cli, r):
    assert_one_error(cli("status"), 1, "not initialised", "admin --gpus")


def test_status_table(cli, pool, fake_smi, spawn):
    now = time.time()
    worker = spawn("sleep", "60")
    fake_smi.set(
        gpus=[{"memory_used": "45"}, {"memory_used": "8452"}, {}, {"memory_used": "9000"}]
        + [{}] * 4,
        processes=[
            {"pid": 31337, "name": "/usr/bin/python3", "gpu": 1, "used_memory": "8452"},
            {"pid": worker.pid, "name": "/usr/bin/python3", "gpu": 3, "used_memory": "8000"},
            {"pid": 4194999, "name": "jupyter", "gpu": 3, "used_memory": "1000"},
        ],
    )
    pool.set(KEY + "gpu:0", json.dumps({"last_released": now - 1815}))
    hold(pool, 1, user="alice", kind="run", age=3725, last_heartbeat=now - 5)
    hold(
        pool,
        2,
        user="bob",
        kind="manual",
        age=60,
        expiry_time=now + 3 * 3600 + 945,
        note="fine-tuning",
    )
    pool.set(KEY + "gpu:5", "{broken")
    p = cli("status", check=True)
    names, rows = parse_table(p.stdout)
    assert names == STATUS_COLUMNS
    assert [row["GPU"] for row in rows] == [str(i) for i in range(8)]
    assert [row["STATUS"] for row in rows] == [
        "AVAILABLE",
        "IN_USE",
        "IN_USE",
        "UNRESERVED",
        "AVAILABLE",
        "ERROR",
        "AVAILABLE",
        "AVAILABLE",
    ]
    free, run, manual, unreserved, never = rows[0], rows[1], rows[2], rows[3], rows[4]
    assert re.fullmatch(r"free for 0h 30m 1[5-9]s", free["DETAILS"])
    assert free["VALIDATION"] == "45MB used" and free["USER"] == "-"
    assert never["DETAILS"] == "never used" and never["VALIDATION"] == "0MB used"
    assert (run["USER"], run["TYPE"]) == ("alice", "RUN")
    assert re.fullmatch(r"1h 2m [5-9]s", run["DURATION"])
    assert re.fullmatch(r"heartbeat 0h 0m [5-9]s ago", run["DETAILS"])
    assert run["VALIDATION"] == "8452MB, 1 process"
    assert (manual["USER"], manual["TYPE"], manual["NOTE"]) == ("bob", "MANUAL", "fine-tuning")
    assert re.fullmatch(r"expires in 3h 15m 4[0-5]s", manual["DETAILS"])
    assert manual["VALIDATION"] == "no usage detected"
    assert unreserved["USER"] == ", ".join(sorted([me(), "unknown"]))
    assert unreserved["DETAILS"] == (
        f"9000MB used by PID {worker.pid} (python3), PID 4194999 (jupyter)"
    )
    assert unreserved["VALIDATION"] == "9000MB, 2 processes"
    assert rows[5]["DETAILS"].startswith("unparseable state")
    assert "MODEL" not in p.stdout and "\x1b[" not in p.stdout
    assert p.stderr == ""
    # The two queries of SPEC section 8, once each.
    assert sorted(fake_smi.calls()) == [
        [
            "--query-compute-apps=pid,process_name,gpu_uuid,used_memory",
            "--format=csv,noheader,nounits",
        ],
        [
            "--query-gpu=index,gpu_uuid,name,memory.used,memory.total",
            "--format=csv,noheader,nounits",
        ],
    ]


def test_status_json(cli, pool, fake_smi, spawn):
    now = time.time()
    worker = spawn("sleep", "60")
    fake_smi.set(
        gpus=[{"memory_used": "2000"}, {"memory_used": "3000", "name": "NVIDIA A100, PCIe"}]
        + [{}] * 6,
        processes=[{"pid": worker.pid, "name": "python3", "gpu": 1, "used_memory": "3000"}],
    )
    hold(pool, 0, user="team", actual=me(), kind="manual", note="demo", age=100)
    pool.set(KEY + "gpu:2", json.dumps({"last_released": now - 60}))
    pool.set(KEY + "gpu:3", "[]")
    rows = json.loads(cli("status", "-j", check=True).stdout)
    assert [row["gpu_id"] for row in rows] == list(range(8))
    held, unreserved, free, broken = rows[:4]
    assert held["status"] == "IN_USE" and held["type"] == "MANUAL"
    assert (held["user"], held["actual_user"], held["note"]) == ("team", me(), "demo")
    assert held["duration_seconds"] == pytest.approx(100, abs=5)
    s = held["duration_seconds"]
    assert held["duration"] == f"{s // 3600}h {s % 3600 // 60}m {s % 60}s"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", held["expiry_time"])
    assert held["memory_mb"] == 2000 and held["validation"] == "no usage detected"
    assert held["gpu_model"] == "NVIDIA H100 80GB HBM3"
    assert unreserved["status"] == "UNRESERVED"
    assert unreserved["unreserved_users"] == [me()]
    assert unreserved["process_info"] == [
        {"pid": worker.pid, "name": "python3", "memory_mb": 3000, "user": me()}
    ]
    assert unreserved["gpu_model"] == "NVIDIA A100, PCIe"
    assert free["status"] == "AVAILABLE"
    assert re.fullmatch(r"free for 0h 1m [0-4]s", free["details"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", free["last_released"])
    assert broken["status"] == "ERROR" and broken["error"]
    assert all("model" not in row for row in rows)


def test_status_model_column_only_when_a_model_is_detected(cli, pool, fake_smi, spawn):
    server = spawn(
        sys.executable, "-c", "import time; time.sleep(60)", "--model", "meta-llama/Llama-3-8B"
    )
    fake_smi.set(
        gpus=[{}, {}, {"memory_used": "20000"}] + [{}] * 5,
        processes=[{"pid": server.pid, "name": "python3", "gpu": 2, "used_memory": "20000"}],
    )
    p = cli("status", check=True)
    names, rows = parse_table(p.stdout)
    assert names == STATUS_COLUMNS[:-1] + ["MODEL", "NOTE"]
    assert rows[2]["MODEL"] == "meta-llama/Llama-3-8B" and rows[2]["STATUS"] == "UNRESERVED"
    assert {row["MODEL"] for k, row in enumerate(rows) if k != 2} == {"-"}
    rows = json.loads(cli("status", "--json", check=True).stdout)
    assert rows[2]["model"] == {"provider": "meta-llama", "model": "meta-llama/Llama-3-8B"}
    server.kill()
    server.wait()
    fake_smi.set()
    assert "MODEL" not in cli("status", check=True).stdout


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("driver-failure", "NVIDIA-SMI has failed"),
        ("garbage", "unexpected line"),
        ("no-devices", "No devices were found"),
    ],
)
def test_status_when_the_provider_fails(cli, pool, fake_smi, mode, reason):
    fake_smi.set(mode=mode)
    hold(pool, 1)
    p = cli("status", check=True)
    _, rows = parse_table(p.stdout)
    assert {row["VALIDATION"] for row in rows} == {"unavailable"}
    assert rows[1]["STATUS"] == "IN_USE" and rows[0]["STATUS"] == "AVAILABLE"
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("Warning: ") and reason in lines[0]
    rows = json.loads(cli("status", "--json", check=True).stdout)
    assert {row["validation"] for row in rows} == {"unavailable"}


def test_status_without_nvidia_smi(cli, pool, tmp_path, fake_smi):
    fake_smi.uninstall()
    p = cli("status", env={"PATH": private_python_path(tmp_path)}, check=True)
    _, rows = parse_table(p.stdout)
    assert {row["VALIDATION"] for row in rows} == {"unavailable"}
    assert "Warning: cannot validate GPU usage: cannot run nvidia-smi" in p.stderr


def test_a_pool_without_a_provider_key_is_nvidia(cli, r, fake_smi):
    r.set(KEY + "gpu_count", 2)  # as old versions left it
    fake_smi.set(gpus=[{"memory_used": "5000"}, {}])
    rows = json.loads(cli("status", "--json", check=True).stdout)
    assert [row["status"] for row in rows] == ["UNRESERVED", "AVAILABLE"]
    assert fake_smi.calls()


@pytest.mark.parametrize("shape", ["rocm6", "rocm7"])
def test_status_on_amd(cli, r, fake_smi, fake_amd_smi, shape):
    fake_smi.uninstall()
    fake_amd_smi.set(
        gpus=[{}, {"memory_used": 9000}, {"memory_used": "N/A"}],
        processes=[{"pid": 4194003, "name": "python3", "gpu": 1, "vram_bytes": 8858370048}],
        shape=shape,
    )
    init_pool(r, 3, provider="amd")
    hold(r, 2)
    rows = json.loads(cli("status", "--json", check=True).stdout)
    assert [row["status"] for row in rows] == ["AVAILABLE", "UNRESERVED", "IN_USE"]
    assert rows[0]["memory_mb"] == 283
    assert rows[1]["details"] == "9000MB used by PID 4194003 (python3)"
    assert rows[1]["process_info"][0]["memory_mb"] == 8448
    fake_amd_smi.set(mode="failure")
    p = cli("status", "--json", check=True)
    assert {row["validation"] for row in json.loads(p.stdout)} == {"unavailable"}
    assert "amd-smi failed" in p.stderr


def test_status_with_an_unknown_provider_in_redis(cli, pool):
    pool.set(KEY + "provider", "intel")
    assert_one_error(cli("status"), 1, "unknown GPU provider 'intel'", "admin --force")


@pytest.mark.slow
def test_status_when_nvidia_smi_hangs(cli, pool, fake_smi):
    fake_smi.set(mode="hang")
    start = time.monotonic()
    p = cli("status", timeout=30, check=True)
    assert time.monotonic() - start < 12
    _, rows = parse_table(p.stdout)
    assert {row["VALIDATION"] for row in rows} == {"unavailable"}
    assert "did not answer" in p.stderr


def test_status_with_na_values(cli, pool, fake_smi):
    fake_smi.set(
        gpus=[
            {"memory_used": "[N/A]"},
            {"memory_used": "[N/A]", "memory_total": "[N/A]"},
            {"memory_used": "[Insufficient Permissions]"},
        ]
        + [{}] * 5,
        processes=[
            {"pid": 4194001, "name": "python3", "gpu": 0, "used_memory": "2048"},
            {"pid": 4194002, "name": "python3", "gpu": 2, "used_memory": "[N/A]"},
        ],
    )
    hold(pool, 1)
    p = cli("status", check=True)
    _, rows = parse_table(p.stdout)
    assert rows[0]["STATUS"] == "UNRESERVED"
    assert rows[0]["DETAILS"] == "2048MB used by PID 4194001 (python3)"
    assert rows[1]["STATUS"] == "IN_USE" and rows[1]["VALIDATION"] == "no usage detected"
    assert rows[2]["STATUS"] == "AVAILABLE" and rows[2]["VALIDATION"] != "unavailable"
    rows = json.loads(cli("status", "--json", check=True).stdout)
    assert rows[0]["memory_mb"] == 2048 and "memory_mb" not in rows[1]


def test_status_into_a_closed_pipe(cli, r, fake_smi):
    """`canhazgpu status | head -1` on a big pool: no traceback, no error."""
    fake_smi.uninstall()
    init_pool(r, 5000, provider="fake")
    proc = cli.popen("status", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=30)
    assert first.split()[:2] == [b"GPU", b"STATUS"]
    assert proc.returncode == 0 and err == b""


def run_in_pty(cli, *args, env=None, timeout=30):
    """Run the CLI with its stdout on a pseudo-terminal; returns (exit code, output)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cli.argv(*args),
        env=cli.make_env(env),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=5)
    finally:
        os.close(master)
    assert "Traceback" not in proc.stderr.read().decode()
    return proc.returncode, out.decode()


def test_status_colour_only_on_a_tty(cli, pool, fake_smi):
    fake_smi.set(gpus=[{"memory_used": "5000"}] + [{}] * 7)
    hold(pool, 1)
    code, out = run_in_pty(cli, "status")
    assert code == 0
    assert "\x1b[" in out
    assert re.search(r"\x1b\[[0-9;]*mAVAILABLE\x1b\[0m", out)
    assert re.search(r"\x1b\[[0-9;]*mIN_USE\x1b\[0m", out)
    assert re.search(r"\x1b\[[0-9;]*mUNRESERVED\x1b\[0m", out)
    for args, env in ((["status", "--no-color"], None), (["status"], {"NO_COLOR": "1"})):
        code, out = run_in_pty(cli, *args, env=env)
        assert code == 0 and "AVAILABLE" in out and "\x1b[" not in out, (args, env)
    assert "\x1b[" not in cli("status", check=True).stdout


# --------------------------------------------------------------------------- reserve


def test_reserve_defaults(cli, pool):
    p = cli("reserve", env={"USER": "mallory", "LOGNAME": "mallory"}, check=True)
    assert p.stdout == "Reserved 1 GPU(s): [0] for 8h 0m 0s\nexport CUDA_VISIBLE_DEVICES=0\n"
    st = gpu_state(pool, 0)
    assert st["type"] == "manual" and st["user"] == me() and st["actual_user"] == me()
    assert st["expiry_time"] - st["start_time"] == pytest.approx(8 * 3600)
    assert abs(st["start_time"] - time.time()) < 30
    assert st["reservation_id"] and list(holders(pool)) == [0]


def test_reserve_count_and_duration(cli, pool):
    p = cli("reserve", "--gpus", 2, "--duration", "1h30m", check=True)
    assert p.stdout.splitlines() == [
        "Reserved 2 GPU(s): [0, 1] for 1h 30m 0s",
        "export CUDA_VISIBLE_DEVICES=0,1",
    ]
    st = gpu_state(pool, 1)
    assert st["expiry_time"] - st["start_time"] == pytest.approx(5400)
    p = cli("reserve", "-g", 1, "-d", "0.5h", check=True)
    assert "[2] for 0h 30m 0s" in p.stdout


def test_reserve_gpu_ids(cli, pool):
    p = cli("reserve", "--gpu-ids", "5,3", check=True)
    assert p.stdout.splitlines() == [
        "Reserved 2 GPU(s): [3, 5] for 8h 0m 0s",
        "export CUDA_VISIBLE_DEVICES=3,5",
    ]
    assert sorted(holders(pool)) == [3, 5]
    cli("reserve", "--gpus", 2, "-G", "0,7", check=True)  # the count matches the list
    cli("reserve", "--gpus", 1, "-G", "1,6", check=True)  # 1 is the default count
    assert sorted(holders(pool)) == [0, 1, 3, 5, 6, 7]
    assert_one_error(cli("reserve", "--gpus", 3, "-G", "2,4"), 2, "--gpus 3")


def test_reserve_short_prints_only_the_ids(cli, pool):
    p = cli("reserve", "--short", "--gpus", 3, check=True)
    assert (p.stdout, p.stderr) == ("0,1,2\n", "")
    assert cli("reserve", "-s", check=True).stdout == "3\n"


def test_reserve_note_and_display_user(cli, pool):
    cli("reserve", "--note", "jupyter on 8888", "--user", "alice", check=True)
    st = gpu_state(pool, 0)
    assert (st["user"], st["actual_user"], st["note"]) == ("alice", me(), "jupyter on 8888")
    _, rows = parse_table(cli("status", check=True).stdout)
    assert rows[0]["USER"] == f"{me()} (alice)" and rows[0]["NOTE"] == "jupyter on 8888"


def test_reserve_nonblock_says_why_and_how_many_are_free(cli, pool, fake_smi):
    for gpu in range(5):
        hold(pool, gpu)
    fake_smi.set(gpus=[{}] * 5 + [{"memory_used": "9000"}, {}, {}])
    before = dump(pool)
    p = cli("reserve", "--gpus", 3, "--nonblock")
    assert_one_error(p, 1, "requested 3, available 2", "1 in use without reservation")
    assert dump(pool) == before
    p = cli("reserve", "-G", "2,5", "--nonblock")
    assert_one_error(
        p, 1, "GPU 2 is reserved by bob (run)", "GPU 5 is in use without a reservation"
    )
    assert dump(pool) == before
    assert cli("reserve", "--gpus", 2, "--nonblock", "--short", check=True).stdout == "6,7\n"
    assert_one_error(cli("reserve", "--nonblock"), 1, "requested 1, available 0")


def test_reserve_force_takes_a_gpu_in_use_without_reservation(cli, pool, fake_smi):
    fake_smi.set(gpus=[{"memory_used": "9000"}] * 8)
    assert_one_error(cli("reserve", "--nonblock"), 1, "8 in use without reservation")
    assert_one_error(cli("reserve", "-G", 3, "--nonblock"), 1, "GPU 3 is in use without")
    p = cli("reserve", "--gpu-ids", 3, "--force", "--nonblock", check=True)
    assert "Reserved 1 GPU(s): [3]" in p.stdout
    hold(pool, 4)
    assert_one_error(cli("reserve", "-G", 4, "-f", "--nonblock"), 1, "GPU 4 is reserved by bob")
    assert sorted(holders(pool)) == [3, 4]


def test_reserve_with_the_provider_failing_goes_on_reservations_alone(cli, pool, fake_smi):
    fake_smi.set(mode="driver-failure")
    p = cli("reserve", "--short", check=True)
    assert p.stdout == "0\n"
    assert "Warning: cannot validate GPU usage" in p.stderr


def test_reserve_wait_gives_up(cli, pool):
    for gpu in range(8):
        hold(pool, gpu)
    p = cli("reserve", "--wait", "1s")
    assert p.returncode == 1 and p.stdout == ""
    assert "Error: gave up after waiting 1s" in p.stderr
    assert pool.zcard(KEY + "queue") == 0


def test_reserve_on_an_uninitialised_pool(cli, r):
    assert_one_error(cli("reserve", "--nonblock"), 1, "not initialised")
    assert r.keys("*") == []


# --------------------------------------------------------------------------- release


def test_release_on_an_uninitialised_pool(cli, r):
    assert_one_error(cli("release"), 1, "not initialised")
    assert_one_error(cli("release", "-G", 0), 1, "not initialised")


def test_release_own_manual_reservations(cli, pool):
    cli("reserve", "--gpus", 2, check=True)
    hold(pool, 4, user=me(), kind="run")  # a run of ours: not released without ids
    hold(pool, 5, user="bob", kind="manual")
    p = cli("release", check=True)
    assert p.stdout == "Released 2 GPU(s): [0, 1]\n"
    assert sorted(holders(pool)) == [4, 5]
    assert sorted(h["gpu_id"] for h in history(pool)) == [0, 1]
    assert {h["reservation_type"] for h in history(pool)} == {"manual"}
    assert gpu_state(pool, 0)["last_released"] == pytest.approx(time.time(), abs=30)
    p = cli("release", check=True)
    assert p.stdout == "No manually reserved GPUs found for current user\n"


def test_release_by_ids(cli, pool):
    cli("reserve", "-G", 0, check=True)
    hold(pool, 4, user=me(), kind="run")
    hold(pool, 6, user="bob", kind="manual")
    # An id outside the pool is a usage error, as for run and reserve: nothing is released.
    p = cli("release", "--gpu-ids", "0,4,5,6,99")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("Error: GPU 99 is not in the pool (GPUs 0-7)\n")
    assert list(holders(pool)) == [0, 4, 6]
    # Any refused id makes it exit 1, each one an `Error:` line; the rest is released.
    p = cli("release", "--gpu-ids", "0,4,5,6")
    assert p.returncode == 1
    assert p.stdout == "Released 2 GPU(s): [0, 4]\n"
    assert p.stderr.splitlines() == [
        "Error: GPU 5 is not reserved",
        f"Error: GPU 6 is reserved by bob, not by you ({me()})",
    ]
    assert list(holders(pool)) == [6]
    p = cli("release", "-G", "5,6")
    assert p.returncode == 1 and p.stdout == ""
    assert len(error_lines(p.stderr)) == 2
    assert list(holders(pool)) == [6]


def test_release_ownership_is_the_real_account(cli, pool):
    hold(pool, 2, user=me(), actual="bob", kind="manual")  # bob calling himself us
    assert cli("release", check=True).stdout.startswith("No manually reserved GPUs")
    p = cli("release", "-G", 2)
    assert p.returncode == 1
    assert error_lines(p.stderr) == [
        f"Error: GPU 2 is reserved by bob ({me()}), not by you ({me()})"
    ]
    cli("reserve", "--user", "somebody-else", check=True)  # ours, whatever the name
    assert cli("release", check=True).stdout == "Released 1 GPU(s): [0]\n"
    assert list(holders(pool)) == [2]


# --------------------------------------------------------------------------- report


def seed_report(r):
    now = time.time()
    add_record(r, "alice", 0, now - 5 * 3600, now - 3 * 3600)  # 2h run
    add_record(r, "bob", 1, now - 2 * 3600, now - 3600, "manual")  # 1h manual
    add_record(r, "alice", 2, now - 10 * 86400 - 3600, now - 10 * 86400, "manual")  # 10 days ago
    add_record(r, "zed", 3, now - 100 * 86400, now - 99 * 86400)  # outside every window
    hold(r, 4, user="carol", kind="manual", age=1800, last_active=now)  # in progress: 0.5h


def test_report_json(cli, pool):
    seed_report(pool)
    rep = json.loads(cli("report", "--days", 7, "--json", check=True).stdout)
    users = {u["name"]: u for u in rep["users"]}
    assert set(users) == {"alice", "bob", "carol"}
    assert users["alice"]["gpu_hours"] == pytest.approx(2, abs=0.01)
    assert users["bob"]["gpu_hours"] == pytest.approx(1, abs=0.01)
    assert users["carol"]["gpu_hours"] == pytest.approx(0.5, abs=0.01)
    assert (users["alice"]["run_count"], users["alice"]["manual_count"]) == (1, 0)
    assert (users["carol"]["run_count"], users["carol"]["manual_count"]) == (0, 1)
    assert users["alice"]["percentage"] == pytest.approx(100 * 2 / 3.5, abs=0.1)
    assert rep["total_gpu_hours"] == pytest.approx(3.5, abs=0.01)
    assert (rep["total_reservations"], rep["unique_users"], rep["days"]) == (3, 3, 7)
    assert set(rep) >= {"start_date", "end_date"}
    rep = json.loads(cli("report", "-j", check=True).stdout)  # 30 days by default
    assert rep["days"] == 30 and rep["total_gpu_hours"] == pytest.approx(4.5, abs=0.01)


def test_report_table_and_total(cli, pool):
    seed_report(pool)
    p = cli("report", "--days", 30, check=True)
    lines = p.stdout.splitlines()
    assert lines[0] == "=== GPU Reservation Report ==="
    assert re.fullmatch(r"Period: \d{4}-\d\d-\d\d to \d{4}-\d\d-\d\d \(30 days\)", lines[1])
    header = ["User", "GPU", "Hours", "Percentage", "Run", "Manual", "Idle", "GPU", "Hours"]
    assert lines[3].split() == header
    body = {line.split()[0]: line.split()[1:] for line in lines[5:8]}
    assert body == {
        "alice": ["3.00", "66.7%", "1", "1", "0.00"],
        "bob": ["1.00", "22.2%", "0", "1", "0.00"],
        "carol": ["0.50", "11.1%", "0", "1", "0.00"],
    }
    assert [line.split()[0] for line in lines[5:8]] == ["alice", "bob", "carol"]
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert total.split() == ["TOTAL", "4.50", "100.0%", "1", "3", "0.00"]
    assert "Total reservations: 4" in lines and "Unique users: 3" in lines


def test_report_of_an_empty_period(cli, pool):
    p = cli("report", "-d", 1, check=True)
    assert "(no reservations in this period)" in p.stdout
    assert next(ln for ln in p.stdout.splitlines() if ln.startswith("TOTAL")).split()[1] == "0.00"


# --------------------------------------------------------------------------- configuration


def test_config_from_environment_host_port_db(cli, redis_server, r):
    env = {
        "CANHAZGPU_REDIS_URL": None,
        "CANHAZGPU_REDIS_HOST": "127.0.0.1",
        "CANHAZGPU_REDIS_PORT": redis_server.port,
        "CANHAZGPU_REDIS_DB": 3,
    }
    cli("admin", "--gpus", 2, env=env, check=True)
    db3 = redis.Redis(host="127.0.0.1", port=redis_server.port, db=3, decode_responses=True)
    assert db3.get(KEY + "gpu_count") == "2"
    assert r.get(KEY + "gpu_count") is None
    assert cli("reserve", "--short", env=env, check=True).stdout == "0\n"
    assert db3.get(KEY + "gpu:0")
    db3.flushdb()


def test_flags_beat_the_environment(cli, redis_server, pool):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    p = cli(
        "status",
        "--json",
        "--redis-url",
        redis_server.url,
        env={"CANHAZGPU_REDIS_URL": dead},
        check=True,
    )
    assert len(json.loads(p.stdout)) == 8
    cli(
        "--redis-port",
        redis_server.port,
        "--redis-host",
        "127.0.0.1",
        "status",
        env={"CANHAZGPU_REDIS_URL": dead},
        check=True,
    )
    cli(
        "status",
        "--redis-url",
        redis_server.unix_url,
        env={"CANHAZGPU_REDIS_URL": dead},
        check=True,
    )


def test_memory_threshold_from_environment_and_flag(cli, pool, fake_smi):
    fake_smi.set(gpus=[{"memory_used": "8452"}] + [{}] * 7)

    def status0(*args, env=None):
        return json.loads(cli("status", "--json", *args, env=env, check=True).stdout)[0]["status"]

    assert status0() == "UNRESERVED"
    assert status0(env={"CANHAZGPU_MEMORY_THRESHOLD": 10000}) == "AVAILABLE"
    assert status0("--memory-threshold", 8452, env={"CANHAZGPU_MEMORY_THRESHOLD": 1}) == "AVAILABLE"
    assert status0("--memory-threshold", 8451) == "UNRESERVED"
    p = cli("reserve", "-G", 0, "--nonblock", env={"CANHAZGPU_MEMORY_THRESHOLD": 10000})
    assert p.returncode == 0


def test_a_short_heartbeat_timeout_ends_no_one_elses_run(cli, pool, r):
    """The double booking: `status` with a 1-second timeout ended another user's live run,
    and its GPU was then reserved by someone else while the job ran."""
    hold(pool, 1, last_heartbeat=time.time() - 120)  # a Go run: the built-in 15 minutes
    live = cli.popen("run", "-G", 2, "--", "sleep", "30", stderr=subprocess.PIPE)
    try:
        wait_for(lambda: "user" in json.loads(r.get("canhazgpu:gpu:2") or "{}"))
        assert json.loads(r.get("canhazgpu:gpu:2"))["heartbeat_timeout"] == 900
        time.sleep(1.2)
        short = {"CANHAZGPU_HEARTBEAT_TIMEOUT": "1s", "CANHAZGPU_HEARTBEAT_INTERVAL": "0.5s"}
        rows = json.loads(cli("status", "-j", env=short, check=True).stdout)
        assert rows[1]["status"] == "IN_USE" and rows[2]["status"] == "IN_USE"
        p = cli("reserve", "-G", 2, "--nonblock", env=short)
        assert p.returncode == 1 and "GPU 2 is reserved by" in p.stderr
        assert history(pool) == []
    finally:
        live.terminate()
        live.wait(10)
    # A run made under a 1-second timeout does expire by it, whatever the viewer's setting.
    short = {"CANHAZGPU_HEARTBEAT_TIMEOUT": "1s", "CANHAZGPU_HEARTBEAT_INTERVAL": "0.5s"}
    stopped = cli.popen("run", "-G", 3, "--", "sleep", "30", env=short, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: "user" in json.loads(r.get("canhazgpu:gpu:3") or "{}"))
        os.kill(stopped.pid, signal.SIGSTOP)  # no more beats
        time.sleep(1.5)
        assert json.loads(cli("status", "-j", check=True).stdout)[3]["status"] == "AVAILABLE"
    finally:
        os.kill(stopped.pid, signal.SIGKILL)
        stopped.wait(10)


def test_config_files(cli, pool, tmp_path):
    home = tmp_path / "home"
    (home / ".canhazgpu.json").write_text('{"reserve": {"duration": "2h"}}')
    assert "for 2h 0m 0s" in cli("reserve", check=True).stdout
    other = tmp_path / "other.json"
    other.write_text('{"reserve": {"duration": "45m"}}')
    p = cli("reserve", env={"CANHAZGPU_CONFIG": other}, check=True)
    assert "for 0h 45m 0s" in p.stdout
    p = cli("reserve", "--config", other, "--duration", "1h", check=True)
    assert "for 1h 0m 0s" in p.stdout
    (home / ".canhazgpu.json").write_text('{"reserve": {"duration": "forever"}}')
    p = cli("reserve")
    assert_one_error(p, 2, str(home / ".canhazgpu.json"), "reserve.duration")


def test_bad_environment_value(cli, pool):
    p = cli("status", env={"CANHAZGPU_REDIS_PORT": "abc", "CANHAZGPU_REDIS_URL": None})
    assert_one_error(p, 2, "CANHAZGPU_REDIS_PORT")
    p = cli("reserve", env={"CANHAZGPU_HEARTBEAT_TIMEOUT": "15"})
    assert_one_error(p, 2, "CANHAZGPU_HEARTBEAT_TIMEOUT")


# --------------------------------------------------------------------------- Redis failures


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["reserve", "--nonblock"],
        ["release"],
        ["report"],
        ["queue"],
        ["admin", "--gpus", "2"],
        ["release", "-G", "1"],
        ["status", "--json"],
    ],
)
def test_redis_unreachable_is_one_line_and_fast(cli, args):
    port = free_port()
    url = f"redis://:s3cr3t-pw@127.0.0.1:{port}/0"
    start = time.monotonic()
    p = cli(*args, env={"CANHAZGPU_REDIS_URL": url})
    assert time.monotonic() - start < 5
    assert_one_error(p, 1, f"127.0.0.1:{port}", "Hint: ")
    assert "s3cr3t" not in p.stderr


def test_a_password_is_never_printed(cli):
    for url in (
        "http://alice:s3cr3t-pw@127.0.0.1:1/0",
        "redis://:s3cr3t-pw@127.0.0.1:1/0",
        "unix:///nonexistent/redis.sock?password=s3cr3t-pw",
    ):
        p = cli("status", "--redis-url", url)
        assert p.returncode in (1, 2) and p.stderr.startswith("Error: ")
        assert "s3cr3t" not in p.stderr + p.stdout


def test_redis_that_needs_a_password(cli, redis_server, r):
    init_pool(r, 2)
    r.config_set("requirepass", "hunter2")
    try:
        p = cli("status")
        wrong = cli(
            "status", env={"CANHAZGPU_REDIS_URL": f"redis://:nope@127.0.0.1:{redis_server.port}/0"}
        )
        right = cli(
            "report",
            "-j",
            env={"CANHAZGPU_REDIS_URL": f"redis://:hunter2@127.0.0.1:{redis_server.port}/0"},
        )
    finally:
        r.config_set("requirepass", "")
    assert_one_error(p, 1, "needs a password", "redis://:PASSWORD@")
    assert_one_error(wrong, 1, "refused the password", ":***@")
    assert "nope" not in wrong.stderr
    assert right.returncode == 0, right.stderr


def test_redis_unreachable_by_host_and_port(cli):
    port = free_port()
    env = {"CANHAZGPU_REDIS_URL": None, "CANHAZGPU_REDIS_PORT": port}
    assert_one_error(cli("status", env=env), 1, f"localhost:{port}")


# --------------------------------------------------------------------------- usage errors

BAD_INPUTS = [
    ["reserve", "--gpus", "0"],
    ["reserve", "--gpus", "-1"],
    ["reserve", "--gpus", "two"],
    ["reserve", "--gpus", "9"],
    ["reserve", "--gpus", "1.5"],
    ["reserve", "--gpu-ids", "1,1"],
    ["reserve", "--gpu-ids", "-1"],
    ["reserve", "--gpu-ids", "8"],
    ["reserve", "--gpu-ids", "1,,2"],
    ["reserve", "--gpu-ids", ""],
    ["reserve", "--gpus", "3", "--gpu-ids", "1,2"],
    ["reserve", "--duration", "0"],
    ["reserve", "--duration", "0s"],
    ["reserve", "--duration", "-1h"],
    ["reserve", "--duration", "5"],
    ["reserve", "--duration", ""],
    ["reserve", "--duration", "1y"],
    ["reserve", "--duration", "106752d"],
    ["reserve", "--duration", "9" * 400 + "d"],
    ["reserve", "--wait", "1m", "--nonblock"],
    ["reserve", "--wait", "0s"],
    ["reserve", "extra"],
    ["reserve", "--", "true"],
    ["reserve", "--bogus"],
    ["release", "--gpu-ids", "x"],
    ["release", "--gpu-ids", "2,2"],
    ["release", "now"],
    ["status", "extra"],
    ["status", "--json", "--", "x"],
    ["report", "--days", "0"],
    ["report", "--days", "91"],
    ["report", "--days", "1.5"],
    ["queue", "--json", "x"],
    ["admin"],
    ["admin", "--gpus", "0"],
    ["admin", "--gpus", "4", "--provider", "intel"],
    ["admin", "--gpus", "4", "--force", "yes"],
    ["--redis-port", "0", "status"],
    ["--redis-port", "abc", "status"],
    ["status", "--redis-port", "65536"],
    ["--redis-db", "-1", "status"],
    ["--memory-threshold", "-5", "status"],
    ["--memory-threshold", "lots", "reserve"],
    ["--redis-url", "", "status"],
    ["--config", "/nonexistent/canhazgpu.toml", "status"],
    ["frobnicate"],
    ["--frobnicate"],
    ["web", "--port", "0"],
    ["web", "--port", "x"],
    ["run", "--gpus", "0", "--", "true"],
    ["run", "--timeout", "0", "--", "true"],
    ["run", "--signal", "NOPE", "--", "true"],
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=" ".join)
def test_bad_input_is_one_line_and_exit_2(cli, pool, args):
    before = dump(pool)
    p = cli(*args)
    assert_one_error(p, 2)
    assert dump(pool) == before


# --------------------------------------------------------------------------- help, version


def test_no_command_prints_help(cli, r):
    p = cli(check=True)
    assert p.stdout.startswith("usage: canhazgpu")
    for command in ("admin", "status", "run", "reserve", "release", "report", "queue", "web"):
        assert command in p.stdout
    assert r.keys("*") == []


def test_version(cli):
    p = cli("--version", check=True)
    assert re.fullmatch(r"canhazgpu \d+\.\d+\.\d+\S*\n", p.stdout)


@pytest.mark.parametrize(
    "command", ["admin", "status", "run", "reserve", "release", "report", "queue", "web"]
)
def test_command_help(cli, command):
    p = cli(command, "--help", check=True)
    assert p.stdout.startswith(f"usage: canhazgpu {command}")
    assert "examples:" in p.stdout and "--redis-url" in p.stdout


def test_global_options_before_or_after_the_command(cli, redis_server, pool):
    dead = {"CANHAZGPU_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    a = cli("--redis-url", redis_server.url, "report", "--json", env=dead, check=True)
    b = cli("report", "--json", "--redis-url", redis_server.url, env=dead, check=True)
    assert json.loads(a.stdout)["days"] == json.loads(b.stdout)["days"] == 30
