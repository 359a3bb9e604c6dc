"""Fast unit tests of canhazgpu.py: durations, time, the Lua scripts (on fakeredis),
Go-format Redis data, report arithmetic, provider parsing, model detection, config.

End-to-end tests of the real CLI against a real redis-server live in tests/."""

import json
import math
import os
import time

import fakeredis
import pytest

import canhazgpu as chg

# --------------------------------------------------------------------------- fixtures


def require_toml():
    """Skip unless tomllib (3.11+) or tomli, what canhazgpu reads TOML with, is there."""
    try:
        import tomllib  # noqa: F401
    except ImportError:
        pytest.importorskip("tomli")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME, no system config files, no CANHAZGPU_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    etc = tmp_path / "etc"
    etc.mkdir()
    monkeypatch.setattr(
        chg,
        "SYSTEM_CONFIGS",
        tuple(str(etc / n) for n in ("config.toml", "config.json", "config.yaml")),
    )
    for var in list(os.environ):
        if var.startswith("CANHAZGPU_"):
            monkeypatch.delenv(var)
    return home


@pytest.fixture
def config(home):
    return chg.Config.load(environ={})


@pytest.fixture
def fake():
    return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)


@pytest.fixture
def store(config, fake):
    return chg.Store(config, client=fake)


NO_HARDWARE = chg.Hardware(None, why="nvidia-smi failed")  # validation unavailable


class StaticProvider(chg.Provider):
    """A provider whose hardware answer is fixed: {index: memory MB}."""

    name = "nvidia"

    def __init__(self, memory):
        super().__init__(len(memory))
        self.memory = memory

    def usage(self):
        return {
            i: chg.GpuUsage(i, f"GPU-{i}", "Test GPU", mb, 81920) for i, mb in self.memory.items()
        }


def init_pool(store, count, provider="fake"):
    reply = store.script("admin", count=count, provider=provider, force=True)
    assert reply["status"] == "ok"


def make_pool(store, config, provider=None):
    return chg.Pool(store, config, provider or chg.FakeProvider())


def request(kind="run", count=1, ids=None, user="alice", display=None, force=False):
    req = chg.Request(
        kind, count, ids=ids, duration=3600.0 if kind == "manual" else None, force=force
    )
    req.actual_user = user
    req.user = display or user
    return req


def allocate(pool, req):
    """One non-blocking allocation step on the fake provider; returns the reply."""
    return pool.allocate(req)


def state(fake, gpu):
    raw = fake.get(f"canhazgpu:gpu:{gpu}")
    return None if raw is None else json.loads(raw)


def put(fake, gpu, value):
    fake.set(f"canhazgpu:gpu:{gpu}", value if isinstance(value, str) else json.dumps(value))


def history(fake):
    """Usage records, oldest first, each with its score."""
    return [
        dict(json.loads(m), score=s)
        for m, s in fake.zrange("canhazgpu:usage_history_sorted", 0, -1, withscores=True)
    ]


def add_history(fake, user, gpu, end, start=None, kind="run", actual=None):
    rec = {
        "user": user,
        "gpu_id": gpu,
        "start_time": start if start is not None else chg.parse_time(end) - 600,
        "end_time": end,
        "duration_seconds": 600,
        "reservation_type": kind,
    }
    if actual:
        rec["actual_user"] = actual
    fake.zadd("canhazgpu:usage_history_sorted", {json.dumps(rec): chg.parse_time(end)})


def rfc(t, offset_hours=0, frac=""):
    """Unix seconds -> RFC 3339 with the given offset, as Go writes it."""
    local = t + offset_hours * 3600
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(local)) + frac
    if offset_hours == 0:
        return base + "Z"
    sign = "+" if offset_hours > 0 else "-"
    h = abs(offset_hours)
    return f"{base}{sign}{int(h):02d}:{int(h * 60) % 60:02d}"


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("2d", 172800),
        ("0.5h", 1800),
        (".5h", 1800),
        ("1.5d", 129600),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("1d2h3m4s", 93784),
        ("2H", 7200),
        (" 45s ", 45),
    ],
)
def test_parse_duration(text, seconds):
    assert chg.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "0",
        "0s",
        "0h0m",
        "0.0h",
        "-5m",
        "-1h30m",
        "5",
        "1.5",
        "h",
        "m30",
        "1x",
        "1h30",
        "30 minutes",
        "1e3s",
        "1.2.3h",
        "nan",
        "inf",
        "1h-30m",
        "+5m",
    ],
)
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        chg.parse_duration(text)


def test_parse_duration_bounds():
    """Go keeps durations as int64 nanoseconds: anything longer cannot be shared."""
    assert chg.parse_duration("106751d") == 106751 * 86400
    for text in ("106752d", "9" * 400 + "d", "1" + "0" * 300 + "s"):
        with pytest.raises(ValueError):
            chg.parse_duration(text)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0h 0m 0s"),
        (5, "0h 0m 5s"),
        (3725, "1h 2m 5s"),
        (90000, "25h 0m 0s"),
        (-3, "0h 0m 0s"),
        (59.9, "0h 0m 59s"),
    ],
)
def test_format_duration(seconds, text):
    assert chg.format_duration(seconds) == text


def test_duration_flags_are_usage_errors():
    convert = chg.arg_type("duration", "duration")
    assert convert("1h30m") == 5400
    for bad in ("0", "0s", "-1h", "", "10"):
        with pytest.raises(chg.argparse.ArgumentTypeError):
            convert(bad)


# --------------------------------------------------------------------------- time

T = 1700000000  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    "value, expected",
    [
        (T, T),
        (T + 0.25, T + 0.25),
        (str(T), T),
        (f"{T}.5", T + 0.5),
        ("2023-11-14T22:13:20Z", T),
        ("2023-11-14T22:13:20z", T),
        ("2023-11-14T22:13:20+00:00", T),
        ("2023-11-15T03:43:20+05:30", T),
        ("2023-11-14T18:13:20-04:00", T),
        ("2023-11-14T18:13:20-0400", T),
        ("2023-11-14T22:13:20.5Z", T + 0.5),
        ("2023-11-14T18:13:20.123456789-04:00", T + 0.123456789),
        ("2023-11-14 22:13:20Z", T),
        (None, None),
        ("", None),
        ("  ", None),
        ("yesterday", None),
        ("2023-11-14", None),
        (True, None),
        ([T], None),
        ({"t": T}, None),
    ],
)
def test_parse_time(value, expected):
    got = chg.parse_time(value)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "value",
    ["2023-13-01T00:00:00Z", "2023-00-10T00:00:00Z", "NaN", "inf", "-Infinity", float("nan")],
)
def test_parse_time_rejects_impossible_values(value):
    """Garbage in Redis must read as 'no time', never as an exception or NaN."""
    assert chg.parse_time(value) is None


def test_rfc3339():
    assert chg.rfc3339(T) == "2023-11-14T22:13:20Z"
    assert chg.rfc3339(T + 0.9) == "2023-11-14T22:13:20Z"
    assert chg.rfc3339(None) is None
    assert chg.parse_time(chg.rfc3339(T)) == T


def test_far_off_times_do_not_break_readers(store, fake):
    """A reader must survive any number another writer left in Redis."""
    assert chg.rfc3339(1e300) is None and chg.rfc3339(float("inf")) is None
    init_pool(store, 1)
    put(fake, 0, {"user": "bob", "type": "manual", "start_time": 1e300, "expiry_time": 1e300})
    rows = chg.status_rows(
        chg.Snapshot(store.script("snapshot")), NO_HARDWARE, store.config, time.time()
    )
    assert rows[0]["status"] == "IN_USE" and "expiry_time" not in rows[0]
    json.dumps(rows)


