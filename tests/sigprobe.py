"""A command for `run`'s tests: it reports what it receives and obeys its stdin.

Every report is a line on stdout and, when PROBE_LOG names a file, in that file too
(stdout may be a terminal that hung up).  At start: `READY pid=P pgid=G ppid=Q tty=T`
(T: the terminal's foreground group, -1 without a terminal).
Each caught signal: `GOT SIGNAME N` (N: how many so far).  Lines read from stdin:
`exit N` reports `COUNTS SIGINT=1 ...` and exits with N; `say TEXT` reports TEXT.
At the end of stdin it waits for signals.  --exit-on SIG (repeatable): that signal
reports the counts and exits 0.  SIGTSTP, SIGTTIN and SIGTTOU keep their defaults,
so the probe can be stopped like any program.
"""

import argparse
import os
import signal
import sys
import time

CAUGHT = ("HUP", "INT", "QUIT", "TERM", "USR1", "USR2", "ALRM", "WINCH", "CONT")
counts = {}
parser = argparse.ArgumentParser()
parser.add_argument("--exit-on", action="append", default=[], metavar="SIG")
exit_on = {"SIG" + name.upper() for name in parser.parse_args().exit_on}


def report(line):
    """Unbuffered writes: a handler may report while the main code is reporting."""
    data = (line + "\n").encode()
    try:
        os.write(1, data)
    except OSError:
        pass
    if os.environ.get("PROBE_LOG"):
        fd = os.open(os.environ["PROBE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def summary():
    return "COUNTS " + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def caught(signum, frame):
    name = signal.Signals(signum).name
    counts[name] = counts.get(name, 0) + 1
    report(f"GOT {name} {counts[name]}")
    if name in exit_on:
        report(summary())
        os._exit(0)


for name in CAUGHT:
    signal.signal(getattr(signal, "SIG" + name), caught)


def terminal_owner():
    """The foreground process group of our terminal, or -1 without one."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return -1
    try:
        return os.tcgetpgrp(fd)
    finally:
        os.close(fd)


report(f"READY pid={os.getpid()} pgid={os.getpgrp()} ppid={os.getppid()} tty={terminal_owner()}")
while True:
    try:
        line = sys.stdin.readline()
    except OSError:  # a terminal that hung up
        line = ""
    if not line:
        break
    command, _, rest = line.strip().partition(" ")
    if command == "exit":
        report(summary())
        sys.exit(int(rest))
    if command == "say":
        report(rest)
while True:
    time.sleep(3600)
