#!/usr/bin/env python3
"""Write the man page canhazgpu.1 (roff) to stdout, generated from canhazgpu's argparse parser.

`make man` runs it; tests/test_install.py fails when the committed canhazgpu.1 is out of date.
Commands, options, their help and examples come from build_parser(); environment variables
and files from SETTINGS and the config paths, so the page cannot drift from the program.
"""

import argparse
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the parser cannot say: `run` takes its command after `--`, and has exit codes of its own.
COMMAND_OPERANDS = {"run": r"\fB\-\-\fR \fICMD\fR [\fIARG\fR...]"}
EXIT_STATUS = [
    ("0", "Success."),
    (
        "1",
        "An operational failure: Redis unreachable, pool not initialised, not enough GPUs "
        "with --nonblock, a wait that expired.",
    ),
    ("2", "A usage error: an unknown option, a missing or invalid value, an extra argument."),
]
RUN_EXIT_STATUS = [
    ("124", "CMD was stopped by --timeout."),
    ("125", "canhazgpu failed before CMD started (nothing was run)."),
    ("126", "CMD was found but is not executable."),
    ("127", "CMD was not found."),
    (
        "128+N",
        "CMD was killed by signal N: canhazgpu dies of the same signal (a shell shows 128+N).",
    ),
]
# Settings without a command-line option, described here (the others share their option's help).
SETTING_HELP = {
    "heartbeat.interval": "how often run refreshes the heartbeat of its reservation",
    "heartbeat.timeout": "a run reservation whose heartbeat is older than this is ended",
    "queue.heartbeat_timeout": "a waiter silent this long loses its place in the queue",
}
RUN_CHILD_ENVIRONMENT = [
    (
        "CUDA_VISIBLE_DEVICES",
        "the reserved GPU ids, ascending (replacing any inherited value); on AMD GPUs 0..n-1",
    ),
    ("CUDA_DEVICE_ORDER", "PCI_BUS_ID unless already set, so CUDA numbers GPUs as nvidia-smi does"),
    ("ROCR_VISIBLE_DEVICES", "AMD GPUs: the reserved ids; ROCm applies it first"),
    (
        "HIP_VISIBLE_DEVICES",
        "AMD GPUs: 0..n-1, since HIP counts among the GPUs that ROCR_VISIBLE_DEVICES left",
    ),
    ("CANHAZGPU_GPU_IDS", "the reserved ids"),
]


