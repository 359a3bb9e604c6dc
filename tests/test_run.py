"""`canhazgpu run`: reservation, supervision, signals, timeouts, clean-up, heartbeat.

Black-box: the real CLI as a subprocess against the test Redis.  The terminal
scenarios (Ctrl-C, Ctrl-Z, hang-up, interactive reads) are in test_run_pty.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_no_traceback
from poolstate import gpu, wait_for

PROBE = [sys.executable, str(Path(__file__).resolve().parent / "sigprobe.py")]
FORWARDED = ["HUP", "INT", "QUIT", "TERM", "USR1", "USR2", "ALRM", "WINCH"]


# --------------------------------------------------------------------------- helpers


def held_by_run(r):
    """GPUs held by a run reservation, and queue entries: both must be gone after a run."""
    held = [i for i in range(4) if gpu(r, i).get("user") and gpu(r, i).get("type") == "run"]
    return held, r.zcard("canhazgpu:queue")


def pid_alive(pid):
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class Running:
    """`canhazgpu run ARGS` in the background, in a session of its own (so without a
    terminal: it never stops itself), stdout and stderr collected line by line."""

    started = []  # killed, with their descendants, when a test fails before they end

    def __init__(self, cli, *args, env=None, argv=None):
        self.proc = subprocess.Popen(
            argv or cli.argv("run", *args),
            env=cli.make_env(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.started.append(self)
        self.lines = {"out": [], "err": []}
        self.readers = [
            threading.Thread(target=self._read, args=(stream, key), daemon=True)
            for stream, key in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, key):
        for line in stream:
            self.lines[key].append(line.rstrip("\n"))

    def text(self, key):
        return "\n".join(self.lines[key])

    def expect(self, key, pattern, timeout=20.0):
        """The first line of stdout ("out") or stderr ("err") matching `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines[key]):
                m = regex.search(line)
                if m:
                    return m
            if time.monotonic() > deadline or (
                self.proc.poll() is not None and not any(r.is_alive() for r in self.readers)
            ):
                pytest.fail(
                    f"no line matching {pattern!r} on std{key}\nstdout:\n{self.text('out')}"
                    f"\nstderr:\n{self.text('err')}",
                    pytrace=False,
                )
            time.sleep(0.02)

    def ready(self):
        """The probe's pids, once it runs."""
        m = self.expect("out", r"READY pid=(\d+) pgid=(\d+) ppid=(\d+) tty=-1")
        return int(m.group(1))

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout=30):
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"run did not end\nstderr:\n{self.text('err')}", pytrace=False)
        for reader in self.readers:
            reader.join(5)
        assert_no_traceback(self.text("err"), "stderr of run")
        return code


@pytest.fixture(autouse=True)
def no_run_left():
    yield
    import psutil

    while Running.started:
        run = Running.started.pop()
        if run.proc.poll() is None:
            for proc in [*psutil.Process(run.pid).children(recursive=True), run.proc]:
                proc.kill()
            run.proc.wait()


@pytest.fixture
def pool(cli, r):
    """A 4-GPU fake pool and a fast heartbeat.  Afterwards no run holds a GPU and
    the queue is empty: every scenario ends with its reservation released."""
    cli.env["CANHAZGPU_HEARTBEAT_INTERVAL"] = "0.2s"
    cli("admin", "--gpus", "4", "--provider", "fake", check=True)
    yield
    assert held_by_run(r) == ([], 0)


# --------------------------------------------------------------------------- basics


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_status_passes_through(cli, pool, code):
    p = cli("run", "--", "sh", "-c", f"exit {code}")
    assert p.returncode == code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGSEGV, signal.SIGKILL])
def test_death_by_a_signal_is_reported_as_such(cli, pool, tmp_path, sig):
    p = cli.popen("run", "--", "sh", "-c", f"kill -{sig.name[3:]} $$", cwd=tmp_path)
    assert p.wait(30) == -sig
    assert not list(tmp_path.glob("core*"))  # core dumps off for run itself


def test_stdout_belongs_to_the_command(cli, pool):
    p = cli("run", "--", "echo", "hello", check=True)
    assert p.stdout == "hello\n"
    assert "Reserved 1 GPU(s): [0] for command execution" in p.stderr


@pytest.mark.parametrize("args", [[], ["--gpus", "1"], ["--"], ["echo", "hi"]])
def test_a_command_is_required(cli, pool, r, args):
    p = cli("run", *args)
    assert p.returncode == 2
    assert "after `--`" in p.stderr
    assert "canhazgpu run --gpus 1 -- python train.py" in p.stderr  # an example
    assert r.zcard("canhazgpu:usage_history_sorted") == 0


def test_own_failures_exit_125(cli, pool, r):
    cli("reserve", "--gpus", "4", check=True)
    p = cli("run", "--nonblock", "--", "true")
    assert p.returncode == 125
    assert "not enough GPUs" in p.stderr
    cli("release", check=True)


# --------------------------------------------------------------------------- 126 / 127


@pytest.fixture
def files(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("echo hi\n")
    script = tmp_path / "noshebang"
    script.write_text("\x7fELF-not-really\n")
    script.chmod(0o755)
    return {"plain": plain, "dir": tmp_path, "noshebang": script}


@pytest.mark.parametrize(
    "name, code",
    [
        ("no-such-command-xyz", 127),
        ("/no/such/path", 127),
        ("plain", 126),
        ("dir", 126),
    ],
)
def test_command_checked_before_reserving(cli, pool, r, files, name, code):
    command = str(files.get(name, name))
    p = cli("run", "--", command)
    assert p.returncode == code
    assert f"{command}: " in p.stderr
    assert "Reserved" not in p.stderr
    assert r.zcard("canhazgpu:usage_history_sorted") == 0  # nothing was ever reserved


def test_a_script_without_shebang_runs_with_sh_as_execvp_does(cli, pool, r, files):
    """It failed only after reserving (exit 126 after "Reserved 1 GPU(s)")."""
    script = files["dir"] / "plain-script"
    script.write_text('echo "sh ran me with $1 on $CUDA_VISIBLE_DEVICES"\nexit 3\n')
    script.chmod(0o755)
    p = cli("run", "--", str(script), "arg")
    assert p.returncode == 3 and p.stdout == "sh ran me with arg on 0\n"
    assert r.zcard("canhazgpu:usage_history_sorted") == 1  # reserved, then released
    # What /bin/sh cannot run either fails as sh says, and the GPU is released.
    p = cli("run", "--", str(files["noshebang"]))
    assert p.returncode == 127 and "not found" in p.stderr
    assert r.zcard("canhazgpu:usage_history_sorted") == 2


# --------------------------------------------------------------------------- environment


def test_environment(cli, pool):
    show = "import os; print([os.environ.get(k) for k in {}])".format(
        ["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CANHAZGPU_GPU_IDS", "ROCR_VISIBLE_DEVICES"]
    )
    env = {"CUDA_VISIBLE_DEVICES": "7", "KEEP_ME": "yes"}
    p = cli("run", "-G", "3,1", "--", sys.executable, "-c", show, env=env, check=True)
    assert p.stdout.strip() == "['1,3', 'PCI_BUS_ID', '1,3', None]"
    p = cli(
        "run",
        "--",
        "sh",
        "-c",
        "echo $CUDA_DEVICE_ORDER $KEEP_ME",
        check=True,
        env=dict(env, CUDA_DEVICE_ORDER="FASTEST_FIRST"),
    )
    assert p.stdout == "FASTEST_FIRST yes\n"


def test_environment_on_amd(cli, r, fake_amd_smi):
    fake_amd_smi.set(gpus=4)
    cli("admin", "--gpus", "4", "--provider", "amd", check=True)
    show = 'echo "$CUDA_VISIBLE_DEVICES $ROCR_VISIBLE_DEVICES $HIP_VISIBLE_DEVICES"'
    p = cli("run", "-G", "1,3", "--", "sh", "-c", show, check=True)
    # ROCm applies ROCR first; HIP (and HIP's reading of CUDA_VISIBLE_DEVICES) count
    # within what it left visible, so the reserved ids there would hide GPU 3.
    assert p.stdout == "0,1 1,3 0,1\n"


def signal_masks(status):
    """{'SigBlk': mask, 'SigIgn': mask} of the standard signals (1-31) in a
    /proc/PID/status text.  32 and 33 are glibc's own and beyond anyone's reach."""
    masks = re.findall(r"^(SigBlk|SigIgn):\s+([0-9a-f]+)$", status, re.M)
    return {name: int(value, 16) & 0x7FFFFFFF for name, value in masks}


def test_command_gets_a_clean_signal_state(cli, pool):
    p = cli("run", "--", "grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status", check=True)
    assert signal_masks(p.stdout) == {"SigBlk": 0, "SigIgn": 0}  # SIGPIPE: Python's SIG_IGN undone


def test_inherited_state_nohup_kept_hostile_undone(cli, pool):
    """The caller ignores HUP (nohup), INT and CHLD, and blocks USR1 and CHLD: the
    command keeps the ignored HUP only, and run still learns its status."""
    wrapper = (
        "import os, signal, sys; "
        "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGCHLD]); "
        "[signal.signal(s, signal.SIG_IGN) for s in "
        "(signal.SIGHUP, signal.SIGINT, signal.SIGCHLD)]; "
        "os.execv(sys.executable, sys.argv[1:])"
    )
    command = "grep -E '^Sig(Blk|Ign)' /proc/self/status; exit 3"
    argv = [sys.executable, "-c", wrapper, *cli.argv("run", "--", "sh", "-c", command)]
    p = subprocess.run(argv, env=cli.env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 3, p.stderr
    assert signal_masks(p.stdout) == {"SigBlk": 0, "SigIgn": 1 << (signal.SIGHUP - 1)}


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("name", FORWARDED)
def test_a_signal_to_run_reaches_the_command_once(cli, pool, name):
    run = Running(cli, "--", *PROBE)
    run.ready()
    os.kill(run.pid, getattr(signal, "SIG" + name))
    run.expect("out", f"GOT SIG{name} 1")
    run.send("exit 0")
    assert run.wait() == 0
    assert run.expect("out", "COUNTS").string == f"COUNTS SIG{name}=1"


def test_a_signal_to_the_job_reaches_the_command_once(cli, pool):
    """`kill %1` signals run's process group: the command, in a group of its own,
    gets it once, from run."""
    run = Running(cli, "--", *PROBE)
    run.ready()
    os.killpg(run.pid, signal.SIGINT)
    run.expect("out", "GOT SIGINT 1")
    run.send("exit 4")
    assert run.wait() == 4
    assert run.expect("out", "COUNTS").string == "COUNTS SIGINT=1"


def test_sigtstp_and_sigcont_are_forwarded(cli, pool, r):
    """Without a terminal run does not stop itself: it keeps heartbeating while the
    command is stopped."""
    run = Running(cli, "--", *PROBE)
    probe = run.ready()
    os.kill(run.pid, signal.SIGTSTP)
    wait_for(lambda: proc_state(probe) == "T", what="the command to stop")
    assert proc_state(run.pid) != "T"
    beat = gpu(r, 0)["last_heartbeat"]
    wait_for(lambda: gpu(r, 0)["last_heartbeat"] > beat, what="a heartbeat")
    os.kill(run.pid, signal.SIGCONT)
    run.expect("out", "GOT SIGCONT 1")
    run.send("exit 0")
    assert run.wait() == 0


def test_run_survives_a_hangup_and_keeps_heartbeating(cli, pool, r):
    run = Running(cli, "--", *PROBE)
    run.ready()
    os.kill(run.pid, signal.SIGHUP)
    run.expect("out", "GOT SIGHUP 1")
    beat = gpu(r, 0)["last_heartbeat"]
    wait_for(lambda: gpu(r, 0)["last_heartbeat"] > beat, what="a heartbeat after SIGHUP")
    run.send("exit 0")
    assert run.wait() == 0


def test_sigkill_of_run_ends_the_command(cli, pool, r):
    """The parent-death signal: SIGTERM.  The reservation can only expire."""
    run = Running(cli, "--", *PROBE, "--exit-on", "TERM")
    run.ready()
    os.kill(run.pid, signal.SIGKILL)
    run.expect("out", "GOT SIGTERM 1")
    assert run.wait() == -signal.SIGKILL
    assert gpu(r, 0)["type"] == "run"
    cli("release", "-G", "0", check=True)


def test_a_signal_while_queued_cancels(cli, pool, r, tmp_path):
    cli("reserve", "--gpus", "4", check=True)
    marker = tmp_path / "ran"
    run = Running(cli, "--", "touch", str(marker))
    wait_for(lambda: r.zcard("canhazgpu:queue") == 1, what="the queue entry")
    os.kill(run.pid, signal.SIGUSR1)  # nothing to forward it to: neither fatal nor kept
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait() == -signal.SIGTERM
    assert r.zcard("canhazgpu:queue") == 0
    assert not marker.exists()
    cli("release", check=True)


def test_other_signals_while_queued_are_dropped(cli, pool, r):
    cli("reserve", "--gpus", "4", check=True)
    run = Running(cli, "--", *PROBE)
    wait_for(lambda: r.zcard("canhazgpu:queue") == 1, what="the queue entry")
    os.kill(run.pid, signal.SIGUSR1)
    os.kill(run.pid, signal.SIGWINCH)
    cli("release", check=True)
    run.ready()
    run.send("exit 0")
    assert run.wait() == 0
    assert run.expect("out", "COUNTS").string == "COUNTS "


# --------------------------------------------------------------------------- timeout


def test_timeout_signals_the_whole_group_and_returns_at_once(cli, pool):
    grandchild = (
        "import signal, subprocess; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "p = subprocess.Popen(['sleep', '1000']); print(p.pid, flush=True); p.wait()"
    )
    started = time.monotonic()
    run = Running(cli, "--timeout", "0.5s", "--kill-after", "120s", "--", sys.executable, "-c",
                  grandchild)  # fmt: skip
    sleeper = int(run.expect("out", r"^\d+$").group(0))
    assert run.wait() == 124
    assert time.monotonic() - started < 60  # the group was gone: no wait for the grace
    assert not pid_alive(sleeper)
    assert "timeout" in run.text("err") and "SIGINT" in run.text("err")
    assert "SIGKILL" not in run.text("err")


def test_timeout_kills_a_command_that_ignores_the_signal(cli, pool):
    run = Running(cli, "-t", "0.5s", "--kill-after", "0.5s", "--", *PROBE)
    run.ready()
    assert run.wait() == 124
    assert "GOT SIGINT 1" in run.text("out")
    assert "sending SIGKILL" in run.text("err")


def test_timeout_signal_option(cli, pool):
    run = Running(cli, "-t", "0.5s", "--signal", "TERM", "--", *PROBE, "--exit-on", "TERM")
    assert run.wait() == 124
    assert "GOT SIGTERM 1" in run.text("out")
    assert "SIGKILL" not in run.text("err")


def test_timeout_settings_from_the_config_file(cli, pool, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"run": {"timeout": "0.5s", "signal": "USR1"}}))
    run = Running(cli, "--", *PROBE, "--exit-on", "USR1", env={"CANHAZGPU_CONFIG": config})
    assert run.wait() == 124
    assert "GOT SIGUSR1 1" in run.text("out")


def test_a_command_ending_before_the_timeout_keeps_its_status(cli, pool):
    assert cli("run", "--timeout", "1h", "--", "sh", "-c", "exit 3").returncode == 3


# --------------------------------------------------------------------------- leftovers


def test_leftovers_are_stopped_before_the_release(cli, pool, r, tmp_path):
    pidfile = tmp_path / "pid"
    command = f"(trap '' TERM; exec sleep 1000) & echo $! > {pidfile}"
    run = Running(cli, "--kill-after", "120s", "--", "bash", "-c", command)
    run.expect("err", r"left 1 process\(es\) behind; sending SIGTERM")
    leftover = int(pidfile.read_text())
    assert pid_alive(leftover)
    assert gpu(r, 0)["type"] == "run"  # still reserved while the leftover lives
    os.kill(leftover, signal.SIGKILL)
    assert run.wait() == 0
    assert not pid_alive(leftover)


def test_leftovers_get_sigterm_then_sigkill(cli, pool, tmp_path):
    """bash -c 'sleep 1000 &' leaves a group member; `setsid` one that left the group
    (re-parented to run, its subreaper); one ignores SIGTERM."""
    pids = tmp_path / "pids"
    command = (
        f"sleep 1000 & echo $! >> {pids}; setsid sleep 1000 & echo $! >> {pids}; "
        f"(trap '' TERM; exec sleep 1000) & echo $! >> {pids}; exit 5"
    )
    run = Running(cli, "--kill-after", "0.5s", "--", "bash", "-c", command)
    assert run.wait() == 5
    left = [int(p) for p in pids.read_text().split()]
    assert len(left) == 3
    assert not any(pid_alive(p) for p in left)
    assert "left 3 process(es) behind" in run.text("err")
    assert "sending SIGKILL to 1 process(es)" in run.text("err")


# --------------------------------------------------------------------------- heartbeat


def test_heartbeat_refreshes_the_reservation(cli, pool, r):
    run = Running(cli, "--", *PROBE)
    run.ready()
    first = gpu(r, 0)["last_heartbeat"]
    wait_for(lambda: gpu(r, 0)["last_heartbeat"] > first, what="a heartbeat")
    run.send("exit 0")
    assert run.wait() == 0


def test_redis_restart_during_a_run(cli, pool, redis_server):
    run = Running(cli, "--", *PROBE)
    run.ready()
    client = redis_server.client()
    client.save()  # the private server saves nothing by itself
    client.close()
    redis_server.stop()
    try:
        run.expect("err", "heartbeat failed: cannot reach Redis")
        assert run.proc.poll() is None
    finally:
        redis_server.start()
        (redis_server.workdir / "dump.rdb").unlink()  # loaded; no other test must load it
    run.expect("err", "Redis answers again")
    run.send("exit 7")
    assert run.wait() == 7
    assert run.expect("out", "COUNTS").string == "COUNTS "  # the command was not disturbed
    assert run.text("err").count("heartbeat failed") == 1
    client = redis_server.client()
    assert "user" not in json.loads(client.get("canhazgpu:gpu:0"))
    client.close()


def test_a_quick_redis_restart_between_two_beats_goes_unnoticed(cli, pool, r, redis_server):
    """The next beat reconnects: no outage is reported that is over."""
    run = Running(cli, "--", *PROBE, env={"CANHAZGPU_HEARTBEAT_INTERVAL": "2s"})
    run.ready()
    beat = gpu(r, 0)["last_heartbeat"]
    wait_for(lambda: gpu(r, 0)["last_heartbeat"] > beat, what="a heartbeat")
    r.save()
    try:
        redis_server.restart()  # well within the 2 s until the next beat
    finally:
        (redis_server.workdir / "dump.rdb").unlink()
    client = redis_server.client()
    beat = json.loads(client.get("canhazgpu:gpu:0"))["last_heartbeat"]
    wait_for(lambda: json.loads(client.get("canhazgpu:gpu:0"))["last_heartbeat"] > beat)
    client.close()
    run.send("exit 0")
    assert run.wait() == 0
    assert "heartbeat failed" not in run.text("err")


def test_a_reservation_taken_away_is_reported_once(cli, pool, r):
    run = Running(cli, "--", *PROBE)
    run.ready()
    cli("release", "-G", "0", check=True)
    run.expect("err", r"reservation of GPU\(s\) \[0\] was taken away")
    cli("reserve", "-G", "0", check=True)  # someone's now: run must neither beat nor free it
    manual = r.get("canhazgpu:gpu:0")
    run.send("exit 2")
    assert run.wait() == 2
    assert run.text("err").count("taken away") == 1
    assert r.get("canhazgpu:gpu:0") == manual
    cli("release", check=True)


def stop_until_expired(cli, r, run):
    """SIGSTOP run until its reservation expires (status ends expired reservations)."""
    os.kill(run.pid, signal.SIGSTOP)

    def expired():
        cli("status", check=True)
        return "user" not in gpu(r, 0)

    wait_for(expired, what="the reservation to expire")


def test_after_sigcont_the_lost_gpus_are_reserved_again(cli, pool, r):
    cli.env["CANHAZGPU_HEARTBEAT_TIMEOUT"] = "1s"
    run = Running(cli, "--", *PROBE)
    run.ready()
    token = gpu(r, 0)["reservation_id"]
    stop_until_expired(cli, r, run)
    os.kill(run.pid, signal.SIGCONT)
    run.expect("err", r"GPU\(s\) \[0\] expired while no heartbeat went out; reserved again")
    assert gpu(r, 0)["reservation_id"] == token
    run.expect("out", "GOT SIGCONT 1")
    run.send("exit 0")
    assert run.wait() == 0


def test_after_sigcont_gpus_taken_meanwhile_give_a_loud_warning(cli, pool, r):
    cli.env["CANHAZGPU_HEARTBEAT_TIMEOUT"] = "1s"
    run = Running(cli, "--", *PROBE)
    run.ready()
    stop_until_expired(cli, r, run)
    cli("reserve", "-G", "0", check=True)
    os.kill(run.pid, signal.SIGCONT)
    run.expect("err", r"WARNING: the reservation of GPU\(s\) \[0\] expired")
    run.send("exit 0")
    assert run.wait() == 0  # the command went on
    assert gpu(r, 0)["type"] == "manual"  # and the other reservation is untouched
    cli("release", check=True)


def test_argv_passes_unchanged(cli, pool):
    show = "import sys; print(sys.argv[1:])"
    p = cli("run", "--", sys.executable, "-c", show, "a b", "$X", "--", check=True)
    assert p.stdout == "['a b', '$X', '--']\n"