def test_lua_reads_every_time_form(store, fake):
    """The scripts' own parser (ts) agrees with parse_time: an RFC 3339 expiry with an
    offset and nanoseconds one minute in the past ends the reservation, one a minute
    in the future keeps it."""
    init_pool(store, 6)
    now = time.time()
    forms = [
        lambda t: t,
        lambda t: str(t),
        lambda t: rfc(t),
        lambda t: rfc(t, -4, ".123456789"),
        lambda t: rfc(t, 5.5, ".5"),
        lambda t: rfc(t, 0, ".000000001").replace("Z", "+00:00"),
    ]
    for gpu, form in enumerate(forms):
        put(
            fake,
            gpu,
            {
                "user": "bob",
                "type": "manual",
                "start_time": form(now - 3600),
                "expiry_time": form(now - 60 if gpu % 2 else now + 60),
            },
        )
    store.script("snapshot")
    for gpu in range(6):
        held = "user" in state(fake, gpu)
        assert held == (gpu % 2 == 0), (gpu, state(fake, gpu))


# --------------------------------------------------------------------------- allocation order


def test_lru_never_used_first_then_least_recently_released(store, fake, config):
    init_pool(store, 5)
    now = time.time()
    put(fake, 0, {"last_released": now - 100})
    fake.delete("canhazgpu:gpu:1")  # absent: never used
    put(fake, 2, {})  # never used
    put(fake, 3, {"last_released": rfc(now - 300, -4)})  # Go's form
    put(fake, 4, {"last_released": now - 200})
    pool = make_pool(store, config)
    order = [allocate(pool, request(user=f"u{k}"))["gpus"][0] for k in range(5)]
    assert order == [1, 2, 3, 4, 0]


def test_lru_ties_go_to_the_lowest_id(store, fake, config):
    init_pool(store, 4)  # a fresh pool: every GPU never used
    pool = make_pool(store, config)
    assert allocate(pool, request(count=3))["gpus"] == [0, 1, 2]


def test_mru_per_user_from_usage_history(store, fake, config):
    init_pool(store, 6)
    now = time.time()
    for gpu in range(6):
        put(fake, gpu, {"last_released": now - 1000 + gpu})  # LRU order: 0..5
    add_history(fake, "alice", 4, now - 50, actual="alice")
    add_history(fake, "alice", 2, now - 10, actual="alice")  # alice's most recent
    add_history(fake, "bob", 5, now - 5, actual="bob")
    add_history(fake, "carol", 3, rfc(now - 20, 2))  # a Go record: no actual_user, RFC 3339
    pool = make_pool(store, config)
    assert [allocate(pool, request(user="alice"))["gpus"][0] for _ in range(3)] == [2, 4, 0]
    assert allocate(pool, request(user="carol"))["gpus"] == [3]
    assert allocate(pool, request(user="bob"))["gpus"] == [5]
    assert allocate(pool, request(user="dave"))["gpus"] == [1]


def test_mru_uses_the_real_account_not_the_display_name(store, fake, config):
    init_pool(store, 4)
    now = time.time()
    add_history(fake, "shared", 3, now - 10, actual="alice")
    pool = make_pool(store, config)
    # bob calling himself "shared" does not inherit alice's GPU; alice under any name does.
    assert allocate(pool, request(user="bob", display="shared"))["gpus"] == [0]
    assert allocate(pool, request(user="alice", display="nb"))["gpus"] == [3]


def test_allocation_order_is_deterministic(config, home):
    def run_once():
        fake = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
        store = chg.Store(config, client=fake)
        init_pool(store, 8)
        for gpu, t in enumerate([5, 3, 3, 9, 1, 1, 7, 3]):
            put(fake, gpu, {"last_released": 1700000000 + t})
        add_history(fake, "alice", 6, 1700000100, actual="alice")
        pool = make_pool(store, config)
        return [allocate(pool, request(user="alice"))["gpus"][0] for _ in range(8)]

    first = run_once()
    assert first == [6, 4, 5, 1, 2, 7, 0, 3]
    assert all(run_once() == first for _ in range(3))


def test_allocation_skips_held_unreserved_and_unparseable(store, fake, config):
    init_pool(store, 5, provider="nvidia")
    now = time.time()
    put(fake, 0, {"user": "bob", "type": "run", "start_time": now, "last_heartbeat": now})
    put(fake, 1, "{not json")
    provider = StaticProvider({0: 0, 1: 0, 2: 5000, 3: 1024, 4: 0})  # 3: exactly at threshold
    pool = make_pool(store, config, provider)
    reply = pool.allocate(request(count=2))
    assert reply["status"] == "ok" and reply["gpus"] == [3, 4]
    reply = pool.allocate(request(count=1))
    assert reply["status"] == "unavailable"
    assert (reply["free"], reply["unreserved"]) == (0, 1)
    # --force takes the GPU in use without a reservation, never a held or broken one.
    reply = pool.allocate(request(count=1, force=True))
    assert reply["gpus"] == [2]
    assert fake.get("canhazgpu:gpu:1") == "{not json"
    assert state(fake, 0)["user"] == "bob"


def test_allocation_by_ids_says_why_each_gpu_is_unavailable(store, fake, config):
    init_pool(store, 4, provider="nvidia")
    now = time.time()
    put(fake, 0, {"user": "bob", "type": "manual", "start_time": now, "expiry_time": now + 60})
    put(fake, 1, "garbage")
    pool = make_pool(store, config, StaticProvider({0: 0, 1: 0, 2: 9000, 3: 0}))
    reply = pool.allocate(request(ids=[0, 1, 2, 3], count=4))
    assert reply["status"] == "unavailable"
    reasons = {r["gpu"]: r["reason"] for r in reply["reasons"]}
    assert reasons == {0: "held", 1: "corrupt", 2: "unreserved"}
    assert fake.get("canhazgpu:gpu:3") is None  # nothing taken
    error = chg.allocation_error(reply, request(ids=[0, 1, 2, 3], count=4))
    assert "GPU 0 is reserved by bob (manual)" in str(error)
    assert "GPU 2 is in use without a reservation" in str(error)


def test_allocation_is_all_or_nothing(store, fake, config):
    init_pool(store, 3)
    pool = make_pool(store, config)
    assert allocate(pool, request(count=2, user="bob"))["status"] == "ok"
    reply = allocate(pool, request(count=2))
    assert reply["status"] == "unavailable" and reply["free"] == 1
    assert fake.get("canhazgpu:gpu:2") is None


def test_grant_writes_a_complete_state(store, fake, config):
    init_pool(store, 2)
    pool = make_pool(store, config)
    req = request(kind="manual", user="alice", display="team-a")
    req.note = "notebook"
    before = time.time()
    assert allocate(pool, req)["gpus"] == [0]
    st = state(fake, 0)
    assert st["user"] == "team-a" and st["actual_user"] == "alice"
    assert st["type"] == "manual" and st["note"] == "notebook"
    assert st["reservation_id"] == req.token
    assert isinstance(st["start_time"], (int, float)) and st["start_time"] >= before - 1
    assert st["expiry_time"] == pytest.approx(st["start_time"] + 3600)
    assert st["pid"] == os.getpid() and st["host"]


def test_a_pool_beyond_the_lua_unpack_limit(store, fake, config):
    """--gpus allows up to 65536: every script must read a pool that large."""
    init_pool(store, 9000)
    pool = make_pool(store, config)
    assert allocate(pool, request(ids=[8999]))["gpus"] == [8999]
    snap = chg.Snapshot(store.script("snapshot"))
    assert snap.count == 9000 and snap.gpus[8999].held and not snap.gpus[8998].held


# --------------------------------------------------------------------------- expiry


