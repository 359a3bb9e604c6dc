"""High availability and scale, against real servers: a Sentinel failover under a
running `run`, a manual reservation, a waiter and the web server; and a Redis Cluster
whose nodes each serve some of the named pools."""

import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest
from conftest import free_port
from redisfleet import ClusterTopology, SentinelTopology, client, wait_until


def running(kind):
    """A topology in a scratch directory, for a module's tests; stopped and removed after."""
    workdir = tempfile.mkdtemp(prefix=f"chg-{kind.__name__.lower()}-")
    topology = kind(workdir)
    try:
        yield topology
    finally:
        topology.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def sentinel():
    yield from running(SentinelTopology)


@pytest.fixture(scope="module")
def cluster():
    yield from running(ClusterTopology)


def states(port, gpus=4, pool=""):
    """{gpu: state} as one server holds them."""
    r = client(port)
    raws = r.mget([f"canhazgpu:{pool}gpu:{i}" for i in range(gpus)])
    return {i: json.loads(raw) if raw else {} for i, raw in enumerate(raws)}


class StatusWatch:
    """`status --json` over and over while the master fails: how long each took, and
    whether it answered."""

    def __init__(self, cli):
        self.cli, self.calls, self.stop = cli, [], threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop.is_set():
            start = time.monotonic()
            p = self.cli("status", "--json", timeout=60)
            end = time.monotonic()
            rows = json.loads(p.stdout) if p.returncode == 0 else None
            self.calls.append((start, end, p.returncode, rows, p.stderr))
            time.sleep(0.2)

    def finish(self):
        self.stop.set()
        self.thread.join(90)
        return self.calls


def test_a_sentinel_failover_loses_nothing_and_books_nothing_twice(cli, sentinel, capsys):
    env = {
        "CANHAZGPU_REDIS_URL": None,
        "CANHAZGPU_REDIS_SENTINELS": sentinel.sentinels,
        "CANHAZGPU_HEARTBEAT_INTERVAL": "1s",
        "CANHAZGPU_HEARTBEAT_TIMEOUT": "30s",
    }
    cli.env.update({k: v for k, v in env.items() if v is not None})
    cli.env.pop("CANHAZGPU_REDIS_URL")
    cli("admin", "--gpus", 4, "--provider", "fake", "--force", "--yes", check=True)
    cli("reserve", "-G", 0, "-d", "1h", "--note", "manual", check=True)
    run = cli.popen("run", "-G", 1, "--", "sleep", 9, stderr=subprocess.PIPE, text=True)
    waiter = cli.popen("reserve", "-G", 0, "--short", stdout=subprocess.PIPE, text=True)
    old = sentinel.master()
    wait_until(lambda: states(old)[1].get("type") == "run", 20, "the run's reservation")
    wait_until(lambda: client(old).zcard("canhazgpu:queue") == 1, 20, "the waiter's entry")
    web_port = free_port()
    web = cli.popen("web", "--host", "127.0.0.1", "--port", web_port, stderr=subprocess.PIPE)
    wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz"), 20, "web")

    watch = StatusWatch(cli)
    time.sleep(1)
    killed = time.monotonic()
    sentinel.kill("master")
    new = wait_until(lambda: sentinel.master() != old and sentinel.master(), 30, "a new master")
    promoted = time.monotonic()

    # The run's heartbeat lands on the new master; the manual reservation is there too.
    wait_until(
        lambda: states(new)[1].get("last_heartbeat", 0) > time.time() - 1.5, 20, "a heartbeat"
    )
    after = states(new)
    assert after[0]["type"] == "manual" and after[0]["note"] == "manual"
    assert after[1]["type"] == "run"
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/status", timeout=40) as got:
        assert got.status == 200 and len(json.loads(got.read())) == 4

    # The waiter kept its place: the manual reservation's release reaches it.
    assert client(new).zcard("canhazgpu:queue") == 1
    cli("release", "-G", 0, check=True)
    out, _ = waiter.communicate(timeout=30)
    assert out == "0\n"
    # The run's release at exit lands on the new master.
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert "user" not in states(new)[1]
    web.terminate()
    web.wait(10)
    calls = watch.finish()

    # status answered throughout (retrying while the master was away), and no GPU was
    # ever seen with two holders: 0 manual, then the waiter's; 1 the run; 2 and 3 free.
    assert calls and all(rc == 0 for _, _, rc, _, _ in calls), [c[4] for c in calls if c[2]]
    for _, _, _, rows, _ in calls:
        assert [r["status"] for r in rows[2:]] == ["AVAILABLE", "AVAILABLE"]
        assert rows[0]["status"] == "IN_USE" and rows[0]["type"] == "MANUAL"
        assert rows[1]["status"] == "AVAILABLE" or rows[1]["type"] == "RUN"
    waits = [end - max(start, killed) for start, end, *_ in calls if end > killed]
    records = [json.loads(m) for m in client(new).zrange("canhazgpu:usage_history_sorted", 0, -1)]
    assert {(r["gpu_id"], r["end_reason"]) for r in records} == {(0, "release"), (1, "exit")}
    with capsys.disabled():
        print(
            f"\n[failover] new master after {promoted - killed:.1f}s; "
            f"longest status during it {max(waits):.1f}s"
        )


