"""The Python API (`canhazgpu.gpus`, `canhazgpu.reserve`), in-process against a real
redis-server, with the same settings and identity as the command line."""

import os
import signal
import sys
import threading
import time

import pytest
from conftest import REPO
from poolstate import KEY, gpu, hold, holders, init_pool, me

sys.path.insert(0, str(REPO))
import canhazgpu  # noqa: E402


@pytest.fixture
def api(r, redis_server, monkeypatch, tmp_path):
    """canhazgpu configured as a notebook on this host would be: by its environment."""
    for var in list(os.environ):
        if var.startswith(("CANHAZGPU_", "CUDA_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("CANHAZGPU_REDIS_URL", redis_server.url)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi: the pool's provider is fake
    init_pool(r, 4, provider="fake")
    return canhazgpu


def test_gpus_sets_the_environment_and_releases_on_exit(api, r):
    with api.gpus(2, duration="4h", note="sweep") as ids:
        assert ids == [0, 1]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        held = holders(r, 4)
        assert set(held) == {0, 1} and held[0]["note"] == "sweep"
        assert held[0]["actual_user"] == me() and held[0]["type"] == "manual"
        assert held[0]["expiry_time"] == pytest.approx(time.time() + 4 * 3600, abs=30)
    assert holders(r, 4) == {}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and "CUDA_DEVICE_ORDER" not in os.environ


@pytest.mark.parametrize("ending", [ValueError, KeyboardInterrupt])
def test_an_exception_or_ctrl_c_in_the_block_releases(api, r, ending):
    os.environ["CUDA_VISIBLE_DEVICES"] = "7"
    with pytest.raises(ending):
        with api.gpus(1):
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
            raise ending()
    assert holders(r, 4) == {}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"  # as it was


def test_reserve_extend_release(api, r):
    held = api.reserve(ids=[2, 3], duration=3600)
    assert held.ids == [2, 3] and "GPUs [2, 3] until" in repr(held)
    expiry = held.expires_at
    assert held.extend("30m") == pytest.approx(expiry + 1800, abs=2)
    assert gpu(r, 2)["expiry_time"] == pytest.approx(expiry + 1800, abs=2)
    hold(r, 0, kind="manual")  # bob's: extend goes only to this reservation (its token)
    held.extend(60)
    assert "extend_request" not in gpu(r, 0)
    held.release()
    held.release()  # again: nothing happens
    assert holders(r, 4) == {0: gpu(r, 0)}
    with pytest.raises(api.Error, match="was released"):
        held.extend("1h")


def test_errors_are_the_clis_messages(api, r):
    for i in range(4):
        hold(r, i, kind="manual")
    with pytest.raises(api.Error) as e:
        api.reserve(2, wait=0)
    assert str(e.value) == "not enough GPUs available: requested 2, available 0"
    assert e.value.hint and e.value.code == 1
    started = time.monotonic()
    with pytest.raises(api.Error, match=r"gave up after waiting 1s for 1 GPU \(position 1"):
        api.reserve(1, wait="1s")
    assert time.monotonic() - started < 10 and r.zcard(KEY + "queue") == 0
    with pytest.raises(api.Error, match="duration: expected a duration") as e:
        api.reserve(1, duration="soon")
    assert e.value.code == 2
    with pytest.raises(api.Error, match="GPU 9 is not in the pool"):
        api.reserve(ids=[9])


def test_the_limits_apply_as_on_the_command_line(api, r, cli):
    cli("admin", "--max-gpus", 1, "--max-duration", "1h", env={"PATH": "/usr/bin:/bin"}, check=True)
    with pytest.raises(api.Error, match=rf"{me()} may hold at most 1 GPU \(holds 0, asked for 2\)"):
        api.reserve(2)
    with api.reserve() as held:  # the default 8h, trimmed to the limit
        assert held.expires_at == pytest.approx(time.time() + 3600, abs=30)
        with pytest.raises(api.Error, match="may reserve for at most 1h"):
            held.extend("30m")


def test_a_waiting_reserve_gets_the_gpu_when_it_is_released(api, r):
    hold(r, 0, kind="manual")
    for i in (1, 2, 3):
        hold(r, i, kind="manual")
    got = {}

    def wait():
        with api.gpus(ids=[0]) as ids:
            got["ids"] = ids

    waiter = threading.Thread(target=wait)  # in a thread: signals are the main thread's
    waiter.start()
    deadline = time.monotonic() + 20
    while not r.zcard(KEY + "queue") and time.monotonic() < deadline:
        time.sleep(0.02)
    r.set(KEY + "gpu:0", '{"last_released": 1}')
    canhazgpu.Pool(canhazgpu.Store(canhazgpu.Config.load()), canhazgpu.Config.load()).snapshot()
    waiter.join(20)
    assert got == {"ids": [0]} and "user" not in gpu(r, 0)


def test_ctrl_c_while_waiting_leaves_the_queue(api, r):
    for i in range(4):
        hold(r, i, kind="manual")
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        api.reserve(1)
    timer.join()
    assert r.zcard(KEY + "queue") == 0
