"""Every way in, end to end against the test Redis: each install path runs what a user runs
first (admin -> reserve -> status -> run -> release), and the packaging artefacts (`make
install`, sdist and wheel, the man page) hold what they promise.

  1. `pip install .` into a fresh virtual environment;
  2. the single file copied to a bin/ directory, run by the distribution's /usr/bin/python3
     with only its python3-redis and python3-psutil (Debian 12: redis-py 4.3.4, the oldest
     we support);
  3. `python3 canhazgpu.py`.

The virtual environments see the test Python's site packages (redis, psutil) and are
installed with --no-deps --no-build-isolation: no download, a few seconds each.
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
from conftest import REPO, assert_no_traceback


def load_canhazgpu():
    spec = importlib.util.spec_from_file_location("canhazgpu_for_install", REPO / "canhazgpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_parser()  # registers COMMANDS
    return module


CHG = load_canhazgpu()
SYSTEM_PYTHON = "/usr/bin/python3"
DIST_PACKAGES = "/usr/lib/python3/dist-packages/"


def user_flow(argv, env, cwd):
    """What a user runs first, through `argv` (how this install path starts canhazgpu)."""

    def chg(*args):
        proc = subprocess.run(
            [*argv, *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise AssertionError(f"{args}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        assert_no_traceback(proc.stderr, f"stderr of {args}")
        return proc

    assert "provider fake" in chg("admin", "--gpus", "2", "--provider", "fake").stdout
    held = chg("reserve", "--duration", "1h", "--short").stdout
    assert re.fullmatch(r"[01]\n", held), held
    rows = json.loads(chg("status", "--json").stdout)
    assert [row["status"] for row in rows].count("IN_USE") == 1
    chg("run", "--gpus", "1", "--", "true")
    assert f"Released 1 GPU(s): [{held.strip()}]" in chg("release").stdout
    rows = json.loads(chg("status", "--json").stdout)
    assert {row["status"] for row in rows} == {"AVAILABLE"}


def source_copy(tmp_path):
    """The checkout as a user has it, without build outputs (pip and setup.py write there)."""
    dest = tmp_path / "src"
    ignore = shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", ".venv", "__pycache__", ".*_cache", ".hypothesis"
    )
    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
    return dest


def venv(path):
    """A fresh virtual environment that sees this Python's packages (redis, psutil, pip)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
        check=True,
    )
    return path


