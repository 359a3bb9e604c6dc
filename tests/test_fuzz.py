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
