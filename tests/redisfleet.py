"""Real Redis topologies for the fleet tests, on free loopback ports: a master with a
replica watched by three Sentinels (`redis-server --sentinel`), and a Cluster of three
masters (`redis-cli --cluster create`).  Each starts its own processes and stops them."""

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port

MASTER_NAME = "canhazgpu"


def redis_exe(name="redis-server"):
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed (run `make deps`)", pytrace=False)
    return exe


def client(port, **kwargs):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kwargs.setdefault("decode_responses", True)
    kwargs.setdefault("socket_timeout", 5)
    kwargs.setdefault("socket_connect_timeout", 1)
    return redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), **kwargs)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # a server still starting
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(0.05)


class Topology:
    """Processes started in one directory, all stopped (SIGKILL at the latest) at the end."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.procs = {}

    def spawn(self, name, argv):
        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir
        )
        return self.procs[name]

    def server(self, name, port, *extra):
        return self.spawn(name, [
            redis_exe(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), *extra,
        ])  # fmt: skip

    def kill(self, name, sig=signal.SIGKILL):
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(10)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self, name):
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class SentinelTopology(Topology):
    """A master, one replica and three Sentinels that fail over within seconds."""

    def __init__(self, workdir, down_after_ms=1000):
        super().__init__(workdir)
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.server("master", self.master_port)
        self.server("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        for k, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{k}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self.spawn(f"sentinel-{k}", [redis_exe(), str(conf), "--sentinel"])
        self.wait_ready()

    @property
    def sentinels(self):
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def wait_ready(self):
        wait_until(
            lambda: client(self.replica_port).info("replication")["master_link_status"] == "up",
            20,
            "the replica to sync",
        )
        for port in self.sentinel_ports:
            s = client(port)
            wait_until(
                lambda s=s: (
                    len(s.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)) == 1
                    and len(s.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)) == 2
                ),
                30,
                f"sentinel on {port} to know the replica and the other sentinels",
            )

    def master(self):
        """The port the Sentinels name as master now."""
        _, port = client(self.sentinel_ports[0]).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME
        )
        return int(port)


def cluster_port():
    """A free port whose cluster bus port (10000 above it, as Redis fixes it) is free too."""
    import socket

    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class ClusterTopology(Topology):
    """Three masters, no replicas: every slot served, each pool on the node of its slot."""

    def __init__(self, workdir):
        super().__init__(workdir)
        self.ports = [cluster_port() for _ in range(3)]
        for port in self.ports:
            self.server(
                f"node-{port}", port, "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "2000",
            )  # fmt: skip
        for port in self.ports:
            wait_until(lambda port=port: client(port).ping(), 10, f"cluster node {port}")
        subprocess.run(
            [redis_exe("redis-cli"), "--cluster", "create",
             *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for port in self.ports:
            wait_until(
                lambda port=port: client(port).cluster("info")["cluster_state"] == "ok",
                30,
                f"cluster node {port} to serve every slot",
            )

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node_of(self, key):
        """The port of the master that serves `key`'s slot."""
        import redis

        rc = redis.RedisCluster(host="127.0.0.1", port=self.ports[0], decode_responses=True)
        try:
            return rc.get_node_from_key(key).port
        finally:
            rc.close()
