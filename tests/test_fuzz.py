"""Random argument vectors for every command: the exit status is always 0, 1 or 2 and
there is never a traceback.  Each example starts a process, so the runs are few.

`run` and `web` would start something long-lived, so their vectors always hold an
invalid value first: they must end in a usage error (2)."""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from poolstate import init_pool

COMMANDS = ["admin", "status", "run", "reserve", "release", "report", "queue", "web"]

text = st.one_of(
    st.sampled_from(["", " ", "x", "-", "--", "-x", "ünïcödé ✓", "a,b", "a\nb", "%s", "{}"]),
    # A real argv holds no NUL and only encodable text: exec() can pass nothing else.
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12),
)
counts = st.sampled_from(["1", "2", "3", "8", "9", "0", "-1", "1.5", "x", "", "65537"])
gpu_ids = st.sampled_from(["0", "1,3", "7", "3,1", "8", "1,1", "-1", "a", "", "0,,1", " 2"])
durations = st.sampled_from(
    [
        "30s",
        "1h",
        "0.5h",
        "1h30m",
        "2d",
        "0",
        "0s",
        "5",
        "-1h",
        "",
        "1y",
        "h",
        "1e3s",
        "106751d",
        "9" * 400 + "d",
    ]
)
flag = None  # a switch: no value

# command -> {option: strategy of its value, or None for a switch}
OPTIONS = {
    "admin": {"--gpus": counts, "-g": counts, "--force": flag,
              "--provider": st.sampled_from(["nvidia", "amd", "fake", "intel", ""])},
    "status": {"--json": flag, "-j": flag, "--no-color": flag},
    "reserve": {"--gpus": counts, "-G": gpu_ids, "--gpu-ids": gpu_ids, "--duration": durations,
                "-d": durations, "--force": flag, "-f": flag, "--wait": durations,
                "--note": text, "-n": text, "--user": text, "-u": text, "--short": flag,
                "-s": flag},
    "release": {"--gpu-ids": gpu_ids, "-G": gpu_ids},
    "report": {"--days": st.sampled_from(["1", "7", "30", "90", "0", "91", "x", ""]),
               "-j": flag, "--json": flag},
    "queue": {"--json": flag, "-j": flag},
    "run": {"--gpus": counts, "--gpu-ids": gpu_ids, "--timeout": durations,
            "--signal": st.sampled_from(["INT", "TERM", "usr1", "9", "NOPE", "0"]),
            "--kill-after": durations, "--nonblock": flag, "--wait": durations,
            "--note": text, "--user": text},
    "web": {"--host": st.sampled_from(["127.0.0.1", "0.0.0.0"]),
            "--port": st.sampled_from(["8080", "0", "x", "70000"]), "--demo": flag},
}  # fmt: skip
# An argument error that `run` and `web` meet before anything starts.
INVALID_FIRST = {"run": ["--gpus", "0"], "web": ["--port", "0"]}