def test_stale_run_heartbeat_is_ended_with_a_usage_record(store, fake, config):
    init_pool(store, 3)
    now = time.time()
    timeout = config["heartbeat.timeout"]
    put(
        fake,
        0,
        {
            "user": "bob",
            "actual_user": "bob",
            "type": "run",
            "start_time": now - 7200,
            "last_heartbeat": now - timeout - 5,
        },
    )
    put(
        fake,
        1,
        {
            "user": "carol",
            "type": "run",
            "start_time": rfc(now - 600),
            "last_heartbeat": rfc(now - 30, -7, ".25"),
        },
    )
    pool = make_pool(store, config)
    # The allocation script itself ends the stale one, then may hand it out.
    reply = allocate(pool, request(count=2, user="alice"))
    assert reply["gpus"] == [0, 2]
    assert state(fake, 1)["user"] == "carol"
    [rec] = history(fake)
    assert rec["user"] == "bob" and rec["gpu_id"] == 0 and rec["reservation_type"] == "run"
    assert rec["start_time"] == pytest.approx(now - 7200, abs=1e-3)
    assert rec["end_time"] == pytest.approx(now, abs=30)
    assert rec["duration_seconds"] == pytest.approx(rec["end_time"] - rec["start_time"])
    # Scored in whole seconds, as the Go tool reads up to the current whole second.
    assert rec["score"] == math.floor(rec["end_time"])


def test_expired_manual_is_ended_with_a_usage_record(store, fake, config):
    init_pool(store, 2)
    now = time.time()
    put(
        fake,
        0,
        {
            "user": "bob",
            "type": "manual",
            "start_time": rfc(now - 3600, 1),
            "expiry_time": rfc(now - 1, 1),
            "note": "x",
        },
    )
    put(
        fake,
        1,
        {
            "user": "bob",
            "type": "manual",
            "start_time": now - 3600,
            "expiry_time": now + 3600,
            "last_heartbeat": now - 99999,
        },
    )
    snap = chg.Snapshot(store.script("snapshot"))
    assert not snap.gpus[0].held and snap.gpus[1].held  # a manual one has no heartbeat
    assert state(fake, 0) == {"last_released": pytest.approx(now, abs=30)}
    [rec] = history(fake)
    assert (rec["user"], rec["gpu_id"], rec["reservation_type"]) == ("bob", 0, "manual")
    assert rec["duration_seconds"] == pytest.approx(3600, abs=30)


def store_with(fake, **environ):
    return chg.Store(chg.Config.load(environ=environ), client=fake)


def test_a_run_expires_by_the_heartbeat_timeout_it_was_made_under(home, fake):
    """The double booking: a client's own short timeout must not end another's run."""
    short = {"CANHAZGPU_HEARTBEAT_INTERVAL": "10s", "CANHAZGPU_HEARTBEAT_TIMEOUT": "1m"}
    maker = store_with(fake, **short)
    init_pool(maker, 3)
    mine = request(count=1, user="alice")
    assert allocate(make_pool(maker, maker.config), mine)["gpus"] == [0]
    assert (state(fake, 0)["heartbeat_interval"], state(fake, 0)["heartbeat_timeout"]) == (10, 60)
    now = time.time()
    made_long = {"user": "bob", "type": "run", "start_time": now - 300, "last_heartbeat": now - 90}
    put(fake, 1, dict(made_long, heartbeat_interval=60, heartbeat_timeout=900))
    put(fake, 2, made_long)  # a Go record: no terms, so the built-in 15 minutes
    # A viewer with a 1-minute timeout ends neither of bob's runs.
    store_with(fake, **short).script("snapshot", now=now)
    assert state(fake, 1)["user"] == "bob" and state(fake, 2)["user"] == "bob"
    # A viewer with a 2-hour timeout still ends alice's 1-minute run once it is stale.
    patient = store_with(fake, CANHAZGPU_HEARTBEAT_TIMEOUT="2h")
    patient.script("snapshot", now=now + 61)
    assert "user" not in state(fake, 0)
    patient.script("snapshot", now=now + 811)
    assert "user" not in state(fake, 1) and "user" not in state(fake, 2)


def test_a_queue_entry_expires_by_its_own_heartbeat_timeout(home, fake):
    waiter = store_with(fake, CANHAZGPU_QUEUE_HEARTBEAT_TIMEOUT="10m")
    init_pool(waiter, 1)
    holder = request(count=1, user="bob")
    allocate(make_pool(waiter, waiter.config), holder)
    queued = make_pool(waiter, waiter.config).allocate(request(count=1), block=True)
    assert queued["status"] == "queued"
    [entry] = fake.zrange(chg.KEY + "queue", 0, -1)
    now = time.time()
    store_with(fake, CANHAZGPU_QUEUE_HEARTBEAT_TIMEOUT="5s").script("snapshot", now=now + 300)
    assert fake.zrange(chg.KEY + "queue", 0, -1) == [entry]  # kept: 300 s < its 10 minutes
    store_with(fake).script("snapshot", now=now + 601)
    assert fake.zrange(chg.KEY + "queue", 0, -1) == []


def test_a_timeout_shorter_than_two_intervals_is_a_configuration_error(home):
    with pytest.raises(chg.UsageError) as e:
        chg.Config.load(environ={"CANHAZGPU_HEARTBEAT_TIMEOUT": "1m"})
    assert "CANHAZGPU_HEARTBEAT_TIMEOUT" in str(e.value) and "twice" in str(e.value)
    assert "heartbeat.interval 1m (from the built-in default)" in str(e.value)
    config = chg.Config.load(
        environ={"CANHAZGPU_HEARTBEAT_TIMEOUT": "1m", "CANHAZGPU_HEARTBEAT_INTERVAL": "30s"}
    )
    assert config["heartbeat.timeout"] == 60


def test_old_history_is_trimmed_on_write(store, fake, config):
    init_pool(store, 1)
    now = time.time()
    add_history(fake, "old", 0, now - 91 * 86400)
    add_history(fake, "recent", 0, now - 89 * 86400)
    pool = make_pool(store, config)
    req = request(user=chg.current_user())
    allocate(pool, req)
    pool.release(token=req.token)
    assert [r["user"] for r in history(fake)] == ["recent", chg.current_user()]


# --------------------------------------------------------------------------- Go-format states


def test_go_held_state_reads_with_rfc3339_times(store, fake):
    init_pool(store, 2)
    now = float(int(time.time()))
    put(
        fake,
        0,
        {
            "user": "alice",
            "actual_user": "alice",
            "type": "run",
            "start_time": rfc(now - 3726, -4, ".123456789"),
            "last_heartbeat": rfc(now - 5, 2),
            "expiry_time": None,
            "last_released": None,
        },
    )
    put(
        fake,
        1,
        {
            "user": "bob",
            "type": "manual",
            "start_time": rfc(now - 60),
            "expiry_time": rfc(now + 3 * 3600 + 15 * 60 + 45, 9),
            "last_heartbeat": None,
            "last_released": None,
        },
    )
    snap = chg.Snapshot(store.script("snapshot"))
    rows = chg.status_rows(snap, NO_HARDWARE, store.config, now)
    assert rows[0]["status"] == "IN_USE" and rows[0]["type"] == "RUN"
    assert rows[0]["duration"] == "1h 2m 5s"
    # Never seen in use since its start an hour ago: idle, as far as anyone knows.
    assert rows[0]["details"] == "heartbeat 0h 0m 5s ago, idle 1h 2m"
    assert rows[0]["idle"] is True and rows[0]["idle_seconds"] == 3725
    assert rows[0]["last_heartbeat"] == chg.rfc3339(now - 5)
    assert rows[0]["last_heartbeat"].endswith("Z")
    assert rows[1]["details"] == "expires in 3h 15m 45s"
    assert rows[1]["expiry_time"] == chg.rfc3339(now + 3 * 3600 + 15 * 60 + 45)
    assert rows[1]["actual_user"] == "bob" and "last_heartbeat" not in rows[1]


