"""The Lua scripts on the real redis-server (its Lua 5.1 and cjson, not fakeredis's
emulation): Go-format data in, our data out."""

import json
import sys
import time

import pytest
from conftest import REPO
from poolstate import KEY, add_record, gpu_state, history

sys.path.insert(0, str(REPO))
import canhazgpu as chg  # noqa: E402


@pytest.fixture
def store(r, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(chg, "SYSTEM_CONFIGS", ())
    return chg.Store(chg.Config.load(environ={}), client=r)


def go_time(t, offset="-04:00", frac=".123456789"):
    """Unix seconds -> RFC 3339 as Go's time.Time marshals it (local offset, ns)."""
    shift = 0
    if offset != "Z":
        sign = -1 if offset[0] == "-" else 1
        shift = sign * (int(offset[1:3]) * 3600 + int(offset[4:6]) * 60)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(t) + shift)) + frac + offset


def request(user, count=1, ids=None, kind="run"):
    req = chg.Request(kind, count, ids=ids, duration=3600.0 if kind == "manual" else None)
    req.user = req.actual_user = user
    return req


def test_go_states_expire_and_read_on_real_redis(store, r):
    now = time.time()
    r.mset({KEY + "gpu_count": 5, KEY + "provider": "fake"})
    go = {"expiry_time": None, "last_released": None, "note": "", "partial_queue_id": ""}
    r.set(
        KEY + "gpu:0",
        json.dumps(
            {
                **go,
                "user": "alice",
                "type": "manual",
                "start_time": go_time(now - 7200),
                "last_heartbeat": None,
                "expiry_time": go_time(now - 60, "+05:30"),
            }
        ),
    )
    r.set(
        KEY + "gpu:1",
        json.dumps(
            {
                **go,
                "user": "bob",
                "type": "run",
                "start_time": go_time(now - 7200),
                "last_heartbeat": go_time(now - 3600, "Z", ""),
            }
        ),
    )
    r.set(
        KEY + "gpu:2",
        json.dumps(
            {
                **go,
                "user": "carol",
                "type": "run",
                "start_time": go_time(now - 60),
                "last_heartbeat": go_time(now - 10, "+09:00"),
            }
        ),
    )
    r.set(KEY + "gpu:3", json.dumps({**go, "last_released": go_time(now - 30)}))
    r.set(KEY + "gpu:4", "[1, 2]")
    snap = chg.Snapshot(store.script("snapshot"))
    assert [g.held for g in snap.gpus] == [False, False, True, False, False]
    assert snap.gpus[4].error
    records = sorted(history(r), key=lambda h: h["gpu_id"])
    assert [(h["user"], h["gpu_id"], h["reservation_type"]) for h in records] == [
        ("alice", 0, "manual"),
        ("bob", 1, "run"),
    ]
    assert records[0]["start_time"] == pytest.approx(int(now - 7200) + 0.123456789, abs=1e-3)
    assert records[1]["duration_seconds"] == pytest.approx(7200, abs=30)
    for gpu in (0, 1):
        assert gpu_state(r, gpu) == {"last_released": pytest.approx(now, abs=30)}
    # LRU: never used (the freed Go GPU 3 was released 30 s ago, 0 and 1 just now).
    pool = chg.Pool(store, store.config, chg.FakeProvider())
    assert pool.allocate(request("dave"))["gpus"] == [3]
    assert pool.allocate(request("dave", 2))["gpus"] == [0, 1]
    assert pool.allocate(request("dave"))["status"] == "unavailable"
    assert r.get(KEY + "gpu:4") == "[1, 2]"


def test_heartbeat_keeps_unknown_fields_on_real_redis(store, r):
    now = time.time()
    r.set(KEY + "gpu_count", 1)
    state = {
        "user": "alice",
        "actual_user": "alice",
        "type": "run",
        "start_time": go_time(now - 60),
        "last_heartbeat": now - 50,
        "reservation_id": "tok",
        "expiry_time": None,
        "tags": ["a", "b/c"],
        "nested": {"k": 1.5, "big": 1234567890123},
        "note": 'über ✓ "q"',
    }
    r.set(KEY + "gpu:0", json.dumps(state))
    assert store.script("heartbeat", token="tok", gpus=[0]) == {"lost": []}
    after = gpu_state(r, 0)
    assert after["last_heartbeat"] == pytest.approx(time.time(), abs=5)
    assert isinstance(after["last_heartbeat"], (int, float))
    for key in ("user", "start_time", "expiry_time", "tags", "nested", "note", "reservation_id"):
        assert after[key] == state[key], key


def test_mru_from_go_records_on_real_redis(store, r):
    now = time.time()
    r.mset({KEY + "gpu_count": 4, KEY + "provider": "fake"})
    add_record(r, "alice", 2, now - 100, now - 50)
    rec = {
        "user": "alice",
        "gpu_id": 3,
        "start_time": go_time(now - 100),
        "end_time": go_time(now - 10),
        "duration_seconds": 90,
        "reservation_type": "run",
    }
    r.zadd(KEY + "usage_history_sorted", {json.dumps(rec): now - 10})
    pool = chg.Pool(store, store.config, chg.FakeProvider())
    order = [pool.allocate(request("alice"))["gpus"][0] for _ in range(4)]
    assert order == [3, 2, 0, 1]


def test_a_big_pool_on_real_redis(store, r):
    store.script("admin", count=20000, provider="fake", force=False)
    pool = chg.Pool(store, store.config, chg.FakeProvider())
    assert pool.allocate(request("alice", ids=[19999]))["gpus"] == [19999]
    snap = chg.Snapshot(store.script("snapshot"))
    assert snap.count == 20000 and snap.gpus[19999].held
