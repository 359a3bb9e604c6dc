"""Tests of the test harness itself (conftest.py and the tests/bin stand-ins).

They do not need canhazgpu.py."""

import json
import os
import subprocess
import time

import pytest
import redis

NVIDIA_GPU_QUERY = [
    "--query-gpu=index,gpu_uuid,name,memory.used,memory.total",
    "--format=csv,noheader,nounits",
]
NVIDIA_APPS_QUERY = [
    "--query-compute-apps=pid,process_name,gpu_uuid,used_memory",
    "--format=csv,noheader,nounits",
]


def tool(cli, name, *args, timeout=10):
    """Run a stand-in the way canhazgpu will: by name, through the cli environment's PATH."""
    return subprocess.run(
        [name, *args], env=cli.env, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------- redis


def test_redis_server_answers(redis_server, r):
    assert redis_server.port != 6379
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert r.ping()
    r.set("canhazgpu:gpu_count", "4")
    assert r.get("canhazgpu:gpu_count") == "4"  # decode_responses=True


def test_each_test_starts_with_an_empty_database(r):
    assert r.dbsize() == 0
    r.set("leftover", "1")


def test_unix_socket_url(redis_server, r):
    client = redis.Redis.from_url(redis_server.unix_url, decode_responses=True)
    assert client.ping()
    client.close()


def test_stop_and_start_keep_the_port(redis_server, r):
    port = redis_server.port
    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(redis.exceptions.ConnectionError):
        redis_server.client(socket_connect_timeout=1).ping()
    redis_server.start()
    assert redis_server.port == port
    assert redis_server.client().ping()


def test_a_stopped_server_is_restarted_by_the_next_r_fixture(redis_server, request):
    redis_server.stop()  # as an outage test leaves it
    assert not redis_server.running
    r = request.getfixturevalue("r")  # what the next test's `r` does first
    assert redis_server.running and r.ping()


def test_freeze_makes_the_server_unresponsive(redis_server, r):
    redis_server.freeze()
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            redis_server.client(socket_timeout=0.3).ping()
    finally:
        redis_server.thaw()
    assert r.ping()


# --------------------------------------------------------------------------- cli env


def test_cli_environment(cli, redis_server, tmp_path, monkeypatch):
    assert cli.env["CANHAZGPU_REDIS_URL"] == redis_server.url
    assert cli.env["HOME"] == str(tmp_path / "home")
    assert cli.env["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert "NO_COLOR" not in cli.env
    assert "CUDA_VISIBLE_DEVICES" not in cli.env
    merged = cli.make_env({"NO_COLOR": "1", "CANHAZGPU_REDIS_URL": None})
    assert merged["NO_COLOR"] == "1" and "CANHAZGPU_REDIS_URL" not in merged
    assert cli.argv("status", "--json")[-2:] == ["status", "--json"]


def test_assert_no_traceback(no_traceback):
    no_traceback("Error: Redis is unreachable at redis://127.0.0.1:1/0\n")
    with pytest.raises(pytest.fail.Exception):
        no_traceback('Traceback (most recent call last):\n  File "x", line 1\nKeyError: 1\n')


# --------------------------------------------------------------------------- nvidia-smi


def test_nvidia_smi_default_state(cli, fake_smi):
    p = tool(cli, "nvidia-smi", *NVIDIA_GPU_QUERY)
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert len(lines) == 8
    assert lines[0] == f"0, {fake_smi.uuid(0)}, NVIDIA H100 80GB HBM3, 0, 81559"
    p = tool(cli, "nvidia-smi", *NVIDIA_APPS_QUERY)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_nvidia_smi_configured(cli, fake_smi):
    fake_smi.set(
        gpus=[
            {"memory_used": "8452"},
            {"uuid": "GPU-aaaa", "name": "NVIDIA A100-SXM4-80GB, rev 2", "memory_used": "[N/A]"},
        ],
        processes=[
            {"pid": 12345, "name": "/usr/bin/python3", "gpu": 0, "used_memory": "8452"},
            {"pid": 999999, "name": "vllm serve x", "gpu_uuid": "GPU-aaaa", "used_memory": "3"},
        ],
    )
    p = tool(cli, "nvidia-smi", *NVIDIA_GPU_QUERY)
    assert p.stdout.splitlines() == [
        f"0, {fake_smi.uuid(0)}, NVIDIA H100 80GB HBM3, 8452, 81559",
        "1, GPU-aaaa, NVIDIA A100-SXM4-80GB, rev 2, [N/A], 81559",
    ]
    p = tool(cli, "nvidia-smi", *NVIDIA_APPS_QUERY)
    assert p.stdout.splitlines() == [
        f"12345, /usr/bin/python3, {fake_smi.uuid(0)}, 8452",
        "999999, vllm serve x, GPU-aaaa, 3",
    ]


def test_nvidia_smi_field_order_and_units(cli, fake_smi):
    fake_smi.set(gpus=2)
    p = tool(cli, "nvidia-smi", "--query-gpu=memory.total,index", "--format=csv")
    assert p.stdout.splitlines() == ["memory.total [MiB], index", "81559 MiB, 0", "81559 MiB, 1"]
    p = tool(cli, "nvidia-smi", "--query-gpu=uuid,name", "--format=csv,noheader")
    assert p.stdout.splitlines()[1] == f"{fake_smi.uuid(1)}, NVIDIA H100 80GB HBM3"
    p = tool(cli, "nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv")
    assert p.stdout == "pid, used_gpu_memory [MiB]\n"


def test_nvidia_smi_list(cli, fake_smi):
    fake_smi.set(gpus=2)
    p = tool(cli, "nvidia-smi", "-L")
    assert p.returncode == 0
    assert p.stdout == "".join(
        f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: {fake_smi.uuid(i)})\n" for i in range(2)
    )


@pytest.mark.parametrize(
    "mode, code, text",
    [
        ("driver-failure", 9, "NVIDIA-SMI has failed because it couldn't communicate"),
        ("no-devices", 6, "No devices were found"),
        ("garbage", 0, "not csv"),
    ],
)
def test_nvidia_smi_failure_modes(cli, fake_smi, mode, code, text):
    fake_smi.set(mode=mode)
    p = tool(cli, "nvidia-smi", *NVIDIA_GPU_QUERY)
    assert p.returncode == code
    assert text in p.stdout


def test_nvidia_smi_hang_and_per_query_modes(cli, fake_smi):
    fake_smi.set(modes={"query-compute-apps": "hang"})
    assert tool(cli, "nvidia-smi", *NVIDIA_GPU_QUERY).returncode == 0
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        tool(cli, "nvidia-smi", *NVIDIA_APPS_QUERY, timeout=0.5)
    assert time.monotonic() - start < 5


def test_nvidia_smi_invalid_arguments(cli):
    for args in (["--bogus"], ["--query-gpu=index"], ["--query-gpu=index", "--format=xml"]):
        p = tool(cli, "nvidia-smi", *args)
        assert p.returncode == 2
        assert "Invalid combination of input arguments" in p.stdout
    p = tool(cli, "nvidia-smi", "--query-gpu=nope", "--format=csv")
    assert p.returncode == 2 and 'Field "nope" is not a valid field' in p.stdout


def test_nvidia_smi_log_and_uninstall(cli, fake_smi):
    assert fake_smi.calls() == []
    tool(cli, "nvidia-smi", "-L")
    tool(cli, "nvidia-smi", *NVIDIA_GPU_QUERY)
    assert fake_smi.calls() == [["-L"], NVIDIA_GPU_QUERY]
    fake_smi.clear_calls()
    assert fake_smi.calls() == []
    fake_smi.uninstall()
    assert not (fake_smi.bindir / "nvidia-smi").exists()
    fake_smi.install()
    assert tool(cli, "nvidia-smi", "-L").returncode == 0


# --------------------------------------------------------------------------- amd-smi


def test_amd_smi_is_not_installed_by_default(cli, fake_amd_smi):
    assert not fake_amd_smi.path.exists()
    fake_amd_smi.set(gpus=1)
    assert fake_amd_smi.path.exists()


@pytest.mark.parametrize("shape", ["rocm6", "rocm7"])
def test_amd_smi_shapes(cli, fake_amd_smi, shape):
    fake_amd_smi.set(
        gpus=[{}, {"memory_used": 9000}],
        processes=[{"pid": 4242, "name": "python3", "gpu": 1, "vram_bytes": 8858370048}],
        shape=shape,
    )

    def run(*args):
        p = tool(cli, "amd-smi", *args)
        assert p.returncode == 0, p.stderr
        data = json.loads(p.stdout)
        if shape == "rocm7":
            assert isinstance(data, dict) and list(data) == ["gpu_data"]
            data = data["gpu_data"]
        assert isinstance(data, list)
        return data

    listed = run("list", "--json")
    assert [g["gpu"] for g in listed] == [0, 1]
    assert listed[0]["uuid"] == fake_amd_smi.uuid(0) and listed[0]["bdf"] == "0000:05:00.0"

    for flag in ("--mem-usage", "-m"):
        mem = run("metric", flag, "--json")
        assert mem[1]["mem_usage"]["used_vram"] == {"value": 9000, "unit": "MB"}
        assert mem[0]["mem_usage"]["total_vram"] == {"value": 196592, "unit": "MB"}

    procs = run("process", "--json")
    assert procs[0] == {
        "gpu": 0,
        "process_list": [{"process_info": "No running processes detected"}],
    }
    info = procs[1]["process_list"][0]["process_info"]
    assert (info["pid"], info["name"]) == (4242, "python3")
    assert info["memory_usage"]["vram_mem"] == {"value": 8858370048, "unit": "B"}

    assert [g["gpu"] for g in run("process", "--json", "--gpu", "1")] == [1]
    assert run("static", "--asic", "--json")[0]["asic"]["market_name"] == "AMD Instinct MI300X"
    assert len(fake_amd_smi.calls()) == 6


def test_amd_smi_failure_modes(cli, fake_amd_smi):
    fake_amd_smi.set(mode="failure")
    p = tool(cli, "amd-smi", "list", "--json")
    assert p.returncode != 0 and "Unable to detect any GPU devices" in p.stderr
    fake_amd_smi.set(mode="garbage")
    p = tool(cli, "amd-smi", "process", "--json")
    assert p.returncode == 0
    with pytest.raises(ValueError):
        json.loads(p.stdout)
    fake_amd_smi.set(mode="hang")
    with pytest.raises(subprocess.TimeoutExpired):
        tool(cli, "amd-smi", "metric", "-m", "--json", timeout=0.5)
    p = tool(cli, "amd-smi", "frobnicate", "--json")
    assert p.returncode == 2 and "invalid choice" in p.stderr