def test_free_states_empty_absent_userless_and_go_nulls(store, fake, config):
    init_pool(store, 5)
    now = float(int(time.time()))
    put(fake, 0, {})
    fake.delete("canhazgpu:gpu:1")
    put(fake, 2, {"start_time": now, "type": "run", "last_heartbeat": now})  # no user
    put(
        fake,
        3,
        {
            "user": "",
            "start_time": None,
            "last_heartbeat": None,
            "expiry_time": None,
            "last_released": rfc(now - 1815, -4),
        },
    )
    put(fake, 4, {"user": "bob", "type": "run", "start_time": now, "last_heartbeat": now})
    snap = chg.Snapshot(store.script("snapshot"))
    rows = chg.status_rows(snap, NO_HARDWARE, store.config, now)
    assert [r["status"] for r in rows] == ["AVAILABLE"] * 4 + ["IN_USE"]
    assert [r["details"] for r in rows[:3]] == ["never used"] * 3
    assert rows[3]["details"] == "free for 0h 30m 15s"
    assert rows[3]["last_released"] == chg.rfc3339(now - 1815)
    pool = make_pool(store, config)
    assert allocate(pool, request(count=4))["gpus"] == [0, 1, 2, 3]


@pytest.mark.parametrize("raw", ["{not json", "null", "42", '"text"', "[1, 2]", ""])
def test_unparseable_state_is_error_and_never_allocated(store, fake, config, raw):
    init_pool(store, 2)
    put(fake, 0, raw)
    snap = chg.Snapshot(store.script("snapshot"))
    rows = chg.status_rows(snap, NO_HARDWARE, store.config, time.time())
    assert rows[0]["status"] == "ERROR" and rows[0]["error"]
    assert rows[1]["status"] == "AVAILABLE"
    pool = make_pool(store, config)
    assert allocate(pool, request(count=2))["status"] == "unavailable"
    assert allocate(pool, request(ids=[0]))["status"] == "unavailable"
    assert allocate(pool, request(count=1))["gpus"] == [1]
    assert fake.get("canhazgpu:gpu:0") == raw  # left for an admin to look at


def test_states_with_fields_of_the_wrong_type(store, fake):
    init_pool(store, 4)
    now = time.time()
    put(fake, 0, {"user": "bob", "type": 5, "start_time": "soon", "last_heartbeat": now})
    put(fake, 1, {"user": ["bob"], "type": "run"})  # not a user: free
    put(fake, 2, {"user": "carol", "type": "manual", "expiry_time": {"t": 1}, "note": 7})
    put(fake, 3, {"user": "dave", "actual_user": 9, "type": None, "last_heartbeat": [1]})
    rows = chg.status_rows(chg.Snapshot(store.script("snapshot")), NO_HARDWARE, store.config, now)
    assert [r["status"] for r in rows] == ["IN_USE", "AVAILABLE", "IN_USE", "IN_USE"]
    assert rows[0]["type"] == "RUN" and rows[0]["duration"] == ""
    assert rows[3]["type"] == "RUN"
    json.dumps(rows)


def test_heartbeat_preserves_unknown_fields(store, fake, config):
    init_pool(store, 2)
    now = time.time()
    go_state = {
        "user": "alice",
        "actual_user": "alice",
        "type": "run",
        "start_time": rfc(now - 60, -4, ".123456789"),
        "last_heartbeat": now - 50,
        "reservation_id": "tok",
        "expiry_time": None,
        "future_field": {"a": [1, 2]},
        "partial_queue_id": "",
        "note": "über ✓",
    }
    put(fake, 0, go_state)
    pool = make_pool(store, config)
    assert pool.heartbeat("tok", [0]) == []
    st = state(fake, 0)
    assert st["last_heartbeat"] == pytest.approx(time.time(), abs=5)
    assert isinstance(st["last_heartbeat"], (int, float))
    for key in ("user", "actual_user", "type", "start_time", "future_field", "note", "expiry_time"):
        assert st[key] == go_state[key], key


def test_heartbeat_is_compare_and_set_on_the_token(store, fake, config):
    init_pool(store, 3)
    now = time.time()
    put(fake, 0, {"user": "bob", "type": "run", "last_heartbeat": now - 50, "reservation_id": "b"})
    put(
        fake, 1, {"user": "alice", "type": "run", "last_heartbeat": now - 50, "reservation_id": "a"}
    )
    pool = make_pool(store, config)
    assert pool.heartbeat("a", [0, 1, 2]) == [0, 2]
    assert state(fake, 0)["last_heartbeat"] == pytest.approx(now - 50)
    assert state(fake, 1)["last_heartbeat"] > now - 5


def test_release_is_compare_and_set_on_owner_and_token(store, fake, config, monkeypatch):
    monkeypatch.setattr(chg, "current_user", lambda: "alice")
    init_pool(store, 4)
    now = time.time()
    put(
        fake,
        0,
        {
            "user": "alice",
            "actual_user": "alice",
            "type": "manual",
            "start_time": now,
            "expiry_time": now + 60,
            "reservation_id": "a",
        },
    )
    put(
        fake,
        1,
        {
            "user": "alice",
            "actual_user": "bob",
            "type": "manual",
            "start_time": now,
            "expiry_time": now + 60,
            "reservation_id": "b",
        },
    )
    put(
        fake,
        2,
        {
            "user": "alice",
            "actual_user": "alice",
            "type": "run",
            "start_time": now,
            "last_heartbeat": now,
            "reservation_id": "r",
        },
    )
    pool = make_pool(store, config)
    assert pool.release(token="nope") == []
    results = pool.release()  # the caller's manual reservations only
    assert [(r["gpu"], r["result"]) for r in results] == [(0, "released")]
    results = pool.release(ids=[1, 2, 3, 9])
    assert [(r["gpu"], r["result"]) for r in results] == [
        (1, "other"),
        (2, "released"),
        (3, "free"),
        (9, "range"),
    ]
    assert state(fake, 1)["actual_user"] == "bob"
    assert sorted(r["gpu_id"] for r in history(fake)) == [0, 2]


def test_admin_force_ends_reservations_with_usage_records(store, fake):
    init_pool(store, 4)
    now = time.time()
    put(fake, 1, {"user": "bob", "type": "run", "start_time": now - 60, "last_heartbeat": now})
    put(
        fake,
        3,
        {"user": "carol", "type": "manual", "start_time": rfc(now - 120), "expiry_time": now + 60},
    )
    put(fake, 2, "corrupt")
    assert store.script("admin", count=2, provider="fake", force=False)["status"] == "exists"
    assert state(fake, 1)["user"] == "bob"
    reply = store.script("admin", count=2, provider="nvidia", force=True)
    assert reply == {"status": "ok", "ended": 2, "old": 4}
    assert fake.get("canhazgpu:gpu_count") == "2" and fake.get("canhazgpu:provider") == "nvidia"
    assert sorted((r["user"], r["gpu_id"]) for r in history(fake)) == [("bob", 1), ("carol", 3)]
    assert fake.get("canhazgpu:gpu:2") is None and fake.get("canhazgpu:gpu:3") is None
    assert "user" not in state(fake, 1)


# --------------------------------------------------------------------------- report

NOW = 1750000000.0
H = 3600.0


class Held:
    """A held GPU as report_for passes it: user, kind, time(field)."""

    def __init__(self, user, kind, start):
        self.user, self.kind, self.start = user, kind, start
        self.owner = user  # the real account: no --user display name here
        self.data = {}

    def idle_seconds(self, now):
        return 0.0

    def time(self, field):
        return self.start if field == "start_time" else None


def record(user, start, end, kind="run"):
    return {
        "user": user,
        "gpu_id": 0,
        "start_time": start,
        "end_time": end,
        "duration_seconds": chg.parse_time(end) - chg.parse_time(start),
        "reservation_type": kind,
    }


