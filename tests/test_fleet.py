"""A fleet on one Redis: named pools beside the unnamed (Go-format) one, the registry,
published usage seen from other hosts, `status/queue/report --all`, `--pool` on every
command, and hosts with a Redis of their own reached over ssh (a stand-in)."""

import json
import re
import socket
import time

import pytest
from conftest import REPO, STANDIN_DIR
from poolstate import KEY, dump, gpu, hold, holders, parse_table, prefix, wait_for

HOST = socket.gethostname()
GO_STATE = {  # a Go client's reservation: RFC 3339 times, no fields of ours
    "user": "gopher",
    "start_time": "2026-01-01T10:00:00Z",
    "last_heartbeat": "2026-01-01T10:00:00Z",
    "type": "manual",
    "expiry_time": "2999-01-01T00:00:00+02:00",
}


def go_keys(r):
    """The unnamed pool's keys that a Go client reads and writes."""
    return {k: v for k, v in dump(r).items() if not k.startswith((KEY + "{", KEY + "pools"))}


def seed_go_pool(r):
    r.mset({KEY + "gpu_count": 2, KEY + "provider": "nvidia"})
    r.set(KEY + "gpu:0", json.dumps(GO_STATE))
    r.set(KEY + "gpu:1", json.dumps({"last_released": "2026-01-01T09:00:00Z"}))


def blocks(text):
    """`status --all`'s output: {heading: table text}."""
    out = {}
    for part in text.strip().split("\n\n"):
        heading, _, table = part.partition("\n")
        out[heading] = table
    return out


def test_named_pools_and_a_go_pool_share_one_redis(cli, r, fake_smi):
    seed_go_pool(r)
    before = go_keys(r)
    for name, gpus in (("gpu-a", 2), ("gpu-b", 4)):
        cli("--pool", name, "admin", "--gpus", gpus, "--provider", "fake", check=True)
    cli("--pool", "gpu-a", "reserve", "-g", 2, "-d", "1h", check=True)
    cli("reserve", "--pool", "gpu-b", "-G", "1,3", "--note", "sweep", check=True)
    cli("run", "--pool", "gpu-b", "-g", 2, "--", "true", check=True)

    # Every key of a named pool carries its hash tag; nothing of theirs is in the Go pool.
    named = [k for k in r.keys(KEY + "{*")]
    assert named and all(re.match(r"canhazgpu:\{gpu-[ab]\}:", k) for k in named)
    assert set(holders(r, 2, pool="gpu-a")) == {0, 1}
    assert set(holders(r, 4, pool="gpu-b")) == {1, 3}
    assert go_keys(r) == before

    table = cli("status", "--all", "--no-color", check=True).stdout
    parts = blocks(table)
    headings = list(parts)
    assert [h.split()[2] for h in headings] == ["(default)", "gpu-a", "gpu-b"]  # name order
    assert headings[1] == f"== Pool gpu-a on {HOST}: 2 x Fake GPU, 0 free =="
    assert headings[2] == f"== Pool gpu-b on {HOST}: 4 x Fake GPU, 2 free =="
    _, rows = parse_table(parts[headings[2]])
    assert [row["STATUS"] for row in rows] == ["AVAILABLE", "IN_USE", "AVAILABLE", "IN_USE"]
    _, rows = parse_table(parts[headings[0]])
    assert rows[0]["USER"] == "gopher" and rows[0]["STATUS"] == "IN_USE"

    doc = json.loads(cli("status", "--all", "--json", check=True).stdout)
    assert list(doc) == ["(default)", "gpu-a", "gpu-b"]
    assert [row["status"] for row in doc["gpu-a"]] == ["IN_USE", "IN_USE"]
    assert doc["gpu-b"][1]["note"] == "sweep"

    lines = cli("status", "--all", "--summary", check=True).stdout.splitlines()
    header = ["POOL", "HOST", "GPUS", "FREE", "IN_USE", "UNRESERVED", "QUEUED", "MODELS"]
    assert lines[0].split() == header
    assert lines[2].split()[:7] == ["gpu-a", HOST, "2", "0", "2", "0", "0"]
    assert lines[3].split()[:7] == ["gpu-b", HOST, "4", "2", "2", "0", "0"]
    assert lines[4].split() == ["TOTAL", "8", "3", "5", "0", "0"]
    summary = json.loads(cli("status", "--all", "--summary", "--json", check=True).stdout)
    assert [s["pool"] for s in summary] == ["(default)", "gpu-a", "gpu-b"]
    assert go_keys(r) == before  # read, never rewritten

    cli("release", "--pool", "gpu-b", check=True)
    assert holders(r, 4, pool="gpu-b") == {} and set(holders(r, 2, pool="gpu-a")) == {0, 1}


