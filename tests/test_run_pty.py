"""`canhazgpu run` at a terminal: an interactive bash on a pseudo-terminal, typed at
the way a user types (Ctrl-C, Ctrl-Z, fg, bg, hang-up, interactive reads)."""

import json
import os
import pty
import re
import select
import shlex
import signal
import sys
import time

import pytest
from conftest import PROGRAM
from poolstate import gpu, wait_for
from test_run import PROBE, held_by_run, pid_alive, proc_state

RUN = " ".join(shlex.quote(a) for a in (sys.executable, str(PROGRAM), "run"))
PROBE_CMD = " ".join(shlex.quote(a) for a in PROBE)
PROMPT = "PROMPT> "


class Shell:
    """An interactive bash (job control on, no line editing) on a pseudo-terminal."""

    def __init__(self, env):
        env = dict(env, PS1=PROMPT, TERM="dumb", HISTFILE="/dev/null")
        pid, fd = pty.fork()
        if pid == 0:  # the child: a session of its own, the terminal as its controlling tty
            try:
                os.execvpe("bash", ["bash", "--norc", "--noprofile", "--noediting", "-i"], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.seen, self.pos = b"", 0
        self.started = []  # pids of runs and probes, killed if a test fails before they end
        self.prompt()

    def type(self, text):
        os.write(self.fd, text.encode())

    def line(self, text):
        self.type(text + "\n")

    def expect(self, pattern, timeout=20.0):
        """Wait for `pattern` in the output after what was matched before."""
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.seen, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            ready = select.select([self.fd], [], [], max(0.0, left))[0] if left > 0 else []
            data = b""
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the shell is gone
                    pass
            if not data:
                transcript = self.seen.decode(errors="replace")
                pytest.fail(f"no {pattern!r} on the terminal; it showed:\n{transcript}", False)
            self.seen += data

    def prompt(self):
        self.expect(re.escape(PROMPT))

    def status(self):
        """$? of the last command."""
        self.line("echo RC=$?")
        return int(self.expect(r"RC=(\d+)").group(1))

    def hang_up(self):
        os.close(self.fd)
        self.fd = None

    def close(self):
        if self.fd is not None:
            self.hang_up()
        for pid in self.started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


@pytest.fixture
def shell(cli, r):
    cli.env["CANHAZGPU_HEARTBEAT_INTERVAL"] = "0.2s"
    cli("admin", "--gpus", "4", "--provider", "fake", check=True)
    sh = Shell(cli.env)
    yield sh
    sh.close()
    assert held_by_run(r) == ([], 0)


def ready(sh, foreground=True):
    """The probe's pid and run's, once the probe runs, in the terminal's foreground
    group (or not)."""
    m = sh.expect(r"READY pid=(\d+) pgid=(\d+) ppid=(\d+) tty=(-?\d+)")
    probe, group, run, owner = map(int, m.groups())
    sh.started += [run, probe]
    assert group == probe != run  # a group of its own
    assert (owner == group) == foreground
    return probe, run


def test_ctrl_c_reaches_the_command_once(shell):
    shell.line(f"{RUN} -- {PROBE_CMD}")
    ready(shell)
    shell.type("\x03")
    shell.expect("GOT SIGINT 1")
    shell.line("exit 5")  # read from the terminal: the command has it
    shell.expect(r"COUNTS SIGINT=1\r\n")
    shell.prompt()
    assert shell.status() == 5


def test_ctrl_c_ends_a_command_that_does_not_catch_it(shell):
    shell.line(f"{RUN} -- sh -c 'echo START\"\"ED; exec sleep 60'")
    shell.expect("STARTED")  # not in the echo of the command line
    shell.type("\x03")
    shell.prompt()
    assert shell.status() == 130


def test_ctrl_z_then_fg(shell, r):
    shell.line(f"{RUN} -- {PROBE_CMD}")
    probe, run = ready(shell)
    shell.type("\x1a")
    shell.expect(r"Stopped")
    shell.prompt()
    assert proc_state(probe) == "T" and proc_state(run) == "T"
    assert gpu(r, 0)["type"] == "run"  # still held
    shell.line("fg")
    shell.expect("GOT SIGCONT 1")
    shell.line("exit 7")
    shell.expect(r"COUNTS SIGCONT=1\r\n")
    assert shell.status() == 7


def test_ctrl_z_bg_then_fg(shell):
    """In the background the command stops when it reads the terminal, and run stops
    with it, so that the shell reports the job stopped; `fg` brings both back."""
    shell.line("set -b")  # report job state changes at once
    shell.prompt()
    shell.line(f"{RUN} -- {PROBE_CMD}")
    probe, run = ready(shell)
    shell.type("\x1a")
    shell.expect("Stopped")
    shell.prompt()
    shell.line("bg")
    shell.expect(r"\[1\]\+ [^\r\n]*&\r\n")  # bash has continued the job: both ran again
    shell.expect("Stopped")  # set -b: the job stopped again (SIGTTIN) and bash said so
    wait_for(
        lambda: proc_state(run) == "T" and proc_state(probe) == "T",
        what="run and the command to stop again (SIGTTIN)",
    )
    shell.line("fg")
    shell.line("exit 6")
    shell.expect(r"COUNTS SIGCONT=\d\r\n")
    assert shell.status() == 6


def test_interactive_read(shell):
    shell.line(f'{RUN} -- {sys.executable} -c \'print("hello", input("NAME? ".lower()))\'')
    shell.expect(r"name\? ")  # not in the echo of the command line
    shell.line("bob")
    shell.expect(r"hello bob\r\n")
    assert shell.status() == 0


def test_interactive_read_from_a_script(shell):
    """run in a script does not lead its process group, so it does not hand the
    terminal over at the start (Decisions: Scripts); the command gets it when it
    reads, and the script has it back afterwards."""
    script = f"{RUN} -- {PROBE_CMD}; read -r x; echo SCRIPT GOT $x"
    shell.line(f"bash -c {shlex.quote(script)}")
    ready(shell, foreground=False)
    shell.line("exit 3")
    shell.expect(r"COUNTS SIGCONT=1\r\n")  # stopped by SIGTTIN, continued with the terminal
    shell.line("more")
    shell.expect(r"SCRIPT GOT more\r\n")
    assert shell.status() == 0


def test_hang_up(shell, r, tmp_path):
    """The terminal goes away: run forwards SIGHUP, survives, keeps heartbeating, and
    releases when the command (which ignores the hang-up) ends."""
    log = tmp_path / "probe.log"
    shell.line(f"PROBE_LOG={log} {RUN} -- {PROBE_CMD} --exit-on USR2")
    probe, run = ready(shell)
    wait_for(lambda: log.exists(), what="the probe's log")  # written after the terminal
    shell.hang_up()
    wait_for(lambda: "GOT SIGHUP" in log.read_text(), what="SIGHUP at the command")
    beat = gpu(r, 0)["last_heartbeat"]
    wait_for(lambda: gpu(r, 0)["last_heartbeat"] > beat, what="a heartbeat after the hang-up")
    assert pid_alive(run)
    os.kill(probe, signal.SIGUSR2)
    wait_for(lambda: "user" not in gpu(r, 0), what="the release")
    wait_for(lambda: not pid_alive(run), what="run to exit")
    assert json.loads(r.get("canhazgpu:gpu:0"))["last_released"]