def test_report_arithmetic_clips_to_the_window():
    since = NOW - 86400
    records = [
        record("alice", NOW - 3 * H, NOW - 1 * H),  # 2h inside
        record("alice", since - 6 * H, since + 4 * H, "manual"),  # straddles: 4h inside
        record("bob", since - 5 * H, since - 1 * H),  # ended before the window: out
        record("bob", chg.rfc3339(NOW - 2 * H), chg.rfc3339(NOW - H), "manual"),  # Go: RFC 3339
        record("carol", NOW - 10, NOW + 100),  # ends in the "future" (clock skew): clipped
    ]
    held = [Held("bob", "run", NOW - 3 * H), Held("dave", "manual", NOW - 48 * H)]
    rep = chg.build_report(records, held, 1, NOW)
    users = {u["name"]: u for u in rep["users"]}
    assert set(users) == {"alice", "bob", "carol", "dave"}
    assert users["alice"]["gpu_hours"] == pytest.approx(6)
    assert (users["alice"]["run_count"], users["alice"]["manual_count"]) == (1, 1)
    assert users["bob"]["gpu_hours"] == pytest.approx(4)  # 1h done + 3h in progress
    assert (users["bob"]["run_count"], users["bob"]["manual_count"]) == (1, 1)
    assert users["carol"]["gpu_hours"] == pytest.approx(10 / 3600, abs=1e-4)
    assert users["dave"]["gpu_hours"] == pytest.approx(24)  # in progress, clipped
    total = 6 + 4 + 10 / 3600 + 24
    assert rep["total_gpu_hours"] == pytest.approx(total, abs=1e-4)
    assert rep["total_reservations"] == 6
    assert rep["unique_users"] == 4
    assert [u["name"] for u in rep["users"]] == ["dave", "alice", "bob", "carol"]
    assert users["dave"]["percentage"] == pytest.approx(100 * 24 / total, abs=0.01)
    assert sum(u["percentage"] for u in rep["users"]) == pytest.approx(100, abs=0.05)
    assert rep["start_date"] == chg.rfc3339(since) and rep["end_date"] == chg.rfc3339(NOW)
    assert rep["days"] == 1


def test_report_skips_malformed_records():
    records = [
        {"user": ["x"], "start_time": NOW - H, "end_time": NOW},
        {"user": None, "start_time": NOW - H, "end_time": NOW},
        {"user": "a", "start_time": NOW - H, "end_time": "garbage"},
        {"user": "b", "start_time": NOW + H, "end_time": NOW - 1},  # ends before it starts
        {"user": "c", "start_time": NOW - H, "end_time": NOW, "reservation_type": 3},
    ]
    rep = chg.build_report(records, [], 1, NOW)
    assert [(u["name"], u["gpu_hours"], u["run_count"]) for u in rep["users"]] == [
        ("c", 1.0, 1),
        ("b", 0.0, 1),
    ]


def test_report_of_nothing():
    rep = chg.build_report([], [], 30, NOW)
    assert rep["users"] == [] and rep["total_gpu_hours"] == 0
    assert rep["total_reservations"] == 0 and rep["unique_users"] == 0


def test_report_for_reads_history_legacy_keys_and_held_gpus(store, fake):
    init_pool(store, 3)
    now = time.time()
    add_history(fake, "alice", 0, now - 3600, start=now - 3 * 3600)  # 2h
    add_history(fake, "alice", 1, now - 40 * 86400, start=now - 41 * 86400)  # outside 30 days
    legacy = record("bob", rfc(now - 7200), rfc(now - 3600))  # 1h, old Go per-record key
    fake.set(f"canhazgpu:usage_history:{int(now)}:bob:2", json.dumps(legacy))
    put(
        fake,
        2,
        {"user": "carol", "type": "manual", "start_time": now - 1800, "expiry_time": now + 600},
    )
    put(
        fake,
        1,
        {
            "user": "dave",
            "type": "run",
            "start_time": now - 600,
            "last_heartbeat": now,
            "partial_queue_id": "q1",
        },
    )
    fake.zadd("canhazgpu:queue", {"q1": int(now * 1e9)})  # a live waiter gathering GPUs
    fake.set(
        "canhazgpu:queue:entry:q1",
        json.dumps(
            {
                "id": "q1",
                "user": "dave",
                "actual_user": "dave",
                "requested_count": 2,
                "allocated_gpus": [1],
                "reservation_type": "run",
                "enqueue_time": now,
                "last_heartbeat": now,
            }
        ),
    )
    rep = chg.report_for(chg.Pool(store, store.config), 30, now=now)
    hours = {u["name"]: u["gpu_hours"] for u in rep["users"]}
    assert hours == pytest.approx({"alice": 2.0, "bob": 1.0, "carol": 0.5})
    assert rep["total_gpu_hours"] == pytest.approx(3.5)
    assert rep["total_reservations"] == 3


# --------------------------------------------------------------------------- providers: nvidia

UUID = [f"GPU-5e3b7c2a-1f2d-4c7e-9a8b-0c1d2e3f{i:04x}" for i in range(4)]

NVIDIA_GPUS = (
    f"0, {UUID[0]}, NVIDIA H100 80GB HBM3, 8452, 81559\n"
    f"1, {UUID[1]}, NVIDIA A100-SXM4-80GB, rev 2, [N/A], 81920\n"
    f"2, {UUID[2]}, NVIDIA GeForce RTX 4090, [Insufficient Permissions], [Not Supported]\n"
    f"3, {UUID[3]}, Tesla V100-SXM2-16GB, 45, 16384\n"
)
NVIDIA_APPS = (
    f"12345, /usr/bin/python3, {UUID[0]}, 8000\n"
    f"67890, jupyter-lab, {UUID[0]}, 452\n"
    f"4242, /opt/my app, v2/bin/python, {UUID[1]}, 2048\n"
    f"777, /usr/bin/python3, {UUID[2]}, [Insufficient Permissions]\n"
    f"888, /usr/bin/python3, {UUID[2]}, [Not Supported]\n"
    "999, /usr/bin/python3, GPU-00000000-dead-beef-0000-000000000000, 5000\n"
)


def test_parse_nvidia():
    gpus = chg.parse_nvidia(NVIDIA_GPUS, NVIDIA_APPS)
    assert sorted(gpus) == [0, 1, 2, 3]
    g0, g1, g2, g3 = (gpus[i] for i in range(4))
    assert (g0.uuid, g0.name, g0.memory_used, g0.memory_total) == (
        UUID[0],
        "NVIDIA H100 80GB HBM3",
        8452,
        81559,
    )
    assert [(p.pid, p.name, p.memory_mb) for p in g0.processes] == [
        (12345, "python3", 8000),
        (67890, "jupyter-lab", 452),
    ]
    assert g1.name == "NVIDIA A100-SXM4-80GB, rev 2"
    assert g1.memory_used is None and g1.used_mb == 2048  # from its processes
    assert [(p.pid, p.name) for p in g1.processes] == [(4242, "python")]
    assert g2.memory_used is None and g2.memory_total is None
    assert [(p.pid, p.memory_mb) for p in g2.processes] == [(777, None), (888, None)]
    assert g2.used_mb is None and not g2.in_use(0)
    assert g3.used_mb == 45 and g3.processes == []
    # A process on a GPU nvidia-smi did not list (e.g. hidden by CUDA_VISIBLE_DEVICES) is dropped.
    assert sum(len(g.processes) for g in gpus.values()) == 5


@pytest.mark.parametrize("apps", ["", "\n", "\n\n"])
def test_parse_nvidia_without_processes(apps):
    gpus = chg.parse_nvidia(f"0, {UUID[0]}, NVIDIA H100 80GB HBM3, 0, 81559\n", apps)
    assert gpus[0].processes == [] and gpus[0].used_mb == 0


@pytest.mark.parametrize(
    "gpu_text, apps",
    [
        ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", ""),
        ("\x1b[31mSegmentation fault?? <html>not csv</html>\n", ""),
    ],
)
def test_parse_nvidia_rejects_unexpected_output(gpu_text, apps):
    with pytest.raises(chg.ProviderError):
        chg.parse_nvidia(gpu_text, apps)


