"""Start-up: what `canhazgpu status` and `canhazgpu run -- true` add over the unavoidable
floor (a Python that imports redis-py and makes one Redis round trip), what the installed
program (a launcher importing the module and its cached bytecode) saves over the copied
single file, and the memory `run` keeps while it supervises a command.

All commands are timed interleaved, round after round, against one private
redis-server and a fake pool of 8 GPUs, so machine noise hits each alike.

    python3 bench/startup.py [--rounds 11]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchredis import PROGRAM, REPO, figure, print_table, private_redis

FLOOR = (
    "import os, redis; "
    "redis.Redis.from_url(os.environ['CANHAZGPU_REDIS_URL']).get('canhazgpu:gpu_count')"
)


def timed(argv):
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def installed_program(workdir):
    """`make install` into a scratch prefix, run by this Python: the launcher's path."""
    prefix = Path(workdir) / "prefix"
    subprocess.run(
        ["make", "-s", "--no-print-directory", "install", f"PREFIX={prefix}",
         f"INSTALL_PYTHON={sys.executable}"],
        cwd=REPO, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return str(prefix / "bin" / "canhazgpu")


def rss_kib(argv, wait_for_child):
    """Resident memory of a process once it has settled (for `run`: once its command runs)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            if not wait_for_child or (children.exists() and children.read_text().strip()):
                break
            time.sleep(0.02)
        time.sleep(0.5)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(
            next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]
        )
    finally:
        proc.kill()
        proc.wait()


def measure(rounds=11):
    py, chg = sys.executable, str(PROGRAM)
    with private_redis(), tempfile.TemporaryDirectory() as workdir:
        subprocess.run([py, chg, "admin", "--gpus", "8", "--provider", "fake"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        launcher = installed_program(workdir)
        commands = {
            "python -c pass": [py, "-c", "pass"],
            "floor": [py, "-c", FLOOR],
            "status": [py, chg, "status", "--no-color"],
            "run -- true": [py, chg, "run", "--nonblock", "--", "true"],
            "version": [py, chg, "--version"],
            "installed version": [launcher, "--version"],
            "installed status": [launcher, "status", "--no-color"],
        }
        times = {name: [] for name in commands}
        for _ in range(rounds):
            for name, argv in commands.items():
                times[name].append(timed(argv))
        m = {name: statistics.median(t) for name, t in times.items()}
        floor_rss = rss_kib([py, "-c", FLOOR + "; import time; time.sleep(30)"], False)
        run_rss = rss_kib([launcher, "run", "--nonblock", "--", "sleep", "30"], True)
        copied_rss = rss_kib([py, chg, "run", "--nonblock", "--", "sleep", "30"], True)
    return [
        figure("status", m["status"], "s", "floor: import redis + GET", m["floor"]),
        figure("run -- true", m["run -- true"], "s", "floor", m["floor"], "<= 1.6x",
               m["run -- true"] / m["floor"] <= 1.6),
        figure("--version", m["version"], "s", "python -c pass", m["python -c pass"]),
        figure("installed --version (launcher, bytecode)", m["installed version"], "s",
               "copied script", m["version"]),
        figure("installed status", m["installed status"], "s", "copied script", m["status"]),
        figure("run's memory while supervising (RSS)", run_rss, "KiB", "floor's", floor_rss,
               "<= 1.15x", run_rss / floor_rss <= 1.15, "installed"),
        figure("  the same, run as the copied script", copied_rss, "KiB", "floor's", floor_rss),
    ]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    print_table(measure(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