def pip_install(env_dir, what, cwd):
    proc = subprocess.run(
        [env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps"]
        + ["--no-build-isolation", "--no-index", str(what)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def output(argv, env=None, cwd=None):
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


# --------------------------------------------------------------------------- the three ways in


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv(cli, tmp_path):
    src = source_copy(tmp_path)
    env_dir = venv(tmp_path / "venv")
    pip_install(env_dir, ".", cwd=src)
    bindir = env_dir / "bin"
    assert output([bindir / "chg", "--version"]) == f"canhazgpu {CHG.__version__}\n"
    requires = output(
        [bindir / "python", "-c", "import importlib.metadata as m; print(m.requires('canhazgpu'))"]
    )
    assert "redis>=4.3" in requires and "psutil>=5.9" in requires
    for path in (
        "share/bash-completion/completions/canhazgpu.bash",
        "share/bash-completion/completions/chg.bash",
        "share/zsh/site-functions/_canhazgpu",
        "share/fish/vendor_completions.d/canhazgpu.fish",
        "share/fish/vendor_completions.d/chg.fish",
        "share/man/man1/canhazgpu.1",
    ):
        assert (env_dir / path).is_file(), path
    user_flow([bindir / "canhazgpu"], cli.env, cwd=tmp_path)


def test_copied_file_runs_on_the_distributions_python(cli, tmp_path, fake_smi):
    libs = output(
        [SYSTEM_PYTHON, "-c", "import redis, psutil; print(redis.__file__, psutil.__file__)"]
    ).split()
    assert all(lib.startswith(DIST_PACKAGES) for lib in libs), (
        f"{SYSTEM_PYTHON} should use the distribution's python3-redis and python3-psutil "
        f"(apt-get install python3-redis python3-psutil), not {libs}"
    )
    bindir = tmp_path / "host-bin"
    bindir.mkdir()
    shutil.copy(REPO / "canhazgpu.py", bindir / "canhazgpu")
    (bindir / "canhazgpu").chmod(0o755)
    (bindir / "chg").symlink_to("canhazgpu")
    # The one file runs as it is ...
    # A host's PATH: its `#!/usr/bin/env python3` finds the distribution's python3.
    env = {**cli.env, "PATH": f"{bindir}:{fake_smi.bindir}:/usr/bin:/bin"}
    assert shutil.which("python3", path=env["PATH"]) == SYSTEM_PYTHON
    assert output(["chg", "--version"], env=env) == f"canhazgpu {CHG.__version__}\n"
    user_flow(["canhazgpu"], env, cwd=tmp_path)


def test_the_readmes_copy_with_bytecode(cli, tmp_path, fake_smi):
    """The README's three commands for a host without make: the module and its bytecode
    in a directory of their own, and the launcher (its path edited) that imports it."""
    lib, bindir = tmp_path / "lib/canhazgpu", tmp_path / "host-bin"
    bindir.mkdir()
    output(["install", "-D", "-m", "644", REPO / "canhazgpu.py", lib / "canhazgpu.py"])
    output([SYSTEM_PYTHON, "-m", "compileall", "-q", lib])
    launcher = (REPO / "contrib/canhazgpu-launcher").read_text()
    (bindir / "canhazgpu").write_text(launcher.replace("/usr/local/lib/canhazgpu", str(lib)))
    (bindir / "canhazgpu").chmod(0o755)
    env = {**cli.env, "PATH": f"{bindir}:{fake_smi.bindir}:/usr/bin:/bin"}
    assert output(["canhazgpu", "--version"], env=env) == f"canhazgpu {CHG.__version__}\n"
    pyc = list((lib / "__pycache__").glob("canhazgpu.*.pyc"))
    assert len(pyc) == 1 and pyc[0].stat().st_mtime > (lib / "canhazgpu.py").stat().st_mtime - 1
    user_flow(["canhazgpu"], env, cwd=tmp_path)


def test_python3_canhazgpu_py(cli, tmp_path):
    user_flow([sys.executable, REPO / "canhazgpu.py"], cli.env, cwd=tmp_path)


# --------------------------------------------------------------------------- make install


def make(*args, cwd=REPO):
    return output(["make", "-s", "--no-print-directory", *args], cwd=cwd)


INSTALLED = {
    "bin/canhazgpu": None,
    "lib/canhazgpu/canhazgpu.py": None,
    "bin/chg": "canhazgpu",
    "share/bash-completion/completions/canhazgpu": None,
    "share/bash-completion/completions/chg": "canhazgpu",
    "share/zsh/site-functions/_canhazgpu": None,
    "share/fish/vendor_completions.d/canhazgpu.fish": None,
    "share/fish/vendor_completions.d/chg.fish": "canhazgpu.fish",
    "share/man/man1/canhazgpu.1": None,
    "share/man/man1/chg.1": "canhazgpu.1",
}


def test_make_install_honours_prefix_and_destdir(cli, tmp_path, fake_smi):
    dest = tmp_path / "stage"
    make("install", f"DESTDIR={dest}", "PREFIX=/usr")
    prefix = dest / "usr"
    for path, link in INSTALLED.items():
        assert (prefix / path).is_file(), path
        assert os.readlink(prefix / path) == link if link else not (prefix / path).is_symlink()
    assert (prefix / "bin/canhazgpu").stat().st_mode & 0o777 == 0o755
    script = (prefix / "bin/canhazgpu").read_text()
    # Pinned to the distribution's python3, whatever environment a user has activated; a
    # launcher that imports the program, whose bytecode that python3 compiled at install.
    assert script.startswith(f"#!{SYSTEM_PYTHON}\n")
    assert 'sys.path.insert(0, "/usr/lib/canhazgpu")' in script
    assert (prefix / "lib/canhazgpu/canhazgpu.py").read_text() == (
        REPO / "canhazgpu.py"
    ).read_text()
    tag = output([SYSTEM_PYTHON, "-c", "import sys; print(sys.implementation.cache_tag)"]).strip()
    assert (prefix / f"lib/canhazgpu/__pycache__/canhazgpu.{tag}.pyc").is_file()
    assert (prefix / "share/man/man1/canhazgpu.1").read_text() == (REPO / "canhazgpu.1").read_text()

    make("install", f"DESTDIR={tmp_path / 'opt'}", "PREFIX=/opt/gpu")
    assert all((tmp_path / "opt/opt/gpu" / path).is_file() for path in INSTALLED)
    make("uninstall", f"DESTDIR={tmp_path / 'opt'}", "PREFIX=/opt/gpu")
    assert not [p for p in (tmp_path / "opt").rglob("*") if not p.is_dir()]

    # Staged files name their final place: installed for real (no DESTDIR), it runs.
    real = tmp_path / "real"
    make("install", f"PREFIX={real}")
    env = {**cli.env, "PATH": f"{real / 'bin'}:{fake_smi.bindir}:/usr/bin:/bin"}
    assert output(["chg", "--version"], env=env) == f"canhazgpu {CHG.__version__}\n"
    user_flow(["canhazgpu"], env, cwd=tmp_path)


def test_installed_completions_load_for_both_names(tmp_path):
    """bash-completion, zsh's compinit and fish find the installed files by command name."""
    dest = tmp_path / "stage"
    make("install", f"DESTDIR={dest}", "PREFIX=/usr/local")
    share = dest / "usr/local/share"
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_DIRS": f"{share}:/usr/share",
        "PATH": f"{dest / 'usr/local/bin'}:{os.environ['PATH']}",
    }
    bash = (
        "source /usr/share/bash-completion/bash_completion; "
        "for c in canhazgpu chg; do _completion_loader $c; complete -p $c; done"
    )
    assert output(["bash", "--norc", "-c", bash], env=env).splitlines() == [
        "complete -F _canhazgpu canhazgpu",
        "complete -F _canhazgpu chg",
    ]
    zsh = (
        f"fpath=({share}/zsh/site-functions $fpath); autoload -Uz compinit; compinit -u -D; "
        "print $_comps[canhazgpu] $_comps[chg]"
    )
    assert output(["zsh", "-f", "-c", zsh], env=env) == "_canhazgpu _canhazgpu\n"
    fish = "complete -C 'canhazgpu st'; complete -C 'chg st'"
    assert output(["fish", "-c", fish], env=env).count("status\t") == 2


# --------------------------------------------------------------------------- sdist and wheel


@pytest.mark.slow
def test_sdist_and_wheel_install_and_run(cli, tmp_path):
    src = source_copy(tmp_path)
    assert output([sys.executable, "setup.py", "--version"], cwd=src).split()[-1] == (
        CHG.__version__
    )
    dist = tmp_path / "dist"
    output(
        [sys.executable, "setup.py", "-q", "sdist", "-d", dist, "bdist_wheel", "-d", dist], cwd=src
    )
    name = f"canhazgpu-{CHG.__version__}"
    sdist, wheel = dist / f"{name}.tar.gz", dist / f"{name}-py3-none-any.whl"
    assert set(dist.iterdir()) == {sdist, wheel}

    with tarfile.open(sdist) as tar:
        files = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"canhazgpu.py", "setup.py", "LICENSE", "canhazgpu.1"} <= files
    assert {
        "completions/canhazgpu.bash",
        "completions/_canhazgpu",
        "completions/canhazgpu.fish",
    } <= files
    with zipfile.ZipFile(wheel) as whl:
        entry_points = whl.read(f"{name}.dist-info/entry_points.txt").decode()
        data = {n.split(".data/data/", 1)[1] for n in whl.namelist() if ".data/data/" in n}
    assert "canhazgpu = canhazgpu:main" in entry_points and "chg = canhazgpu:main" in entry_points
    assert "share/man/man1/canhazgpu.1" in data and "share/zsh/site-functions/_canhazgpu" in data

    for artefact in (wheel, sdist):
        env_dir = venv(tmp_path / f"venv-{artefact.suffix}")
        pip_install(env_dir, artefact, cwd=tmp_path)
        chg = env_dir / "bin" / "chg"
        assert output([chg, "--version"]) == f"canhazgpu {CHG.__version__}\n"
        output([chg, "admin", "--gpus", "2", "--provider", "fake", "--force"], env=cli.env)
        assert "AVAILABLE" in output([chg, "status"], env=cli.env)


# --------------------------------------------------------------------------- the man page


def test_man_page_is_generated_from_the_parser():
    generated = output([sys.executable, REPO / "tools" / "gen_man.py"])
    assert generated == (REPO / "canhazgpu.1").read_text(), (
        "canhazgpu.1 is out of date: run `make man`"
    )


def test_man_page_lists_commands_options_exit_codes_variables_and_files():
    render = subprocess.run(
        ["groff", "-man", "-Tascii", "-ww", "-P", "-cbou", REPO / "canhazgpu.1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert render.stderr == "", render.stderr  # no roff warnings
    text = render.stdout
    parser = CHG.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in [("", parser), *sub.choices.items()]:
        if name:
            assert re.search(rf"^ +canhazgpu {name}\b", text, re.M), f"synopsis of {name}"
        for action in command._actions:
            if action.help != argparse.SUPPRESS:
                for option in action.option_strings:
                    assert re.search(rf"(^|[\s,\[|]){re.escape(option)}\b", text), option
    exit_codes = re.search(r"^EXIT STATUS\n(.*?)^\S", text, re.M | re.S).group(1)
    for code in ("0", "1", "2", "124", "125", "126", "127", "128+N"):
        assert re.search(rf"^ +{re.escape(code)} ", exit_codes, re.M), f"exit code {code}"
    environment = re.search(r"^ENVIRONMENT\n(.*?)^\S", text, re.M | re.S).group(1)
    variables = {env for _, _, env in CHG.SETTINGS.values() if env} | {"CANHAZGPU_CONFIG"}
    for variable in variables:
        assert re.search(rf"^ +{variable}$", environment, re.M), variable
    files = re.search(r"^FILES\n(.*?)^\S", text, re.M | re.S).group(1)
    for path in CHG.SYSTEM_CONFIGS + CHG.USER_CONFIGS:
        assert path in " ".join(files.split()), path