def test_memory_threshold_is_strict():
    gpu = chg.GpuUsage(0, "u", "n", 1024, 81920)
    assert not gpu.in_use(1024) and gpu.in_use(1023)


@pytest.mark.parametrize(
    "text, mb",
    [
        ("8452", 8452),
        ("8452 MiB", 8452),
        (" 12 ", 12),
        ("[N/A]", None),
        ("[Not Supported]", None),
        ("[Insufficient Permissions]", None),
        ("N/A", None),
        ("", None),
        ("[Unknown Error]", None),
    ],
)
def test_megabytes(text, mb):
    assert chg.megabytes(text) == mb


# --------------------------------------------------------------------------- providers: amd

AMD_UUID = [f"c4ff74a1-0000-1000-80d3-7e2f5a9b{i:04x}" for i in range(3)]


def amd_list():
    return [
        {
            "gpu": i,
            "bdf": f"0000:{5 + 16 * i:02x}:00.0",
            "uuid": AMD_UUID[i],
            "kfd_id": 40000 + i,
            "node_id": 2 + i,
            "partition_id": 0,
        }
        for i in range(3)
    ]


def amd_metric():
    def mem(used, total=196592):
        return {
            "total_vram": {"value": total, "unit": "MB"},
            "used_vram": used,
            "free_vram": {"value": 190000, "unit": "MB"},
            "total_gtt": {"value": 257579, "unit": "MB"},
        }

    return [
        {"gpu": 0, "mem_usage": mem({"value": 8741, "unit": "MB"})},
        {"gpu": 1, "mem_usage": mem({"value": 283, "unit": "MB"})},
        {"gpu": 2, "mem_usage": mem("N/A", "N/A")},
    ]


def amd_process():
    info = {
        "name": "python3",
        "pid": 4242,
        "memory_usage": {
            "gtt_mem": {"value": 2097152, "unit": "B"},
            "cpu_mem": {"value": 4202496, "unit": "B"},
            "vram_mem": {"value": 8858370048, "unit": "B"},
        },
        "mem_usage": {"value": 8858370048, "unit": "B"},
        "usage": {"gfx": {"value": 0, "unit": "ns"}},
        "cu_occupancy": "N/A",
    }
    none = [{"process_info": "No running processes detected"}]
    return [
        {"gpu": 0, "process_list": [{"process_info": info}]},
        {"gpu": 1, "process_list": none},
        {"gpu": 2, "process_list": none},
    ]


@pytest.mark.parametrize("shape", ["rocm6", "rocm7"])
def test_parse_amd(shape):
    def dump(doc):
        return json.dumps({"gpu_data": doc} if shape == "rocm7" else doc, indent=4)

    gpus = chg.parse_amd(dump(amd_list()), dump(amd_metric()), dump(amd_process()))
    assert sorted(gpus) == [0, 1, 2]
    assert gpus[0].uuid == AMD_UUID[0]
    assert (gpus[0].memory_used, gpus[0].memory_total) == (8741, 196592)
    assert [(p.pid, p.name, p.memory_mb) for p in gpus[0].processes] == [(4242, "python3", 8448)]
    assert gpus[0].in_use(1024)
    assert gpus[1].processes == [] and gpus[1].used_mb == 283 and not gpus[1].in_use(1024)
    assert gpus[2].memory_used is None and gpus[2].processes == []


def test_parse_amd_rejects_non_json():
    with pytest.raises(chg.ProviderError):
        chg.parse_amd("GPU: 0\n    MEM_USAGE: {'total_vram': 'N/A'\n", "[]", "[]")


@pytest.mark.parametrize(
    "value, mb",
    [
        ({"value": 8858370048, "unit": "B"}, 8448),
        ({"value": 2, "unit": "GB"}, 2048),
        ({"value": 512, "unit": "MB"}, 512),
        (100, 100),
        ("N/A", None),
        (None, None),
        ({"value": "N/A", "unit": "MB"}, None),
    ],
)
def test_amd_megabytes(value, mb):
    assert chg.amd_megabytes(value) == mb


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(chg.CanhazError) as e:
        chg.Provider.create("intel", 8)
    assert "intel" in str(e.value) and e.value.code == 1
    assert isinstance(chg.Provider.create("amd", 2), chg.AmdProvider)


def test_fake_provider_is_idle():
    usage = chg.FakeProvider(3).usage()
    assert sorted(usage) == [0, 1, 2]
    assert all(g.used_mb == 0 and not g.processes for g in usage.values())


def test_inspect_processes_owner_and_unknown_pids():
    gpus = chg.parse_nvidia(
        f"0, {UUID[0]}, NVIDIA H100 80GB HBM3, 8452, 81559\n",
        f"{os.getpid()}, python3, {UUID[0]}, 4000\n4194999, python3, {UUID[0]}, 4000\n",
    )
    chg.inspect_processes(gpus)
    mine, foreign = gpus[0].processes
    assert mine.owner == chg.current_user()
    assert foreign.owner is None and foreign.model is None  # another PID namespace


# --------------------------------------------------------------------------- model detection


@pytest.mark.parametrize(
    "cmdline, provider, model",
    [
        (
            ["vllm", "serve", "meta-llama/Llama-3-8B", "--tensor-parallel-size", "2"],
            "meta-llama",
            "meta-llama/Llama-3-8B",
        ),
        (
            ["/opt/venv/bin/vllm", "serve", "Qwen/Qwen2-7B-Instruct"],
            "Qwen",
            "Qwen/Qwen2-7B-Instruct",
        ),
        (
            [
                "python3",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                "mistralai/Mistral-7B-v0.1",
                "--port",
                "8000",
            ],
            "mistralai",
            "mistralai/Mistral-7B-v0.1",
        ),
        (["python", "serve.py", "--model=google/gemma-2b"], "google", "google/gemma-2b"),
        (
            [
                "lm_eval",
                "--model",
                "hf",
                "--model_args",
                "pretrained=EleutherAI/pythia-160m,dtype=float16",
                "--tasks",
                "hellaswag",
            ],
            "EleutherAI",
            "EleutherAI/pythia-160m",
        ),
        (
            [
                "lm_eval",
                "--model",
                "vllm",
                "--model_args=pretrained=meta-llama/Llama-2-7b-hf,tensor_parallel_size=2",
            ],
            "meta-llama",
            "meta-llama/Llama-2-7b-hf",
        ),
        (
            ["lm_eval", "--model_args", "dtype=float16,pretrained=org/m", "--model", "hf"],
            "org",
            "org/m",
        ),
        (["vllm", "serve", "/models/llama-3-8b"], "local", "/models/llama-3-8b"),
        (["python", "x.py", "--model", "./checkpoints/run1"], "local", "./checkpoints/run1"),
        (["python", "x.py", "--model", "~/ckpt"], "local", "~/ckpt"),
        (["python", "x.py", "--model", "gpt2"], "", "gpt2"),
    ],
)
def test_detect_model(cmdline, provider, model):
    assert chg.detect_model(cmdline) == {"provider": provider, "model": model}


@pytest.mark.parametrize(
    "cmdline",
    [
        [],
        ["python3", "train.py"],
        ["python", "x.py", "--model"],
        ["vllm", "serve", "--help"],
        ["lm_eval", "--model_args", "dtype=float16"],
        ["jupyter-lab", "--port", "8888"],
        ["myserve", "serve", "x/y"],
    ],
)
def test_detect_no_model(cmdline):
    assert chg.detect_model(cmdline) is None