def load_program():
    spec = importlib.util.spec_from_file_location("canhazgpu", os.path.join(REPO, "canhazgpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def roff(text):
    """Escape running text for roff: backslashes, hyphens, and a leading dot or quote."""
    text = str(text).replace("\\", r"\e").replace("-", r"\-")
    return "\n".join(r"\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def option_label(action):
    names = ", ".join(rf"\fB{roff(s)}\fR" for s in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices:
        value = "|".join(rf"\fB{roff(c)}\fR" for c in action.choices)
    else:
        value = rf"\fI{roff(action.metavar or action.dest.upper())}\fR"
    return f"{names} {value}"


def visible(actions):
    return [a for a in actions if a.option_strings and a.help != argparse.SUPPRESS]


def options_list(actions):
    lines = []
    for action in actions:
        lines += [".TP", option_label(action), roff(action.help)]
    return lines


def synopsis_of(name, parser, own):
    """`canhazgpu run [-g N] [--nonblock | -w D] ...` from the parser's own options."""
    exclusive = {}
    for group in parser._mutually_exclusive_groups:
        for action in group._group_actions:
            exclusive[action] = group._group_actions
    parts, done = [], set()
    for action in own:
        if action in done:
            continue
        members = exclusive.get(action, [action])
        done.update(members)
        alternatives = []
        for member in members:
            label = rf"\fB{roff(member.option_strings[0])}\fR"
            if member.nargs != 0:
                value = "|".join(member.choices) if member.choices else member.metavar
                label += rf" \fI{roff(value)}\fR"
            alternatives.append(label)
        text = " | ".join(alternatives)
        parts.append(text if action.required else f"[{text}]")
    if name in COMMAND_OPERANDS:
        parts.append(COMMAND_OPERANDS[name])
    return [".SY canhazgpu", rf"\fB{roff(name)}\fR", *parts, ".YS"]


def examples_of(parser):
    """The `examples:` lines of a parser's epilog, as a literal block."""
    lines = [line[2:] for line in (parser.epilog or "").splitlines() if line.startswith("  ")]
    if not lines:
        return []
    return [".PP", "Examples:", ".PP", ".RS 4", ".nf", *map(roff, lines), ".fi", ".RE"]


def global_actions(command):
    groups = [g for g in command._action_groups if g.title == "global options"]
    return [a for g in groups for a in g._group_actions]


def format_default(kind, value):
    if value is None:
        return "unset"
    if kind == "duration":
        seconds = int(value)
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return f"{seconds // size}{unit}"
        return f"{seconds}s"
    return str(value)


def page(chg):
    parser = chg.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    global_group = next(g for g in parser._action_groups if g.title == "global options")
    out = [
        f'.TH CANHAZGPU 1 "" "canhazgpu {chg.__version__}" "User Commands"',
        # No hyphenation (the man macros restore it from HY at each paragraph): option names,
        # config keys and paths stay whole.
        ".nr HY 0",
        ".nh",
        ".SH NAME",
        r"canhazgpu, chg \- reserve GPUs on a shared machine, run commands on them, and see "
        "who holds what",
        ".SH SYNOPSIS",
        r".SY canhazgpu",
        r"[\fIglobal options\fR] \fICOMMAND\fR [\fIoptions\fR]",
        ".YS",
        r".SY canhazgpu",
        r"\fB\-\-version\fR | \fB\-h\fR",
        ".YS",
        ".SH DESCRIPTION",
        roff(parser.description),
        "GPU reservations live in Redis, so every user and process on a host, and every host "
        "sharing that Redis, see one truth.",
        r"\fBchg\fR is the short name of \fBcanhazgpu\fR.",
        ".PP",
        "Results go to standard output; progress, warnings and errors go to standard error, "
        "an error as one line \\(lqError: ...\\(rq, sometimes followed by \\(lqHint: ...\\(rq.",
        "Durations are a number and a unit: 30s, 15m, 0.5h, 2d, or compounds like 1h30m.",
        ".SH GLOBAL OPTIONS",
        "Accepted before or after the command name.",
        *options_list(visible(a for a in parser._actions if a.option_strings[:1] == ["-h"])),
        *options_list(visible(a for a in parser._actions if a.dest == "version")),
        *options_list(visible(global_group._group_actions)),
        ".SH COMMANDS",
    ]
    for name, command in sub.choices.items():
        own = [
            a
            for a in visible(command._actions)
            if a.dest != "help" and a not in global_actions(command)
        ]
        out += [".SS " + roff(name), *synopsis_of(name, command, own), ".PP", roff(helps[name])]
        if own:
            out += options_list(own)
        out += examples_of(command)
    out += [".SH EXIT STATUS"]
    for code, text in EXIT_STATUS:
        out += [".TP", rf"\fB{roff(code)}\fR", roff(text)]
    out += [".PP", r"\fBrun\fR exits with the status of \fICMD\fR, or:"]
    for code, text in RUN_EXIT_STATUS:
        out += [".TP", rf"\fB{roff(code)}\fR", roff(text)]
    out += [
        ".SH ENVIRONMENT",
        "Settings, with their config file keys and built-in defaults.",
        "Precedence: command line, environment, user file, system file, default.",
        ".TP",
        r"\fBCANHAZGPU_CONFIG\fR",
        "The config file to read instead of the default ones (as --config).",
    ]
    option_help = {a.dest.replace("_", "."): a.help for a in global_group._group_actions}
    option_help["redis.url"] = "the Redis URL; wins over host, port and db"
    for key, (kind, default, env) in chg.SETTINGS.items():
        if env:
            what = option_help.get(key.replace("_", ".")) or SETTING_HELP.get(key, key)
            what = what.split(" (")[0]  # the default is given below
            text = f"{what[:1].upper()}{what[1:]}. Config key {key}; default "
            text += f"{format_default(kind, default)}."
            out += [".TP", rf"\fB{roff(env)}\fR", roff(text)]
    out += [
        ".TP",
        r"\fBNO_COLOR\fR",
        "When set, status prints no colours.",
        ".TP",
        r"\fBCANHAZGPU_COMPLETION_TIMEOUT\fR",
        "Seconds the shell completions wait for Redis when completing GPU ids (0.3).",
        ".PP",
        r"\fBrun\fR sets for \fICMD\fR:",
    ]
    for name, text in RUN_CHILD_ENVIRONMENT:
        out += [".TP", rf"\fB{roff(name)}\fR", roff(text)]
    out += [".SH FILES"]
    user = "~/.canhazgpu.{" + ",".join(p.rsplit(".", 1)[1] for p in chg.USER_CONFIGS) + "}"
    out += [
        ".TP",
        rf"\fI{roff(user)}\fR",
        "The user's config file: the first that exists of "
        + roff(", ".join(chg.USER_CONFIGS))
        + ".",
    ]
    out += [".TP", rf"\fI{roff(chg.SYSTEM_CONFIGS[0])}\fR"]
    for path in chg.SYSTEM_CONFIGS[1:]:
        out += [".TQ", rf"\fI{roff(path)}\fR"]
    out += [
        "The system config file (the first that exists).",
        "TOML needs Python 3.11 or tomli; YAML needs PyYAML; JSON always works.",
        "Sections redis (url, host, port, db), memory (threshold), heartbeat (interval, "
        "timeout), queue (heartbeat_timeout) and per-command defaults: "
        + roff(", ".join(k for k, v in chg.SETTINGS.items() if not v[2]))
        + ".",
        ".SH SEE ALSO",
        r"\fBredis\-server\fR(1), \fBnvidia\-smi\fR(1)",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page(load_program()))