def test_the_registry_says_where_each_pool_is(cli, r):
    cli("admin", "--pool", "gpu-a", "--gpus", 3, "--provider", "fake", check=True)
    info = json.loads(r.hget(KEY + "pools", "gpu-a"))
    assert info["host"] == HOST and info["gpu_count"] == 3 and info["provider"] == "fake"
    assert info["version"] and time.time() - info["updated"] < 30
    # Refreshed by the commands that look at the pool, at most once a minute.
    r.hset(KEY + "pools", "gpu-a", json.dumps(dict(info, updated=1)))
    cli("status", "--pool", "gpu-a", check=True)
    assert json.loads(r.hget(KEY + "pools", "gpu-a"))["updated"] == 1  # refreshed at admin
    r.delete(prefix("gpu-a") + "registered")
    cli("status", "--pool", "gpu-a", check=True)
    fresh = json.loads(r.hget(KEY + "pools", "gpu-a"))
    assert time.time() - fresh["updated"] < 30 and fresh["models"] == ["Fake GPU"]


@pytest.mark.parametrize("name", ["a b", "x" * 65, "a/b", "gpu:1", "{a}", "(default)"])
def test_a_bad_pool_name_is_a_usage_error(cli, name):
    p = cli("status", "--pool", name)
    assert p.returncode == 2 and "pool name" in p.stderr
    p = cli("status", env={"CANHAZGPU_POOL": name})
    assert p.returncode == 2 and "CANHAZGPU_POOL" in p.stderr


def test_auto_is_the_short_host_name(cli, r):
    cli("admin", "--gpus", 1, "--provider", "fake", env={"CANHAZGPU_POOL": "auto"}, check=True)
    short = HOST.split(".")[0]
    assert r.get(prefix(short) + "gpu_count") == "1"
    assert r.hexists(KEY + "pools", short)


def elsewhere(r, name="gpu-b", host="gpu-b.lab", gpus=4):
    """A pool initialised on another host: its registry entry names that host."""
    r.mset({prefix(name) + "gpu_count": gpus, prefix(name) + "provider": "nvidia"})
    info = {"host": host, "gpu_count": gpus, "provider": "nvidia", "models": ["NVIDIA H100"]}
    r.hset(KEY + "pools", name, json.dumps(info))


def publish(r, name="gpu-b", host="gpu-b.lab", age=0.0, busy=(1,), gpus=4):
    """What that host's canhazgpu publishes after asking its nvidia-smi."""
    doc = {
        "host": host,
        "updated": time.time() - age,
        "provider": "nvidia",
        "error": None,
        "problem": None,
        "gpus": [
            {
                "index": i,
                "uuid": f"GPU-{i}",
                "name": "NVIDIA H100 80GB HBM3",
                "memory_used": 9000 if i in busy else 3,
                "memory_total": 81559,
                "processes": [
                    {"pid": 4242, "name": "python3", "memory_mb": 8990, "owner": "mallory",
                     "model": None}
                ] if i in busy else [],
            }
            for i in range(gpus)
        ],
    }  # fmt: skip
    r.set(prefix(name) + "usage", json.dumps(doc), ex=60)