# --------------------------------------------------------------------------- configuration


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_defaults(config):
    assert config["redis.url"] is None
    assert (config["redis.host"], config["redis.port"], config["redis.db"]) == (
        "localhost",
        6379,
        0,
    )
    assert config["memory.threshold"] == 1024
    assert config["heartbeat.interval"] == 60
    assert config["heartbeat.timeout"] == 900
    assert config["queue.heartbeat_timeout"] == 120


def test_config_precedence_flag_env_user_system_default(home, tmp_path, monkeypatch):
    system = write(
        tmp_path / "etc" / "config.json",
        json.dumps({"redis": {"port": 1111, "host": "sys", "db": 1}, "memory": {"threshold": 11}}),
    )
    write(home / ".canhazgpu.json", json.dumps({"redis": {"port": 2222, "host": "usr"}}))
    environ = {"CANHAZGPU_REDIS_PORT": "3333"}
    config = chg.Config.load(environ=environ)
    assert config["redis.port"] == 3333  # env > user file
    assert config["redis.host"] == "usr"  # user file > system file
    assert config["redis.db"] == 1  # system file > default
    assert config["memory.threshold"] == 11
    assert config["heartbeat.timeout"] == 900  # default
    os.unlink(home / ".canhazgpu.json")
    assert chg.Config.load(environ={})["redis.port"] == 1111
    os.unlink(system)
    assert chg.Config.load(environ={})["redis.port"] == 6379
    # A flag beats the environment (App applies the flags).
    write(home / ".canhazgpu.json", json.dumps({"redis": {"port": 2222}}))
    monkeypatch.setenv("CANHAZGPU_REDIS_PORT", "3333")
    monkeypatch.setenv("CANHAZGPU_MEMORY_THRESHOLD", "77")
    app = chg.App(chg.build_parser().parse_args(["report", "--redis-port", "4444"]))
    assert app.config["redis.port"] == 4444 and app.config["memory.threshold"] == 77
    app = chg.App(chg.build_parser().parse_args(["--memory-threshold", "5", "report"]))
    assert app.config["memory.threshold"] == 5 and app.config["redis.port"] == 3333


def test_empty_environment_values_are_ignored(config, home):
    config = chg.Config.load(environ={"CANHAZGPU_REDIS_PORT": "", "CANHAZGPU_REDIS_HOST": ""})
    assert config["redis.port"] == 6379 and config["redis.host"] == "localhost"


def test_config_file_formats_yaml_toml_json_and_go_keys(home, tmp_path):
    pytest.importorskip("yaml")
    require_toml()
    write(
        home / ".canhazgpu.yaml",
        "redis-host: gohost\nredis-port: 6390\nmemory-threshold: 512\n"
        "heartbeat:\n  timeout: 30m\nreserve:\n  duration: 2h\nrun:\n  signal: TERM\n",
    )
    config = chg.Config.load(environ={})
    assert (config["redis.host"], config["redis.port"]) == ("gohost", 6390)
    assert config["memory.threshold"] == 512
    assert config["heartbeat.timeout"] == 1800
    assert config["reserve.duration"] == 7200
    assert config["run.signal"] == 15
    toml = write(tmp_path / "c.toml", 'redis-url = "redis://h:1/2"\n[report]\ndays = 7\n')
    config = chg.Config.load(str(toml), environ={})
    assert config["redis.url"] == "redis://h:1/2" and config["report.days"] == 7
    js = write(tmp_path / "c.json", '{"queue": {"heartbeat-timeout": "5m"}, "web": {"port": 9}}')
    config = chg.Config.load(environ={"CANHAZGPU_CONFIG": str(js)})
    assert config["queue.heartbeat_timeout"] == 300 and config["web.port"] == 9
    assert config["redis.host"] == "localhost"  # an explicit file replaces the default ones


def test_user_file_search_order(home):
    write(home / ".canhazgpu.json", '{"redis": {"port": 2}}')
    write(home / ".canhazgpu.toml", "[redis]\nport = 3\n")
    assert chg.Config.load(environ={})["redis.port"] == 2


@pytest.mark.parametrize(
    "name, text, needles",
    [
        (".canhazgpu.json", '{"redis": {"port": 6379,}}', ["malformed"]),
        (".canhazgpu.toml", "[redis\nport = 1\n", ["malformed"]),
        (".canhazgpu.yaml", "redis: [unclosed\n", ["malformed"]),
        (".canhazgpu.json", '["a list"]', ["mapping"]),
        (".canhazgpu.json", '{"redis": {"port": "abc"}}', ["redis.port", "whole number"]),
        (".canhazgpu.json", '{"redis": {"port": 70000}}', ["redis.port", "65535"]),
        (".canhazgpu.json", '{"redis": {"port": true}}', ["redis.port"]),
        (".canhazgpu.json", '{"redis-db": -1}', ["redis.db"]),
        (".canhazgpu.toml", 'memory-threshold = "lots"\n', ["memory.threshold"]),
        (".canhazgpu.toml", '[heartbeat]\ntimeout = "0s"\n', ["heartbeat.timeout"]),
        (".canhazgpu.toml", '[heartbeat]\ntimeout = "10"\n', ["heartbeat.timeout", "duration"]),
        (".canhazgpu.toml", "[heartbeat]\ntimeout = 600\n", ["heartbeat.timeout", "duration"]),
        (".canhazgpu.toml", '[reserve]\nduration = "-2h"\n', ["reserve.duration"]),
        (".canhazgpu.toml", '[run]\nsignal = "NOPE"\n', ["run.signal", "signal"]),
        (".canhazgpu.toml", "[report]\ndays = 91\n", ["report.days"]),
        (".canhazgpu.toml", '[redis]\nhost = ""\n', ["redis.host"]),
        (".canhazgpu.toml", "[redis]\nprot = 1\n", ["redis.prot", "unknown"]),
    ],
)
def test_bad_config_file_names_file_and_key(home, name, text, needles):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    if name.endswith(".toml"):
        require_toml()
    path = write(home / name, text)
    with pytest.raises(chg.UsageError) as e:
        chg.Config.load(environ={})
    message = str(e.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(
    "var, value",
    [
        ("CANHAZGPU_REDIS_PORT", "abc"),
        ("CANHAZGPU_REDIS_PORT", "0"),
        ("CANHAZGPU_REDIS_DB", "-1"),
        ("CANHAZGPU_MEMORY_THRESHOLD", "1.5"),
        ("CANHAZGPU_HEARTBEAT_TIMEOUT", "15"),
        ("CANHAZGPU_HEARTBEAT_INTERVAL", "0s"),
        ("CANHAZGPU_QUEUE_HEARTBEAT_TIMEOUT", "-2m"),
    ],
)
def test_bad_environment_value_names_the_variable(home, var, value):
    with pytest.raises(chg.UsageError) as e:
        chg.Config.load(environ={var: value})
    assert var in str(e.value) and e.value.code == 2


def test_missing_explicit_config_file(home, tmp_path):
    with pytest.raises(chg.UsageError) as e:
        chg.Config.load(str(tmp_path / "nope.toml"), environ={})
    assert "nope.toml" in str(e.value)


def address(environ=None, flags=None, files=()):
    """The Redis URL a Store would use, and where its parts came from."""
    store = chg.Store(chg.Config.load(environ=environ or {}, flags=flags), client=object())
    return store.url, store.address


def test_store_address_from_url_or_host_port(home):
    environ = {
        "CANHAZGPU_REDIS_HOST": "db.example",
        "CANHAZGPU_REDIS_PORT": "6380",
        "CANHAZGPU_REDIS_DB": "3",
    }
    assert address(environ)[0] == "redis://db.example:6380/3"
    url, shown = address({"CANHAZGPU_REDIS_URL": "redis://:hunter2@db.example:6380/3"})
    assert url == "redis://:hunter2@db.example:6380/3"
    assert "hunter2" not in shown and "db.example:6380" in shown
    assert "(from CANHAZGPU_REDIS_URL)" in shown
    assert address()[1] == "redis://localhost:6379/0 (from the built-in default)"


def test_the_address_follows_precedence_part_by_part(home, tmp_path):
    """Command line > environment > user file > system file, for the address as a whole:
    a URL in a file no longer beats the environment's host and port."""
    write(home / ".canhazgpu.json", json.dumps({"redis": {"url": "redis://:pw@filehost:7000/4"}}))
    url, shown = address({"CANHAZGPU_REDIS_HOST": "envhost", "CANHAZGPU_REDIS_PORT": "7001"})
    assert url == "redis://:pw@envhost:7001/4"
    assert str(home / ".canhazgpu.json") in shown and "CANHAZGPU_REDIS_HOST" in shown
    # --redis-host alone keeps the URL's port and db; --redis-db is applied to a URL.
    url, _ = address({"CANHAZGPU_REDIS_URL": "redis://h:6390/2"}, {"redis.host": ("x", "--h")})
    assert url == "redis://x:6390/2"
    url, _ = address({"CANHAZGPU_REDIS_URL": "redis://h:6390/2"}, {"redis.db": (5, "--redis-db")})
    assert url == "redis://h:6390/5"
    # The user file's host beats a system file's URL; an environment URL beats both.
    write(home / ".canhazgpu.json", json.dumps({"redis": {"host": "userhost"}}))
    url, _ = address({"CANHAZGPU_REDIS_URL": "redis://envurl:1/0"})
    assert url == "redis://envurl:1/0"
    # A URL whose password holds '@' and '/' reaches redis-py percent-encoded.
    url, shown = address({"CANHAZGPU_REDIS_URL": "redis://:p@ss/w0rd@h:6379/0"})
    assert url == "redis://:p%40ss%2Fw0rd@h:6379/0" and "w0rd" not in shown
    # A unix socket keeps its db; a host from above switches to TCP.
    url, _ = address({"CANHAZGPU_REDIS_URL": "unix:///run/r.sock?db=2"})
    assert url == "unix:///run/r.sock?db=2"
    url, _ = address({"CANHAZGPU_REDIS_URL": "unix:///run/r.sock"}, {"redis.port": (7, "--p")})
    assert url == "redis://localhost:7/0"


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://alice:hunter2@h/0", "redis://alice:***@h/0"),
        ("rediss://alice:p%40ss@h:6380", "rediss://alice:***@h:6380"),
        ("redis://:p@ss:w0rd@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://:p@ss/w0rd@host/0", "redis://:***@host/0"),
        ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=0"),
        (
            "unix:///run/redis.sock?db=0&password=hunter2",
            "unix:///run/redis.sock?db=0&password=***",
        ),
        ("redis://h:6379/0?password=hunter2&db=1", "redis://h:6379/0?password=***&db=1"),
    ],
)
def test_redacted(url, shown):
    assert chg.redacted(url) == shown


