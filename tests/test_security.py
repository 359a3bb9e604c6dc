"""The threat model of SECURITY.md: a shared host, a trusted Redis, untrusted co-users.
(The dashboard's read-only routes and escaping are tested in test_web.py and
test_web_browser.py; terminal escapes in test_trust.py.)"""

import json
import subprocess
import sys
import time

import pytest
from poolstate import KEY, gpu_state, hold, holders, init_pool, me, wait_for
from webserver import web_servers

SPOOF = {"USER": "bob", "LOGNAME": "bob", "SUDO_USER": "bob", "USERNAME": "bob"}
PASSWORD = "s3cr3t-Pa55"


@pytest.fixture
def pool(r):
    init_pool(r, 4, provider="fake")
    return r


def test_spoofed_login_variables_change_nothing(cli, pool, r):
    cli("reserve", "-G", 0, "--nonblock", env=SPOOF, check=True)
    st = gpu_state(r, 0)
    assert st["user"] == me() and st["actual_user"] == me()
    hold(pool, 1, user="bob", kind="manual")
    p = cli("release", "-G", 1, env=SPOOF)
    assert p.returncode == 1 and f"not by you ({me()})" in p.stderr
    assert holders(r)[1]["actual_user"] == "bob"
    # A display name is only a name: it grants nothing either.
    p = cli("release", "-G", 1, "--user", "bob")
    assert p.returncode == 2  # release takes no --user at all
    assert cli("release", env=SPOOF, check=True).stdout == "Released 1 GPU(s): [0]\n"
    assert list(holders(r)) == [1]


def test_someone_elses_run_cannot_be_released(cli, pool, r):
    hold(pool, 2, user="alice", kind="run")
    p = cli("release", "-G", 2)
    assert p.returncode == 1
    assert p.stderr.strip() == f"Error: GPU 2 is reserved by alice, not by you ({me()})"
    assert holders(r)[2]["user"] == "alice"


@pytest.fixture
def web(cli, tmp_path):
    yield from web_servers(cli, tmp_path)


@pytest.fixture
def secret_redis(r, redis_server):
    """The test Redis with a password; the CLI given it in a URL."""
    r.config_set("requirepass", PASSWORD)
    client = redis_server.client(password=PASSWORD)
    try:
        yield client, f"redis://:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    finally:
        client.config_set("requirepass", "")
        client.close()


def test_a_password_never_shows_in_ps_of_the_supervisor(cli, secret_redis):
    client, url = secret_redis
    init_pool(client, 2, provider="fake")
    run = cli.popen(
        "--redis-url", url, "run", "--", sys.executable, "-c", "import time; time.sleep(30)",
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: holders(client, 2), what="the reservation")
        with open(f"/proc/{run.pid}/cmdline", "rb") as f:
            cmdline = f.read().decode()
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(run.pid)], capture_output=True)
        assert PASSWORD not in cmdline and PASSWORD not in ps.stdout.decode()
        assert f":{'*' * len(PASSWORD)}@127.0.0.1" in cmdline  # same length, masked
    finally:
        run.terminate()
        err = run.communicate(timeout=20)[1].decode()
    assert PASSWORD not in err and run.returncode == -15


def test_a_password_never_shows_in_output_or_errors(cli, secret_redis, redis_server):
    client, url = secret_redis
    init_pool(client, 2, provider="fake")
    env = {"CANHAZGPU_REDIS_URL": url}
    outputs = []
    for args in (["status"], ["status", "-j"], ["reserve", "--nonblock"], ["queue", "-j"],
                 ["report", "-j"], ["release"], ["release", "-G", "5"]):  # fmt: skip
        p = cli(*args, env=env)
        outputs.append(p.stdout + p.stderr)
    wrong = url.replace(PASSWORD, PASSWORD[::-1])
    for p in (
        cli("status", env={"CANHAZGPU_REDIS_URL": wrong}),
        cli("status", "--redis-url", wrong),
    ):
        assert p.returncode == 1 and "refused the password" in p.stderr
        outputs.append(p.stdout + p.stderr)
    client.config_set("requirepass", "")
    outputs.append(cli("status", "--redis-url", url).stderr)  # AUTH against no password
    for text in outputs:
        assert PASSWORD not in text and PASSWORD[::-1] not in text


def test_the_dashboard_never_shows_the_password(cli, secret_redis, web):
    client, url = secret_redis
    init_pool(client, 2, provider="fake")
    server = web(env={"CANHAZGPU_REDIS_URL": url})
    for path in ("/", "/api/status", "/api/queue", "/api/report", "/metrics", "/healthz"):
        got = server.get(path)
        assert got.status == 200, (path, got.text)
        assert PASSWORD not in got.text
    assert PASSWORD not in server.stderr


def test_run_leaks_no_descriptor_to_the_command(cli, pool):
    """Only stdin, stdout and stderr: not the Redis socket, not the wake-up pipe."""
    probe = (
        "import os\n"
        "def open_fd(fd):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "        return True\n"
        "    except OSError:\n"
        "        return False\n"
        "print([fd for fd in range(1024) if open_fd(fd)])\n"
    )
    p = cli("run", "--wait", "5s", "--", sys.executable, "-c", probe, check=True)
    assert p.stdout == "[0, 1, 2]\n"


def test_a_reservation_id_is_needed_to_beat_or_free_a_run(cli, pool, r):
    """A stale supervisor (another token) can neither extend nor free a run's GPU."""
    run = cli.popen("run", "--", "sleep", "20", stderr=subprocess.PIPE)
    try:
        wait_for(lambda: holders(r), what="the reservation")
        st = gpu_state(r, 0)
        forged = dict(st, reservation_id="0" * 32, last_heartbeat=time.time() - 3600)
        r.set(KEY + "gpu:0", json.dumps(forged))  # someone's state now, with another token
        time.sleep(0.1)
    finally:
        run.terminate()
        run.wait(20)
    # Its final release by token left the other holder's state alone.
    assert gpu_state(r, 0)["reservation_id"] == "0" * 32