def test_another_hosts_pool_is_seen_through_what_it_published(cli, r, fake_smi):
    elsewhere(r)
    fake_smi.set(gpus=[{"memory_used": "50000"}] * 4)  # this host's GPUs: all busy
    rows = json.loads(cli("status", "--pool", "gpu-b", "--json", check=True).stdout)
    assert {row["validation"] for row in rows} == {"unknown (no recent report from gpu-b.lab)"}
    assert {row["status"] for row in rows} == {"AVAILABLE"}  # not this host's busy GPUs
    assert fake_smi.calls() == []  # and this host's nvidia-smi was not even asked

    publish(r)
    rows = json.loads(cli("status", "--pool", "gpu-b", "--json", check=True).stdout)
    assert [r["status"] for r in rows] == ["AVAILABLE", "UNRESERVED", "AVAILABLE", "AVAILABLE"]
    assert (
        rows[1]["unreserved_users"] == ["mallory"] and rows[1]["validation"] == "9000MB, 1 process"
    )

    # reserve --pool uses the published answer for the unreserved check.
    p = cli("reserve", "--pool", "gpu-b", "-g", 3, "--short", check=True)
    assert p.stdout == "0,2,3\n" and p.stderr == ""
    cli("release", "--pool", "gpu-b", check=True)
    publish(r, age=45)
    p = cli("reserve", "--pool", "gpu-b", "-g", 1, "--short", check=True)
    assert "the usage report from gpu-b.lab is 45s old" in p.stderr
    cli("release", "--pool", "gpu-b", check=True)
    r.delete(prefix("gpu-b") + "usage")
    p = cli("reserve", "--pool", "gpu-b", "-G", 1, "--short", check=True)
    assert "no recent report from gpu-b.lab" in p.stderr and p.stdout == "1\n"


def test_run_on_another_hosts_pool_is_a_usage_error(cli, r):
    elsewhere(r)
    p = cli("run", "--pool", "gpu-b", "--", "true")
    assert p.returncode == 2
    assert p.stderr.startswith("Error: pool gpu-b is on gpu-b.lab: `run` runs the command here")
    assert "canhazgpu reserve --pool gpu-b" in p.stderr
    assert holders(r, 4, pool="gpu-b") == {}


def test_queue_and_report_across_the_fleet(cli, r):
    for name in ("gpu-a", "gpu-b"):
        cli("admin", "--pool", name, "--gpus", 1, "--provider", "fake", check=True)
    now = time.time()
    from poolstate import add_record

    add_record(r, "alice", 0, now - 7200, now - 3600, pool="gpu-a")
    add_record(r, "alice", 0, now - 4 * 3600, now - 3600, pool="gpu-b")
    add_record(r, "bob", 0, now - 3600, now - 1800, "manual", pool="gpu-b")
    hold(r, 0, user="carol", kind="manual", age=60, pool="gpu-a")
    waiter = cli.popen("reserve", "--pool", "gpu-a", "--short", "-d", "1h")
    try:
        wait_for(lambda: r.zcard(prefix("gpu-a") + "queue"), what="the waiter in gpu-a's queue")
        lines = cli("queue", "--all", check=True).stdout.splitlines()
        assert lines[0].split()[:3] == ["POOL", "POS", "USER"]
        assert lines[1].split()[:2] == ["gpu-a", "1"] and "starts by" in lines[1]
        assert lines[-1] == "Total: 1 waiting in 2 pool(s)"
        queues = json.loads(cli("queue", "--all", "--json", check=True).stdout)
        assert queues["gpu-a"]["total"] == 1 and queues["gpu-b"]["total"] == 0
        assert queues["gpu-a"]["entries"][0]["eta"]  # carol's reservation has an end
    finally:
        waiter.kill()
        waiter.wait()

    rep = json.loads(cli("report", "--all", "--days", 1, "--json", check=True).stdout)
    users = {u["name"]: u for u in rep["users"]}
    assert users["alice"]["gpu_hours"] == pytest.approx(4, abs=0.01)
    assert users["alice"]["pools"] == ["gpu-b", "gpu-a"]  # most hours first
    assert users["bob"]["pools"] == ["gpu-b"] and users["carol"]["pools"] == ["gpu-a"]
    assert set(rep["pools"]) == {"gpu-a", "gpu-b"}
    assert rep["pools"]["gpu-b"]["total_gpu_hours"] == pytest.approx(3.5, abs=0.01)
    assert rep["total_gpu_hours"] == pytest.approx(
        sum(p["total_gpu_hours"] for p in rep["pools"].values()), abs=0.01
    )
    text = cli("report", "--all", "--days", 1, check=True).stdout
    assert "=== GPU Reservation Report (all pools) ===" in text
    alice = next(line for line in text.splitlines() if line.startswith("alice"))
    assert alice.endswith("gpu-b, gpu-a")