def test_store_failure_is_one_clear_line(config):
    import redis

    store = chg.Store(config, client=object())
    error = store.failure(redis.ConnectionError("Error 111 connecting to localhost:6379. Refused."))
    assert isinstance(error, chg.CanhazError) and error.code == 1
    assert "localhost:6379" in str(error) and "\n" not in str(error) and error.hint


# --------------------------------------------------------------------------- report roll-ups


def random_records(rng, now, n):
    """Records as any client may leave them: short and long, over midnights, odd ones."""
    out = []
    for k in range(n):
        end = now - rng.uniform(0, 95 * 86400)
        length = rng.choice((5, 600, 3600, 5 * 3600, 30 * 3600, 4 * 86400, 40 * 86400))
        rec = record(rng.choice(("alice", "bob", "carol")), end - length, end,
                     rng.choice(("run", "manual")))  # fmt: skip
        rec["gpu_id"] = k % 8
        if rng.random() < 0.3:
            rec["idle_seconds"] = rng.uniform(0, length)
        if rng.random() < 0.05:
            rec["start_time"] = None  # counts from the window's start
        if rng.random() < 0.05:
            rec["end_time"] = chg.rfc3339(end)  # a Go record
        out.append(rec)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_reports_from_roll_ups_equal_reports_from_every_record(store, fake, seed):
    """However the records fall on days and whenever they were folded, a report from
    the per-day roll-ups is the report computed record by record."""
    import random

    rng = random.Random(seed)
    init_pool(store, 8)
    now = time.time()
    records = random_records(rng, now, 400)
    for rec in records:
        end = chg.parse_time(rec["end_time"])
        fake.zadd("canhazgpu:usage_history_sorted", {json.dumps(rec): int(end)})
    pool = make_pool(store, store.config)
    folded_at = now - rng.uniform(0, 3 * 86400)  # an earlier report folded up to here
    chg.report_reply(pool, folded_at - 86400, folded_at)
    for days in (1, 2, 7, 30, 90):
        got = chg.report_for(pool, days, now=now)
        kept = [r for r in records if chg.parse_time(r["end_time"]) >= now - 90 * 86400 - 1]
        want = chg.build_report(kept, [], days, now)
        assert got["total_reservations"] == want["total_reservations"], days
        assert got["total_gpu_hours"] == pytest.approx(want["total_gpu_hours"], abs=1e-3), days
        assert got["total_idle_gpu_hours"] == pytest.approx(want["total_idle_gpu_hours"], abs=1e-3)
        for mine, theirs in zip(got["users"], want["users"]):
            assert (mine["name"], mine["run_count"], mine["manual_count"]) == (
                theirs["name"], theirs["run_count"], theirs["manual_count"])  # fmt: skip
            assert mine["gpu_hours"] == pytest.approx(theirs["gpu_hours"], abs=1e-3)


def test_a_report_reads_the_legacy_keys_once(store, fake):
    init_pool(store, 2)
    now = time.time()
    legacy = record("bob", now - 7200, now - 3600)
    fake.set(f"canhazgpu:usage_history:{int(now)}:bob:1", json.dumps(legacy))
    pool = make_pool(store, store.config)
    assert chg.report_for(pool, 1, now=now)["total_gpu_hours"] == pytest.approx(1)
    assert fake.keys("canhazgpu:usage_history:*") == []  # moved into the sorted set
    assert fake.get("canhazgpu:legacy_migrated")
    # Written later by an old client: never scanned for again.
    fake.set(f"canhazgpu:usage_history:{int(now)}:bob:0", json.dumps(legacy))
    assert chg.report_for(pool, 1, now=now)["total_gpu_hours"] == pytest.approx(1)


def test_a_record_folded_into_summed_days_renews_their_sums(store, fake):
    """A report keeps the sums of its whole days; a record that lands in them later (a
    run of days that ends now) must count in the next report."""
    init_pool(store, 8)
    pool = make_pool(store, store.config)
    now = time.time()
    for k in range(30):
        rec = record("alice", now - k * 86400 - 7200, now - k * 86400 - 3600)
        fake.zadd("canhazgpu:usage_history_sorted", {json.dumps(rec): int(now - k * 86400 - 3600)})
    first = chg.report_for(pool, 30, now=now)
    assert fake.hkeys("canhazgpu:usage_windows")  # the whole days, summed once
    assert chg.report_for(pool, 30, now=now)["total_gpu_hours"] == first["total_gpu_hours"]
    late = record("bob", now - 5 * 86400, now + 100)  # five days, ending after that report
    fake.zadd("canhazgpu:usage_history_sorted", {json.dumps(late): int(now + 100)})
    later = now + 1000
    got = chg.report_for(pool, 30, now=later)
    records = [json.loads(m) for m in fake.zrange("canhazgpu:usage_history_sorted", 0, -1)]
    want = chg.build_report(records, [], 30, later)
    assert got["total_gpu_hours"] == pytest.approx(want["total_gpu_hours"], abs=1e-3)
    assert {u["name"]: u["gpu_hours"] for u in got["users"]}["bob"] == pytest.approx(
        120.03, abs=0.01
    )
