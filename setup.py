"""Packaging for canhazgpu: a single module, `canhazgpu.py`, with two console scripts."""

import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    path = os.path.join(HERE, name)
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


def version():
    """The version is defined once, as `__version__ = "X.Y.Z"` in canhazgpu.py."""
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', read("canhazgpu.py"), re.M)
    return match.group(1) if match else "0.0.0"


setup(
    name="canhazgpu",
    version=version(),
    description="GPU reservation tool for shared GPU machines, with state in Redis",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    py_modules=["canhazgpu"],
    # Completions and the man page, under the install prefix where the shells and man look
    # (chg.* are links to canhazgpu.*: bash-completion and fish load a file named after the
    # command).
    data_files=[
        (
            "share/bash-completion/completions",
            ["completions/canhazgpu.bash", "completions/chg.bash"],
        ),
        ("share/zsh/site-functions", ["completions/_canhazgpu"]),
        ("share/fish/vendor_completions.d", ["completions/canhazgpu.fish", "completions/chg.fish"]),
        ("share/man/man1", ["canhazgpu.1"]),
    ],
    python_requires=">=3.9",
    install_requires=["redis>=4.3", "psutil>=5.9"],
    extras_require={"test": ["pytest", "fakeredis", "hypothesis", "ruff"]},
    entry_points={
        "console_scripts": [
            "canhazgpu=canhazgpu:main",
            "chg=canhazgpu:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Environment :: Console",
    ],
)