@pytest.fixture
def ssh(cli, redis_server, tmp_path):
    """The ssh stand-in on PATH: `ssh.hosts[host] = redis URL | "refused" | "garbage"`."""
    (tmp_path / "bin" / "ssh").symlink_to(STANDIN_DIR / "ssh")

    class Ssh:
        hosts = {}
        log = tmp_path / "ssh.log"

        def env(self):
            return {
                "FAKE_SSH_HOSTS": json.dumps(self.hosts),
                "FAKE_SSH_PROGRAM": str(REPO / "canhazgpu.py"),
                "FAKE_SSH_LOG": str(self.log),
            }

    return Ssh()


def test_hosts_with_their_own_redis_over_ssh(cli, r, redis_server, ssh):
    # Another Redis database stands for old-box's own Redis.
    other = redis_server.url.rsplit("/", 1)[0] + "/5"
    cli("admin", "--gpus", 2, "--provider", "fake", env={"CANHAZGPU_REDIS_URL": other}, check=True)
    cli("reserve", "-G", 1, env={"CANHAZGPU_REDIS_URL": other}, check=True)
    cli("admin", "--pool", "gpu-a", "--gpus", 1, "--provider", "fake", check=True)
    ssh.hosts.update({"old-box": other, "dead-box": "refused", "odd-box": "garbage"})

    p = cli("status", "--remote", "old-box", "--remote", "dead-box", "--no-color", env=ssh.env())
    assert p.returncode == 0
    parts = blocks(p.stdout)
    assert list(parts) == ["== Host dead-box ==", "== Host old-box: 2 x Fake GPU, 1 free =="]
    assert parts["== Host dead-box =="] == (
        "Error: ssh: connect to host dead-box port 22: Connection refused"
    )
    _, rows = parse_table(parts["== Host old-box: 2 x Fake GPU, 1 free =="])
    assert [row["STATUS"] for row in rows] == ["AVAILABLE", "IN_USE"]
    calls = [json.loads(line) for line in ssh.log.read_text().splitlines()]
    assert ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "old-box",
            "canhazgpu", "status", "--json"] in calls  # fmt: skip

    # remote_hosts in a config file joins --all; each failure is one line in its block.
    config = r"""{"remote_hosts": ["old-box", "odd-box"]}"""
    home = cli.env["HOME"]
    with open(f"{home}/.canhazgpu.json", "w") as f:
        f.write(config)
    doc = json.loads(cli("status", "--all", "--json", env=ssh.env(), check=True).stdout)
    assert list(doc) == ["gpu-a", "odd-box", "old-box"]
    assert doc["odd-box"] == {"error": "`canhazgpu status --json` there printed no status"}
    assert [row["status"] for row in doc["old-box"]] == ["AVAILABLE", "IN_USE"]
    summary = cli("status", "--all", "--summary", env=ssh.env(), check=True).stdout
    assert re.search(r"^odd-box\s+odd-box\s+(-\s+){5}error: ", summary, re.M)
    assert re.search(r"^TOTAL\s+3\s+2\s+1\s+0\s+0$", summary, re.M)


@pytest.mark.parametrize("host", ["-oProxyCommand=touch /tmp/x", "a b", "a,b"])
def test_a_remote_host_is_never_an_option(cli, host):
    p = cli("status", "--remote", host)
    assert p.returncode == 2 and "expected a host name" in p.stderr


def test_a_dead_waiter_and_expiry_stay_inside_their_pool(cli, r):
    """Expiry in one pool ends nothing in another, even under the same GPU ids."""
    cli("admin", "--pool", "gpu-a", "--gpus", 1, "--provider", "fake", check=True)
    cli("admin", "--pool", "gpu-b", "--gpus", 1, "--provider", "fake", check=True)
    hold(r, 0, kind="manual", pool="gpu-a", expiry_time=time.time() - 5)
    hold(r, 0, kind="manual", pool="gpu-b")
    cli("status", "--pool", "gpu-a", check=True)
    assert gpu(r, 0, pool="gpu-a") != {} and "user" not in gpu(r, 0, pool="gpu-a")
    assert gpu(r, 0, pool="gpu-b")["user"] == "bob"
