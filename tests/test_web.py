"""`canhazgpu web` over HTTP: every route, method and error case, the provider cache,
/metrics read back with prometheus_client's own parser, slow clients and shutdown."""

import configparser
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, free_port
from webserver import XSS_NOTE, XSS_USER, history, seed_pool, web_servers

ROUTES = ["/", "/api/status", "/api/report?days=7", "/api/queue", "/metrics", "/healthz"]
TIME_FIELDS = ("duration", "duration_seconds", "details", "idle_seconds")


@pytest.fixture
def web(cli, tmp_path):
    yield from web_servers(cli, tmp_path)


def without(rows, fields):
    return [{k: v for k, v in row.items() if k not in fields} for row in rows]


def metric_families(text):
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families, name, **labels):
    """{label tuple (without the labels given): value} of one metric."""
    family = families[name]
    sample_name = name + "_total" if family.type == "counter" else name
    out = {}
    for s in family.samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            rest = tuple(v for k, v in sorted(s.labels.items()) if k not in labels)
            out[rest[0] if len(rest) == 1 else rest] = s.value
    return out


def raw_request(port, data, timeout=10):
    """Send raw bytes; return what the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return answer
            answer += chunk


# --------------------------------------------------------------------------- routes


def test_every_route_answers_get_and_head(cli, r, fake_smi, web):
    seed_pool(cli, r, fake_smi)
    server = web()
    kinds = {
        "/": "text/html; charset=utf-8",
        "/metrics": "text/plain; version=0.0.4; charset=utf-8",
    }
    for path in ROUTES:
        got = server.get(path)
        assert got.status == 200, f"GET {path}: {got.status} {got.text}"
        assert got.headers["Content-Type"] == kinds.get(path.split("?")[0], "application/json")
        assert got.headers["Cache-Control"] == "no-store"
        assert got.headers["X-Content-Type-Options"] == "nosniff"
        assert int(got.headers["Content-Length"]) == len(got.body)
        head = server.request("HEAD", path)
        assert head.status == 200 and head.body == b""
        assert head.headers["Content-Type"] == got.headers["Content-Type"]
    assert server.get("/healthz").json() == {"status": "ok"}
    page = server.get("/")
    assert int(server.request("HEAD", "/").headers["Content-Length"]) == len(page.body)


def test_api_status_is_status_json(cli, r, fake_smi, web):
    seed_pool(cli, r, fake_smi)
    server = web()
    mine = json.loads(cli("status", "--json", check=True).stdout)  # it notes GPU 1 in use
    api = server.get_json("/api/status")
    assert without(api, TIME_FIELDS) == without(mine, TIME_FIELDS)
    by_id = {row["gpu_id"]: row for row in api}
    assert [by_id[i]["status"] for i in range(5)] == [
        "IN_USE", "IN_USE", "AVAILABLE", "UNRESERVED", "ERROR",
    ]  # fmt: skip
    assert by_id[0]["user"] == XSS_USER and by_id[0]["note"] == XSS_NOTE
    assert by_id[0]["type"] == "MANUAL" and by_id[0]["details"].startswith("expires in 3h 59m")
    assert by_id[1]["user"] == "alice" and by_id[1]["details"].startswith("heartbeat 0h 0m")
    assert by_id[1]["memory_mb"] == 30210 and by_id[1]["memory_total_mb"] == 81559
    assert by_id[3]["unreserved_users"] and by_id[3]["memory_mb"] == 5000
    assert "unparseable" in by_id[4]["error"]


def test_api_queue_is_queue_json(cli, r, fake_smi, web):
    seed_pool(cli, r, fake_smi)
    server = web()
    api = server.get_json("/api/queue")
    assert api["total"] == 1 and api["entries"][0]["user"] == "dave"
    assert 90 <= api["oldest_wait_seconds"] < 600
    cli_json = json.loads(cli("queue", "--json", check=True).stdout)
    drop = ("waiting_seconds",)
    assert without(api["entries"], drop) == without(cli_json["entries"], drop)


def test_api_report_is_report_json(cli, r, fake_smi, web):
    cli("admin", "--gpus", "4", check=True)
    history(r, "alice", 1, 30, 6)
    history(r, "bob", 2, 50, 2.5, "manual")
    history(r, "carol", 3, 24 * 20, 12)
    server = web()
    for days in (1, 7, 30, 90):
        api = server.get_json(f"/api/report?days={days}")
        mine = json.loads(cli("report", "--days", days, "--json", check=True).stdout)
        dates = ("start_date", "end_date")
        assert {k: v for k, v in api.items() if k not in dates} == {
            k: v for k, v in mine.items() if k not in dates
        }
    assert [u["name"] for u in server.get_json("/api/report?days=7")["users"]] == ["alice", "bob"]
    assert server.get_json("/api/report")["days"] == 30  # the default
    assert server.get_json("/api/report?days=90")["unique_users"] == 3


BAD_DAYS = ["days=0", "days=91", "days=-1", "days=abc", "days=1.5", "days=", "days=%ff",
            "days=7&days=8", "day=7", "days=7&x=1"]  # fmt: skip


def test_report_days_out_of_range_is_400(cli, web):
    cli("admin", "--gpus", "2", check=True)
    server = web()
    for query in BAD_DAYS:
        got = server.get(f"/api/report?{query}")
        assert got.status == 400, f"{query}: {got.status} {got.text}"
        error = got.json()["error"]
        assert re.search(r"days|parameter", error) and len(error.splitlines()) == 1, error
    assert server.get_json("/api/report?days=1")["days"] == 1
    assert server.get_json("/api/report?days=90")["days"] == 90


def test_read_only_every_other_method_is_405(cli, web):
    server = web()
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"):
        for path in ("/", "/api/status", "/metrics", "/nowhere"):
            got = server.request(method, path, body=b'{"gpus": 8}')
            assert got.status == 405, f"{method} {path}: {got.status}"
            assert got.headers["Allow"] == "GET, HEAD"
            assert got.headers["Connection"] == "close"  # its body is never read
            assert "read-only" in got.json()["error"]


def test_unknown_paths_are_404(cli, web):
    server = web()
    for path in (
        "/api",
        "/api/status/",
        "/index.html",
        "/metrics/x",
        "/API/STATUS",
        "/favicon.ico",
    ):
        got = server.get(path)
        assert got.status == 404, path
        assert got.json()["error"] == f"no such page: {path}"


MALFORMED = [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET / FOO/1.1\r\n\r\n", 400),
    (b"GET /\r\n", 400),  # HTTP/0.9: answered at once, not after a timeout
    (b"GET nopath HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
]


def test_malformed_requests_get_4xx_and_the_server_goes_on(cli, web):
    server = web()
    for request_bytes, status in MALFORMED:
        answer = raw_request(server.port, request_bytes)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (request_bytes[:40], answer)
        assert server.get("/healthz").status == 200


def test_keep_alive_serves_many_requests_on_one_connection(cli, web):
    cli("admin", "--gpus", "2", check=True)
    server = web()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for path in ROUTES * 3:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    conn.close()


# --------------------------------------------------------------------------- errors


def test_pool_not_initialised_is_503_with_a_hint(cli, web):
    server = web()
    for path in ("/api/status", "/api/queue", "/api/report"):  # queue, report: they were 200
        got = server.get(path)
        assert got.status == 503, path
        assert got.json()["error"] == "the GPU pool is not initialised"
        assert "canhazgpu admin" in got.json()["hint"]
    assert server.get("/").status == 200
    families = metric_families(server.get("/metrics").text)
    assert samples(families, "canhazgpu_pool_gpus", pool="(default)") == {(): 0.0}


def test_redis_outage_is_503_then_recovers(cli, redis_server, web):
    cli("admin", "--gpus", "2", check=True)
    server = web()
    assert server.get("/api/status").status == 200
    redis_server.stop()
    for path in ("/api/status", "/api/queue", "/api/report?days=3", "/healthz"):
        got = server.get(path)
        assert got.status == 503, path
        assert got.json()["error"].startswith("cannot reach Redis at redis://127.0.0.1:")
    assert server.get("/").status == 200  # the page itself needs no Redis
    metrics = server.get("/metrics")
    assert metrics.status == 200
    assert samples(metric_families(metrics.text), "canhazgpu_redis_up") == {(): 0.0}
    redis_server.start()  # empty: it keeps nothing
    assert server.get("/healthz").status == 200
    assert server.get("/api/status").json()["error"] == "the GPU pool is not initialised"


def test_redis_password_is_never_shown(cli, web, redis_server):
    port = free_port()
    server = web(env={"CANHAZGPU_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0"})
    got = server.get("/api/status")
    assert got.status == 503 and "hunter2" not in got.text and ":***@" in got.text
    assert "hunter2" not in server.stderr


def test_provider_failure_shows_validation_unavailable(cli, fake_smi, web):
    cli("admin", "--gpus", "2", check=True)
    fake_smi.set(gpus=2, mode="driver-failure")
    server = web()
    rows = server.get_json("/api/status")
    assert [row["validation"] for row in rows] == ["unavailable", "unavailable"]
    families = metric_families(server.get("/metrics").text)
    assert samples(families, "canhazgpu_provider_up", pool="(default)") == {(): 0.0}
    assert samples(families, "canhazgpu_provider_query_failures") == {(): 1.0}
    assert "NVIDIA-SMI has failed" in server.stderr  # said once, in the server's log


def test_port_in_use_is_one_clear_error(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        got = cli("web", "--host", "127.0.0.1", "--port", port, timeout=20)
    assert got.returncode == 1
    assert got.stderr.splitlines()[0] == (
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert got.stderr.splitlines()[1].startswith("Hint: ")


def test_host_and_port_come_from_the_config_file(cli, tmp_path):
    port = free_port()
    config = tmp_path / "web.json"
    config.write_text(json.dumps({"web": {"host": "127.0.0.1", "port": port}}))
    proc = cli.popen("web", env={"CANHAZGPU_CONFIG": config}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                assert conn.getresponse().status == 200
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert f"on http://127.0.0.1:{port}/" in err.decode()


# --------------------------------------------------------------------------- metrics


def test_metrics_parse_with_prometheus_client(cli, r, fake_smi, web):
    seed_pool(cli, r, fake_smi)
    odd = 'q"uote\\back\nline'  # --user refuses it; a client of its own may write it
    state = dict(json.loads(r.get("canhazgpu:gpu:2")), user=odd, actual_user="svc-ml")
    r.set("canhazgpu:gpu:2", json.dumps(state))
    server = web()
    got = server.get("/metrics")
    assert got.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = metric_families(got.text)
    for name, family in families.items():
        assert name.startswith("canhazgpu_") and family.documentation, name
    assert families["canhazgpu_provider_queries"].type == "counter"
    assert samples(families, "canhazgpu_redis_up") == {(): 1.0}
    pool = {"pool": "(default)"}  # every series of a pool carries its name
    assert samples(families, "canhazgpu_pool_gpus", **pool) == {(): 5.0}
    assert samples(families, "canhazgpu_gpus", **pool) == {
        "available": 0.0, "in_use": 3.0, "unreserved": 1.0, "error": 1.0, "idle": 1.0,
    }  # fmt: skip
    state = samples(families, "canhazgpu_gpu_state", **pool)
    assert len(state) == 5 * 4 and sum(state.values()) == 5
    assert {gpu for (gpu, s), v in state.items() if v == 1 and s == "in_use"} == {"0", "1", "2"}
    assert state[("3", "unreserved")] == 1 and state[("4", "error")] == 1
    me = json.loads(cli("status", "--json").stdout)[3]["unreserved_users"][0]
    # Labelled by the real account and the display name: ("account", "user").
    assert samples(families, "canhazgpu_user_reserved_gpus", **pool) == {
        (me, XSS_USER): 1.0, ("alice", "alice"): 1.0, ("svc-ml", odd): 1.0,
    }  # fmt: skip
    assert samples(families, "canhazgpu_user_unreserved_gpus", **pool) == {(me, me): 1.0}
    assert samples(families, "canhazgpu_queue_length", **pool) == {(): 1.0}
    assert 90 <= samples(families, "canhazgpu_queue_oldest_wait_seconds", **pool)[()] < 600
    used = samples(families, "canhazgpu_gpu_memory_used_bytes", **pool)
    assert used["1"] == 30210 * 2**20 and used["3"] == 5000 * 2**20
    assert samples(families, "canhazgpu_gpu_memory_total_bytes", **pool)["0"] == 81559 * 2**20
    idle = samples(families, "canhazgpu_gpu_idle_seconds", **pool)
    assert set(idle) == {"0", "1", "2"} and min(idle.values()) >= 0  # the held GPUs
    assert samples(families, "canhazgpu_provider_queries") == {(): 1.0}
    assert samples(families, "canhazgpu_provider_query_failures") == {(): 0.0}
    assert samples(families, "canhazgpu_provider_up", **pool) == {(): 1.0}


# --------------------------------------------------------------------------- cache


def test_concurrent_viewers_share_one_provider_run(cli, fake_smi, web):
    cli("admin", "--gpus", "4", check=True)
    fake_smi.set(gpus=4, delay=0.5)  # slow enough that every request arrives mid-query
    fake_smi.clear_calls()
    server = web()
    results = []

    def view():
        results.append(server.get("/api/status").status)

    threads = [threading.Thread(target=view) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 20
    assert len(fake_smi.calls()) == 2  # one provider run: its two nvidia-smi queries
    # The answer is shared only for a few seconds: later requests query again.
    deadline = time.monotonic() + 30
    while len(fake_smi.calls()) < 4:
        assert time.monotonic() < deadline, "the provider answer was never refreshed"
        assert server.get("/api/status").status == 200
        time.sleep(0.2)
    families = metric_families(server.get("/metrics").text)
    assert samples(families, "canhazgpu_provider_queries")[()] == len(fake_smi.calls()) / 2


# --------------------------------------------------------------------------- robustness


def test_slow_clients_block_nobody_and_sigterm_stops_cleanly(cli, web):
    cli("admin", "--gpus", "2", check=True)
    server = web()
    stuck = []
    for _ in range(10):  # half-sent requests, never finished
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
        stuck.append(s)
    try:
        for path in ROUTES:
            assert server.get(path, timeout=5).status == 200
        # Stuck clients would hold a server that waits for its threads until they time out.
        assert server.stop(signal.SIGTERM, timeout=5) == 0
    finally:
        for s in stuck:
            s.close()
    assert server.stderr.rstrip().endswith("Stopped.")


def test_ctrl_c_stops_cleanly(cli, web):
    server = web("--demo")
    assert server.get("/api/status").status == 200
    assert server.stop(signal.SIGINT) == 0
    assert "Stopped." in server.stderr and "KeyboardInterrupt" not in server.stderr


# --------------------------------------------------------------------------- demo, page, unit


def test_demo_needs_no_redis(cli, web):
    nothing = f"redis://127.0.0.1:{free_port()}/0"
    server = web("--demo", env={"CANHAZGPU_REDIS_URL": nothing})
    rows = server.get_json("/api/status")
    assert len(rows) == 8
    assert {row["status"] for row in rows} == {"AVAILABLE", "IN_USE", "UNRESERVED"}
    assert any(row.get("model") for row in rows) and any(row.get("note") for row in rows)
    assert any(row["user"] != row["actual_user"] for row in rows if row["status"] == "IN_USE")
    assert server.get_json("/api/queue")["total"] == 2
    report = server.get_json("/api/report?days=90")
    assert report["unique_users"] >= 5 and report["total_gpu_hours"] > 100
    assert server.get_json("/api/report?days=1")["total_gpu_hours"] < report["total_gpu_hours"]
    assert server.get_json("/healthz") == {"status": "ok"}
    families = metric_families(server.get("/metrics").text)
    assert samples(families, "canhazgpu_pool_gpus", pool="(default)") == {(): 8.0}
    assert 'content="1"' in server.get("/").text.split('name="canhazgpu-demo"')[1][:20]


def test_page_is_self_contained_and_builds_with_text_only(cli, web):
    page = web().get("/")
    html = page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no external assets
    assert "@import" not in html and "url(" not in html
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    host = os.uname().nodename
    assert f'<meta name="canhazgpu-host" content="{host}">' in html


def test_systemd_unit_runs_the_web_command():
    sys.path.insert(0, str(REPO))
    import canhazgpu

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(REPO / "contrib" / "canhazgpu-web.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert os.path.basename(argv[0]) == "canhazgpu"
    args = canhazgpu.build_parser().parse_args(argv[1:])
    assert args.command == "web" and canhazgpu.COMMANDS["web"] is canhazgpu.cmd_web
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# --------------------------------------------------------------------------- fleet


def test_the_fleet_dashboard_serves_every_pool(cli, r, fake_smi, web):
    cli("admin", "--gpus", 2, "--provider", "fake", check=True)
    for name, gpus in (("gpu-a", 2), ("gpu-b", 4)):
        cli("admin", "--pool", name, "--gpus", gpus, "--provider", "fake", check=True)
    cli("reserve", "--pool", "gpu-b", "-G", "1,2", "--note", XSS_NOTE, check=True)
    server = web("--fleet")
    tiles = server.get_json("/api/pools")
    assert tiles["fleet"] is True and tiles["local"] == "(default)"
    by_pool = {t["pool"]: t for t in tiles["pools"]}
    assert list(by_pool) == ["(default)", "gpu-a", "gpu-b"]
    assert (by_pool["gpu-b"]["free"], by_pool["gpu-b"]["in_use"], by_pool["gpu-b"]["gpus"]) == (
        2,
        2,
        4,
    )
    assert by_pool["(default)"]["local"] and not by_pool["gpu-b"]["local"]
    rows = server.get_json("/api/status?pool=gpu-b")
    assert [row["status"] for row in rows] == ["AVAILABLE", "IN_USE", "IN_USE", "AVAILABLE"]
    assert rows[1]["note"] == XSS_NOTE
    assert server.get_json("/api/queue?pool=gpu-a")["total"] == 0
    assert server.get_json("/api/report?pool=gpu-b&days=1")["total_reservations"] == 2
    assert server.get("/api/status?pool=nope").status == 404
    assert server.get("/api/status?pool=a%20b").status == 400
    assert server.get("/api/pools?x=1").status == 400
    families = metric_families(server.get("/metrics").text)
    assert samples(families, "canhazgpu_pool_gpus") == {"(default)": 2, "gpu-a": 2, "gpu-b": 4}
    assert samples(families, "canhazgpu_gpus", state="in_use") == {
        "(default)": 0, "gpu-a": 0, "gpu-b": 2,
    }  # fmt: skip


def test_without_fleet_the_dashboard_serves_its_own_pool(cli, r, fake_smi, web):
    cli("admin", "--gpus", 2, "--provider", "fake", check=True)
    cli("admin", "--pool", "gpu-a", "--gpus", 2, "--provider", "fake", check=True)
    server = web()
    assert [t["pool"] for t in server.get_json("/api/pools")["pools"]] == ["(default)"]
    got = server.get("/api/status?pool=gpu-a")
    assert got.status == 404 and "--fleet" in got.json()["error"]
    families = metric_families(server.get("/metrics").text)
    assert set(samples(families, "canhazgpu_pool_gpus")) == {"(default)"}


def test_the_grafana_dashboard_queries_only_what_metrics_serves(cli, r, fake_smi, web):
    dashboard = json.loads((REPO / "contrib" / "grafana-dashboard.json").read_text())

    def queries(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    yield value
                else:
                    yield from queries(value)
        elif isinstance(node, list):
            for item in node:
                yield from queries(item)

    used = {m for q in queries(dashboard) for m in re.findall(r"\bcanhazgpu_\w+", q)}
    assert len(used) >= 10
    cli("admin", "--pool", "gpu-a", "--gpus", 2, "--provider", "fake", check=True)
    cli("reserve", "--pool", "gpu-a", check=True)
    text = web("--fleet").get("/metrics").text
    served = set(re.findall(r"^# TYPE (canhazgpu_\w+) ", text, re.M))
    assert used <= served, used - served
    # Every series of a pool carries its name, as the dashboard's $pool filter needs.
    pooled = {
        m for q in queries(dashboard) for m in re.findall(r"\b(canhazgpu_\w+)\{[^}]*pool=", q)
    }
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in pooled:
            assert 'pool="' in line, line