def global_options(redis_server, tmp_path):
    """Mostly valid values (so that commands get to run), some invalid ones."""
    config = tmp_path / "fuzz.toml"
    config.write_text('[reserve]\nduration = "1h"\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("[reserve\n")
    url, port = redis_server.url, str(redis_server.port)
    # Only our server, invalid values and a closed port: never a Redis on 6379.
    return {
        "--redis-url": st.sampled_from(
            [url, url, redis_server.unix_url, "redis://:pw@127.0.0.1:1/0", "", "http://x"]
        ),
        "--redis-port": st.sampled_from([port, port, port, "0", "abc", "70000"]),
        "--redis-db": st.sampled_from(["0", "0", "1", "-1", "x"]),
        "--memory-threshold": st.sampled_from(["0", "1024", "1024", "-1", "x", "99999999999"]),
        "--config": st.sampled_from([str(config), str(config), str(broken), str(tmp_path / "no")]),
    }


def option_units(data, options, label, most):
    """Draw up to `most` options of `options`, each as a list of tokens."""
    units = []
    names = sorted(options)
    for name in data.draw(st.lists(st.sampled_from(names), max_size=most), label=label):
        strategy = options[name]
        units.append([name] if strategy is None else [name, data.draw(strategy, label=name)])
    return units


def draw_argv(data, command, global_opts):
    before = option_units(data, global_opts, "global options before", 1)
    after = option_units(data, global_opts, "global options after", 1)
    after += option_units(data, OPTIONS[command], "options", 4)
    if command == "admin":
        after.append(["--gpus", data.draw(counts, label="admin --gpus")])
    after = data.draw(st.permutations(after), label="order")
    extra = data.draw(st.sampled_from([[]] * 6 + [["extra"], ["--help"]]), label="extra")
    argv = [token for unit in before for token in unit] + [command]
    argv += INVALID_FIRST.get(command, [])
    argv += [token for unit in after for token in unit] + extra
    if command == "reserve":
        argv.append("--nonblock")  # never wait in the queue (with --wait: a usage error)
    if command == "run":
        argv += ["--", "true"]
    return argv


@pytest.mark.parametrize("command", COMMANDS)
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_arguments_exit_0_1_or_2_without_traceback(
    cli, r, redis_server, tmp_path, command, data
):
    if not r.exists("canhazgpu:gpu_count"):
        init_pool(r, 8)
    argv = draw_argv(data, command, global_options(redis_server, tmp_path))
    p = cli(*argv, timeout=30)
    event(f"exit {p.returncode}")  # --hypothesis-show-statistics shows the spread
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode in (0, 1, 2), (argv, p.returncode, p.stdout, p.stderr)
    if p.returncode != 0:
        assert p.stderr.strip(), argv
    if p.returncode == 2:
        assert p.stdout == "", argv
    if command in INVALID_FIRST:
        assert p.returncode == 2, (argv, p.stdout, p.stderr)


# --------------------------------------------------------------------------- config files

KNOWN_KEYS = ["redis.url", "redis.host", "redis.port", "redis.db", "memory.threshold",
              "heartbeat.interval", "heartbeat.timeout", "queue.heartbeat_timeout",
              "run.gpus", "run.timeout", "run.signal", "run.kill_after", "run.wait",
              "reserve.gpus", "reserve.duration", "reserve.wait", "report.days",
              "web.host", "web.port", "redis-url", "redis-port", "memory-threshold"]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            "",
            "30s",
            "1h",
            "0s",
            "-1m",
            "9" * 400 + "d",
            "redis://h:1/0",
            "unix:///x.sock",
            "TERM",
            "abc",
            "6379",
            "1e309",
        ]
    ),  # fmt: skip
    st.text(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=4)
config_keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=12))
config_docs = st.dictionaries(config_keys, values, max_size=6)


def nest(flat):
    """{'a.b': v} -> {'a': {'b': v}}; a key that is both a section and a value keeps one."""
    doc = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        here = doc
        for section in sections:
            if not isinstance(here.get(section), dict):
                here[section] = {}
            here = here[section]
        here[name] = value
    return doc


def write_config(path, doc):
    """The doc in the file's format; None when that format cannot hold it."""
    import json

    if path.suffix == ".json":
        path.write_text(json.dumps(doc))
    elif path.suffix == ".yaml":
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(doc))
    else:
        try:
            path.write_text(toml_dumps(doc))
        except ValueError:
            return None
    return path


def toml_dumps(doc, prefix=""):
    """A small TOML writer for the fuzzer (tomllib reads, it does not write)."""
    import json

    def value(v):
        if v is None:
            raise ValueError("TOML has no null")
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)  # a basic string: JSON's escapes are TOML's

    plain = [f"{json.dumps(k)} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = []
    for k, v in doc.items():
        if isinstance(v, dict):
            name = f"{prefix}{json.dumps(k)}"
            tables.append(f"[{name}]\n" + toml_dumps(v, name + "."))
    return "\n".join(plain + tables) + "\n"


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flat=config_docs)
def test_fuzzed_config_files_load_or_fail_with_one_clear_error(tmp_path_factory, suffix, flat):
    """Wrong types, unknown keys, huge values: a Config, or an error naming the file."""
    import canhazgpu as chg

    path = write_config(tmp_path_factory.mktemp("cfg") / f"c{suffix}", nest(flat))
    if path is None:
        return
    try:
        config = chg.Config.load(str(path), environ={})
        config.redis_address().url()
    except chg.CanhazError as e:
        assert e.code in (1, 2) and "\n" not in str(e)
        assert str(path) in str(e), str(e)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(flat=config_docs)
