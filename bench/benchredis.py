"""A private redis-server for the benches (loopback, a free port, never 6379), and the
canhazgpu module with a Config, Store and Pool bound to it."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROGRAM = REPO / "canhazgpu.py"
sys.path.insert(0, str(REPO))

import canhazgpu  # noqa: E402


def free_port():
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379:
            return port


@contextlib.contextmanager
def private_redis():
    """Start redis-server; yields its URL, with CANHAZGPU_REDIS_URL and a scratch HOME set
    in os.environ (so CLI subprocesses and in-process Pools use it, and no user config)."""
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed (run `make deps`)")
    workdir = tempfile.mkdtemp(prefix="chg-bench-")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--logfile", os.path.join(workdir, "redis.log")],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    saved = {k: os.environ.get(k) for k in ("CANHAZGPU_REDIS_URL", "HOME")}
    os.environ["CANHAZGPU_REDIS_URL"] = url
    os.environ["HOME"] = workdir
    try:
        client = connect()[0].redis
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit(f"redis-server on port {port} did not start")
                time.sleep(0.02)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(workdir, ignore_errors=True)


def connect():
    """(store, pool) of the pool CANHAZGPU_REDIS_URL points at."""
    config = canhazgpu.Config.load(None)
    store = canhazgpu.Store(config)
    return store, canhazgpu.Pool(store, config)


def init_pool(store, gpus):
    """A fresh pool of `gpus` fake GPUs, ending whatever held the old one."""
    store.script("admin", count=gpus, provider="fake", force=True)


def cli(*args):
    return [sys.executable, str(PROGRAM), *map(str, args)]


def percentile(values, q):
    """Nearest-rank percentile of `values` (q in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def figure(name, value, unit, baseline=None, base_value=None, target=None, met=None, note=""):
    """One measured figure: a median, and the baseline it is compared with in the same run."""
    ratio = value / base_value if base_value else None
    return {"name": name, "value": value, "unit": unit, "baseline": baseline,
            "base_value": base_value, "ratio": ratio, "target": target, "met": met,
            "note": note}  # fmt: skip


def shown(value, unit):
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.1f} s"
    if unit == "s+":
        return f"{value * 1000:+.0f} ms"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.2f} {unit}"


def print_table(figures, out=sys.stdout):
    """The figures as one table: median, baseline, ratio, target, and whether it is met."""
    rows = [["figure", "median", "baseline", "ratio", "target", ""]]
    for f in figures:
        base = f"{f['baseline']} {shown(f['base_value'], f['unit'].rstrip('+'))}" \
            if f["baseline"] and f["base_value"] is not None else (f["baseline"] or "")  # fmt: skip
        ratio = f"{f['ratio']:.3g}x" if f.get("ratio") and f["unit"] != "s+" else ""
        verdict = {True: "met", False: "NOT MET", None: ""}[f["met"]]
        rows.append([f["name"], shown(f["value"], f["unit"]), base, ratio, f["target"] or "",
                     verdict or f["note"]])  # fmt: skip
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def machine():
    """Where the figures were measured."""
    import platform

    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "redis_py": canhazgpu.require_module("redis", "python3-redis").__version__,
        "redis_server": server.stdout.split()[2].split("=")[1] if server.stdout else "?",
    }
