"""Shared test harness: a private redis-server, the canhazgpu CLI as a subprocess, and
stand-ins for `nvidia-smi` / `amd-smi` (tests/bin) that a test configures per test.

Fixtures:
  redis_server  (session)  private redis-server on a free loopback port (never 6379)
  r             (function) that server's client, database flushed (server restarted if a
                           previous test left it stopped or frozen)
  fake_smi      (function) configures the nvidia-smi stand-in: fake_smi.set(...)
  fake_amd_smi  (function) configures the amd-smi stand-in: fake_amd_smi.set(...)
  cli           (function) cli(*args, env=None, input=None, timeout=30, check=None)
  no_traceback  (function) the assert_no_traceback helper, as a fixture
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROGRAM = REPO / "canhazgpu.py"
STANDIN_DIR = REPO / "tests" / "bin"

# Variables a developer's or CI machine may have set that would change what a test sees.
SCRUBBED_VARS = (
    "NO_COLOR",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
)
SCRUBBED_PREFIXES = ("CANHAZGPU_", "FAKE_NVIDIA_SMI_", "FAKE_AMD_SMI_")


def assert_no_traceback(text, what="stderr"):
    """Fail if `text` (a command's stderr, usually) holds a Python traceback."""
    if text and "Traceback (most recent call last)" in text:
        pytest.fail(f"unexpected traceback in {what}:\n{text}", pytrace=False)


def free_port():
    """A free TCP port on 127.0.0.1 that is not Redis's default port."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379:
            return port


# --------------------------------------------------------------------------- redis


class RedisServer:
    """A private redis-server. `stop()`/`start()` keep the port (for outage tests);
    `freeze()`/`thaw()` SIGSTOP/SIGCONT it (a server that accepts but never answers)."""

    def __init__(self, workdir, extra=()):
        self.workdir = Path(workdir)
        self.extra = list(extra)  # more redis-server options; later ones win
        self.port = free_port()
        self.socket_path = str(self.workdir / "redis.sock")
        self.logfile = self.workdir / "redis.log"
        self.proc = None
        self.frozen = False

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self):
        return f"unix://{self.socket_path}?db=0"

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs):
        """A client of this server: decoded strings, and no silent retries (redis-py >= 6
        retries a failed command 3 times with back-off by default: seconds per call)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("socket_timeout", 10)
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, **kwargs)

    def start(self, timeout=10.0):
        if self.running:
            self.thaw()
            return
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (run `make deps`)", pytrace=False)
        cmd = [
            exe,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.logfile),
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout):
        import redis

        deadline = time.monotonic() + timeout
        client = self.client(socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        finally:
            client.close()
        status = f"exited with {self.proc.returncode}" if not self.running else "no PING reply"
        self.stop()
        log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
        pytest.fail(
            f"redis-server on port {self.port} did not come up within {timeout}s "
            f"({status}). Log tail:\n{log}",
            pytrace=False,
        )

    def stop(self):
        if self.proc is None:
            return
        self.thaw()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        self.start()

    def freeze(self):
        if self.running and not self.frozen:
            self.proc.send_signal(signal.SIGSTOP)
            self.frozen = True

    def thaw(self):
        if self.running and self.frozen:
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False


@pytest.fixture(scope="session")
def redis_server():
    # A short path under /tmp: unix socket paths are limited to ~107 bytes.
    workdir = tempfile.mkdtemp(prefix="chg-redis-")
    server = RedisServer(workdir)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def r(redis_server):
    """A client of the test server, with an empty database."""
    redis_server.start()  # no-op unless an earlier test left it stopped or frozen
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


# --------------------------------------------------------------------------- stand-ins


class FakeTool:
    """One GPU tool stand-in (tests/bin/<name>) for the current test.

    The stand-in is reached through a per-test bin directory at the front of PATH;
    `install()`/`uninstall()` add or remove it there (a real tool later on PATH is not
    hidden). Its state file starts absent, which means the stand-in's defaults.
    """

    def __init__(self, name, env_prefix, bindir, statedir, installed):
        self.name = name
        self.bindir = bindir
        self.state_path = statedir / (f"{name}.json")
        self.log_path = statedir / (f"{name}.log")
        self.env = {
            env_prefix + "STATE": str(self.state_path),
            env_prefix + "LOG": str(self.log_path),
        }
        if installed:
            self.install()

    @property
    def path(self):
        return self.bindir / self.name

    def install(self):
        if not self.path.exists():
            self.path.symlink_to(STANDIN_DIR / self.name)

    def uninstall(self):
        if self.path.is_symlink() or self.path.exists():
            self.path.unlink()

    def write(self, state):
        """Write the raw state (atomically: a running command may be reading it)."""
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(str(tmp), str(self.state_path))
        self.install()

    def reset(self):
        if self.state_path.exists():
            self.state_path.unlink()

    def calls(self):
        """The argv (without the program name) of each run of the stand-in so far."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]

    def clear_calls(self):
        if self.log_path.exists():
            self.log_path.unlink()


class FakeNvidiaSmi(FakeTool):
    @staticmethod
    def uuid(index):
        """The UUID the stand-in gives GPU `index` when the state does not name one."""
        return f"GPU-5e3b7c2a-1f2d-4c7e-9a8b-0c1d2e3f{index:04x}"

    def set(self, gpus=8, processes=(), mode="ok", modes=None, delay=0.0):
        """Configure nvidia-smi (and make sure it is installed).

        gpus: a count of idle H100s, or a list of dicts with any of index, uuid, name,
              memory_used, memory_total (strings, MiB: "8452", "[N/A]", ...; missing
              keys get defaults; index defaults to the position).
        processes: dicts with pid, name, used_memory (string, MiB) and gpu_uuid or
              gpu (an index).
        mode: "ok", "driver-failure" (exit 9), "hang", "no-devices" (exit 6), "garbage".
        modes: per-query override, keys "query-gpu", "query-compute-apps", "list".
        delay: seconds to sleep before answering.
        """
        self.write(
            {
                "gpus": gpus,
                "processes": list(processes),
                "mode": mode,
                "modes": modes or {},
                "delay": delay,
            }
        )


class FakeAmdSmi(FakeTool):
    @staticmethod
    def uuid(index):
        return f"c4ff74a1-0000-1000-80d3-7e2f5a9b{index:04x}"

    def set(self, gpus=8, processes=(), mode="ok", shape="rocm6", delay=0.0, exit_code=255):
        """Configure amd-smi (and make sure it is installed).

        gpus: a count of idle MI300X, or dicts with any of index, uuid, bdf, name,
              memory_used, memory_total (numbers in MB, or a string such as "N/A").
        processes: dicts with pid, name, gpu (an index), vram_bytes.
        mode: "ok", "failure" (exit `exit_code`), "hang", "garbage".
        shape: "rocm6" (top-level JSON array) or "rocm7" ({"gpu_data": [...]}).
        """
        self.write(
            {
                "gpus": gpus,
                "processes": list(processes),
                "mode": mode,
                "shape": shape,
                "delay": delay,
                "exit_code": exit_code,
            }
        )


@pytest.fixture
def _standin_dirs(tmp_path):
    bindir = tmp_path / "bin"
    statedir = tmp_path / "standins"
    bindir.mkdir()
    statedir.mkdir()
    return bindir, statedir


@pytest.fixture
def fake_smi(_standin_dirs):
    """The nvidia-smi stand-in: installed by default, 8 idle H100s until `set()`."""
    return FakeNvidiaSmi("nvidia-smi", "FAKE_NVIDIA_SMI_", *_standin_dirs, installed=True)


@pytest.fixture
def fake_amd_smi(_standin_dirs):
    """The amd-smi stand-in: NOT installed by default (so provider detection sees NVIDIA
    only); `set()` or `install()` puts it on PATH."""
    return FakeAmdSmi("amd-smi", "FAKE_AMD_SMI_", *_standin_dirs, installed=False)


# --------------------------------------------------------------------------- cli


class Cli:
    """Runs `python canhazgpu.py ARGS...` against the test Redis and the stand-ins."""

    program = str(PROGRAM)

    def __init__(self, env):
        self.env = env

    def argv(self, *args):
        return [sys.executable, self.program, *[str(a) for a in args]]

    def make_env(self, env=None):
        """The base environment merged with `env`; a value of None removes the variable."""
        merged = dict(self.env)
        for key, value in (env or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = str(value)
        return merged

    def __call__(self, *args, env=None, input=None, timeout=30, check=None, allow_traceback=False):
        """Run the CLI; returns the CompletedProcess (text, stdout/stderr captured).

        check: None/False (no check), True (exit 0) or an int (that exit status).
        A traceback on stderr fails the test unless allow_traceback or `--debug`.
        """
        argv = self.argv(*args)
        shown = "canhazgpu " + " ".join(argv[2:])
        try:
            proc = subprocess.run(
                argv,
                env=self.make_env(env),
                input=input,
                timeout=timeout,
                capture_output=True,
                text=True,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"{shown}: timed out after {timeout}s\n"
                f"stdout: {_text(e.stdout)}\nstderr: {_text(e.stderr)}",
                pytrace=False,
            )
        if not allow_traceback and "--debug" not in args:
            assert_no_traceback(proc.stderr, f"stderr of {shown}")
        if check is not None and check is not False:
            expected = 0 if check is True else check
            if proc.returncode != expected:
                pytest.fail(
                    f"{shown}: exit {proc.returncode}, expected {expected}"
                    f"\nstdout: {proc.stdout}\nstderr: {proc.stderr}",
                    pytrace=False,
                )
        return proc

    def popen(self, *args, env=None, **kwargs):
        """Start the CLI in the background (subprocess.Popen keyword arguments)."""
        return subprocess.Popen(self.argv(*args), env=self.make_env(env), **kwargs)


def _text(data):
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def base_env(redis_url, home, bindir, extra=()):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SCRUBBED_VARS and not k.startswith(SCRUBBED_PREFIXES)
    }
    env["CANHAZGPU_REDIS_URL"] = redis_url
    env["HOME"] = str(home)
    env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", os.defpath)])
    for more in extra:
        env.update(more)
    return env


@pytest.fixture
def cli(redis_server, r, tmp_path, fake_smi, fake_amd_smi):
    """cli(*args, env=None, input=None, timeout=30, check=None) -> CompletedProcess.

    `cli.env` is the base environment (for Popen); `cli.popen(*args)` and
    `cli.argv(*args)` help with background runs. The database is empty at the start.
    """
    home = tmp_path / "home"
    home.mkdir()
    return Cli(base_env(redis_server.url, home, fake_smi.bindir, (fake_smi.env, fake_amd_smi.env)))


@pytest.fixture
def no_traceback():
    return assert_no_traceback