def test_fuzzed_config_files_through_the_cli(cli, r, tmp_path, suffix, flat):
    if not r.exists("canhazgpu:gpu_count"):
        init_pool(r, 8)
    path = write_config(tmp_path / f"fuzz{suffix}", nest(flat))
    if path is None:
        return
    p = cli("--config", path, "status", "--redis-url", cli.env["CANHAZGPU_REDIS_URL"])
    assert "Traceback" not in p.stderr
    assert p.returncode in (0, 1, 2), (flat, p.stderr)
    if p.returncode == 2:
        assert str(path) in p.stderr or "heartbeat" in p.stderr, p.stderr


# --------------------------------------------------------------------------- corrupt Redis state

junk_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(
                                ["user", "actual_user", "type", "start_time", "expiry_time",
                                 "last_heartbeat", "partial_queue_id", "reservation_id",
                                 "heartbeat_timeout", "note", "last_released", "id",
                                 "requested_count", "requested_ids", "allocated_gpus",
                                 "enqueue_time", "gpu_id", "end_time"]), inner, max_size=6)),
    max_leaves=8,
)  # fmt: skip
junk = st.one_of(
    junk_json.map(lambda v: __import__("json").dumps(v)),
    st.sampled_from(["", "{", "null", "[]", "{}", "NaN", "\x00\xff", "1e999", '{"user": 1}']),
    st.binary(max_size=12),
)
SCHEMA_KEYS = ["gpu_count", "provider", "gpu:0", "gpu:2", "usage_history_sorted", "queue",
               "queue:entry:e1", "allocation_lock"]  # fmt: skip


def corrupt(r, key, raw, as_type):
    full = "canhazgpu:" + key
    r.delete(full)
    if as_type == "string":
        r.set(full, raw)
    elif as_type == "zset":
        r.zadd(full, {raw: 1.0, "e1": 1e18})
    elif as_type == "hash":
        r.hset(full, "x", raw)  # the wrong type altogether
    else:
        r.rpush(full, raw)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    damage=st.lists(
        st.tuples(st.sampled_from(SCHEMA_KEYS), junk,
                  st.sampled_from(["string", "string", "string", "zset", "hash", "list"])),
        min_size=1, max_size=3,
    )
)  # fmt: skip
def test_corrupt_values_in_every_key_crash_nothing(r, monkeypatch, tmp_path, damage):
    """Random and corrupt values in the schema's keys: corrupt GPUs show ERROR, the rest
    keeps working, no command crashes, and nothing that was not ours is overwritten."""
    import contextlib
    import io
    import json
    import signal

    import redis

    import canhazgpu as chg

    r.flushdb()
    init_pool(r, 4, provider="fake")
    for key, raw, as_type in damage:
        corrupt(r, key, raw, as_type)
    port = r.connection_pool.connection_kwargs["port"]
    monkeypatch.setenv("CANHAZGPU_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("HOME", str(tmp_path))
    raw = redis.Redis(port=port)  # bytes, as they are
    states = {
        k: raw.get("canhazgpu:" + k)
        for k in ("gpu:0", "gpu:2")
        if raw.type("canhazgpu:" + k) == b"string"
    }
    unreadable = {
        k: v for k, v in states.items() if chg.Reservation(0, v.decode(errors="replace")).error
    }
    handler = signal.getsignal(signal.SIGINT)
    try:
        for argv in (["status", "-j"], ["status"], ["queue", "-j"], ["report", "-j"],
                     ["reserve", "--nonblock", "-G", "1"], ["release"], ["release", "-G", "0"],
                     ["reserve", "--nonblock"]):  # fmt: skip
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = chg.main(argv)
            assert code in (0, 1, 2), (argv, code, err.getvalue())
            if argv == ["status", "-j"] and code == 0:
                rows = json.loads(out.getvalue())
                for key in unreadable:
                    assert rows[int(key.split(":")[1])]["status"] == "ERROR", key
    finally:
        signal.signal(signal.SIGINT, handler)
    for key, value in unreadable.items():
        assert raw.get("canhazgpu:" + key) == value  # an unreadable state is left for an admin
    last = {key: as_type for key, _, as_type in damage}  # a key damaged twice: the last
    for key, as_type in last.items():
        if key.startswith("gpu:") and as_type != "string":  # not a state: never overwritten
            assert raw.type("canhazgpu:" + key).decode() == as_type
    raw.close()
