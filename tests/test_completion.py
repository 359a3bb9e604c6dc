"""Shell completion, driven in the real shells: bash (with Debian's bash-completion), zsh and
fish.  A test types a command line and asks the shell what Tab would offer:

  bash  COMP_WORDS/COMP_CWORD set as readline sets them, then the function that
        `complete -p` names (loaded lazily by bash-completion, as on a user's machine);
  zsh   an interactive zsh on a pseudo-terminal (tests/complete.zsh) with compadd captured;
  fish  `complete -C LINE`.

The scripts are found where `make install` puts them (a share/ tree of links), so that the
file names that lazy loading needs are checked too.  The parser is the reference: every
command and option of `canhazgpu.build_parser()` must be offered by each shell, and nothing
else.
"""

import argparse
import importlib.util
import os
import re
import shlex
import stat
import subprocess
import sys
import time

import pytest
from conftest import REPO

COMPLETIONS = REPO / "completions"
BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"
SHELLS = ("bash", "zsh", "fish")
END = "<<end>>"


def load_canhazgpu():
    spec = importlib.util.spec_from_file_location("canhazgpu_for_completion", REPO / "canhazgpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parser_surface():
    """(command -> help, command or "" -> the option strings it accepts), hidden ones left out."""
    parser = load_canhazgpu().build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    def options(p):
        return {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}

    helps = {a.dest: a.help for a in sub._choices_actions}
    surface = {"": options(parser)}
    surface.update({name: options(p) for name, p in sub.choices.items()})
    return helps, surface


HELPS, SURFACE = parser_surface()


# --------------------------------------------------------------------------- drivers


def readline_words(line):
    """COMP_WORDS as readline splits a line: at blanks, and around `=` and `:` (both in
    COMP_WORDBREAKS); a trailing blank starts an empty word."""
    words = re.findall(r"[=:]+|[^\s=:]+", line)
    if not words or line[-1].isspace():
        words.append("")
    return words


class Shells:
    """Runs the three shells on lines, with the completions laid out as `make install` does
    and `canhazgpu` and `chg` on PATH running this checkout (fish completes only commands
    that exist)."""

    def __init__(self, tmp_path, env):
        share = tmp_path / "share"
        bindir = tmp_path / "shell-bin"
        bindir.mkdir()
        for name in ("canhazgpu", "chg"):
            path = bindir / name
            path.write_text(
                f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {REPO}/canhazgpu.py "$@"\n'
            )
            path.chmod(path.stat().st_mode | stat.S_IXUSR)
        self.env = dict(env)
        self.env["PATH"] = f"{bindir}:{env['PATH']}"
        links = {
            "bash-completion/completions/canhazgpu": "canhazgpu.bash",
            "bash-completion/completions/chg": "canhazgpu.bash",
            "fish/vendor_completions.d/canhazgpu.fish": "canhazgpu.fish",
            "fish/vendor_completions.d/chg.fish": "canhazgpu.fish",
        }
        for path, target in links.items():
            (share / path).parent.mkdir(parents=True, exist_ok=True)
            (share / path).symlink_to(COMPLETIONS / target)
        home = tmp_path / "shell-home"
        home.mkdir()
        self.env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_DATA_HOME=str(home / ".local/share"),
            XDG_DATA_DIRS=f"{share}:/usr/share",
            BASH_COMPLETION_USER_DIR=str(home / "no-user-completions"),
        )

    def run(self, argv, lines, timeout=60):
        proc = subprocess.run(
            argv,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
        blocks = proc.stdout.split(END + "\n")
        assert proc.returncode == 0 and len(blocks) == len(lines) + 1, (
            f"{argv[0]} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
        return [
            [tuple((c.split("\t", 1) + [""])[:2]) for c in block.splitlines()]
            for block in blocks[:-1]
        ]

    def bash(self, lines, timeout):
        script = [
            f"source {BASH_COMPLETION}",
            # Outside readline there is no completion for compopt to adjust.
            'compopt() { builtin compopt "$@" 2>/dev/null; return 0; }',
            "tab() {",
            "  local cmd=${COMP_WORDS[0]} spec",
            '  spec=$(complete -p "$cmd" 2>/dev/null) || _completion_loader "$cmd"',
            '  spec=$(complete -p "$cmd") || return',
            "  local func=${spec#*-F }",
            "  COMPREPLY=()",
            '  ${func%% *} "$cmd" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"',
            '  ((${#COMPREPLY[@]} == 0)) || printf "%s\\n" "${COMPREPLY[@]}"',
            "}",
        ]
        for line in lines:
            words = readline_words(line)
            script += [
                f"COMP_LINE={shlex.quote(line)} COMP_POINT={len(line)}",
                f"COMP_WORDS=({' '.join(map(shlex.quote, words))}) COMP_CWORD={len(words) - 1}",
                f"tab; echo '{END}'",
            ]
        return self.run(["bash", "--norc", "--noprofile", "-c", "\n".join(script)], lines, timeout)

    def zsh(self, lines, timeout):
        argv = ["zsh", "-f", str(REPO / "tests" / "complete.zsh"), str(COMPLETIONS), *lines]
        return self.run(argv, lines, timeout)

    def fish(self, lines, timeout):
        script = f"for line in $argv; complete -C $line; echo '{END}'; end"
        return self.run(["fish", "-c", script, *lines], lines, timeout)

    def complete(self, shell, *lines, timeout=60):
        """What Tab offers at the end of each line: a list of (word, description) per line."""
        return getattr(self, shell)(list(lines), timeout)

    def words(self, shell, line, **kwargs):
        return {word for word, _ in self.complete(shell, line, **kwargs)[0]}


@pytest.fixture(scope="module")
def shells(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANHAZGPU_")}
    return Shells(tmp_path_factory.mktemp("completion"), env)


@pytest.fixture
def live(cli, tmp_path):
    """Shells whose `canhazgpu` runs against the test Redis, with a pool of 4 fake GPUs."""
    cli("admin", "--gpus", "4", "--provider", "fake", check=True)
    return Shells(tmp_path, {**cli.env, "CANHAZGPU_COMPLETION_TIMEOUT": "30"})


def options(candidates):
    return {word for word, _ in candidates if word.startswith("-") and word != "--"}


# --------------------------------------------------------------------------- the parser's surface


@pytest.mark.parametrize("shell", SHELLS)
def test_every_command_and_option_of_the_parser_is_offered(shells, shell):
    names = sorted(SURFACE)
    lines = ["canhazgpu "] + [f"canhazgpu {name} -".replace("  ", " ") for name in names]
    results = shells.complete(shell, *lines)
    assert {word for word, _ in results[0]} == set(HELPS)
    for name, offered in zip(names, results[1:]):
        missing = SURFACE[name] - options(offered)
        unknown = options(offered) - SURFACE[name]
        where = f"{shell}: `canhazgpu {name} -`"
        assert not missing, f"{where} does not offer {sorted(missing)}"
        assert not unknown, f"{where} offers {sorted(unknown)}, which the parser does not know"


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_commands_and_long_options_come_with_descriptions(shells, shell):
    commands, *per_command = shells.complete(
        shell, "canhazgpu ", *(f"canhazgpu {name} --" for name in HELPS)
    )
    assert dict(commands) == HELPS
    for name, offered in zip(HELPS, per_command):
        undescribed = [word for word, description in offered if not description]
        assert not undescribed, f"{shell}: `canhazgpu {name} --` without description"


@pytest.mark.parametrize("shell", SHELLS)
def test_chg_completes_like_canhazgpu(shells, shell):
    lines = ["{} ", "{} reserve -", "{} admin --provider ", "{} run -g 2 -- {} sta"]
    ours = shells.complete(shell, *(line.format("canhazgpu", "canhazgpu") for line in lines))
    short = shells.complete(shell, *(line.format("chg", "chg") for line in lines))
    assert short == ours
    assert all(ours), ours


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("shell", SHELLS)
def test_provider_values(shells, shell):
    parser = load_canhazgpu().build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    provider = [a for a in sub.choices["admin"]._actions if "--provider" in a.option_strings]
    choices = provider[0].choices
    all_, short, partial, port = shells.complete(
        shell,
        "canhazgpu admin --provider ",
        "canhazgpu admin -p ",
        "canhazgpu admin --gpus 4 --provider f",
        "canhazgpu web -p ",  # web's -p is its port: nothing to offer
    )
    assert {w for w, _ in all_} == {w for w, _ in short} == set(choices)
    assert [w for w, _ in partial] == ["fake"]
    assert port == []


def test_bash_completes_a_value_after_equals(shells):
    assert shells.words("bash", "canhazgpu admin --provider=f") == {"fake"}
    assert shells.words("bash", "canhazgpu run --signal=te") == {"TERM"}


@pytest.mark.parametrize("shell", SHELLS)
def test_global_options_before_the_command_are_skipped(shells, shell):
    port, config, value = shells.complete(
        shell,
        "canhazgpu --redis-port 6380 rep",
        "canhazgpu --config /etc/canhazgpu/config.toml st",
        "canhazgpu --redis-port ",  # a number: nothing to offer
    )
    assert [w for w, _ in port] == ["report"]
    assert [w for w, _ in config] == ["status"]
    assert value == []


@pytest.mark.parametrize("shell", SHELLS)
def test_redis_url_schemes(shells, shell):
    assert shells.words(shell, "canhazgpu status --redis-url r") == {"redis://", "rediss://"}


@pytest.mark.parametrize("shell", SHELLS)
def test_signal_names_for_run(shells, shell):
    words = shells.words(shell, "canhazgpu run --timeout 1h --signal ")
    assert {"INT", "TERM", "HUP", "KILL", "USR1"} <= words


# --------------------------------------------------------------------------- run -- CMD


@pytest.fixture(scope="module")
def wrapped(shells, tmp_path_factory):
    """A command only this test's PATH has, and a directory with one file in it."""
    root = tmp_path_factory.mktemp("wrapped")
    tool = root / "bin" / "chg-test-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (root / "data").mkdir()
    (root / "data" / "weights.bin").write_text("")
    shells.env["PATH"] = f"{tool.parent}:{shells.env['PATH']}"
    return root


@pytest.mark.parametrize("shell", SHELLS)
def test_run_offers_the_separator_before_the_command(shells, shell):
    assert "--" in shells.words(shell, "canhazgpu run --gpus 2 ")


@pytest.mark.parametrize("shell", SHELLS)
def test_run_completes_the_wrapped_command_like_sudo(shells, wrapped, shell):
    name, ours, files, own_options = shells.complete(
        shell,
        "canhazgpu run --gpus 2 -- chg-test-to",
        "canhazgpu run -g 1 -- canhazgpu sta",
        f"canhazgpu run -- chg-test-tool {wrapped}/data/we",
        "canhazgpu run -- chg-test-tool --",
    )
    assert "chg-test-tool" in {w for w, _ in name}
    assert [w for w, _ in ours] == ["status"]  # canhazgpu's own completion, for the new line
    assert any(w.endswith("weights.bin") for w, _ in files), files
    assert not options(own_options) & SURFACE["run"], "run's options offered after --"


# --------------------------------------------------------------------------- GPU ids from Redis


@pytest.mark.parametrize("shell", SHELLS)
def test_gpu_ids_are_completed_from_status(live, cli, shell):
    cli("reserve", "--gpu-ids", "1", "--duration", "1h", check=True)
    free, listed, mine, long_form = live.complete(
        shell,
        "canhazgpu reserve -G ",
        "canhazgpu run --gpu-ids 0,",
        "canhazgpu release -G ",
        "chg reserve --gpu-ids=",
    )
    assert {w for w, _ in free} == {"0", "2", "3"}  # GPU 1 is held
    assert {w for w, _ in listed} == {"0,2", "0,3"}  # 0 is listed already
    assert {w for w, _ in mine} == {"1"}  # release offers the caller's own
    assert {w.rpartition("=")[2] for w, _ in long_form} == {"0", "2", "3"}
    if shell != "bash":
        assert dict(mine)["1"].startswith("expires in"), mine  # status's details


@pytest.mark.parametrize("shell", SHELLS)
def test_gpu_ids_follow_the_redis_named_on_the_line(live, redis_server, shell):
    live.env["CANHAZGPU_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens there
    line = f"canhazgpu reserve --redis-url {redis_server.url} -G "
    assert live.words(shell, line) == {"0", "1", "2", "3"}


@pytest.mark.parametrize("shell", SHELLS)
def test_gpu_ids_never_wait_for_a_frozen_redis(live, redis_server, shell):
    del live.env["CANHAZGPU_COMPLETION_TIMEOUT"]  # the default, 0.3 s
    redis_server.freeze()  # accepts connections, never answers: status would wait 10 s
    started = time.monotonic()
    assert live.complete(shell, "canhazgpu reserve -G ", timeout=30) == [[]]
    assert time.monotonic() - started < 8, "completion waited for Redis"


def test_the_generated_option_lists_are_up_to_date():
    """The bash and fish option lists are generated from the parser: `make completions`."""
    p = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_completions.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