def test_sentinel_misconfigured_is_one_clear_line(cli, sentinel):
    env = {"CANHAZGPU_REDIS_SENTINELS": sentinel.sentinels, "CANHAZGPU_REDIS_MASTER_NAME": "nope"}
    p = cli("status", env=dict(env, CANHAZGPU_REDIS_URL=None))
    assert p.returncode == 1
    assert p.stderr.splitlines()[0].startswith("Error: no Sentinel answered with a master for")
    dead = f"127.0.0.1:{free_port()}"
    p = cli("status", env={"CANHAZGPU_REDIS_SENTINELS": dead, "CANHAZGPU_REDIS_URL": None})
    assert p.returncode == 1 and "Error: no Sentinel answered" in p.stderr


def test_a_cluster_serves_named_pools_on_every_node(cli, cluster):
    cli.env.update({"CANHAZGPU_REDIS_URL": cluster.url, "CANHAZGPU_REDIS_CLUSTER": "1"})
    # Pools chosen so that each of the three masters serves one.
    pools = {"a": None, "b": None, "c": None}
    nodes = {name: cluster.node_of(f"canhazgpu:{{{name}}}:gpu_count") for name in pools}
    assert len(set(nodes.values())) == 3, nodes
    for name in pools:
        cli("--pool", name, "admin", "--gpus", 2, "--provider", "fake", check=True)
    assert client(nodes["a"]).get("canhazgpu:{a}:gpu_count") == "2"

    cli("--pool", "a", "reserve", "-g", 2, "-d", "1h", check=True)
    waiter = cli.popen("--pool", "a", "reserve", "--short", stdout=subprocess.PIPE, text=True)
    wait_until(lambda: client(nodes["a"]).zcard("canhazgpu:{a}:queue") == 1, 20, "the waiter")
    assert "1 waiting" in cli("queue", "--all", check=True).stdout
    cli("--pool", "a", "release", "-G", 1, check=True)
    assert waiter.communicate(timeout=30)[0] == "1\n"
    cli("--pool", "b", "run", "-g", 2, "--", "true", check=True)

    doc = json.loads(cli("status", "--all", "--json", check=True).stdout)
    assert list(doc) == ["a", "b", "c"]
    assert [r["status"] for r in doc["a"]] == ["IN_USE", "IN_USE"]
    assert [r["status"] for r in doc["b"]] == ["AVAILABLE", "AVAILABLE"]
    rep = json.loads(cli("report", "--all", "--json", check=True).stdout)
    assert set(rep["pools"]) == {"a", "b", "c"} and rep["total_reservations"] >= 4

    p = cli("status")
    assert p.returncode == 2
    assert p.stderr.startswith("Error: Redis Cluster needs a named pool")
    assert 'pool.name = "auto"' in p.stderr
