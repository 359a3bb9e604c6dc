#!/usr/bin/env python3
"""canhazgpu: GPU reservations for shared GPU machines.

`canhazgpu run --gpus 2 -- python train.py` reserves two free GPUs, runs the
command with CUDA_VISIBLE_DEVICES set, and frees them when it ends.
`canhazgpu status` shows who holds what, and who uses a GPU without holding it.

State lives in Redis and is shared, key for key, with the Go implementation of
the same tool.  Every decision that hands out or frees a GPU is made inside one
Redis Lua script, so no GPU is ever given to two holders, without a global lock.

The sections below come in dependency order; each names only what comes before it:
  Errors, messages and identity - CanhazError, the one stderr helper, who the user is.
  Time and durations - parsing and showing durations and timestamps in every form.
  Configuration - SETTINGS (every setting and its default), files, the Redis address.
  Redis state and Lua scripts - the keys, the scripts with their contracts, Store.
  GPU providers - what NVML, nvidia-smi, amd-smi or the fake provider say the GPUs do.
  Allocation and queue - Reservation, Request, Pool, Fleet, acquiring and waiting.
  Supervisor - `run`: the command's process group, signals, heartbeat, clean-up.
  Commands - one cmd_* function per command, and the text they print.
  Web - the dashboard's routes, provider cache, metrics, server, demo data and page.
  Entry point - the parser (one table), App (one invocation), main(), the Python API.
  Data - the dashboard's style, script and page templates.
"""

from __future__ import annotations

import signal


def quiet_interrupts():
    """Until a command puts its own handlers in place, Ctrl-C ends canhazgpu as it
    ends any program (it dies of SIGINT, nothing is reserved yet), not with a
    KeyboardInterrupt traceback from whatever Python was importing (redis-py takes
    a fifth of a second).  A SIGINT the caller ignored (a background job) stays so."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":  # the program's first line: before any other import
    quiet_interrupts()

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

__version__ = "0.1.0"
PROG = "canhazgpu"


# ============================================================================
# Errors, messages and identity
# ============================================================================


class CanhazError(Exception):
    """A failure the user can act on: one line, an optional hint, an exit code."""

    def __init__(self, message, hint=None, code=1):
        super().__init__(message)
        self.hint = hint
        self.code = code


class UsageError(CanhazError):
    def __init__(self, message, hint=None):
        super().__init__(message, hint, code=2)


def tell(text, end="\n", control=""):
    """Every line of ours on stderr (stdout is the command's), unbuffered: after a
    hang-up the terminal fails with EIO, which must neither stop us nor linger in a
    buffer that fails again at exit.  Names and notes in `text` are other users'
    text, so it is printable(); `control` is a terminal sequence of our own."""
    try:
        os.write(2, (control + printable(text) + end).encode(errors="replace"))
    except OSError:
        pass


# C0 and C1 controls (escape sequences, newlines, backspaces) and the bidi overrides
# that make text read other than it is: never sent raw to a terminal.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text):
    """Text that came from users or processes, safe for someone else's terminal:
    `\x1b]0;...` is shown as those characters, a newline in a note as `\n`."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text))


def warn(message):
    tell(f"Warning: {message}")


def current_user():
    """The real OS account of this process: from its uid, never from $USER."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def say(text=""):
    """stdout is the result; a closed pipe (| head) must not end in a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os._exit(0)


# ============================================================================
# Time and durations
# ============================================================================

DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([smhd])", re.I)
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Go clients keep durations as int64 nanoseconds (a queue entry's expiry_duration).
MAX_DURATION = (2**63 - 1) / 1e9
RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?\s*([Zz]|[+-]\d\d:?\d\d)?"
)


def parse_duration(text):
    """'30s', '0.5h', '2d', '1h30m' -> seconds.  Zero, negative or unit-less is an error."""
    compact = str(text).strip().lower()
    parts = DURATION_PART.findall(compact)
    if not compact or DURATION_PART.sub("", compact).strip():
        raise ValueError(f"expected a duration like 30s, 15m, 2h, 1d or 1h30m, got {text!r}")
    seconds = sum(float(n) * UNIT_SECONDS[u.lower()] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"a duration must be longer than zero, got {text!r}")
    if not seconds <= MAX_DURATION:
        raise ValueError(f"a duration must be at most {int(MAX_DURATION // 86400)}d, got {text!r}")
    return seconds


def format_duration(seconds):
    """Seconds -> '1h 2m 15s' (the format of the Go implementation)."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h {seconds % 3600 // 60}m {seconds % 60}s"


def format_hm(seconds):
    """Seconds -> '1h 5m': an idle time, to the minute."""
    minutes = max(0, int(seconds)) // 60
    return f"{minutes // 60}h {minutes % 60}m"


def format_span(seconds):
    """A compact human duration for requests and waits: '8h', '1h30m', '45s'."""
    seconds = int(round(seconds))
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0s"


def parse_time(value):
    """Any timestamp form found in Redis -> Unix seconds (float), or None.

    Unix numbers (int or float, bare or quoted) come from Python writers and
    ours; RFC 3339 strings with any offset come from the Go implementation.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        number = float(value)
        return number if math.isfinite(number) else None
    except ValueError:
        pass
    m = RFC3339.fullmatch(value.strip())
    if not m:
        return None
    import calendar

    y, mo, d, h, mi, s, frac, offset = m.groups()
    try:
        t = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s), 0, 0, 0))
    except ValueError:  # month 13 and the like
        return None
    t += float(frac) if frac else 0.0
    if offset and offset not in "Zz":
        sign = -1 if offset[0] == "+" else 1
        digits = offset[1:].replace(":", "")
        t += sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return t


def rfc3339(t):
    """Unix seconds -> '2026-11-23T10:00:00Z', for JSON output."""
    if t is None:
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    except (OverflowError, OSError, ValueError):  # a far-off time someone wrote to Redis
        return None


# ============================================================================
# Configuration
# ============================================================================


HISTORY_DAYS = 90  # usage records are kept this long; reports reach this far back
PRIORITIES = ("high", "normal", "low")  # queue classes: waiters are served class by class

# Every setting: config key -> (kind, built-in default, environment variable).  The
# defaults live here alone: help texts and `Config` take them from this table.
SETTINGS = {
    "redis.url": ("url", None, "CANHAZGPU_REDIS_URL"),
    "redis.host": ("str", "localhost", "CANHAZGPU_REDIS_HOST"),
    "redis.port": ("port", 6379, "CANHAZGPU_REDIS_PORT"),
    "redis.db": ("count0", 0, "CANHAZGPU_REDIS_DB"),
    "redis.sentinels": ("hostports", None, "CANHAZGPU_REDIS_SENTINELS"),
    "redis.master_name": ("str", "canhazgpu", "CANHAZGPU_REDIS_MASTER_NAME"),
    "redis.sentinel_password": ("str", None, "CANHAZGPU_REDIS_SENTINEL_PASSWORD"),
    "redis.cluster": ("bool", False, "CANHAZGPU_REDIS_CLUSTER"),
    "redis.wait_replicas": ("count0", 1, None),
    "redis.wait_timeout": ("count0", 100, None),  # milliseconds, as WAIT takes them
    "redis.failover_timeout": ("duration", 30.0, None),
    "pool.name": ("pool", None, "CANHAZGPU_POOL"),
    "remote_hosts": ("list", None, "CANHAZGPU_REMOTE_HOSTS"),
    "memory.threshold": ("count0", 1024, "CANHAZGPU_MEMORY_THRESHOLD"),
    "heartbeat.interval": ("duration", 60.0, "CANHAZGPU_HEARTBEAT_INTERVAL"),
    "heartbeat.timeout": ("duration", 900.0, "CANHAZGPU_HEARTBEAT_TIMEOUT"),
    "queue.heartbeat_timeout": ("duration", 120.0, "CANHAZGPU_QUEUE_HEARTBEAT_TIMEOUT"),
    "idle.after": ("duration", 1800.0, "CANHAZGPU_IDLE_AFTER"),
    "idle.reclaim_after": ("duration", None, "CANHAZGPU_IDLE_RECLAIM_AFTER"),
    "idle.sample_interval": ("duration", 300.0, "CANHAZGPU_IDLE_SAMPLE_INTERVAL"),
    "run.gpus": ("count", 1, None),
    "run.timeout": ("duration", None, None),
    "run.signal": ("signal", int(signal.SIGINT), None),
    "run.kill_after": ("duration", 30.0, None),
    "run.wait": ("duration", None, None),
    "run.priority": ("priority", None, None),  # None: the account's class
    "reserve.gpus": ("count", 1, None),
    "reserve.duration": ("duration", 8 * 3600.0, None),
    "reserve.wait": ("duration", None, None),
    "reserve.priority": ("priority", None, None),
    "report.days": ("days", 30, None),
    "web.host": ("str", "0.0.0.0", None),
    "web.port": ("port", 8080, None),
}
# Settings that are also global options (--redis-url): their names are also the Go
# implementation's flat config keys, so one file can serve both.
GLOBAL_OPTIONS = {
    "redis-url": "redis.url",
    "redis-host": "redis.host",
    "redis-port": "redis.port",
    "redis-db": "redis.db",
    "memory-threshold": "memory.threshold",
    "pool": "pool.name",
}
ADDRESS_KEYS = ("redis.url", "redis.host", "redis.port", "redis.db")
BUILT_IN = "the built-in default"
USER_CONFIGS = ("~/.canhazgpu.yaml", "~/.canhazgpu.yml", "~/.canhazgpu.json", "~/.canhazgpu.toml")
SYSTEM_CONFIGS = (
    "/etc/canhazgpu/config.toml",
    "/etc/canhazgpu/config.json",
    "/etc/canhazgpu/config.yaml",
)


def convert_setting(kind, value):
    """Convert a raw setting (from a file, the environment or a flag) or raise ValueError."""
    if kind in CONVERTERS:
        return CONVERTERS[kind](value)
    if kind in ("str", "url"):
        if not isinstance(value, str) or not value.strip():
            raise ValueError("expected a non-empty string")
        if kind == "url":
            RedisAddress().apply_url(value.strip(), None)  # raises ValueError if malformed
        return value.strip()
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    number = int(value) if isinstance(value, int) else parse_int(str(value))
    low, high = {
        "port": (1, 65535),
        "count": (1, 1 << 16),
        "count0": (0, 1 << 40),
        "days": (1, HISTORY_DAYS),
    }[kind]
    if not low <= number <= high:
        raise ValueError(f"expected a whole number from {low} to {high}")
    return number


def duration_setting(value):
    if not isinstance(value, str):  # a bare number in a file has no unit
        raise ValueError(f"expected a duration like 30s, 15m, 2h or 1d, got {value!r}")
    return parse_duration(value)


POOL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def pool_setting(value):
    """A pool's name; `auto` is this host's short name (one config file for a fleet)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a pool name, got {value!r}")
    name = value.strip()
    if name == "auto":
        name = os.uname().nodename.split(".")[0]
    if not POOL_NAME.fullmatch(name):
        raise ValueError(
            f"a pool name is 1-64 letters, digits, '.', '_' or '-' (or auto), got {value!r}"
        )
    return name


def bool_setting(value):
    words = {"1": True, "true": True, "yes": True, "on": True}
    words.update({"0": False, "false": False, "no": False, "off": False})
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise ValueError(f"expected true or false, got {value!r}")


def list_setting(value):
    """A list in a file, or comma-separated in the environment: non-empty strings."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"expected a list of names, got {value!r}")
    items = [x.strip() for x in items if x.strip()]
    if not items:
        raise ValueError("expected at least one name")
    bad = [x for x in items if CONTROL.search(x) or x.startswith("-") or re.search(r"\s", x)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a host name")
    return items


def hostports_setting(value):
    """Sentinels: 'host:port' each (port 26379 if left out), IPv6 as [::1]:26379."""
    out = []
    for item in list_setting(value):
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", item)
        if not m:
            raise ValueError(f"expected host:port, got {item!r}")
        host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        out.append((host, convert_setting("port", port) if port else 26379))
    return out


def priority_setting(value):
    if not isinstance(value, str) or value.strip().lower() not in PRIORITIES:
        raise ValueError(f"expected one of {', '.join(PRIORITIES)}, got {value!r}")
    return value.strip().lower()


CONVERTERS = {
    "duration": duration_setting,
    "signal": lambda value: parse_signal(str(value)),
    "pool": pool_setting,
    "bool": bool_setting,
    "list": list_setting,
    "hostports": hostports_setting,
    "priority": priority_setting,
}


def parse_int(text):
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise ValueError(f"expected a whole number, got {text!r}")
    return int(text)


def parse_signal(text):
    """'INT', 'SIGINT', 'int' or '2' -> signal number."""
    name = text.strip().upper()
    if name.isdigit():
        number = int(name)
        if number in {s.value for s in signal.Signals}:
            return number
    else:
        sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
        if isinstance(sig, signal.Signals):
            return int(sig)
    raise ValueError(f"expected a signal name like INT, TERM or USR1, got {text!r}")


def read_config_file(path):
    """Parse one config file into flat {'section.key': value}; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:
                try:
                    import tomli as tomllib
                except ImportError:
                    raise CanhazError(
                        f"cannot read {path}: TOML needs Python 3.11 or the 'tomli' package"
                    ) from None
            doc = tomllib.loads(data.decode())
        elif path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise CanhazError(
                    f"cannot read {path}: YAML needs the PyYAML package",
                    hint="install python3-yaml, or write the file as JSON or TOML",
                ) from None
            doc = yaml.safe_load(data) or {}
        else:
            doc = json.loads(data or b"{}")
    except CanhazError:
        raise
    except Exception as e:  # each parser has its own error type
        raise UsageError(f"config file {path} is malformed: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"config file {path}: expected a mapping of settings at the top level")
    return flatten_config(doc, path)


def flatten_config(doc, path, prefix=""):
    flat = {}
    for key, value in doc.items():
        name = GLOBAL_OPTIONS.get(prefix + str(key), prefix + str(key).replace("-", "_"))
        if isinstance(value, dict):
            flat.update(flatten_config(value, path, name + "."))
        elif name in SETTINGS:
            flat[name] = value
        else:
            raise UsageError(
                f"config file {path}: unknown key {name!r}",
                hint="known keys: " + ", ".join(SETTINGS),
            )
    return flat


def redacted(url):
    """A Redis URL as it may be shown: never with its password, which may hold '@' and
    '/' (so the userinfo runs to the last '@'), or come as a ?password= argument."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, tail = rest.rpartition("@")
    if sep and at and ":" in userinfo:
        url = f"{scheme}://{userinfo.split(':', 1)[0]}:***@{tail}"
    return re.sub(r"(?<=[?&]password=)[^&#]*", "***", url, flags=re.I)


class RedisAddress:
    """Where Redis is, put together by precedence part by part: a URL names a whole
    address (its missing parts are the defaults), and a host, port or db from a
    higher source replaces only that part, so `--redis-host` keeps a URL's port."""

    def __init__(self):
        self.scheme, self.userinfo = "redis", ""
        self.host, self.port, self.db = "localhost", 6379, 0
        self.socket = self.query = ""  # the path of a unix:// URL; URL options kept as given
        self.origins = {}  # part -> where it was set

    def apply_url(self, url, where):
        m = re.fullmatch(r"(rediss?|unix)://(.*)", url, re.I | re.S)
        if not m:
            raise ValueError(f"expected redis://, rediss:// or unix://, got {redacted(url)!r}")
        scheme, rest = m.group(1).lower(), m.group(2)
        # A password may hold '@' and '/': the userinfo runs to the last '@'.
        userinfo, _, rest = rest.rpartition("@")
        rest, _, query = rest.partition("?")
        host, port, db, socket = "localhost", 6379, 0, ""
        if scheme == "unix":
            if not rest.startswith("/"):
                raise ValueError(f"a unix:// URL needs the socket's path, got {redacted(url)!r}")
            socket = rest
        else:
            hostport, _, path = rest.partition("/")
            if hostport.startswith("["):  # [::1]:6379
                host, _, tail = hostport[1:].partition("]")
                port_text = tail[1:] if tail.startswith(":") else ""
            else:
                host, _, port_text = hostport.partition(":")
            host = host or "localhost"
            port = convert_setting("port", port_text) if port_text else 6379
            db = convert_setting("count0", path.strip("/")) if path.strip("/") else 0
        for option in query.split("&"):  # ?db=N, as redis-py reads it, beats the path
            if option.lower().startswith("db="):
                db = convert_setting("count0", option[3:])
        self.scheme, self.userinfo, self.host, self.port, self.db = scheme, userinfo, host, port, db
        self.socket, self.query = socket, query
        self.origins = {"url": where}

    def apply(self, key, value, where):
        """redis.host, redis.port or redis.db from a source above the URL's."""
        part = key.split(".")[1]
        setattr(self, part, value)
        if part != "db" and self.scheme == "unix":  # a host or port means TCP
            self.scheme, self.socket = "redis", ""
            self.host = self.host if part == "host" else "localhost"
        self.origins[part] = where

    def url(self):
        """The URL for redis-py, its userinfo percent-encoded (redis-py decodes it)."""
        auth = ""
        if self.userinfo:
            from urllib.parse import quote  # only for an address with a password

            user, colon, password = self.userinfo.partition(":")
            safe = "%!$&'()*+,;=-._~"
            auth = quote(user, safe=safe) + colon + quote(password, safe=safe) + "@"
        query = [q for q in self.query.split("&") if q and not q.lower().startswith("db=")]
        if self.scheme == "unix":
            return f"unix://{auth}{self.socket}?" + "&".join([*query, f"db={self.db}"])
        host = f"[{self.host}]" if ":" in self.host else self.host
        tail = "?" + "&".join(query) if query else ""
        return f"{self.scheme}://{auth}{host}:{self.port}/{self.db}{tail}"

    def origin(self):
        """Which sources set the address, for messages: 'from --redis-port and ...'."""
        named = sorted({w for w in self.origins.values() if w})
        return "from " + " and ".join(named) if named else f"from {BUILT_IN}"


class Config:
    """Settings resolved by precedence: command line > environment > user file >
    system file > built-in default.  Each value remembers where it came from, so a
    message can name the flag, the variable or the file and key."""

    def __init__(self, layers):
        self.layers = layers  # lowest first: [{key: (value, where)}]
        self.values, self.sources = {}, {}
        for layer in layers:
            for key, (value, where) in layer.items():
                self.values[key], self.sources[key] = value, where
        self._check()

    def __getitem__(self, key):
        return self.values[key]

    def source(self, key):
        return self.sources[key]

    def file_value(self, key):
        """A setting as the config files (or the built-in default) have it, before the
        environment and the command line: what the host's admin set."""
        value = None
        for layer in self.layers[:-2]:
            if key in layer:
                value = layer[key][0]
        return value

    def redis_address(self):
        address = RedisAddress()
        for layer in self.layers[1:]:
            if "redis.url" in layer:
                address.apply_url(*layer["redis.url"])
            for key in ADDRESS_KEYS[1:]:
                if key in layer:
                    address.apply(key, *layer[key])
        return address

    @classmethod
    def load(cls, explicit_path=None, environ=None, flags=None):
        """flags: {key: (value, '--flag')} from the command line, already converted."""
        environ = os.environ if environ is None else environ
        layers = [{key: (default, BUILT_IN) for key, (_, default, _) in SETTINGS.items()}]
        for path in cls.files(explicit_path or environ.get("CANHAZGPU_CONFIG")):
            layer = {}
            for key, raw in read_config_file(path).items():
                where = f"config file {path}: {key}"
                layer[key] = (cls._convert(key, raw, where), where)
            layers.append(layer)
        layers.append(
            {
                key: (cls._convert(key, environ[env], env), env)
                for key, (_, _, env) in SETTINGS.items()
                if env and environ.get(env, "") != ""
            }
        )
        layers.append(dict(flags or {}))
        return cls(layers)

    @staticmethod
    def files(explicit_path):
        """The config files to read, lowest precedence first."""
        if explicit_path:
            if not os.path.exists(explicit_path):
                raise UsageError(f"config file {explicit_path} does not exist")
            return [explicit_path]
        files = [p for p in SYSTEM_CONFIGS if os.path.exists(p)][:1]
        return files + [p for p in map(os.path.expanduser, USER_CONFIGS) if os.path.exists(p)][:1]

    @staticmethod
    def _convert(key, raw, where):
        try:
            return convert_setting(SETTINGS[key][0], raw)
        except ValueError as e:
            raise UsageError(f"{where}: {e}") from None

    def _check(self):
        """A run's reservation expires by the timeout it was made under; one late beat
        must not end it, so the timeout spans at least two intervals."""
        interval, timeout = self["heartbeat.interval"], self["heartbeat.timeout"]
        if timeout < 2 * interval:
            raise UsageError(
                f"heartbeat.timeout {format_span(timeout)} (from "
                f"{self.source('heartbeat.timeout')}) must be at least twice heartbeat.interval "
                f"{format_span(interval)} (from {self.source('heartbeat.interval')})",
                hint="raise the timeout or shorten the interval",
            )


# ============================================================================
# Redis state and Lua scripts
# ============================================================================
#
# Keys of a pool (shared with the Go implementation; the README's "Redis data" lists
# them all), under the pool's prefix: `canhazgpu:` for the unnamed pool, the Go layout,
# or `canhazgpu:{NAME}:` for a named one (the braces are a Redis Cluster hash tag, so
# every key of a pool lives in one slot and a script may touch them all):
#   gpu_count, provider, gpu:{id} (JSON), usage_history_sorted (zset of JSON records
#   scored by end time), queue (zset of entry ids scored by enqueue time in ns),
#   queue:entry:{id} (JSON).
# Ours alone: events (pub/sub: wakes waiters), usage (the host's last provider answer,
# 60 s), limits (hash: limits, priority classes, idle policy), notices (reclaims not yet
# shown), usage_day:{YYYY-MM-DD} and usage_folded (per-day roll-ups of the records for
# reports), legacy_migrated.  Fleet-wide: canhazgpu:pools, the registry of named pools.

KEY = "canhazgpu:"
REGISTRY = KEY + "pools"
USAGE_TTL = 60  # seconds a published provider answer stays
REGISTRY_EVERY = 60  # seconds between refreshes of a pool's registry entry
CLASS_OFFSET_NS = 10**17  # ~3 years: a queue class always sorts before the next


def pool_prefix(name):
    """The key prefix of a pool: the Go layout for the unnamed pool."""
    return f"{KEY}{{{name}}}:" if name else KEY


# Every script is LUA_LIB followed by its own body, with this contract:
#   KEYS:    KEYS[1] is the pool's key prefix (canhazgpu: or canhazgpu:{NAME}:), declared
#            as a key so that Redis Cluster runs the script on the node of the pool's
#            slot; every key the script touches is named from it.
#   ARGV[1]: A, one JSON object.  Store.script() always sets
#            now (Unix s), heartbeat {interval, timeout} (put on the runs this script
#            grants), queue_timeout (put on the entries it queues), history_days,
#            defaults {heartbeat_timeout, queue_timeout} (for records that state none),
#            idle_after (s: idle spans longer than this add up on a reservation);
#            optional everywhere: active (ids the hardware shows in use now) and
#            observed (the caller just asked this pool's own hardware: only then may
#            an idle reservation be reclaimed); each script's own fields are listed
#            at its top.
#   reply:   a JSON string made by enc(), unless the script says otherwise.
#   errors:  BADKEY <key> ... when one of the pool's keys holds another Redis type;
#            nothing is changed then.
# Lua's cjson writes at most 14 significant digits and turns [] into {}, which would
# break Go readers of nanosecond fields and lists, so the scripts encode with enc().
LUA_LIB = r"""
local P = KEYS[1]
local unpack = unpack or table.unpack
local A = cjson.decode(ARGV[1])
local NOW = tonumber(A.now)
local ARRAYS = {allocated_gpus = true, requested_ids = true, gpus = true, lost = true,
  have = true, released = true, results = true, reasons = true, groups = true,
  reclaimed = true, sums = true, crossing = true, records = true}
local CLASS = {low = 1, normal = 2, high = 3}

local function enc(v, key)
  local t = type(v)
  if t == 'table' then
    local out = {}
    if ARRAYS[key] or #v > 0 then
      for i = 1, #v do out[i] = enc(v[i]) end
      return '[' .. table.concat(out, ',') .. ']'
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    for _, k in ipairs(keys) do out[#out + 1] = cjson.encode(k) .. ':' .. enc(v[k], k) end
    return '{' .. table.concat(out, ',') .. '}'
  elseif t == 'number' then
    if v == math.floor(v) and math.abs(v) < 9e18 then return string.format('%d', v) end
    return string.format('%.16g', v)
  end
  return cjson.encode(v)
end

-- A JSON object, or nil (cjson reads '[1]' as a table too: not a state).
local function decode(raw)
  if not raw or not string.match(raw, '^%s*{') then return nil end
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' then return v end
  return nil
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

-- Days since 1970-01-01 -> 'YYYY-MM-DD', the inverse of days_from_civil.
local function day_name(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02d', y, m, d)
end

-- Unix number (bare or quoted) or RFC 3339 string with any offset -> seconds.
local function ts(v)
  if type(v) == 'number' then return v end
  if type(v) ~= 'string' then return nil end
  local n = tonumber(v)
  if n then return n end
  local y, mo, d, h, mi, s, rest = string.match(v,
    '^(%d%d%d%d)%-(%d%d)%-(%d%d)[Tt ](%d%d):(%d%d):(%d%d%.?%d*)(.*)$')
  if not y then return nil end
  local t = days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400
    + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
  if rest == '' or rest == 'Z' or rest == 'z' then return t end
  local sign, oh, om = string.match(rest, '^([%+%-])(%d%d):?(%d%d)$')
  if not sign then return nil end
  local off = tonumber(oh) * 3600 + tonumber(om) * 60
  if sign == '+' then return t - off end
  return t + off
end

-- The pool's own keys of another type (a hash for the queue) would fail the script
-- half-way with a bare WRONGTYPE: say which key, and touch nothing.
for key, want in pairs({queue = 'zset', usage_history_sorted = 'zset', gpu_count = 'string',
    provider = 'string', limits = 'hash', notices = 'list', usage_windows = 'hash'}) do
  local kind = redis.call('TYPE', P .. key).ok
  if kind ~= 'none' and kind ~= want then
    return redis.error_reply('BADKEY ' .. P .. key .. ' is a Redis ' .. kind .. ', not a ' .. want)
  end
end

local function str(v) return type(v) == 'string' and v ~= '' end
local function held(st) return type(st) == 'table' and str(st.user) end
local function partial_of(st)
  if held(st) and str(st.partial_queue_id) then return st.partial_queue_id end
end
local function owner(st) if str(st.actual_user) then return st.actual_user end return st.user end

-- The pool: S[i] is the decoded state (false when unparseable), RAW[i] its JSON.
-- A pool size is digits only, as Python reads it too ('1e3' and '1.5' are no pool).
local N = tonumber(string.match(redis.call('GET', P .. 'gpu_count') or '', '^%d+$')) or 0
local S, RAW = {}, {}
local FREED = false  -- something was released: wake the waiters
local WAKE = false   -- a waiter's request was completed for it by this script: wake it

local function load_pool()
  -- MGET in chunks: unpack() of more than ~8000 values fails in Redis's Lua.
  for first = 0, N - 1, 1000 do
    local last = math.min(N, first + 1000) - 1
    local keys = {}
    for i = first, last do keys[#keys + 1] = P .. 'gpu:' .. i end
    local raws = redis.call('MGET', unpack(keys))
    for i = first, last do
      RAW[i] = raws[i - first + 1]
      if not RAW[i] then  -- absent, or not a string at all: never ours to overwrite
        local kind = redis.call('TYPE', keys[i - first + 1]).ok
        if kind ~= 'none' then RAW[i] = '(a Redis ' .. kind .. ', not a state)' end
      end
      if RAW[i] then S[i] = decode(RAW[i]) or false else S[i] = {} end
    end
  end
end

local function put(i, st)
  S[i] = st
  RAW[i] = enc(st)
  redis.call('SET', P .. 'gpu:' .. i, RAW[i])
end

-- Idle time runs from when a held GPU last showed use, or from its start.
local function busy_since(st)
  return math.max(ts(st.last_active) or 0, ts(st.start_time) or NOW)
end

-- An idle span longer than idle_after counts whole on the reservation, for reports.
local function idle_gap(st)
  local gap = NOW - busy_since(st)
  if gap > (tonumber(A.idle_after) or math.huge) then return gap end
  return 0
end

-- Per-day roll-ups of the usage records, for reports that never read every record.
-- usage_day:{day} holds, for who = JSON [type, account, user], the field who = 'S N I':
-- S the seconds used that day (a record that spans midnight is split over its days), N
-- the records that ended that day, I the idle seconds among S; C<record> for each
-- record that crossed into the day from the one before (a report clips those at its
-- start); and L<record> for a record too odd to split (kept whole, clipped alike).
local function day_key(day) return P .. 'usage_day:' .. day_name(day) end

local function sum_of(text)
  local s, n, i = string.match(text or '', '^(%S+) (%S+) (%S+)$')
  return tonumber(s) or 0, tonumber(n) or 0, tonumber(i) or 0
end

local function add_to(key, who, seconds, count, idle)
  local s, n, i = sum_of(redis.call('HGET', key, who))
  redis.call('HSET', key, who, string.format('%.17g %d %.17g', s + seconds, n + count, i + idle))
end

-- A report keeps the sums of its window's whole days but the last in usage_windows
-- (field 'FIRST:LAST', days since 1970), until a record is folded into one of them.
local FOLDED_DAYS = {}  -- low and high day this script folded into

local function forget_windows()
  if not FOLDED_DAYS[1] then return end
  for _, field in ipairs(redis.call('HKEYS', P .. 'usage_windows')) do
    local a, b = string.match(field, '^(%d+):(%d+)$')
    if not a or (tonumber(a) <= FOLDED_DAYS[2] and tonumber(b) >= FOLDED_DAYS[1]) then
      redis.call('HDEL', P .. 'usage_windows', field)
    end
  end
  FOLDED_DAYS = {}
end

local function fold_record(raw, score)
  local r = decode(raw)
  if not r or not str(r.user) then return end
  local last = math.floor(score / 86400)
  local start, stop = ts(r.start_time), ts(r.end_time)
  local touched = {last}
  if not start or not stop or math.floor(stop) ~= math.floor(score) or stop < start then
    redis.call('HSET', day_key(last), 'L' .. raw, 1)
  else
    local kind = r.reservation_type == 'manual' and 'manual' or 'run'
    local who = cjson.encode({kind, str(r.actual_user) and r.actual_user or r.user, r.user})
    local total = stop - start
    local idle = math.min(tonumber(r.idle_seconds) or 0, total)
    local first = math.floor(start / 86400)
    for day = math.max(first, last - A.history_days), last do
      local part = math.max(0, math.min(stop, (day + 1) * 86400) - math.max(start, day * 86400))
      local key = day_key(day)
      add_to(key, who, part, day == last and 1 or 0, total > 0 and idle * part / total or 0)
      if day > first then redis.call('HSET', key, 'C' .. raw, 1) end
      touched[#touched + 1] = day
    end
  end
  for _, day in ipairs(touched) do
    redis.call('EXPIREAT', day_key(day), (day + 1 + A.history_days) * 86400)
    FOLDED_DAYS[1] = math.min(FOLDED_DAYS[1] or day, day)
    FOLDED_DAYS[2] = math.max(FOLDED_DAYS[2] or day, day)
  end
end

local function folded_upto()
  return tonumber(redis.call('GET', P .. 'usage_folded') or '')
end

-- End whatever holds GPU i, leaving a usage record saying why (release, exit,
-- expired, idle, admin, cancel).
local function free(i, reason)
  local st = S[i]
  if held(st) then
    local start = ts(st.start_time) or NOW
    local rec = {user = st.user, actual_user = st.actual_user, gpu_id = i, start_time = start,
      end_time = NOW, duration_seconds = math.max(0, NOW - start),
      reservation_type = str(st.type) and st.type or 'run', end_reason = reason}
    -- The span that got a reservation reclaimed is idle time, however short the policy.
    local gap = reason == 'idle' and NOW - busy_since(st) or idle_gap(st)
    local idle = (tonumber(st.idle_seconds) or 0) + gap
    if idle > 0 then rec.idle_seconds = math.min(idle, rec.duration_seconds) end
    -- Scored in whole seconds, as the Go tool reads up to the current whole second;
    -- the record keeps the exact times.
    local raw, score = enc(rec), math.floor(NOW)
    redis.call('ZADD', P .. 'usage_history_sorted', score, raw)
    local upto = folded_upto()
    if upto and score <= upto then fold_record(raw, score) end  -- a clock behind the rest
  end
  put(i, {last_released = NOW})
  FREED = true
end

-- Q: live queue entries in order, each {qid=, e=}; LIVE[qid] = entry.
local Q, LIVE = {}, {}

-- A queue entry leaves the queue (its GPUs are the caller's business).
local function remove_entry(qid)
  redis.call('ZREM', P .. 'queue', qid)
  redis.call('DEL', P .. 'queue:entry:' .. qid)
  LIVE[qid] = nil
end

-- A dead or cancelled entry: gone, and the GPUs it had gathered freed.
local function drop_entry(qid, reason)
  remove_entry(qid)
  for i = 0, N - 1 do
    if partial_of(S[i]) == qid then free(i, reason or 'cancel') end
  end
  FREED = true
end

local function load_queue()
  local flat = redis.call('ZRANGE', P .. 'queue', 0, -1, 'WITHSCORES')
  for k = 1, #flat, 2 do
    local qid = flat[k]
    local raw = redis.pcall('GET', P .. 'queue:entry:' .. qid)  -- a wrong type: a dead entry
    local e = type(raw) == 'string' and decode(raw) or nil
    local hb = e and (ts(e.last_heartbeat) or ts(e.enqueue_time))
    if hb and NOW - hb <= (tonumber(e.heartbeat_timeout) or A.defaults.queue_timeout) then
      Q[#Q + 1] = {qid = qid, e = e, score = tonumber(flat[k + 1])}
      LIVE[qid] = e
    else
      drop_entry(qid)
    end
  end
end

-- The hardware shows these GPUs in use now: note it on their holders, closing any
-- idle span (a waiter's gathered GPUs are not in anyone's use yet).
local function observe()
  for _, i in ipairs(A.active or {}) do
    local st = S[i]
    if held(st) and not partial_of(st) then
      local gap = idle_gap(st)
      if gap > 0 then st.idle_seconds = (tonumber(st.idle_seconds) or 0) + gap end
      st.last_active = NOW
      put(i, st)
    end
  end
end

-- Limits and priority classes set with `admin`: field default, user:NAME or group:NAME
-- -> JSON {max_gpus, max_duration, priority} (false: no limit), and the pool's policy
-- {idle_reclaim_after}.  A user's own value wins over its groups' (the most generous
-- of them), which win over the default.
local RULES
local function rules()
  if not RULES then
    RULES = {}
    local flat = redis.call('HGETALL', P .. 'limits')
    for k = 1, #flat, 2 do RULES[flat[k]] = decode(flat[k + 1]) or {} end
  end
  return RULES
end

local function more_generous(key, a, b)
  if key == 'priority' then return (CLASS[a] or 0) > (CLASS[b] or 0) end
  if a == false or b == false then return a == false end
  return (tonumber(a) or 0) > (tonumber(b) or 0)
end

-- who: {actual_user, groups}.  The value that applies, nil or false when none does.
local function rule(who, key)
  local own = rules()['user:' .. tostring(who.actual_user)]
  if own and own[key] ~= nil then return own[key] end
  local best
  for _, g in ipairs(type(who.groups) == 'table' and who.groups or {}) do
    local r = rules()['group:' .. tostring(g)]
    if r and r[key] ~= nil and (best == nil or more_generous(key, r[key], best)) then
      best = r[key]
    end
  end
  if best ~= nil then return best end
  return (rules()['default'] or {})[key]
end

-- GPUs an account holds: its reservations and what its waiters have gathered.
local function holdings(account)
  local n = 0
  for i = 0, N - 1 do if held(S[i]) and owner(S[i]) == account then n = n + 1 end end
  return n
end

-- Whether `who` may hold `more` GPUs beyond what it holds now.
local function fits(who, more)
  local cap = tonumber(rule(who, 'max_gpus'))
  return not cap or holdings(who.actual_user) + more <= cap, cap
end

-- A manual reservation idle this long is ended, if the admin set a policy and the
-- caller has just seen the hardware (a stale view must never end a busy one).
local function reclaim_after()
  if not A.observed then return nil end
  local policy = rules()['policy'] or {}
  return tonumber(policy.idle_reclaim_after)
end

local function reclaim(i, st)
  local idle = NOW - busy_since(st)
  free(i, 'idle')
  redis.call('LPUSH', P .. 'notices', enc({gpu = i, user = st.user,
    actual_user = owner(st), idle = idle, time = NOW}))
  redis.call('LTRIM', P .. 'notices', 0, 99)
  redis.call('EXPIRE', P .. 'notices', 86400)
end

-- Expired reservations end here, in every script that reads the pool: each run by
-- the heartbeat timeout it was made under (stored on it; the built-in default for a
-- record without one, as the Go tool writes), never by the caller's own setting,
-- which would let one user's short timeout end another user's live run.  A run is
-- never reclaimed for idleness: its command lives.
local function expire_pool()
  local idle_limit = reclaim_after()
  for i = 0, N - 1 do
    local st = S[i]
    if held(st) then
      local dead = false
      local qid = partial_of(st)
      if qid then
        dead = not LIVE[qid]
      elseif st.type == 'manual' then
        local e = ts(st.expiry_time)
        dead = e ~= nil and e <= NOW
        if not dead and idle_limit and NOW - busy_since(st) >= idle_limit then
          reclaim(i, st)
        end
      else
        local hb = ts(st.last_heartbeat) or ts(st.start_time)
        local limit = tonumber(st.heartbeat_timeout) or A.defaults.heartbeat_timeout
        dead = hb ~= nil and NOW - hb > limit
      end
      if dead then free(i, 'expired') end
    end
  end
end

-- A run's GPU carries the heartbeat terms of the client that beats it.
local function heartbeat_terms(st)
  st.heartbeat_interval = A.heartbeat.interval
  st.heartbeat_timeout = A.heartbeat.timeout
end

local function settle()
  load_pool()
  load_queue()
  observe()
  expire_pool()
end

-- The host's provider answer, for viewers on other hosts (A.publish, a JSON string);
-- true when the fleet registry is due for a refresh (at most once a minute).
local function publish()
  if not A.publish then return false end
  redis.call('SET', P .. 'usage', A.publish, 'EX', A.usage_ttl)
  return redis.call('SET', P .. 'registered', NOW, 'NX', 'EX', A.registry_every) ~= false
end

local function finish()
  forget_windows()
  if FREED then
    redis.call('ZREMRANGEBYSCORE', P .. 'usage_history_sorted', '-inf',
      string.format('(%d', math.floor(NOW - 86400 * A.history_days)))
  end
  if FREED or WAKE then redis.call('PUBLISH', P .. 'events', FREED and 'released' or 'complete') end
end
"""

# snapshot: status, queue, report and web.  Ends what has expired, then returns the pool.
#   A:     publish? (this host's provider answer, JSON), notices? (take the reclaim
#          notices not yet shown).
#   reply: a Redis array (not JSON): {gpu_count, provider or false, {state JSON or false
#          for each GPU}, {entry JSON for each live queue entry, in order}, the published
#          provider answer or false, 1 if the registry is due for a refresh else 0,
#          {notice JSON, oldest first}}.
LUA_SNAPSHOT = r"""
settle()
local due = publish()
finish()
local states, queue, notices = {}, {}, {}
for i = 0, N - 1 do states[i + 1] = RAW[i] or false end
for k, q in ipairs(Q) do queue[k] = enc(q.e) end
if A.notices then
  notices = redis.call('LRANGE', P .. 'notices', 0, -1)
  redis.call('DEL', P .. 'notices')
end
return {N, redis.call('GET', P .. 'provider') or false, states, queue,
  redis.call('GET', P .. 'usage') or false, due and 1 or 0, notices}
"""

# admin: initialise the pool, or with force re-initialise it, ending every reservation
# (with usage records) and emptying the queue.
#   A:     count (GPUs), provider (nvidia, amd, fake), force (bool).
#   reply: {status = 'exists', count, provider} when a pool exists and force is not set;
#          {status = 'ok', ended (reservations ended), old (the old count, or absent)}.
LUA_ADMIN = r"""
local old = tonumber(redis.call('GET', P .. 'gpu_count') or '')
if old and not A.force then
  return enc({status = 'exists', count = old, provider = redis.call('GET', P .. 'provider')})
end
N = old or 0
load_pool()
local ended = 0
for i = 0, N - 1 do
  if held(S[i]) then ended = ended + 1 end
  if held(S[i]) or S[i] == false then free(i, 'admin') end
end
for i = A.count, N - 1 do redis.call('DEL', P .. 'gpu:' .. i) end
for _, qid in ipairs(redis.call('ZRANGE', P .. 'queue', 0, -1)) do drop_entry(qid, 'admin') end
redis.call('SET', P .. 'gpu_count', A.count)
redis.call('SET', P .. 'provider', A.provider)
FREED = true
finish()
return enc({status = 'ok', ended = ended, old = old})
"""

# release: by ids (any type, the caller's own), by token (a run's own GPUs, or a
# cancelled waiter's), or, with neither, every manual reservation of the caller.
#   A:     actual_user (the caller's account); reason (for the usage records: release,
#          exit or cancel); ids (list), token, entry (a queue entry to remove with the
#          GPUs it gathered) - each optional.
#   reply: {results = [{gpu, result = released|free|other|range|corrupt, type?, user?,
#          actual_user?}]}, one per GPU looked at.
LUA_RELEASE = r"""
load_pool()
local results = {}
local function release(i, reason)
  local st = S[i]
  if i < 0 or i >= N then
    results[#results + 1] = {gpu = i, result = 'range'}
  elseif st == false then
    results[#results + 1] = {gpu = i, result = 'corrupt'}
  elseif not held(st) then
    results[#results + 1] = {gpu = i, result = 'free'}
  elseif owner(st) ~= A.actual_user then
    results[#results + 1] = {gpu = i, result = 'other', user = st.user, actual_user = owner(st)}
  else
    free(i, reason)
    results[#results + 1] = {gpu = i, result = 'released', type = st.type}
  end
end
for _, i in ipairs(A.ids or {}) do release(tonumber(i), A.reason) end
local mine_manual = not A.ids and not A.token and not A.entry
for i = 0, N - 1 do
  local st = S[i]
  if held(st) and not partial_of(st) and ((A.token and st.reservation_id == A.token)
      or (mine_manual and st.type == 'manual' and owner(st) == A.actual_user)) then
    release(i, A.reason)
  end
end
if A.entry then
  for i = 0, N - 1 do
    if partial_of(S[i]) == A.entry then release(i, 'cancel') end  -- each checked as ours
  end
  remove_entry(A.entry)
  FREED = true
end
finish()
return enc({results = results})
"""

# heartbeat: a run's beat, compare-and-set on the reservation token, so a stale
# supervisor can never extend a GPU that has since passed to someone else.
#   A:     token, gpus (ids); active (of those, the ones the hardware showed in use,
#          when the beat sampled it).
#   reply: {lost = [ids no longer held with this token]}.
LUA_HEARTBEAT = r"""
local lost, seen = {}, {}
for _, i in ipairs(A.active or {}) do seen[i] = true end
for _, i in ipairs(A.gpus) do
  local key = P .. 'gpu:' .. i
  local st = decode(redis.call('GET', key))
  if held(st) and st.reservation_id == A.token and not partial_of(st) then
    st.last_heartbeat = NOW
    if seen[i] then
      local gap = idle_gap(st)
      if gap > 0 then st.idle_seconds = (tonumber(st.idle_seconds) or 0) + gap end
      st.last_active = NOW
    end
    redis.call('SET', key, enc(st))
  else
    lost[#lost + 1] = i
  end
end
return enc({lost = lost})
"""

# extend: more time on the caller's manual reservations, within its max_duration.
#   A:     actual_user, groups (the account's Unix groups, for its limits), duration
#          (s to add), ids? (only these GPUs), token? (only GPUs of this reservation:
#          compare-and-set), request (an id: a replay after a failover extends once).
#   reply: {results = [{gpu, result = extended|free|other|run|range|corrupt|limit,
#          expiry?, max?, length?}]}.
LUA_EXTEND = r"""
settle()
local results = {}
local cap = tonumber(rule(A, 'max_duration'))
local function extend(i, quiet)
  local st = S[i]
  local r = {gpu = i}
  if i < 0 or i >= N then r.result = 'range'
  elseif st == false then r.result = 'corrupt'
  elseif not held(st) or partial_of(st) then r.result = 'free'
  elseif owner(st) ~= A.actual_user or (A.token and st.reservation_id ~= A.token) then
    r.result = 'other'; r.user = st.user; r.actual_user = owner(st)
  elseif st.type ~= 'manual' then r.result = 'run'
  else
    local expiry = ts(st.expiry_time) or NOW
    if st.extend_request ~= A.request then expiry = expiry + A.duration end
    local length = expiry - (ts(st.start_time) or NOW)
    if cap and length > cap then
      r.result = 'limit'; r.max = cap; r.length = length
    else
      st.expiry_time = expiry
      st.extend_request = A.request
      put(i, st)
      r.result = 'extended'; r.expiry = expiry
    end
  end
  if not quiet or r.result == 'extended' or r.result == 'limit' then
    results[#results + 1] = r
  end
end
if A.ids then
  for _, i in ipairs(A.ids) do extend(tonumber(i), false) end
else
  for i = 0, N - 1 do
    if held(S[i]) and S[i].type == 'manual' and owner(S[i]) == A.actual_user then
      extend(i, true)
    end
  end
end
finish()
return enc({results = results})
"""

# allocate: allocation and the FCFS queue, in one atomic step, within the limits.
#   A:     req {user, actual_user, groups, type (run|manual), count, ids?, duration (s,
#          manual), duration_given (the user chose it), timeout? (s, run), priority
#          (asked), note?, token, force?, host, pid, block, wait? (s), entry? (our queue
#          entry: a waiter's poll), new_entry and enqueue_ns (when block and no entry)};
#          unreserved (ids the hardware shows in use); publish?; replay (a retry after a
#          failover: the first try may have landed); class_offset (ns per queue class).
#   reply: {status = 'ok', gpus, duration?, timeout?, capped?} | {status = 'queued',
#          position, have, need, waiting} | {status = 'unavailable', free, unreserved,
#          held_back, waiting, reasons = [{gpu, reason = held|unreserved|queued|corrupt,
#          user?, type?}]} | {status = 'limit', what = gpus|duration|timeout, max, asked,
#          holds?, user} | {status = 'invalid', reason = toomany|range|priority, gpu?,
#          pool?, class?} | {status = 'nopool'} | {status = 'gone'} (a poll whose entry
#          was dropped as stale); each may carry register = true (refresh the registry).
#
# Fairness without head-of-line blocking: walking the queue in order (class by class,
# then first come, first served), each waiter gathers the free GPUs it may take; a
# waiter still short of a *count* then holds back every free GPU from those behind it,
# a waiter for *ids* only those ids.  A newcomer may take only what no waiter holds
# back.  A waiter whose account's max_gpus leaves no room to complete neither gathers
# nor holds back: it waits for its own user, not everyone.
LUA_ALLOCATE = r"""
settle()
local REGISTER = publish()
local R = A.req
local function reply(t)
  finish()
  if REGISTER then t.register = true end
  return enc(t)
end
if N <= 0 then return reply({status = 'nopool'}) end
if (R.count or 0) > N then
  return reply({status = 'invalid', reason = 'toomany', pool = N})
end
for _, i in ipairs(R.ids or {}) do
  if i >= N then return reply({status = 'invalid', reason = 'range', gpu = i, pool = N}) end
end
if A.replay and R.new_entry and LIVE[R.new_entry] then R.entry = R.new_entry end

-- A.unreserved is what the hardware shows in use; only a --force request may take those.
local UNRES = {}
for _, i in ipairs(A.unreserved or {}) do UNRES[i] = true end
local function usable(i, req)
  return S[i] ~= false and not held(S[i]) and (req.force or not UNRES[i])
end

local HISTORY
local function recent_use(actual_user, user)
  if not HISTORY then
    HISTORY = {}
    for _, raw in ipairs(redis.call('ZREVRANGE', P .. 'usage_history_sorted', 0, 999)) do
      HISTORY[#HISTORY + 1] = decode(raw)
    end
  end
  local last = {}
  for _, r in ipairs(HISTORY) do
    local mine
    if str(r.actual_user) then mine = r.actual_user == actual_user
    else mine = r.user == user or r.user == actual_user end
    local g, t = tonumber(r.gpu_id), ts(r.end_time)
    if mine and g and t and (not last[g] or t > last[g]) then last[g] = t end
  end
  return last
end

-- MRU for this user, then least recently released (never used first), then id.
local function ordered(cands, who)
  local mru = recent_use(who.actual_user, who.user)
  local function released(i) return ts(S[i].last_released) or -1 end
  table.sort(cands, function(a, b)
    local ma, mb = mru[a], mru[b]
    if ma and mb and ma ~= mb then return ma > mb end
    if (ma == nil) ~= (mb == nil) then return ma ~= nil end
    local la, lb = released(a), released(b)
    if la ~= lb then return la < lb end
    return a < b
  end)
  return cands
end

-- A reservation's deadline: a manual one expires, a run with a timeout is stopped.
local function deadlines(st, who)
  if who.type == 'manual' then st.expiry_time = NOW + who.duration
  else
    heartbeat_terms(st)
    if who.timeout then st.timeout_at = NOW + who.timeout end
  end
end

local function grant(i, who, qid)
  local st = {user = who.user, actual_user = who.actual_user, type = who.type,
    start_time = NOW, last_heartbeat = NOW, reservation_id = who.token,
    host = who.host, pid = who.pid}
  if str(who.note) then st.note = who.note end
  if qid then st.partial_queue_id = qid else deadlines(st, who) end
  put(i, st)
end

-- GPUs earlier waiters hold back: their missing ids, or (a count waiter still
-- short) every GPU; either way only the GPUs that waiter can use.
local hold_all, hold_unres, blocked = false, false, {}
local function withheld(i)
  return blocked[i] or (hold_all and (hold_unres or not UNRES[i]))
end

local function request_of(e, qid)
  local ids = {}
  if type(e.requested_ids) == 'table' then
    for _, i in ipairs(e.requested_ids) do ids[#ids + 1] = tonumber(i) end
  end
  local dur = tonumber(e.expiry_duration)
  return {user = e.user, actual_user = str(e.actual_user) and e.actual_user or e.user,
    groups = e.groups, type = str(e.reservation_type) and e.reservation_type or 'run',
    count = tonumber(e.requested_count) or #ids, ids = ids, note = e.note,
    token = str(e.reservation_id) and e.reservation_id or qid, host = e.host, pid = e.pid,
    force = e.force == true, duration = dur and dur / 1e9 or 0, timeout = tonumber(e.timeout)}
end

-- GPUs already gathered by queue entry qid.
local function holding(qid)
  local have = {}
  for i = 0, N - 1 do if partial_of(S[i]) == qid then have[#have + 1] = i end end
  return have
end

-- What a request still lacks given what it holds: {missing ids} or a count.
local function lacking(req, have)
  if #req.ids == 0 then return nil, req.count - #have end
  local got, missing = {}, {}
  for _, i in ipairs(have) do got[i] = true end
  for _, i in ipairs(req.ids) do if not got[i] then missing[#missing + 1] = i end end
  return missing, #missing
end

-- Free GPUs this request may take now, best first.
local function candidates(req, missing)
  local cands = {}
  for _, i in ipairs(missing or {}) do
    if usable(i, req) and not withheld(i) then cands[#cands + 1] = i end
  end
  if not missing then
    for i = 0, N - 1 do
      if usable(i, req) and not withheld(i) then cands[#cands + 1] = i end
    end
  end
  return ordered(cands, req)
end

-- A waiter gathers what it may take; if still short, it holds back the rest.
local function gather(qid, e)
  local req = request_of(e, qid)
  local have = holding(qid)
  local missing, need = lacking(req, have)
  local took = 0
  local room = need > 0 and fits(req, need)
  if room then
    local cands = candidates(req, missing)
    for k = 1, math.min(need, #cands) do
      grant(cands[k], req, qid)
      have[#have + 1] = cands[k]
      took = took + 1
    end
  end
  -- Keep allocated_gpus exact: a Go client releases what it lists when it drops the entry.
  local listed = type(e.allocated_gpus) == 'table' and #e.allocated_gpus or -1
  if took > 0 or listed ~= #have then
    table.sort(have)
    e.allocated_gpus = have
    redis.call('SET', P .. 'queue:entry:' .. qid, enc(e))
  end
  missing, need = lacking(req, have)
  if took > 0 and need == 0 and qid ~= R.entry then WAKE = true end
  if need > 0 and room then
    for _, i in ipairs(missing or {}) do
      if req.force or not UNRES[i] then blocked[i] = true end
    end
    if not missing then
      hold_all = true
      hold_unres = hold_unres or req.force
    end
  end
  return have, need, req
end

-- A complete waiter turns its gathered GPUs into one reservation and leaves.
local function complete(qid, have, req)
  for _, i in ipairs(have) do
    local st = S[i]
    st.partial_queue_id = nil
    st.last_heartbeat = NOW
    st.reservation_id = R.token
    deadlines(st, req)
    put(i, st)
  end
  remove_entry(qid)
  return reply({status = 'ok', gpus = have, duration = req.type == 'manual' and req.duration
    or nil, timeout = req.timeout})
end

local function queued(pos, have, need)
  return reply({status = 'queued', position = pos, have = have, need = need, waiting = #Q})
end

if str(R.entry) then
  for pos, q in ipairs(Q) do
    local have, need, req = gather(q.qid, q.e)
    if q.qid == R.entry then
      if need == 0 then return complete(q.qid, have, req) end
      -- The poll is the heartbeat, of the entry and of its partial GPUs (a Go
      -- client ends a run-type GPU whose last_heartbeat is old).
      q.e.last_heartbeat = NOW
      redis.call('SET', P .. 'queue:entry:' .. q.qid, enc(q.e))
      for _, i in ipairs(have) do
        S[i].last_heartbeat = NOW
        put(i, S[i])
      end
      return queued(pos, have, need)
    end
  end
  return reply({status = 'gone'})
end

-- A replayed request whose first try was granted gets those GPUs, not more.
if A.replay then
  local mine = {}
  for i = 0, N - 1 do
    if held(S[i]) and not partial_of(S[i]) and S[i].reservation_id == R.token then
      mine[#mine + 1] = i
    end
  end
  if #mine > 0 then return reply({status = 'ok', gpus = mine}) end
end

-- The terms this account may have: its class, its longest reservation, its GPUs.
local class = rule(R, 'priority') or 'normal'
local asked = R.priority or class
if (CLASS[asked] or 2) > (CLASS[class] or 2) then
  return reply({status = 'invalid', reason = 'priority', class = class})
end
local longest, capped = tonumber(rule(R, 'max_duration')), nil
if longest and R.type == 'manual' and R.duration > longest then
  if R.duration_given then
    return reply({status = 'limit', what = 'duration', max = longest, asked = R.duration,
      user = R.actual_user})
  end
  R.duration, capped = longest, longest
elseif longest and R.type ~= 'manual' then
  if R.timeout and R.timeout > longest then
    return reply({status = 'limit', what = 'timeout', max = longest, asked = R.timeout,
      user = R.actual_user})
  end
  if not R.timeout then R.timeout, capped = longest, longest end
end
local wanted = (R.ids and #R.ids > 0) and #R.ids or R.count
local room, cap = fits(R, wanted)
if not room then
  return reply({status = 'limit', what = 'gpus', max = cap, asked = wanted,
    holds = holdings(R.actual_user), user = R.actual_user})
end

-- The newcomer's place: its class is in the score itself, so a Go waiter, which serves
-- the lowest score first, keeps the same order.  Those ahead of it gather first.
local score = (tonumber(R.enqueue_ns) or NOW * 1e9) - ((CLASS[asked] or 2) - 2) * A.class_offset
local ahead = 0
while ahead < #Q and Q[ahead + 1].score <= score do
  ahead = ahead + 1
  gather(Q[ahead].qid, Q[ahead].e)
end
local function behind()
  for k = ahead + 1, #Q do gather(Q[k].qid, Q[k].e) end
end

-- The newcomer as the queue entry it becomes if it waits; as a request, read from that.
local e = {id = R.new_entry, user = R.user, actual_user = R.actual_user,
  requested_count = R.count, allocated_gpus = {}, reservation_type = R.type,
  enqueue_time = NOW, last_heartbeat = NOW, reservation_id = R.token, host = R.host,
  pid = R.pid, heartbeat_timeout = A.queue_timeout}
if R.ids and #R.ids > 0 then e.requested_ids = R.ids end
if R.type == 'manual' then e.expiry_duration = math.floor(R.duration * 1e9 + 0.5) end
if R.timeout then e.timeout = R.timeout end
if str(R.note) then e.note = R.note end
if R.force then e.force = true end
if type(R.groups) == 'table' and #R.groups > 0 then e.groups = R.groups end
if asked ~= 'normal' then e.priority = asked end
if R.wait then e.wait_timeout = NOW + R.wait end  -- Go's field is the deadline, a time
local req = request_of(e, R.token)
local missing, need = lacking(req, {})
local cands = candidates(req, missing)
if #cands >= need then
  local gpus = {}
  for k = 1, need do grant(cands[k], req, nil); gpus[k] = cands[k] end
  table.sort(gpus)
  behind()
  return reply({status = 'ok', gpus = gpus, duration = R.type == 'manual' and R.duration or nil,
    timeout = R.timeout, capped = capped})
end

if not R.block then
  -- Say why, GPU by GPU for ids, in totals for a count.
  local reasons, free_now, unreserved, held_back = {}, 0, 0, 0
  for i = 0, N - 1 do
    if S[i] ~= false and not held(S[i]) then
      if not usable(i, req) then unreserved = unreserved + 1
      elseif withheld(i) then held_back = held_back + 1
      else free_now = free_now + 1 end
    end
  end
  for _, i in ipairs(missing or {}) do
    local st = S[i]
    local why = {gpu = i}
    if st == false then why.reason = 'corrupt'
    elseif held(st) then why.reason = 'held'; why.user = st.user; why.type = st.type
    elseif not usable(i, req) then why.reason = 'unreserved'
    elseif withheld(i) then why.reason = 'queued'
    else why = nil end
    if why then reasons[#reasons + 1] = why end
  end
  behind()
  return reply({status = 'unavailable', free = free_now, unreserved = unreserved,
    held_back = held_back, waiting = #Q, reasons = reasons})
end

-- Join the queue in its place and gather what no earlier waiter holds back.
redis.call('ZADD', P .. 'queue', string.format('%.0f', score), R.new_entry)
redis.call('SET', P .. 'queue:entry:' .. R.new_entry, enc(e))
table.insert(Q, ahead + 1, {qid = R.new_entry, e = e, score = score})
local have, still = gather(R.new_entry, e)
ahead = ahead + 1
behind()
return queued(ahead, have, still)
"""

# report: fold the usage records into the per-day roll-ups, then gather a window.
#   A:     since (s, the window's start), upto (fold the records scored up to here),
#          batch (fold at most this many records in one call).
#   reply: a Redis array: {JSON} when records are left to fold ({more = true}: call
#          again); else {JSON, gpu_count, provider or false, {state JSON or false for
#          each GPU}} (the pool as the snapshot script returns it, after ending what
#          expired), the JSON being {sums = [[type, account, user, seconds, count, idle
#          seconds]] of the window's whole days (from `split`, the midnight after its
#          start), records = [the JSON of each record to clip one by one: those that
#          ended before `split`, those not folded yet, the odd ones], crossing = [the
#          JSON of the folded records that ran over `split`: the part before it is
#          theirs to add], split, migrated}.
LUA_REPORT = r"""
settle()
finish()
local H = P .. 'usage_history_sorted'
local function num(v) return string.format('%.17g', v) end
local W = folded_upto()
local rows = redis.call('ZRANGEBYSCORE', H, W and '(' .. num(W) or '-inf', A.upto,
  'WITHSCORES', 'LIMIT', 0, A.batch)
local n = #rows / 2
if n < A.batch then
  for k = 1, #rows, 2 do fold_record(rows[k], tonumber(rows[k + 1])) end
  forget_windows()
  W = math.max(W or A.upto, A.upto)
  redis.call('SET', P .. 'usage_folded', num(W))
else
  -- A full batch: fold up to the last second it has whole (or, when one second holds
  -- more than a batch, that second whole), then ask to be called again.
  local first, last = tonumber(rows[2]), tonumber(rows[#rows])
  if first == last then
    rows = redis.call('ZRANGEBYSCORE', H, num(last), num(last), 'WITHSCORES')
  end
  for k = 1, #rows, 2 do
    local score = tonumber(rows[k + 1])
    if first == last or score < last then
      fold_record(rows[k], score)
      W = score
    end
  end
  forget_windows()
  redis.call('SET', P .. 'usage_folded', num(W))
  return {enc({more = true})}
end

local since = tonumber(A.since)
local d1 = (math.floor(since / 86400) + 1) * 86400
local records = {}
local function exact(lo, hi)
  for _, raw in ipairs(redis.call('ZRANGEBYSCORE', H, lo, hi)) do records[#records + 1] = raw end
end

-- The roll-ups of days first..last: {sums = {who = {seconds, count, idle}}, L = {odd
-- records}, C = {records crossing into day `first`}}.
local function days_of(first, last)
  local part = {sums = {}, L = {}, C = {}}
  for day = first, last do
    local flat = redis.call('HGETALL', P .. 'usage_day:' .. day_name(day))
    for k = 1, #flat, 2 do
      local field, mark = flat[k], string.byte(flat[k])
      if mark == 91 then  -- '[': a sum
        local a = part.sums[field] or {0, 0, 0}
        local s, n, i = sum_of(flat[k + 1])
        part.sums[field] = {a[1] + s, a[2] + n, a[3] + i}
      elseif mark == 76 then  -- 'L'
        part.L[#part.L + 1] = string.sub(field, 2)
      elseif day == first then  -- 'C', at the window's first midnight
        part.C[#part.C + 1] = string.sub(field, 2)
      end
    end
  end
  return part
end

-- All but the last day come from usage_windows when an earlier report summed them.
local function whole_days(first, last)
  if last <= first then return {days_of(first, last)} end
  local field = first .. ':' .. (last - 1)
  local kept = redis.call('HGET', P .. 'usage_windows', field)
  local early = kept and cjson.decode(kept)
  if not early then
    early = days_of(first, last - 1)
    redis.call('HSET', P .. 'usage_windows', field, cjson.encode(early))
    redis.call('EXPIRE', P .. 'usage_windows', 2 * 86400)
  end
  return {early, days_of(last, last)}
end

local acc, order, crossing = {}, {}, {}
if W >= d1 then
  exact(num(since), '(' .. num(d1))
  exact('(' .. num(W), '+inf')
  local parts = whole_days(d1 / 86400, math.floor(W / 86400))
  crossing = parts[1].C
  for _, part in ipairs(parts) do
    for _, raw in ipairs(part.L) do records[#records + 1] = raw end
    for who, v in pairs(part.sums) do
      local a = acc[who]
      if not a then a = {0, 0, 0}; acc[who] = a; order[#order + 1] = who end
      a[1], a[2], a[3] = a[1] + v[1], a[2] + v[2], a[3] + v[3]
    end
  end
else
  exact(num(since), '+inf')
end
local sums = {}
for _, who in ipairs(order) do
  local w, a = cjson.decode(who), acc[who]
  sums[#sums + 1] = {w[1], w[2], w[3], a[1], a[2], a[3]}
end
local states = {}
for i = 0, N - 1 do states[i + 1] = RAW[i] or false end
return {enc({sums = sums, records = records, crossing = crossing, split = d1,
  migrated = redis.call('EXISTS', P .. 'legacy_migrated') == 1}),
  N, redis.call('GET', P .. 'provider') or false, states}
"""

# migrate: the legacy per-record history keys of old versions (usage_history:*) move
# into the sorted set, once: each record is added and its key deleted in one step.
#   KEYS[2..]: this batch of legacy keys.  A: done (the last batch: mark it finished).
#   reply: {moved = records moved}.
LUA_MIGRATE = r"""
local moved, upto = 0, folded_upto()
local horizon = NOW - 86400 * A.history_days
for k = 2, #KEYS do
  local raw = redis.pcall('GET', KEYS[k])
  if type(raw) == 'string' then
    local r = decode(raw)
    local stop = r and ts(r.end_time)
    if stop and stop >= horizon then
      redis.call('ZADD', P .. 'usage_history_sorted', stop, raw)
      if upto and stop <= upto then fold_record(raw, stop) end
      moved = moved + 1
    end
    redis.call('DEL', KEYS[k])
  end
end
if A.done then redis.call('SET', P .. 'legacy_migrated', NOW) end
return enc({moved = moved})
"""


def require_module(name, debian_package):
    """Import a runtime dependency, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise CanhazError(
            f"the Python package '{name}' is not installed for {sys.executable}",
            hint=f"install it: apt-get install {debian_package}, or pip install {name}",
        ) from None


def json_object(raw):
    """A JSON object read from Redis, or None (malformed, or not an object)."""
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Store:
    """One Redis: a plain server, a master found through Sentinel, or a Cluster.  Every
    call goes through here: the Lua scripts (one round trip each, EVALSHA), plain
    commands, pipelined reads of many pools, and what a failover asks of each."""

    SCRIPTS = {
        "snapshot": LUA_SNAPSHOT,
        "admin": LUA_ADMIN,
        "allocate": LUA_ALLOCATE,
        "release": LUA_RELEASE,
        "heartbeat": LUA_HEARTBEAT,
        "extend": LUA_EXTEND,
        "report": LUA_REPORT,
        "migrate": LUA_MIGRATE,
    }
    # Scripts that grant, release or extend: a user is told of what they did, so with
    # replicas they wait until one has it too (WAIT), and a failover cannot undo it.
    DURABLE = ("admin", "allocate", "release", "extend")

    def __init__(self, config, client=None):
        self.config = config
        address = config.redis_address()
        self.url = address.url()
        self.mode = "sentinel" if config["redis.sentinels"] else "plain"
        if config["redis.cluster"]:
            if self.mode == "sentinel":
                raise UsageError("redis.cluster and redis.sentinels exclude each other")
            self.mode = "cluster"
        # As shown in messages: without the password, with the sources that set it.
        self.address = self._describe(address)
        self.redis = client if client is not None else self._connect(address)
        self._sha = {}
        self._replicas = None  # the master's replicas, asked before the first durable script
        self._told = set()  # one-time messages already given

    def _describe(self, address):
        if self.mode == "sentinel":
            hosts = ",".join(f"{h}:{p}" for h, p in self.config["redis.sentinels"])
            return (
                f"master {self.config['redis.master_name']!r} of Sentinel {hosts} "
                f"(from {self.config.source('redis.sentinels')})"
            )
        kind = "Redis Cluster at " if self.mode == "cluster" else ""
        return f"{kind}{redacted(self.url)} ({address.origin()})"

    def _connect(self, address):
        redis = require_module("redis", "python3-redis")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No silent retries with back-off: a dead Redis is one clear line, at once;
        # a frozen one (accepts, never answers) within a few seconds.
        options = dict(
            decode_responses=True,
            socket_connect_timeout=3,
            socket_timeout=3,
            encoding_errors="replace",  # a corrupt value must not fail every reader
            retry=Retry(NoBackoff(), 0),
        )
        try:
            if self.mode == "sentinel":
                return self._sentinel_master(address, options)
            if self.mode == "cluster":
                from redis.cluster import RedisCluster

                options.pop("retry")
                return RedisCluster.from_url(self.url, **options)
            return redis.Redis.from_url(self.url, **options)
        except ValueError as e:
            raise UsageError(f"invalid Redis URL {self.address}: {e}") from None
        except redis.RedisError as e:  # a Cluster is asked for its slots at once
            raise self.failure(e) from None

    def _sentinel_master(self, address, options):
        """The master that the Sentinels name; the password and db are the URL's."""
        from urllib.parse import unquote, urlsplit

        from redis.sentinel import Sentinel

        url = urlsplit(self.url) if address.scheme != "unix" else None
        if url is not None and url.password is not None:
            options["password"] = unquote(url.password)
            options["username"] = unquote(url.username) if url.username else None
        options["db"] = address.db
        watchers = {"socket_timeout": 1, "socket_connect_timeout": 1}
        if self.config["redis.sentinel_password"]:
            watchers["password"] = self.config["redis.sentinel_password"]
        self.sentinel = Sentinel(
            self.config["redis.sentinels"], sentinel_kwargs=watchers, **options
        )
        return self.sentinel.master_for(self.config["redis.master_name"])

    def failing_over(self, error):
        """Whether a lost master is worth waiting for: behind Sentinel, only if some
        Sentinel answers and knows the master's name (a typo must not wait 30 s)."""
        if self.mode == "cluster":
            return True
        if self.mode != "sentinel" or type(error).__name__ != "MasterNotFoundError":
            return self.mode == "sentinel"
        for watcher in getattr(self, "sentinel", None).sentinels:
            try:
                if watcher.sentinel_get_master_addr_by_name(self.config["redis.master_name"]):
                    return True
            except Exception:  # that Sentinel is away too
                continue
        return False

    def failure(self, error):
        """Turn a redis-py exception into one clear line."""
        import redis

        if str(error).startswith("BADKEY "):  # a script found one of our keys mangled
            key = str(error).split()[1]
            return CanhazError(
                f"Redis key {str(error)[7:].split(' script:')[0]}",
                hint=f"nothing was changed; an admin can inspect it and `redis-cli DEL {key}`",
            )
        if type(error).__name__ == "MasterNotFoundError":
            return CanhazError(
                f"no Sentinel answered with a master for {self.address}",
                hint="check redis.sentinels and redis.master_name (sentinel monitor NAME ...)",
            )
        # First: redis-py's AuthenticationError is a ConnectionError.
        if isinstance(error, redis.AuthenticationError) or "NOAUTH" in str(error):
            hint = "give the password in the URL: --redis-url redis://:PASSWORD@host:port/db"
            if "***" not in self.address:
                return CanhazError(f"Redis at {self.address} needs a password", hint=hint)
            reason = str(error).split(", otherwise")[0].rstrip(".")
            return CanhazError(f"Redis at {self.address} refused the password: {reason}", hint=hint)
        if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
            reason = str(error).split(". ")[-1].rstrip(".") or type(error).__name__
            return CanhazError(
                f"cannot reach Redis at {self.address}: {reason}",
                hint="start it with `redis-server`, or point canhazgpu at yours "
                "with --redis-url or CANHAZGPU_REDIS_URL",
            )
        return CanhazError(f"Redis at {self.address} failed: {error}")

    def tell_once(self, message):
        if message not in self._told:
            self._told.add(message)
            warn(message)

    def retrying(self, attempt, patient=True):
        """attempt(replay) -> its result, with failures turned into CanhazError.  A
        plain Redis is tried once.  Behind Sentinel or in a Cluster, a connection lost
        to a failover is tried again (replay=True) until the new master answers, for
        at most redis.failover_timeout."""
        import redis

        lost = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)
        give_up, replay = None, False
        while True:
            try:
                return attempt(replay)
            except lost as e:
                if not patient or isinstance(e, redis.AuthenticationError):
                    raise self.failure(e) from None
                if give_up is None and not self.failing_over(e):
                    raise self.failure(e) from None
                now = time.monotonic()
                if give_up is None:
                    patience = self.config["redis.failover_timeout"]
                    give_up = now + patience
                    reason = str(e).split(". ")[-1].rstrip(".") or type(e).__name__
                    tell(
                        f"canhazgpu: lost the Redis master ({reason}); retrying while it "
                        f"fails over (up to {format_span(patience)})"
                    )
                if now >= give_up:
                    raise self.failure(e) from None
                self.reconnect()
                self._replicas = None  # a new master has replicas of its own
                replay = True
                time.sleep(0.2)
            except redis.RedisError as e:
                raise self.failure(e) from None

    def payload(self, args, replay=False):
        """A script's ARGV[1]: its own arguments and the ones every script reads."""
        args = {k: v for k, v in args.items() if v is not None}  # JSON null is true in Lua
        if isinstance(args.get("req"), dict):
            args["req"] = {k: v for k, v in args["req"].items() if v is not None}
        args.setdefault("now", time.time())
        # Ours go on what we grant and queue; what others hold expires by its own.
        args["heartbeat"] = {
            "interval": self.config["heartbeat.interval"],
            "timeout": self.config["heartbeat.timeout"],
        }
        args["queue_timeout"] = self.config["queue.heartbeat_timeout"]
        args["history_days"] = HISTORY_DAYS
        args["defaults"] = {
            "heartbeat_timeout": SETTINGS["heartbeat.timeout"][1],
            "queue_timeout": SETTINGS["queue.heartbeat_timeout"][1],
        }
        args["idle_after"] = self.config["idle.after"]
        args["usage_ttl"], args["registry_every"] = USAGE_TTL, REGISTRY_EVERY
        args["class_offset"] = CLASS_OFFSET_NS
        if replay:
            args["replay"] = True
        return json.dumps(args)

    def script(self, name, prefix=KEY, keys=(), patient=True, **args):
        """Run one of SCRIPTS on a pool (its key prefix) with its JSON argument; returns
        what the script returns."""

        def attempt(replay):
            return self._eval(name, [prefix, *keys], self.payload(args, replay))

        reply = self.retrying(attempt, patient)
        return json.loads(reply) if isinstance(reply, str) else reply

    def _sha_of(self, name):
        if name not in self._sha:
            import hashlib

            self._sha[name] = hashlib.sha1((LUA_LIB + self.SCRIPTS[name]).encode()).hexdigest()
        return self._sha[name]

    def _eval(self, name, keys, payload):
        import redis

        sha = self._sha_of(name)
        wait = self.replicas() if name in self.DURABLE else 0
        for loaded in (False, True):
            try:
                if not wait:
                    return self.redis.evalsha(sha, len(keys), *keys, payload)
                # One connection for both, as WAIT counts that connection's writes.
                pipe = self.redis.pipeline(transaction=False)
                pipe.evalsha(sha, len(keys), *keys, payload)
                pipe.execute_command("WAIT", wait, self.config["redis.wait_timeout"])
                reply, acked = pipe.execute(raise_on_error=False)
                if isinstance(reply, Exception):
                    raise reply
                if isinstance(acked, int) and acked < wait:
                    self._replicas = None  # a replica gone (or a new master): ask again
                    if self.replicas() > acked:
                        self.tell_once(
                            f"no replica confirmed the change within "
                            f"{self.config['redis.wait_timeout']} ms; a failover now could lose it"
                        )
                return reply
            except redis.exceptions.NoScriptError:
                if loaded:
                    raise
                self.redis.script_load(LUA_LIB + self.SCRIPTS[name])

    def replicas(self):
        """How many replicas a durable script waits for: redis.wait_replicas, or fewer
        if the master has fewer (none: no WAIT at all).  A Cluster's scripts run on
        the master of each pool's slot; WAIT is left to a plain server and Sentinel."""
        import redis

        wanted = self.config["redis.wait_replicas"]
        if self.mode == "cluster" or not wanted:
            return 0
        if self._replicas is None:
            try:
                info = self.redis.info("replication")
                self._replicas = int(info.get("connected_slaves", 0))
            except (redis.ResponseError, ValueError, TypeError):  # INFO refused by an ACL
                self._replicas = 0
        return min(wanted, self._replicas)

    def do(self, method, *args, patient=True):
        """One plain Redis command, with its failure turned into a clear line."""
        return self.retrying(lambda replay: getattr(self.redis, method)(*args), patient)

    def pipeline(self, calls):
        """Plain commands [(method, *args)] in one round trip (per node in a Cluster)."""

        def attempt(replay):
            pipe = self.redis.pipeline(transaction=False)
            for method, *args in calls:
                getattr(pipe, method)(*args)
            return pipe.execute()

        return self.retrying(attempt)

    def scripts(self, calls):
        """Scripts on many pools, [(name, prefix, args)], pipelined: one round trip per
        Redis node whatever the number of pools.  Returns each reply, or the
        CanhazError that call met (one pool's trouble is that pool's alone)."""
        if not calls:
            return []
        if self.mode == "cluster":
            return self._cluster_scripts(calls)
        return self.retrying(lambda replay: self._pipelined(self.redis, calls))

    def _pipelined(self, client, calls):
        import redis

        pending, replies = list(range(len(calls))), [None] * len(calls)
        for loaded in (False, True):
            pipe = client.pipeline(transaction=False)
            for k in pending:
                name, prefix, args = calls[k]
                pipe.evalsha(self._sha_of(name), 1, prefix, self.payload(args))
            results = pipe.execute(raise_on_error=False)
            missing = []
            for k, result in zip(pending, results):
                if isinstance(result, redis.exceptions.NoScriptError) and not loaded:
                    missing.append(k)
                elif isinstance(result, Exception):
                    replies[k] = self.failure(result)
                else:
                    replies[k] = json.loads(result) if isinstance(result, str) else result
            if not missing:
                break
            for name in {calls[k][0] for k in missing}:
                client.script_load(LUA_LIB + self.SCRIPTS[name])
            pending = missing
        return replies

    def _cluster_scripts(self, calls):
        """In a Cluster, pools are grouped by the node that serves their slot; each
        node's scripts go in one pipeline, and the nodes are asked in parallel."""
        import threading

        groups = {}
        for k, (_, prefix, _) in enumerate(calls):
            node = self.retrying(lambda replay, p=prefix: self.redis.get_node_from_key(p))
            groups.setdefault(node.name, (node, []))[1].append(k)
        replies = [None] * len(calls)

        def ask(node, ks):
            try:
                client = self.redis.get_redis_connection(node)
                for k, reply in zip(ks, self._pipelined(client, [calls[k] for k in ks])):
                    replies[k] = reply
            except Exception:  # a node away, or slots moving: pool by pool instead
                for k in ks:
                    try:
                        replies[k] = self.script(calls[k][0], calls[k][1], **calls[k][2])
                    except CanhazError as error:
                        replies[k] = error

        threads = [threading.Thread(target=ask, args=g) for g in groups.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return replies

    def subscribe(self, channel):
        """A pub/sub subscription (a connection of its own), Redis checked first."""
        self.do("ping")
        events = self.redis.pubsub(ignore_subscribe_messages=True)
        events.subscribe(channel)
        return events

    def reconnect(self):
        """Drop every connection: the next command starts afresh (a signal may have cut
        a reply in half, or the master may have moved)."""
        pool = getattr(self.redis, "connection_pool", None)
        if pool is not None:
            pool.disconnect()

    def registry(self):
        """The fleet's registered pools: {name: {host, gpu_count, provider, ...}}."""
        return {
            name: info
            for name, info in (
                (n, json_object(raw)) for n, raw in self.do("hgetall", REGISTRY).items()
            )
            if info is not None
        }


# ============================================================================
# GPU providers
# ============================================================================
#
# A provider tells what the hardware says: memory used per GPU and the
# processes on it.  Reservations are Redis's business; a GPU whose memory is
# above the threshold while no reservation holds it is "in use without
# reservation".  A provider that fails never stops a command: status shows
# validation as unavailable and allocation goes on with reservations alone.

PROVIDERS = ("nvidia", "amd", "fake")
TOOL_TIMEOUT = 10.0
NOT_A_VALUE = ("[N/A]", "[Not Supported]", "[Insufficient Permissions]", "N/A", "[Unknown Error]")


class ProviderError(Exception):
    pass


class GpuProcess:
    def __init__(self, pid, name, memory_mb):
        self.pid, self.name, self.memory_mb = pid, name, memory_mb
        self.owner = None  # filled from /proc; unknown for PIDs of another namespace
        self.model = None

    def label(self):
        return f"PID {self.pid} ({self.name})" if self.pid else f"({self.name})"


class GpuUsage:
    def __init__(self, index, uuid, name, memory_used, memory_total):
        self.index, self.uuid, self.name = index, uuid, name
        self.memory_used, self.memory_total = memory_used, memory_total
        self.processes = []

    @property
    def used_mb(self):
        """Memory in use in MB; from its processes when the GPU itself does not say."""
        if self.memory_used is not None:
            return self.memory_used
        known = [p.memory_mb for p in self.processes if p.memory_mb is not None]
        return sum(known) if known else None

    def in_use(self, threshold):
        """Strictly above the threshold: exactly 1024 MB is not in use at the default."""
        return self.used_mb is not None and self.used_mb > threshold


def megabytes(text):
    """'8452', '8452 MiB', '[N/A]' -> 8452, 8452, None."""
    text = str(text).strip()
    if text in NOT_A_VALUE:
        return None
    try:
        return int(float(text.split()[0]))
    except (ValueError, IndexError):
        return None


class Provider:
    """Base of the providers: queries start early and are read once."""

    name = ""
    tool = ""
    queries = ()  # the first lists the GPUs; the others add to it
    blank = ""  # what a query that failed is read as: no data

    def __init__(self, count=None):
        self.count = count
        self._procs = None
        self._result = None
        self.problem = None  # why the answer is incomplete (a later query failed)

    @staticmethod
    def create(name, count=None):
        kinds = {"nvidia": NvidiaProvider, "amd": AmdProvider, "fake": FakeProvider}
        if name == "nvidia" and NvmlProvider.load() is not None:
            return NvmlProvider(count)
        if name not in kinds:
            raise CanhazError(
                f"unknown GPU provider {name!r} in Redis",
                hint="`canhazgpu admin --force --provider nvidia|amd|fake` sets it",
            )
        return kinds[name](count)

    @classmethod
    def installed(cls):
        return bool(cls.tool) and shutil.which(cls.tool) is not None

    def start(self):
        """Start the tool's queries concurrently, so their latency overlaps ours."""
        if self._procs is not None or not self.queries:
            return
        self._deadline = time.monotonic() + TOOL_TIMEOUT
        self._procs = []
        for query in self.queries:
            try:
                proc = subprocess.Popen(
                    [self.tool, *query],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                )
            except OSError as e:
                proc = ProviderError(f"cannot run {self.tool}: {e.strerror}")
            self._procs.append(proc)

    def discard(self):
        for proc in self._procs or ():
            if not isinstance(proc, ProviderError) and proc.poll() is None:
                proc.kill()
                proc.wait()

    def _output(self, proc):
        if isinstance(proc, ProviderError):
            raise proc
        try:
            out, _ = proc.communicate(timeout=max(0.1, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise ProviderError(f"{self.tool} did not answer within {TOOL_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            first = next((ln.strip() for ln in out.splitlines() if ln.strip()), "no output")
            raise ProviderError(f"{self.tool} failed (exit {proc.returncode}): {first}")
        return out

    def usage(self):
        """{gpu index: GpuUsage}; raises ProviderError.  Runs the tool at most once.
        When only a later query fails (the process list), what answered is used, so a
        GPU busy without a reservation is still seen; `problem` says what is missing."""
        if self._result is None:
            try:
                self.start()
                outputs, problems = [], []
                for k, proc in enumerate(self._procs):
                    try:
                        outputs.append(self._output(proc))
                    except ProviderError as e:
                        if k == 0:
                            raise
                        outputs.append(self.blank)
                        problems.append(str(e))
                self._result = self.parse(*outputs)
                if problems:
                    self.problem = "; ".join(problems)
            except ProviderError as e:
                self._result = e
        if isinstance(self._result, ProviderError):
            raise self._result
        return self._result

    def detect_count(self):
        """How many GPUs the hardware has, or None if the tool cannot tell."""
        try:
            return len(self.usage())
        except ProviderError:
            return None


class NvidiaProvider(Provider):
    name, tool = "nvidia", "nvidia-smi"
    queries = (
        (
            "--query-gpu=index,gpu_uuid,name,memory.used,memory.total",
            "--format=csv,noheader,nounits",
        ),
        (
            "--query-compute-apps=pid,process_name,gpu_uuid,used_memory",
            "--format=csv,noheader,nounits",
        ),
    )

    def parse(self, gpu_text, app_text):
        return parse_nvidia(gpu_text, app_text)


class NvmlProvider(Provider):
    """nvidia, asked in-process through NVML (nvidia-ml-py's pynvml) when it loads: the
    answer nvidia-smi gives, without starting a process that takes from 0.1 s to
    seconds.  NVML stays initialised for the life of the process, so `web` and waiters
    pay its start once."""

    name, tool = "nvidia", "nvidia-smi"
    module = None  # pynvml once initialised; False when it cannot be

    @classmethod
    def load(cls):
        """pynvml, initialised, or None (not installed, no driver): nvidia-smi then."""
        if cls.module is None:
            cls.module = False
            try:
                import pynvml

                pynvml.nvmlInit()
                cls.module = pynvml
            except Exception:  # ImportError, or NVMLError: no library, no driver
                pass
        return cls.module or None

    def usage(self):
        if self._result is None:
            try:
                self._result = nvml_usage(self.module)
            except ProviderError as e:
                self._result = e
        if isinstance(self._result, ProviderError):
            raise self._result
        return self._result


def nvml_installed():
    """Whether nvidia-ml-py is there to try, without the cost of importing it."""
    import importlib.util

    return importlib.util.find_spec("pynvml") is not None


def nvml_usage(nvml):
    """{index: GpuUsage} from NVML; an NVMLError is a ProviderError."""

    def optional(query, *args):
        try:
            return query(*args)
        except nvml.NVMLError as e:  # as nvidia-smi prints [Not Supported], [N/A]
            unknown = (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_NO_PERMISSION)
            if getattr(e, "value", None) in unknown:
                return None
            raise

    def text(value):
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    try:
        gpus = {}
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = optional(nvml.nvmlDeviceGetMemoryInfo, handle)
            gpu = gpus[i] = GpuUsage(
                i,
                text(nvml.nvmlDeviceGetUUID(handle)),
                text(nvml.nvmlDeviceGetName(handle)),
                mem.used // 2**20 if mem else None,
                mem.total // 2**20 if mem else None,
            )
            for p in optional(nvml.nvmlDeviceGetComputeRunningProcesses, handle) or ():
                name = optional(nvml.nvmlSystemGetProcessName, p.pid)
                used = p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else None
                gpu.processes.append(
                    GpuProcess(p.pid, os.path.basename(text(name or "?")), used and used // 2**20)
                )
        return gpus
    except nvml.NVMLError as e:
        raise ProviderError(f"NVML failed: {e}") from None


def parse_nvidia(gpu_text, app_text):
    """Parse the two CSV queries.  Names may hold commas, so fields are taken
    from both ends of a line and the name is what is left in the middle."""
    gpus = {}
    for line in gpu_text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 5 or not fields[0].isdigit():
            raise ProviderError(f"nvidia-smi printed an unexpected line: {line.strip()[:80]!r}")
        index, gpu_uuid, *name, used, total = fields
        gpus[int(index)] = GpuUsage(
            int(index), gpu_uuid, ", ".join(name), megabytes(used), megabytes(total)
        )
    by_uuid = {gpu.uuid: gpu for gpu in gpus.values()}
    for line in app_text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            raise ProviderError(f"nvidia-smi printed an unexpected line: {line.strip()[:80]!r}")
        pid, *name, gpu_uuid, used = fields
        gpu = by_uuid.get(gpu_uuid)
        if gpu is not None:
            name = ", ".join(name)
            gpu.processes.append(
                GpuProcess(
                    int(pid) if pid.isdigit() else None, os.path.basename(name), megabytes(used)
                )
            )
    return gpus


class AmdProvider(Provider):
    name, tool, blank = "amd", "amd-smi", "[]"
    queries = (("list", "--json"), ("metric", "--mem-usage", "--json"), ("process", "--json"))

    def parse(self, list_text, metric_text, process_text):
        return parse_amd(list_text, metric_text, process_text)


def amd_gpus(text, what):
    """amd-smi JSON: ROCm 6 prints a list of per-GPU objects, ROCm 7 {'gpu_data': [...]}."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise ProviderError(f"amd-smi {what} printed something that is not JSON") from None
    if isinstance(doc, dict):
        doc = doc.get("gpu_data", [doc])
    if not isinstance(doc, list):
        raise ProviderError(f"amd-smi {what} printed JSON of an unexpected shape")
    return [item for item in doc if isinstance(item, dict) and isinstance(item.get("gpu"), int)]


def amd_megabytes(value):
    """{'value': 8858370048, 'unit': 'B'} -> 8448; also plain numbers (MB) and 'N/A'."""
    if isinstance(value, dict):
        number, unit = value.get("value"), str(value.get("unit", "MB")).upper()
    else:
        number, unit = value, "MB"
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return megabytes(number) if isinstance(number, str) else None
    scale = {"B": 1 / 2**20, "KB": 1 / 1024, "KIB": 1 / 1024, "MB": 1, "MIB": 1, "GB": 1024}
    return int(number * scale.get(unit, 1))


def parse_amd(list_text, metric_text, process_text):
    gpus = {}
    for item in amd_gpus(list_text, "list"):
        name = item.get("market_name") or item.get("name") or "AMD GPU"
        gpus[item["gpu"]] = GpuUsage(item["gpu"], str(item.get("uuid", "")), name, None, None)
    for item in amd_gpus(metric_text, "metric"):
        gpu = gpus.setdefault(item["gpu"], GpuUsage(item["gpu"], "", "AMD GPU", None, None))
        mem = item.get("mem_usage") or {}
        gpu.memory_used = amd_megabytes(mem.get("used_vram"))
        gpu.memory_total = amd_megabytes(mem.get("total_vram"))
    for item in amd_gpus(process_text, "process"):
        gpu = gpus.get(item["gpu"])
        for entry in item.get("process_list") or ():
            info = entry.get("process_info") if isinstance(entry, dict) else None
            if gpu is None or not isinstance(info, dict):
                continue  # "No running processes detected"
            usage = info.get("memory_usage") or {}
            memory = amd_megabytes(usage.get("vram_mem", info.get("mem_usage")))
            pid = info.get("pid")
            gpu.processes.append(
                GpuProcess(
                    pid if isinstance(pid, int) else None, str(info.get("name", "?")), memory
                )
            )
    return gpus


class FakeProvider(Provider):
    """For machines without GPUs and demos: every GPU idle."""

    name = "fake"

    def usage(self):
        return {
            i: GpuUsage(i, f"GPU-fake-{i}", "Fake GPU", 0, 81920) for i in range(self.count or 0)
        }

    def detect_count(self):
        return None


def detect_model(cmdline):
    """The model a process serves, from its command line, or None.

    vLLM: `vllm serve ORG/NAME` or `--model`; lm_eval: `--model_args pretrained=X`;
    anything else: `--model X`.  Returns {'provider': ORG, 'model': X}.
    """
    model = None
    for k, arg in enumerate(cmdline):
        value = cmdline[k + 1] if k + 1 < len(cmdline) else ""
        if arg in ("--model_args", "--model-args") or arg.startswith(
            ("--model_args=", "--model-args=")
        ):
            found = re.search(
                r"(?:^|,)pretrained=([^,]+)", arg.split("=", 1)[1] if "=" in arg else value
            )
            if found:
                return model_info(found.group(1))
        if (
            model is None
            and arg == "serve"
            and k > 0
            and os.path.basename(cmdline[k - 1]) == "vllm"
        ):
            if value and not value.startswith("-"):
                model = value
        if model is None and arg == "--model" and value:
            model = value
        elif model is None and arg.startswith("--model="):
            model = arg.split("=", 1)[1]
    return model_info(model) if model else None


def model_info(model):
    if model.startswith(("/", ".", "~")):
        return {"provider": "local", "model": model}
    return {"provider": model.split("/")[0] if "/" in model else "", "model": model}


def inspect_processes(usages):
    """Fill in each GPU process's owner and model (from it or up to 3 parents)."""
    if not any(gpu.processes for gpu in usages.values()):
        return  # idle GPUs: spare every command the import of psutil
    psutil = require_module("psutil", "python3-psutil")

    for gpu in usages.values():
        for proc in gpu.processes:
            if proc.pid is None:
                continue
            try:
                ps = psutil.Process(proc.pid)
                proc.owner = ps.username()
                for _ in range(4):
                    proc.model = detect_model(ps.cmdline())
                    ps = ps.parent()
                    if proc.model or ps is None or ps.pid <= 1:
                        break
            except (psutil.Error, KeyError):
                continue  # gone, or in another PID namespace: owner unknown


def this_host():
    return os.uname().nodename


def usage_document(usage, provider, error=None, problem=None, now=None):
    """What a host publishes of its provider's answer, for viewers on other hosts."""
    gpus = [
        {
            "index": gpu.index,
            "uuid": gpu.uuid,
            "name": gpu.name,
            "memory_used": gpu.memory_used,
            "memory_total": gpu.memory_total,
            "processes": [
                {"pid": p.pid, "name": p.name, "memory_mb": p.memory_mb, "owner": p.owner,
                 "model": p.model}
                for p in gpu.processes
            ],
        }
        for gpu in (usage or {}).values()
    ]  # fmt: skip
    return {
        "host": this_host(),
        "updated": time.time() if now is None else now,
        "provider": provider,
        "gpus": gpus,
        "error": error,
        "problem": problem,
    }


def usage_from_document(doc):
    """{index: GpuUsage} from a published answer.  Raises ProviderError when that
    host's provider had failed, or the document is not one (a value mangled in Redis)."""
    if doc.get("error"):
        raise ProviderError(str(doc["error"]))
    try:
        usage = {}
        for g in doc["gpus"]:
            gpu = GpuUsage(
                int(g["index"]),
                str(g.get("uuid", "")),
                str(g.get("name", "")),
                megabytes(g.get("memory_used")),
                megabytes(g.get("memory_total")),
            )
            for p in g.get("processes") or ():
                pid = p.get("pid") if isinstance(p.get("pid"), int) else None
                proc = GpuProcess(pid, str(p.get("name", "?")), megabytes(p.get("memory_mb")))
                proc.owner = p.get("owner") if isinstance(p.get("owner"), str) else None
                proc.model = p.get("model") if isinstance(p.get("model"), dict) else None
                gpu.processes.append(proc)
            usage[gpu.index] = gpu
        return usage
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ProviderError("the published usage report is unreadable") from None


# ============================================================================
# Allocation and queue
# ============================================================================

QUEUE_POLL = 5.0  # seconds between a waiter's polls when no release wakes it
HARDWARE_FRESH = 5.0  # a provider answer this recent may decide a waiter's grant
PUBLISHED_STALE = 30.0  # a published answer older than this is warned about
UNNAMED = "(default)"  # how fleet views name the unnamed pool: no pool name can be this


class Reservation:
    """One GPU's state as Redis holds it; unknown fields are kept in `data`."""

    def __init__(self, gpu, raw):
        self.gpu, self.raw, self.error = gpu, raw, None
        self._times = {}
        try:
            self.data = json.loads(raw) if raw is not None else {}  # '' is not free
        except ValueError:
            self.data = None
        if not isinstance(self.data, dict):
            self.error = f"unparseable state: {str(raw)[:60]}"
            self.data = {}

    def __getattr__(self, name):
        return self.data.get(name)

    @property
    def held(self):
        return isinstance(self.data.get("user"), str) and self.data["user"] != ""

    @property
    def owner(self):
        return self.data.get("actual_user") or self.data.get("user")

    @property
    def kind(self):
        kind = self.data.get("type")
        return kind if isinstance(kind, str) and kind else "run"

    @property
    def partial(self):
        return self.held and bool(self.data.get("partial_queue_id"))

    def time(self, field):
        if field not in self._times:  # a status row asks for each several times
            self._times[field] = parse_time(self.data.get(field))
        return self._times[field]

    def idle_seconds(self, now):
        """How long a held GPU has shown no use (since its start, if never)."""
        start = self.time("start_time")
        busy = max(self.time("last_active") or 0, start if start is not None else now)
        return max(0.0, now - busy)

    def deadline(self):
        """When the holder is sure to let go: a manual expiry, a run's timeout; or None."""
        if self.partial:
            return None
        if self.kind == "manual":
            return self.time("expiry_time")
        return self.time("timeout_at")


class Snapshot:
    """The pool and the queue as one script saw them, after ending what expired, with
    the provider answer its host published and the reclaim notices not yet shown."""

    def __init__(self, reply):
        count, provider, states, queue, *extra = reply
        usage, due, notices = (list(extra) + [None, 0, []])[:3]
        self.count = int(count)
        self.provider = provider or ("nvidia" if self.count else None)
        self.gpus = [Reservation(i, raw) for i, raw in enumerate(states)]
        self.queue = [json.loads(raw) for raw in queue]
        self.published = json_object(usage) if usage else None
        self.register_due = bool(due)
        self.notices = [n for n in map(json_object, notices or ()) if n is not None]


def account_groups():
    """The Unix groups of the real account, for the limits set on groups."""
    import grp

    names = []
    try:
        gids = os.getgrouplist(current_user(), os.getgid())
    except (OSError, KeyError):
        gids = os.getgroups()
    for gid in sorted(set(gids)):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return names


class Request:
    """What a `run` or `reserve` asks for."""

    def __init__(self, kind, count, ids=None, duration=None, note=None, user=None, force=False):
        self.kind, self.count, self.ids = kind, count, ids
        self.duration, self.note, self.force = duration, note, force
        self.duration_given = False  # the user chose the duration: a limit refuses, not trims
        self.timeout = None  # a run's --timeout, seconds
        self.priority = None  # the queue class asked for: None is the account's own
        self.actual_user = current_user()
        self.user = user or self.actual_user
        self.groups = None  # the account's groups, looked up when first needed
        self.token = uuid.uuid4().hex
        self.entry = None  # our queue entry id while we wait

    def describe(self):
        if self.ids:
            return "GPU" + ("s " if len(self.ids) > 1 else " ") + ", ".join(map(str, self.ids))
        return f"{self.count} GPU" + ("s" if self.count != 1 else "")

    def lua(self):
        if self.groups is None:
            self.groups = account_groups()
        return {
            "user": self.user,
            "actual_user": self.actual_user,
            "groups": self.groups,
            "type": self.kind,
            "count": self.count,
            "ids": self.ids or None,
            "duration": self.duration,
            "duration_given": self.duration_given or None,
            "timeout": self.timeout,
            "priority": self.priority,
            "note": self.note,
            "token": self.token,
            "force": self.force or None,
            "host": this_host(),
            "pid": os.getpid(),
        }


def incomplete(problem):
    """The warning for a provider answer that lacks a part (`Provider.problem`)."""
    return f"GPU validation is incomplete ({problem}); going on with what answered"


def not_initialised(pool=None):
    where = f"the GPU pool {pool}" if pool else "the GPU pool"
    flag = f" --pool {pool}" if pool else ""
    return CanhazError(
        f"{where} is not initialised",
        hint=f"run `canhazgpu admin{flag} --gpus N` on its host first "
        "(N = the GPUs of that machine)",
    )


class Hardware:
    """What a pool's GPUs do, as one command saw it: {index: GpuUsage}, or None when
    it could not be known (`why` then says so), and how old it is."""

    def __init__(self, usage, why=None, problem=None, age=0.0, remote=None, missing=False):
        self.usage, self.why, self.problem, self.age = usage, why, problem, age
        self.missing = missing  # another host's pool that published nothing lately
        self.remote = remote  # the host whose published answer this is, when not ours
        self.taken = time.monotonic()

    def in_use(self, threshold):
        return sorted(i for i, g in (self.usage or {}).items() if g.in_use(threshold))

    def active(self, threshold):
        """GPUs that show use: memory above the threshold, or a compute process."""
        return sorted(
            i for i, g in (self.usage or {}).items() if g.in_use(threshold) or g.processes
        )


class Pool:
    """A GPU pool in Redis, with what validates it: the provider on this host, or the
    answer its own host published.  Its size and provider name are read once per
    command (require() or snapshot())."""

    def __init__(self, store, config, provider=None, name=None, here=True):
        if store.mode == "cluster" and not name:
            raise UsageError(
                "Redis Cluster needs a named pool: the unnamed one's keys span many slots",
                hint='set pool.name = "auto" in the config file, or give --pool NAME',
            )
        self.store, self.config = store, config
        self.name, self.prefix = name, pool_prefix(name)
        self.here = here  # its GPUs are this host's: ask the provider, publish its answer
        self._provider = provider  # started early by main() when it could guess
        self._hardware = None
        self._warned = False
        self.count = self.kind = None  # GPUs in the pool; its provider's name
        self.host = this_host() if here else None  # the pool's host, once known

    @property
    def label(self):
        return self.name or UNNAMED

    def script(self, name, **args):
        return self.store.script(name, self.prefix, **args)

    def snapshot(self, now=None, required=True, notices=False, observe=False):
        """The pool after ending what expired; an uninitialised pool is an error
        unless `required` is false (then its count is 0).  With `observe`, this host's
        hardware answer goes with it (noted on idle GPUs and published)."""
        seen = self.observation() if observe and self.here else {}
        reply = self.script("snapshot", now=now, notices=notices or None, **seen)
        snap = Snapshot(reply)
        if required and not snap.count:
            raise not_initialised(self.name)
        self.count, self.kind = snap.count, snap.provider
        if snap.register_due:
            self.register()
        return snap

    def require(self):
        """The size of an initialised pool (read once), or a clear error."""
        if self.count is None:
            count, kind = self.store.do("mget", self.prefix + "gpu_count", self.prefix + "provider")
            if not count or not str(count).isdigit() or int(count) == 0:
                raise not_initialised(self.name)
            self.count, self.kind = int(count), kind or "nvidia"
        return self.count

    def provider(self):
        """The provider for this pool, reusing the one main() started if it fits."""
        self.require()
        if self._provider is not None and self._provider.name == self.kind:
            self._provider.count = self.count
            return self._provider
        self.close()
        self._provider = Provider.create(self.kind, self.count)
        return self._provider

    def close(self):
        """Stop the provider's queries, if still running: no stray children of ours."""
        if self._provider is not None:
            self._provider.discard()

    def hardware(self, fresh=False):
        """This command's view of the GPUs: the provider here, or the answer the pool's
        host published.  Asked once; with `fresh` (a waiter's poll) asked again unless
        the last answer is a few seconds old at most."""
        hw = self._hardware
        if hw is None or (fresh and time.monotonic() - hw.taken > HARDWARE_FRESH):
            if not self.here:
                self._hardware = self._published()
            else:
                if hw is not None:  # a provider answers once: a new one for a new look
                    self.close()
                    self._provider = None
                self._hardware = self.look(self.provider())
        return self._hardware

    @staticmethod
    def look(provider):
        """What `provider` says now, owners and models of the processes included."""
        try:
            usage = provider.usage()
            inspect_processes(usage)
        except ProviderError as e:
            return Hardware(None, why=str(e))
        return Hardware(usage, problem=provider.problem)

    def keep_looking(self, every):
        """A waiter's helper thread: a new look every `every` seconds, so that when its
        GPUs are released it needs no slow nvidia-smi before it may take them.  Returns
        a function that stops it."""
        import threading

        stop = threading.Event()

        def loop():
            while not stop.wait(every):
                provider = Provider.create(self.kind, self.count)
                try:
                    self._hardware = self.look(provider)
                finally:
                    provider.discard()

        threading.Thread(target=loop, name="hardware", daemon=True).start()
        return stop.set

    def _published(self):
        raw = self.store.do("get", self.prefix + "usage")
        return published_hardware(json_object(raw) if raw else None, self.host or self.label)

    def observation(self):
        """What a script is told of this host's hardware: which GPUs show use (noted
        on their holders; reclaims are decided only on such a fresh look) and the answer
        itself, published for viewers elsewhere."""
        hw = self.hardware()
        error = hw.why if hw.usage is None else None
        doc = usage_document(hw.usage, self.kind, error=error, problem=hw.problem)
        active = hw.active(self.config["memory.threshold"]) if hw.usage is not None else None
        return {
            "active": active,
            "observed": hw.usage is not None or None,
            "publish": json.dumps(doc),
        }

    def unreserved(self):
        """GPUs the hardware shows in use: the script skips those that no one holds."""
        hw = self.hardware()
        if hw.usage is None:
            self.warn_once(
                f"cannot validate GPU usage ({hw.why}); allocating on reservations alone"
            )
            return []
        if hw.problem:
            self.warn_once(incomplete(hw.problem))
        if hw.remote and hw.age > PUBLISHED_STALE:
            self.warn_once(
                f"the usage report from {hw.remote} is {format_span(hw.age)} old; "
                "a GPU it shows free may have been taken since"
            )
        return hw.in_use(self.config["memory.threshold"])

    def warn_once(self, message):
        """A waiter asks the provider at every poll: say a failure once, not each time."""
        if not self._warned:
            warn(message)
            self._warned = True

    def publish(self, hw):
        """Note and publish a look at the hardware taken elsewhere (the web server's
        shared answer); returns the snapshot."""
        self._hardware = hw
        return self.snapshot(observe=True)

    def register(self, models=None):
        """This pool's entry in the fleet registry: where it is and what it has."""
        hw = self._hardware
        if models is None:
            models = sorted({g.name for g in (hw.usage or {}).values() if g.name}) if hw else []
        info = {
            "host": this_host(),
            "gpu_count": self.count,
            "provider": self.kind,
            "models": models,
            "version": __version__,
            "updated": time.time(),
        }
        # The mark that says it is fresh, so that commands refresh it once a minute at most.
        self.store.pipeline(
            [("hset", REGISTRY, self.label, json.dumps(info)),
             ("set", self.prefix + "registered", info["updated"], REGISTRY_EVERY)]
        )  # fmt: skip

    def allocate(self, req, block=False, entry=None, wait=None, fresh=False):
        """One atomic allocation step; see LUA_ALLOCATE for the replies.  `fresh`: a
        waiter's poll, which may use an answer at most a few seconds old."""
        self.hardware(fresh=fresh)
        # Passed even with --force: the script also runs the queue for other waiters.
        unreserved = self.unreserved()
        seen = self.observation() if self.here else {}
        args = dict(req.lua(), block=block, entry=entry, wait=wait)
        if block and not entry:
            # Known before the script runs, so a signal that cuts its reply can still cancel it.
            req.entry = args["new_entry"] = str(uuid.uuid4())
            args["enqueue_ns"] = str(time.time_ns())
        reply = self.script("allocate", req=args, unreserved=unreserved, **seen)
        if reply["status"] != "queued":
            req.entry = None
        if reply.get("register"):
            self.register()
        return reply

    def release(self, ids=None, token=None, entry=None, reason="release"):
        reply = self.script(
            "release", ids=ids, token=token, entry=entry, reason=reason, actual_user=current_user()
        )
        return reply["results"]

    def heartbeat(self, token, ids, active=None):
        """Refresh a run's GPUs; returns the ids no longer held with this token."""
        return self.script("heartbeat", token=token, gpus=ids, active=active, patient=False)["lost"]

    def extend(self, duration, ids=None, token=None):
        reply = self.script(
            "extend",
            duration=duration,
            ids=ids,
            token=token,
            actual_user=current_user(),
            groups=account_groups(),
            request=uuid.uuid4().hex,
        )
        return reply["results"]


def published_hardware(doc, host):
    """A pool's hardware as its host last published it (a minute at most)."""
    if doc is None:
        return Hardware(None, why=f"no recent report from {host}", remote=host, missing=True)
    age = max(0.0, time.time() - (parse_time(doc.get("updated")) or 0))
    source = doc.get("host") if isinstance(doc.get("host"), str) else host
    try:
        usage = usage_from_document(doc)
    except ProviderError as e:
        return Hardware(None, why=f"{source}: {e}", age=age, remote=source)
    return Hardware(usage, problem=doc.get("problem"), age=age, remote=source)


class Fleet:
    """Every pool that one Redis serves, read together: the registered pools and the
    unnamed one, each pool's script pipelined with the others' (one round trip per
    Redis node, whatever the number of pools)."""

    def __init__(self, store, config, here=None):
        self.store, self.config = store, config
        self.here = here  # this host's Pool: its hardware is asked, the others' are read
        self.info = {}  # label -> registry entry

    def labels(self):
        """The pools' labels in name order ((default) for the unnamed pool)."""
        calls = [("hgetall", REGISTRY)]
        if self.store.mode != "cluster":
            calls.append(("exists", KEY + "gpu_count"))
        registry, *unnamed = self.store.pipeline(calls)
        self.info = {
            label: json_object(raw) or {}
            for label, raw in registry.items()
            if label == UNNAMED or POOL_NAME.fullmatch(label)
        }
        if unnamed and unnamed[0]:
            self.info.setdefault(UNNAMED, {})
        return sorted(self.info)

    def pool(self, label):
        """A pool of the fleet: this host's own, or one registered on this host, asks
        the provider here; the others are seen through what their hosts publish."""
        if self.here is not None and self.here.label == label:
            return self.here
        host = self.info.get(label, {}).get("host")
        host = host if isinstance(host, str) else None
        name = None if label == UNNAMED else label
        pool = Pool(self.store, self.config, name=name, here=host == this_host())
        pool.host = host
        return pool

    def views(self, labels, script="snapshot", args=None, observe=True):
        """{label: (pool, reply) or CanhazError} for one script on every pool; with
        `observe`, this host's pools are looked at and their answer published."""
        pools = [self.pool(label) for label in labels]
        calls = []
        for pool in pools:
            seen = {}
            if pool.here and script == "snapshot" and observe:
                try:
                    pool.require()
                    seen = pool.observation()
                except CanhazError:
                    pass  # not initialised: the snapshot says so
            calls.append((script, pool.prefix, dict(args or {}, **seen)))
        return {
            pool.label: reply if isinstance(reply, CanhazError) else (pool, reply)
            for pool, reply in zip(pools, self.store.scripts(calls))
        }

    def snapshots(self, labels):
        """{label: (pool, snapshot, hardware) or CanhazError}."""
        out = {}
        for label, view in self.views(labels).items():
            if isinstance(view, CanhazError):
                out[label] = view
                continue
            pool, snap = view[0], Snapshot(view[1])
            if not snap.count:
                out[label] = not_initialised(pool.name)
                continue
            pool.count, pool.kind = snap.count, snap.provider
            if snap.register_due:
                pool.register()
            hw = (
                pool.hardware()
                if pool.here
                else published_hardware(snap.published, pool.host or label)
            )
            out[label] = (pool, snap, hw)
        return out


class Interrupted(BaseException):
    """A signal that ends a command before its GPUs are in use: INT, TERM, HUP or QUIT
    while reserving or queued cancel the request, and nothing runs."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


CANCEL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class CancelOnSignals:
    """While reserving or queued: INT/TERM/HUP/QUIT raise Interrupted.  A signal
    the caller ignored (nohup's SIGHUP) stays ignored."""

    def __enter__(self):
        import threading

        self.saved = {}
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread (the Python API, in a thread)
        for sig in CANCEL_SIGNALS:
            if signal.getsignal(sig) != signal.SIG_IGN:
                self.saved[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Interrupted(signum)

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False


def acquire(pool, req, block=True, wait=None, progress=None):
    """Reserve now, or wait in the FCFS queue until the request is met.

    Returns the grant: {gpus (sorted ids), duration? and timeout? (as the limits
    left them), capped?}.  A request that can never be met, or cannot be met now
    with block=False, raises CanhazError; a signal while waiting cancels the queue
    entry and any gathered GPUs, then raises Interrupted.
    """
    validate_request(req, pool.require())
    try:
        with CancelOnSignals():
            reply = pool.allocate(req, block=block, wait=wait)
            if reply["status"] == "queued":
                reply = Waiter(pool, req, reply, wait, progress).wait()
            if reply["status"] != "ok":
                raise allocation_error(reply, req)
            return reply
    except Interrupted:
        # The signal may have cut a reply in half: cancel on a fresh connection.
        # The token also frees GPUs granted by a script whose reply we never read.
        pool.store.reconnect()
        pool.release(token=req.token, entry=req.entry, reason="cancel")
        raise


class Waiter:
    """A request in the queue: woken by releases (pub/sub), polling as a safety
    net; each poll is also the heartbeat that keeps the entry alive."""

    def __init__(self, pool, req, reply, wait, progress):
        self.pool, self.req = pool, req
        self.reply, self.wait_for, self.progress = reply, wait, progress
        self.started = time.monotonic()
        # Each poll is the heartbeat: several per queue heartbeat timeout, however short.
        self.interval = min(QUEUE_POLL, pool.config["queue.heartbeat_timeout"] / 4)

    def wait(self):
        events = self.pool.store.subscribe(self.pool.prefix + "events")
        # nvidia-smi can take seconds: keep a recent answer, so a release is taken at once.
        stop_looking = None
        if self.pool.here and self.pool.kind != "fake":
            stop_looking = self.pool.keep_looking(HARDWARE_FRESH / 2)
        try:
            reply = self.poll()  # a release may have come before the subscription
            next_poll = time.monotonic() + self.interval
            while reply["status"] == "queued":
                now = time.monotonic()
                if self.wait_for is not None and now - self.started >= self.wait_for:
                    self.pool.release(token=self.req.token, entry=self.req.entry, reason="cancel")
                    raise CanhazError(
                        f"gave up after waiting {format_span(self.wait_for)} for "
                        f"{self.req.describe()} (position {reply['position']} in the queue)",
                        hint="`canhazgpu status` and `canhazgpu queue` show who holds and waits",
                    )
                if self.progress:
                    self.progress(reply, now - self.started)
                limit = next_poll - now
                if self.wait_for is not None:
                    limit = min(limit, self.started + self.wait_for - now)
                if self.progress:
                    limit = min(limit, 1.0)
                woken = self._listen(events, max(0.0, limit))
                if woken or time.monotonic() >= next_poll:
                    reply = self.poll()
                    next_poll = time.monotonic() + self.interval
            return reply
        finally:
            if stop_looking is not None:
                stop_looking()
            try:
                events.close()
            except Exception:  # closing a half-read connection after a signal
                pass

    def _listen(self, events, timeout):
        import redis

        try:
            woken = events.get_message(timeout=timeout) is not None
            while events.get_message(timeout=0) is not None:
                woken = True
            return woken
        except redis.RedisError:
            time.sleep(min(timeout, 1.0))  # Redis away: the next poll says so
            return True

    def poll(self):
        reply = self.pool.allocate(self.req, block=True, entry=self.req.entry, fresh=True)
        if reply["status"] == "gone":  # dropped as stale (e.g. while stopped): queue again
            warn("our place in the queue had expired; queueing again")
            reply = self.pool.allocate(self.req, block=True, fresh=True)
        return reply


def kind_key(kind):
    return "reserve" if kind == "manual" else "run"


def wait_options(config, kind, nonblock):
    """(block, wait seconds or None) from --nonblock, or --wait and its config default."""
    if nonblock:
        return False, None
    return True, config[f"{kind_key(kind)}.wait"]


CLEAR_LINE = "\r\x1b[K"  # back to the line's start, and clear it


class QueueLine:
    """The live stderr line of a waiting request: only on a terminal, where it also
    says when the request should start (from a fresh look at the pool every 10 s)."""

    ETA_EVERY = 10.0

    def __init__(self, req, pool):
        self.req, self.pool = req, pool
        self.tty = sys.stderr.isatty()
        self.shown = False
        self.eta, self.eta_at = None, None  # the estimate, and when it was made

    def __call__(self, reply, waited):
        have, need = len(reply["have"]), reply["need"]
        text = f"Waiting for {self.req.describe()}: position {reply['position']} in the queue" + (
            f", {have}/{have + need} gathered" if have else ""
        )
        if self.tty:
            eta = self.estimate()
            text += f", starts by {clock(eta)}" if eta else ", start unknown"
            tell(text + f", waited {format_duration(waited)}", end="", control=CLEAR_LINE)
        elif not self.shown:
            tell(text)
        self.shown = True

    def estimate(self):
        now = time.monotonic()
        if self.req.entry and (self.eta_at is None or now - self.eta_at >= self.ETA_EVERY):
            self.eta_at = now
            try:
                self.eta = queue_etas(self.pool.snapshot(), time.time()).get(self.req.entry)
            except CanhazError:
                self.eta = None
        return self.eta

    def clear(self):
        if self.tty and self.shown:
            tell("", end="", control=CLEAR_LINE)


def clock(t, now=None):
    """A coming moment as a person reads it: 14:20 today, Tue 14:20 this week, else the date."""
    now = time.time() if now is None else now
    local, today = time.localtime(t), time.localtime(now)
    if local[:3] == today[:3]:
        return time.strftime("%H:%M", local)
    return time.strftime("%a %H:%M" if t - now < 6 * 86400 else "%Y-%m-%d %H:%M", local)


def entry_duration(e):
    """How long a queue entry's reservation will last once granted, or None if unbounded."""
    if e.get("reservation_type") == "manual":
        ns = e.get("expiry_duration")
        return ns / 1e9 if isinstance(ns, (int, float)) and ns > 0 else None
    timeout = e.get("timeout")
    return float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None


def queue_etas(snap, now):
    """{entry id: when it starts at the latest (Unix s), or None if unknown}.

    Each GPU is free now or from its holder's deadline (a manual expiry, a run's
    timeout); a run without one, or a free GPU the waiters leave alone (busy without a
    reservation), frees at an unknown time.  Waiters in order take the soonest free
    GPUs they can use; what they take is busy again for their own duration."""
    gathered = {g.gpu: g.partial_queue_id for g in snap.gpus if g.partial}
    free_at = {}
    for g in snap.gpus:
        if g.error or g.gpu in gathered:
            free_at[g.gpu] = None
        elif not g.held:
            free_at[g.gpu] = None if snap.queue else now
        else:
            free_at[g.gpu] = g.deadline()
    etas = {}
    for e in snap.queue:
        have = [i for i, qid in gathered.items() if qid == e.get("id")]
        wanted = [i for i in e.get("requested_ids") or () if isinstance(i, int)]
        pool = (
            [i for i in wanted if i not in have]
            if wanted
            else [i for i in free_at if i not in have]
        )
        need = (len(wanted) if wanted else int(e.get("requested_count") or 0)) - len(have)
        at = {i: free_at.get(i) for i in pool}  # an id outside the pool frees never
        soonest = sorted(pool, key=lambda i: math.inf if at[i] is None else at[i])
        picked = soonest[: max(0, need)]
        known = [at[i] for i in picked if at[i] is not None]
        start = max([now, *known]) if len(soonest) >= need and len(known) == len(picked) else None
        eta = etas[e.get("id")] = start
        duration = entry_duration(e)
        for i in [*have, *picked]:
            free_at[i] = eta + duration if eta is not None and duration else None
    return etas


def gpu_environment(ids, kind, current):
    """The variables that give a program these GPUs: CUDA_VISIBLE_DEVICES replaced (never
    added to), in ascending order, and CUDA_DEVICE_ORDER=PCI_BUS_ID unless `current` sets
    it, so that CUDA numbers GPUs as nvidia-smi does.  On AMD, ROCm filters by
    ROCR_VISIBLE_DEVICES first, then reads HIP_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES
    (the same for HIP) as indices among the GPUs left, so both are 0..n-1: the reserved
    ids there would hide every GPU but the first."""
    listed = ",".join(map(str, sorted(ids)))
    env = {"CUDA_VISIBLE_DEVICES": listed, "CANHAZGPU_GPU_IDS": listed}
    if "CUDA_DEVICE_ORDER" not in current:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if kind == "amd":
        env["ROCR_VISIBLE_DEVICES"] = listed
        env["HIP_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = ",".join(
            map(str, range(len(ids)))
        )
    return env


def reserve_gpus(pool, req, block, wait):
    """acquire(), showing the waiting line on a terminal."""
    line = QueueLine(req, pool)
    try:
        return acquire(pool, req, block=block, wait=wait, progress=line)
    finally:
        line.clear()


def validate_request(req, count):
    """Requests that can never be met fail at once, before anything is reserved."""
    check_ids(req.ids or (), count)
    if req.count > count:
        raise UsageError(f"requested {req.count} GPUs but the pool has only {count}")


def check_ids(ids, count):
    outside = [i for i in ids if i >= count]
    if outside:
        raise UsageError(
            f"GPU {outside[0]} is not in the pool (GPUs 0-{count - 1})",
            hint="`canhazgpu status` lists the GPUs",
        )


def allocation_error(reply, req):
    status = reply["status"]
    if status == "nopool":
        return not_initialised()
    if status == "limit":
        return limit_error(reply)
    if status == "invalid" and reply.get("reason") == "priority":
        return UsageError(
            f"{req.actual_user}'s priority class is {reply['class']}: "
            "--priority may lower a request, never raise it",
            hint="`canhazgpu admin --show-limits` shows the classes",
        )
    if status == "invalid":
        return UsageError(f"requested {req.describe()} but the pool has {reply['pool']} GPUs")
    if status != "unavailable":
        return CanhazError(f"unexpected reply from the allocation script: {status}")
    if req.ids:
        lines = []
        for why in reply["reasons"]:
            gpu = why["gpu"]
            lines.append(
                {
                    "held": f"GPU {gpu} is reserved by {why.get('user')} ({why.get('type')})",
                    "unreserved": f"GPU {gpu} is in use without a reservation",
                    "queued": f"GPU {gpu} is promised to an earlier request in the queue",
                    "corrupt": f"GPU {gpu} has an unreadable state in Redis",
                }[why["reason"]]
            )
        return CanhazError(
            "; ".join(lines) or f"{req.describe()} not available",
            hint="`canhazgpu status` shows who holds what; drop --nonblock to wait in the queue",
        )
    details = []
    if reply["unreserved"]:
        details.append(f"{reply['unreserved']} in use without reservation")
    if reply["held_back"]:
        details.append(f"{reply['held_back']} promised to {reply['waiting']} queued request(s)")
    extra = f" ({', '.join(details)})" if details else ""
    return CanhazError(
        f"not enough GPUs available: requested {req.count}, available {reply['free']}{extra}",
        hint="`canhazgpu status` shows who holds what; drop --nonblock to wait in the queue",
    )


def limit_error(reply):
    """A request beyond the account's limits: it fails at once, it never waits."""
    who, top = reply.get("user"), reply.get("max")
    hint = "`canhazgpu admin --show-limits` shows the limits"
    if reply["what"] == "gpus":
        return CanhazError(
            f"{who} may hold at most {top} GPU{'s' if top != 1 else ''} "
            f"(holds {reply['holds']}, asked for {reply['asked']})",
            hint=hint + "; `canhazgpu release` gives back what you do not need",
        )
    what = "run for" if reply["what"] == "timeout" else "reserve for"
    return CanhazError(
        f"{who} may {what} at most {format_span(top)} (asked for {format_span(reply['asked'])})",
        hint=hint,
    )


# ============================================================================
# Supervisor
# ============================================================================
#
# The README's "`canhazgpu run`" section is the user's view of this; tini, sudo and
# GNU timeout are what it was measured against.  canhazgpu stays the parent of the
# command for its whole life (so it sees exec failures, stops and exit statuses, and
# no PID is ever polled): the
# command gets a process group of its own (and the terminal, when `run` is a job
# of an interactive shell); every signal sent to `run` reaches that group once;
# a heartbeat thread keeps the reservation alive; and when the command ends,
# whatever it left behind is stopped before the GPUs are released.

FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGWINCH,
)
EXIT_TIMEOUT, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 124, 126, 127
SIGKILL_PATIENCE = 10.0  # how long processes may take to vanish after SIGKILL
RELEASE_PATIENCE = 10.0  # how long the final release is retried while Redis is away
CLEANUP_POLL = 0.05  # leftovers that are not our children do not wake us when they die
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def find_command(name):
    """Look `name` up the way execvp will, before anything is reserved: its path, or
    exit 127 (not found) or 126 (not executable), as shells and `env` do."""
    candidates = [name] if "/" in name else [os.path.join(d, name) for d in os.get_exec_path()]
    problem = None
    for path in candidates if name else ():
        if os.path.isdir(path):
            problem = problem or "is a directory"
        elif os.path.exists(path):
            if os.access(path, os.X_OK):
                return path
            problem = problem or "Permission denied"
    if problem:
        raise CanhazError(f"{name}: {problem}", code=EXIT_NOT_EXECUTABLE)
    missing = "No such file or directory" if "/" in name else "command not found"
    raise CanhazError(f"{name}: {missing}", code=EXIT_NOT_FOUND)


def linux_prctl():
    """prctl(2) through ctypes, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def give_back_memory():
    """The supervisor lives as long as the command: hand the memory freed since start-up
    (compiling a copied script's thousands of lines takes over 10 MB) back to the system.
    glibc only; elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        pass


def controlling_tty():
    """Our controlling terminal (also when stdin is redirected), or None."""
    try:
        return os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


def die_of(sig):
    """Die of `sig` with core dumps off, so that the caller sees WIFSIGNALED; exit
    128+N if that signal cannot kill us."""
    import resource

    try:
        sys.stderr.flush()
    except OSError:  # a dead terminal
        pass
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):  # SIGKILL: its action cannot be changed, nor needs to be
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def prepare_child(tty, prctl, parent, defaults):
    """In the command's process, between fork and exec (every signal we catch is
    blocked): a group of its own, the terminal if `tty`, the parent-death signal, and
    default dispositions with nothing blocked."""
    os.setpgid(0, 0)
    if tty is not None:
        os.tcsetpgrp(tty, os.getpgrp())
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # we died before the death signal was set
            os._exit(128 + signal.SIGTERM)
    for sig in defaults:
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class Heartbeat:
    """Keeps a run's reservation alive from a thread of its own.

    A Redis outage or restart never disturbs the command: the beat is retried and
    the outage reported once (and its end).  A reservation taken away is reported
    once.  When the beats were held up long enough for the reservation to expire
    (we were stopped, or cut off from Redis), GPUs that did expire are taken back if
    still free.  After SIGCONT it beats at once.
    """

    def __init__(self, pool, req, ids, interval, expiry):
        import threading

        self.pool, self.req, self.ids = pool, req, ids
        self.interval, self.expiry = interval, expiry
        self.lock = threading.Lock()  # held for a whole beat: stop() never cuts one in half
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="heartbeat", daemon=True)
        self.stopped = self.unreachable = False
        self.last_beat = time.monotonic()  # the allocation was the first beat
        self.lost = set()
        self.sample_every = None  # how often a beat also asks the hardware (idle time)
        self.sampled = time.monotonic()  # the allocation looked at it

    def start(self):
        self.thread.start()

    def beat_now(self):
        self.wake.set()

    def stop(self):
        """Wait for a beat in flight, then beat no more."""
        with self.lock:
            self.stopped = True
        self.wake.set()

    def loop(self):
        while True:
            self.wake.wait(self.interval)
            self.wake.clear()
            with self.lock:
                if self.stopped:
                    return
                self.beat()

    def beat(self):
        # Half the expiry: the clocks of the hosts that expire reservations may run ahead.
        overdue = time.monotonic() - self.last_beat > self.expiry / 2
        try:
            lost = set(self.pool.heartbeat(self.req.token, self.ids, self.sample()))
        except Exception as e:  # this thread must outlive any failure: the command goes on
            if not self.unreachable:
                self.unreachable = True
                warn(f"heartbeat failed: {e}; the command goes on, canhazgpu keeps trying")
            return
        self.last_beat = time.monotonic()
        if self.unreachable:
            self.unreachable = False
            tell("canhazgpu: Redis answers again; the heartbeat goes on")
        newly = lost - self.lost
        if newly and overdue:
            if self.reacquire(sorted(newly)):
                lost -= newly
        elif newly:
            warn(
                f"the reservation of GPU(s) {sorted(newly)} was taken away "
                "(released or expired); the command goes on without it"
            )
        self.lost = lost

    def sample(self):
        """Every idle.sample_interval, which of our GPUs the hardware shows in use: the
        run's idle time is the same truth `status` shows.  None between samples."""
        if not self.pool.here or self.sample_every is None:
            return None
        if time.monotonic() - self.sampled < self.sample_every:
            return None
        self.sampled = time.monotonic()
        provider = Provider.create(self.pool.kind, self.pool.count)
        try:
            hw = self.pool.look(provider)
        finally:
            provider.discard()
        if hw.usage is None:
            return None
        return [i for i in hw.active(self.pool.config["memory.threshold"]) if i in self.ids]

    def reacquire(self, ids):
        """Our reservation of `ids` expired while no beat went out: take the same GPUs
        again if they are free.  `force`, as the memory used on them is our command's."""
        again = Request("run", len(ids), ids=ids, note=self.req.note, user=self.req.user)
        again.force, again.token = True, self.req.token  # one token: one final release
        try:
            ok = self.pool.allocate(again)["status"] == "ok"
        except CanhazError:
            ok = False
        if ok:
            tell(f"canhazgpu: GPU(s) {ids} expired while no heartbeat went out; reserved again")
        else:
            tell(
                f"WARNING: the reservation of GPU(s) {ids} expired while no heartbeat went out, "
                "and they are not free any more: the command goes on, on GPUs it does not hold"
            )
        return ok


class Supervisor:
    """One `run`: reserve, start the command, supervise it, clean up after it,
    release, and end as the command ended."""

    def __init__(self, pool, req, argv, wait, timeout, timeout_signal, kill_after):
        """wait: (block, seconds or None) as wait_options() gives it."""
        self.pool, self.req, self.argv, self.wait = pool, req, argv, wait
        self.timeout, self.timeout_signal, self.kill_after = timeout, timeout_signal, kill_after
        self.pending = []  # signals caught, for the main loop
        self.popen = self.pid = self.pgid = self.status = self.tty = None
        self.deadline = self.kill_at = None  # monotonic times of the timeout's two steps
        self.timed_out = self.gave_terminal = self.group_gone = False

    def run(self):
        """Never returns: the process ends as the command did, through os._exit, so that
        a flush failing at exit (a terminal hung up) cannot change the status."""
        self.pool.require()
        self.catch_signals()
        grant = reserve_gpus(self.pool, self.req, *self.wait)
        self.ids = grant["gpus"]
        signal.pthread_sigmask(signal.SIG_BLOCK, self.caught)  # until the command runs
        self.pool.close()  # the provider's queries are done with: no stray children of ours
        self.cancel_if_signalled()
        tell(f"Reserved {len(self.ids)} GPU(s): {self.ids} for command execution")
        if grant.get("capped"):
            self.timeout = grant["capped"]
            tell(
                f"canhazgpu: runs here may last {format_span(self.timeout)} at most: --timeout "
                f"{format_span(self.timeout)} applies"
            )
        try:
            self.start()
        except BaseException:
            self.release("cancel")
            raise
        config = self.pool.config
        self.heartbeat = Heartbeat(
            self.pool, self.req, self.ids, config["heartbeat.interval"], config["heartbeat.timeout"]
        )
        self.heartbeat.sample_every = config["idle.sample_interval"]
        self.heartbeat.start()  # only now: a thread must not hold a lock across our fork
        give_back_memory()
        self.supervise()
        self.clean_up()
        self.reclaim_terminal()
        self.heartbeat.stop()
        self.release()
        if self.timed_out:
            os._exit(EXIT_TIMEOUT)
        if os.WIFSIGNALED(self.status):
            die_of(os.WTERMSIG(self.status))
        os._exit(os.waitstatus_to_exitcode(self.status))

    # -- signals

    def catch_signals(self):
        """Before anything is reserved: our handlers in place, a signal the
        caller ignored left ignored (nohup), except SIGCHLD: with SIG_IGN inherited the
        kernel would reap the command and its status would be lost."""
        ignored = {s for s in (*FORWARDED, signal.SIGTSTP) if signal.getsignal(s) == signal.SIG_IGN}
        self.hup_ignored = signal.SIGHUP in ignored
        forwarded = [s for s in FORWARDED if s not in ignored]
        self.catch_tstp = signal.SIGTSTP not in ignored
        self.caught = [*forwarded, signal.SIGCONT, signal.SIGCHLD]
        if self.catch_tstp:
            self.caught.append(signal.SIGTSTP)
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self.wakeup = read
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in (*forwarded, signal.SIGCONT, signal.SIGCHLD):
            signal.signal(sig, self.caught_signal)  # SIGCHLD's also wakes the main loop
        # SIGTSTP keeps its default until the command runs: ^Z while queued stops us.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.caught)

    def caught_signal(self, signum, frame):
        self.pending.append(signum)  # the wake-up fd wakes the main loop

    def cancel_if_signalled(self):
        """A signal between the reservation and the fork (acquire()
        covers the wait before): release and die of the signal, nothing runs.  Other
        signals that came before the command are dropped: delivered at its start, a
        SIGUSR1 would kill it before it could set up its handler."""
        cancel = [s for s in self.pending if s in CANCEL_SIGNALS]
        if cancel:
            self.release("cancel")
            die_of(cancel[0])
        self.pending.clear()

    def handle_signals(self):
        """What is sent to us goes to the command's group, once, unchanged: SLURM's
        SIGUSR1 warning must reach the training script, and `kill %1` reaches only us."""
        while self.pending:
            sig = self.pending.pop(0)
            if sig == signal.SIGCONT:
                self.resumed()
            elif sig != signal.SIGCHLD:
                self.signal_group(sig)

    def signal_group(self, sig):
        if not self.group_gone:  # a gone group's id may be reused: never signal it
            try:
                os.killpg(self.pgid, sig)
            except OSError:  # no member left (ESRCH), or none we may signal
                pass

    # -- the command

    def environment(self):
        """The caller's environment, with the GPUs' variables replaced."""
        env = dict(os.environ)
        env.update(gpu_environment(self.ids, self.pool.kind, env))
        return env

    def start(self):
        """Fork the command into a process group of its own (the unit for signals, the
        timeout and the clean-up), with the terminal only when we are a job of an
        interactive shell (a script's terminal stays the script's), a parent-death
        signal, and a clean signal state; then start the clock."""
        import errno
        import functools

        env = self.environment()
        self.tty = controlling_tty()
        ours, parent = os.getpgrp(), os.getpid()
        take = ours == parent and self.foreground() == ours
        for sig in (signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)  # our terminal calls are made from the background
        prctl = linux_prctl()
        if prctl is not None:
            prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # descendants that setsid away stay ours
        defaults = [
            s
            for s in signal.valid_signals()
            if s not in (signal.SIGKILL, signal.SIGSTOP)
            and not (s == signal.SIGHUP and self.hup_ignored)
        ]
        tty = self.tty if take else None
        child = functools.partial(prepare_child, tty, prctl, parent, defaults)
        try:
            self.popen = self.spawn(env, child)
        except (OSError, subprocess.SubprocessError) as e:
            if take:
                self.give_terminal(ours)  # the child may have taken it before exec failed
            if isinstance(e, OSError):  # a shell's codes: 127 not found, 126 not executable
                code = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE
                raise CanhazError(f"{self.argv[0]}: {e.strerror}", code=code) from None
            raise CanhazError(f"cannot start {self.argv[0]}: {e}") from None
        self.pid = self.pgid = self.popen.pid
        self.gave_terminal = take
        if self.timeout:
            self.deadline = time.monotonic() + self.timeout
        if self.catch_tstp:
            signal.signal(signal.SIGTSTP, self.caught_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.caught)

    def spawn(self, env, child):
        import errno

        try:
            return subprocess.Popen(
                self.argv, env=env, preexec_fn=child, close_fds=True, restore_signals=True
            )
        except OSError as e:
            if e.errno != errno.ENOEXEC:
                raise
        # A script without '#!': execvp(3), env and timeout run it with /bin/sh; Python's
        # exec does not.
        argv = ["/bin/sh", find_command(self.argv[0]), *self.argv[1:]]
        return subprocess.Popen(
            argv, env=env, preexec_fn=child, close_fds=True, restore_signals=True
        )

    def supervise(self):
        """Forward signals, follow stops and continues, run the clock: until the
        command exits."""
        while self.status is None:
            times = [t for t in (self.deadline, self.kill_at) if t is not None]
            self.sleep(max(0.0, min(times) - time.monotonic()) if times else None)
            self.handle_signals()
            self.reap()
            if self.status is None:
                self.check_clock()

    def sleep(self, seconds):
        """Until a signal arrives (its handler writes the wake-up fd) or `seconds` pass."""
        import select

        select.select([self.wakeup], [], [], seconds)
        try:
            while os.read(self.wakeup, 512):
                pass
        except BlockingIOError:
            pass

    def reap(self):
        """Collect our children: the command's status or stop, and orphans that were
        re-parented to us (no Popen but the command's is waiting, so -1 is safe)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid != self.pid:
                continue
            if os.WIFSTOPPED(status):
                self.command_stopped(os.WSTOPSIG(status))
            else:
                self.status = status
                self.popen.returncode = os.waitstatus_to_exitcode(status)  # no second wait

    def check_clock(self):
        """At the timeout the signal (SIGCONT too, for a stopped group); SIGKILL after
        the grace.  The clock is monotonic: SIGALRM could be blocked by the caller."""
        now = time.monotonic()
        name = signal.Signals(self.timeout_signal).name
        if self.deadline is not None and now >= self.deadline:
            self.deadline, self.timed_out = None, True
            self.kill_at = now + self.kill_after
            tell(
                f"canhazgpu: timeout: the command ran for {format_span(self.timeout)}; "
                f"sending {name} to its process group"
            )
            self.signal_group(self.timeout_signal)
            self.signal_group(signal.SIGCONT)
        elif self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            tell(
                f"canhazgpu: the command is still running {format_span(self.kill_after)} "
                f"after {name}; sending SIGKILL to its process group"
            )
            self.signal_group(signal.SIGKILL)

    # -- job control and the terminal, as sudo does it

    def foreground(self):
        """The terminal's foreground process group, or None."""
        try:
            return os.tcgetpgrp(self.tty) if self.tty is not None else None
        except OSError:  # hung up
            return None

    def give_terminal(self, pgid):
        try:
            os.tcsetpgrp(self.tty, pgid)
        except OSError:
            pass

    def command_stopped(self, sig):
        """A command stopped for the terminal while our group holds it gets it, and
        goes on (`run -- vim` from a script).  Otherwise we take the terminal back and
        stop our own job, so that its shell shows the prompt; `fg` continues both."""
        ours = os.getpgrp()
        fg = self.foreground()
        if sig in (signal.SIGTTIN, signal.SIGTTOU) and fg == ours:
            self.gave_terminal = True
            self.give_terminal(self.pgid)
            self.signal_group(signal.SIGCONT)
            return
        if fg == self.pgid:
            self.give_terminal(ours)
        if self.shell_above():
            # Also without a terminal (`kill -TSTP` from a batch system): a parent that
            # can continue us must see us stopped too.  SIGSTOP: a SIGTSTP to an
            # orphaned group is discarded.  Our whole job when we lead it, else only us.
            if ours == os.getpid():
                os.killpg(ours, signal.SIGSTOP)
            else:
                os.kill(os.getpid(), signal.SIGSTOP)

    def shell_above(self):
        """Whether a job-control shell can continue our group: the first ancestor
        outside it is in our session (the group is not orphaned).  Otherwise a stop
        of ours would last for ever, so we keep supervising the stopped command."""
        import psutil

        ours, session = os.getpgrp(), os.getsid(0)
        try:
            proc = psutil.Process().parent()
            while proc is not None and os.getpgid(proc.pid) == ours:
                proc = proc.parent()
            return proc is not None and os.getsid(proc.pid) == session
        except (OSError, psutil.Error):
            return False

    def resumed(self):
        """SIGCONT (`fg`, `bg`): heartbeat at once; the terminal back to the command if
        we are the foreground again (as sudo does); then continue its group."""
        self.heartbeat.beat_now()
        if self.gave_terminal and self.foreground() == os.getpgrp():
            self.give_terminal(self.pgid)
        self.signal_group(signal.SIGCONT)

    def reclaim_terminal(self):
        """Before we exit the terminal goes back to our group: a calling script must
        not find itself in the background."""
        if self.foreground() == self.pgid:
            self.give_terminal(os.getpgrp())

    # -- the end

    def clean_up(self):
        """What the command left (its group, and descendants that left
        the group and were re-parented to us) gets SIGTERM and SIGCONT, SIGKILL after
        the grace; the GPUs are released only when all of it is gone.  After a
        timeout the grace is what remains of --kill-after."""
        now = time.monotonic()
        kill_at = (self.kill_at or now) if self.timed_out else now + self.kill_after
        termed, killed_at = set(), None
        while True:
            self.handle_signals()
            self.reap()
            left = self.leftovers()
            if not left:
                break
            now = time.monotonic()
            if killed_at is None and now >= kill_at:
                killed_at = now
                tell(f"canhazgpu: sending SIGKILL to {len(left)} process(es) still running")
            if killed_at is not None:
                if now - killed_at > SIGKILL_PATIENCE:
                    warn(f"process(es) {left} survived SIGKILL; releasing the GPUs anyway")
                    break
                self.signal_each(left, signal.SIGKILL)
            else:  # each gets one SIGTERM, also those forked or re-parented meanwhile
                new = [p for p in left if p not in termed]
                if new and not termed:
                    tell(
                        f"canhazgpu: the command left {len(new)} process(es) behind; "
                        f"sending SIGTERM (SIGKILL after {format_span(kill_at - now)})"
                    )
                self.signal_each(new, signal.SIGTERM)
                self.signal_each(new, signal.SIGCONT)
                termed.update(new)
            self.sleep(CLEANUP_POLL)
        self.group_gone = True

    def leftovers(self):
        """Live processes that the command left: as their subreaper we are the
        ancestor of all of them, its group's members included."""
        import psutil

        live = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    live.append(proc.pid)
            except psutil.Error:
                pass
        return live

    @staticmethod
    def signal_each(pids, sig):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def release(self, reason="exit"):
        """Synchronously, before we exit, so `status` shows the GPU free the moment `run`
        returns; retried while Redis is briefly away."""
        give_up = time.monotonic() + RELEASE_PATIENCE
        while True:
            try:
                self.pool.release(token=self.req.token, reason=reason)
                return
            except CanhazError as e:
                if time.monotonic() >= give_up:
                    timeout = format_span(self.pool.config["heartbeat.timeout"])
                    warn(
                        f"could not release GPU(s) {self.ids}: {e}; "
                        f"they become free when their heartbeat expires ({timeout})"
                    )
                    return
                time.sleep(0.5)


# ============================================================================
# Commands
# ============================================================================

STATUS_COLOURS = {"AVAILABLE": "32", "IN_USE": "33", "UNRESERVED": "31", "ERROR": "1;31"}


def use_colour(args, stream=sys.stdout):
    return not getattr(args, "no_color", False) and "NO_COLOR" not in os.environ and stream.isatty()


LIMIT_FIELDS = ("max_gpus", "max_duration", "priority")


def cmd_admin(app):
    """Initialise a pool (--gpus), set its limits and priority classes, its idle
    policy, or show them: any of these in one call, in that order."""
    args = app.args
    changes = {f: getattr(args, f) for f in LIMIT_FIELDS if getattr(args, f) is not None}
    policy = args.idle_reclaim_after
    if args.gpus is None and not (changes or args.clear or policy is not None or args.show_limits):
        raise UsageError(
            "admin needs --gpus N to initialise the pool, limits to set, or --show-limits",
            hint="canhazgpu admin --gpus 8; canhazgpu admin --max-gpus 4 --for alice",
        )
    if (args.user_scope or args.group_scope) and not (changes or args.clear):
        raise UsageError(
            "--for and --for-group name whom --max-gpus, --max-duration, "
            "--priority or --clear apply to"
        )
    pool = app.pool()
    if args.gpus is not None:
        initialise(app, pool)
        if policy is None and app.config["idle.reclaim_after"] is not None:
            policy = app.config["idle.reclaim_after"]
    if changes or args.clear:
        scope = limit_scope(args)
        rule = set_limits(pool, scope, changes, args.clear)
        who = "everyone (the default)" if scope == "default" else scope.replace(":", " ", 1)
        say(f"Limits of {who} in pool {pool.label}: {describe_limits(rule)}")
    if policy is not None:
        pool.require()
        set_limits(pool, "policy", {"idle_reclaim_after": policy or False}, False)
        say(
            "Idle manual reservations are "
            + (f"reclaimed after {format_span(policy)}" if policy else "never reclaimed")
        )
    if args.show_limits:
        show_limits(pool)
    return 0


def initialise(app, pool):
    args = app.args
    name = args.provider or detect_provider()
    provider = Provider.create(name)
    real = provider.detect_count()
    if args.force and not args.yes and sys.stdin.isatty():
        confirm_force(pool)
    reply = pool.script("admin", count=args.gpus, provider=name, force=args.force)
    where = f"the GPU pool {pool.name}" if pool.name else "the GPU pool"
    if reply["status"] == "exists":
        raise CanhazError(
            f"{where} is already initialised with {reply['count']} GPUs "
            f"(provider {reply.get('provider') or 'nvidia'})",
            hint="add --force to re-initialise it; that ends every reservation",
        )
    if real is not None and real != args.gpus:  # only once the pool has that count
        warn(f"{provider.tool} reports {real} GPU(s); the pool has {args.gpus}")
    pool.count, pool.kind = args.gpus, name
    models = sorted({g.name for g in provider.usage().values()}) if real is not None else []
    pool.register(models)
    verb = "Re-initialised" if reply.get("old") is not None else "Initialised"
    say(f"{verb} {where}: {args.gpus} GPU(s), provider {name}")
    if reply.get("old") is not None:
        say(f"Ended {reply['ended']} reservation(s)")


def limit_scope(args):
    if args.user_scope:
        return f"user:{args.user_scope}"
    if args.group_scope:
        return f"group:{args.group_scope}"
    return "default"


def limits_of(pool):
    """The pool's limits hash: {scope: JSON}."""
    return pool.store.do("hgetall", pool.prefix + "limits")


def set_limits(pool, scope, changes, clear):
    """Merge `changes` into a scope's limits (none: no limit, even over a default);
    `clear` removes what the scope had first.  Returns the scope's limits now."""
    key = pool.prefix + "limits"
    current = {} if clear else json_object(pool.store.do("hget", key, scope)) or {}
    current.update(changes)
    if current:
        pool.store.do("hset", key, scope, json.dumps(current))
    else:
        pool.store.do("hdel", key, scope)
    return current


def describe_limits(rule):
    def shown(field, value):
        if value is False:
            return "none"
        return format_span(value) if field == "max_duration" else str(value)

    parts = [f"{f.replace('_', '-')} {shown(f, rule[f])}" for f in LIMIT_FIELDS if f in rule]
    return ", ".join(parts) or "none set (the defaults apply)"


def show_limits(pool):
    """`admin --show-limits`: every scope, most general first, and the idle policy."""
    raw = limits_of(pool)
    rules = {scope: json_object(v) or {} for scope, v in raw.items()}
    policy = rules.pop("policy", {})
    order = sorted(rules, key=lambda s: (s != "default", s.split(":")[0] != "group", s))
    rows = [
        [scope]
        + [
            "-"
            if f not in rules[scope]
            else "none"
            if rules[scope][f] is False
            else format_span(rules[scope][f])
            if f == "max_duration"
            else str(rules[scope][f])
            for f in LIMIT_FIELDS
        ]
        for scope in order
    ]
    say(f"Limits of pool {pool.label}:")
    if rows:
        for line in render_table(["SCOPE", "MAX_GPUS", "MAX_DURATION", "PRIORITY"], rows):
            say("  " + line.rstrip())
    else:
        say("  none: everyone may hold every GPU, for any time, in the normal class")
    after = policy.get("idle_reclaim_after")
    say(
        f"Idle manual reservations: reclaimed after {format_span(after)}"
        if after
        else "Idle manual reservations: never reclaimed"
    )


def confirm_force(pool):
    """On a terminal, `admin --force` asks before it ends everyone's reservations
    (anyone may run it: Redis ACLs, not this question, are what restrict it)."""
    snap = pool.snapshot(required=False)
    if not snap.count:
        return
    holders = sorted({g.owner for g in snap.gpus if g.held})
    ended = sum(g.held for g in snap.gpus)
    who = f" of {', '.join(holders)}" if holders else ""
    tell(f"This ends {ended} reservation(s){who} and empties the queue. Go on? [y/N] ", end="")
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CanhazError("nothing changed", hint="--yes skips this question")


def detect_provider():
    found = [p.name for p in (NvidiaProvider, AmdProvider) if p.installed()]
    if not found and NvmlProvider.load() is not None:  # NVML without the nvidia-smi tool
        found = ["nvidia"]
    if len(found) > 1:
        raise UsageError(
            "both nvidia-smi and amd-smi are installed", hint="choose with --provider nvidia|amd"
        )
    if not found:
        raise CanhazError(
            "found neither nvidia-smi nor amd-smi on PATH",
            hint="on a machine without GPUs, use --provider fake",
        )
    return found[0]


def status_rows(snap, hw, config, now):
    """One dict per GPU, in the `status --json` shape; `hw` is the pool's Hardware."""
    rows = []
    for gpu in snap.gpus:
        g = hw.usage.get(gpu.gpu) if hw.usage is not None else None
        row = {"gpu_id": gpu.gpu, **hardware_fields(g)}
        state = gpu_state(gpu, g, config["memory.threshold"])
        if state == "ERROR":
            row.update(status="ERROR", error=gpu.error, details=gpu.error)
        elif state == "IN_USE":
            row.update(held_fields(gpu, now, config["idle.after"]))
        elif state == "UNRESERVED":
            owners = sorted({p.owner or "unknown" for p in g.processes}) or ["unknown"]
            procs = ", ".join(p.label() for p in g.processes)
            row.update(
                status="UNRESERVED",
                user=", ".join(owners),
                unreserved_users=owners,
                details=f"{g.used_mb}MB used" + (f" by {procs}" if procs else ""),
            )
        else:
            released = gpu.time("last_released")
            row.update(
                status="AVAILABLE",
                last_released=rfc3339(released),
                details=f"free for {format_duration(now - released)}" if released else "never used",
            )
        if gpu.note:
            row["note"] = gpu.note
        row["validation"] = validation_text(row["status"], g, hw)
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def gpu_state(gpu, g, threshold):
    """A GPU's STATUS: ERROR, IN_USE, UNRESERVED or AVAILABLE (g: what the provider says)."""
    if gpu.error:
        return "ERROR"
    if gpu.held:
        return "IN_USE"
    if g is not None and g.in_use(threshold):
        return "UNRESERVED"
    return "AVAILABLE"


def pool_counts(snap, hw, config, now):
    """GPUs per state of a pool, and how many held ones are idle: a fleet tile, without
    building every row."""
    counts = dict.fromkeys(STATUS_COLOURS, 0)
    idle = 0
    usage = hw.usage or {}
    for gpu in snap.gpus:
        state = gpu_state(gpu, usage.get(gpu.gpu), config["memory.threshold"])
        counts[state] += 1
        if state == "IN_USE" and not gpu.partial:
            idle += gpu.idle_seconds(now) > config["idle.after"]
    models = sorted({g.name for g in usage.values() if g.name})
    return counts, idle, models


def hardware_fields(g):
    """What the provider says of one GPU, for its status row."""
    if g is None:
        return {}
    row = {
        "gpu_model": g.name,
        "memory_mb": g.used_mb,
        "memory_total_mb": g.memory_total,
        "process_info": [
            {"pid": p.pid, "name": p.name, "memory_mb": p.memory_mb, "user": p.owner}
            for p in g.processes
        ],
    }
    models = [p.model for p in g.processes if p.model]
    if models:
        row["model"] = models[0]
    return row


def held_fields(gpu, now, idle_after):
    start = gpu.time("start_time")
    idle = gpu.idle_seconds(now)
    is_idle = idle > idle_after and not gpu.partial
    idle = int(idle)
    details = held_details(gpu, now)
    if is_idle:
        details = f"{details}, idle {format_hm(idle)}" if details else f"idle {format_hm(idle)}"
    return dict(
        status="IN_USE",
        user=gpu.user,
        actual_user=gpu.owner,
        type=gpu.kind.upper(),
        duration_seconds=max(0, int(now - start)) if start else None,  # as shown
        duration=format_duration(now - start) if start else "",
        last_heartbeat=rfc3339(gpu.time("last_heartbeat")),
        expiry_time=rfc3339(gpu.time("expiry_time")),
        timeout_at=rfc3339(gpu.time("timeout_at")),
        last_active=rfc3339(gpu.time("last_active")),
        idle_seconds=idle,
        idle=is_idle,
        details=details,
    )


def held_details(gpu, now):
    if gpu.partial:
        return "gathering for a queued request"
    if gpu.kind == "manual" and gpu.time("expiry_time"):
        return f"expires in {format_duration(gpu.time('expiry_time') - now)}"
    if gpu.time("last_heartbeat"):
        return f"heartbeat {format_duration(now - gpu.time('last_heartbeat'))} ago"
    return None


def validation_text(status, g, hw):
    if hw.usage is None:
        return f"unknown ({hw.why})" if hw.missing else "unavailable"
    if g is None:
        return "not reported by the provider"
    procs = len(g.processes)
    used = g.used_mb
    if status in ("IN_USE", "UNRESERVED") and procs:
        memory = f"{used}MB, " if used is not None else ""
        return f"{memory}{procs} process" + ("es" if procs != 1 else "")
    if status == "IN_USE":
        return "no usage detected"
    return f"{used}MB used" if used is not None else "memory unknown"


def pool_view(pool, notices=False):
    """(snapshot, hardware) of one pool: this host's asks its provider first, so the
    snapshot script can note which GPUs show use and publish the answer; another
    host's is seen through what that host published."""
    if pool.here:
        pool.require()
        pool.hardware()
        snap = pool.snapshot(observe=True, notices=notices)
        return snap, pool.hardware()
    snap = pool.snapshot(notices=notices)
    return snap, published_hardware(snap.published, pool.host or pool.label)


def hardware_warnings(hw):
    if hw.usage is None and not hw.missing:
        warn(f"cannot validate GPU usage: {hw.why}")
    elif hw.problem:
        warn(incomplete(hw.problem))


def cmd_status(app):
    if app.args.all or app.args.remote:
        return fleet_status(app)
    pool = app.pool()
    snap, hw = pool_view(pool, notices=True)
    hardware_warnings(hw)
    for n in snap.notices:
        tell(
            f"reclaimed GPU {n.get('gpu')} from {n.get('actual_user') or n.get('user')}: "
            f"idle for {format_hm(n.get('idle') or 0)}"
        )
    rows = status_rows(snap, hw, app.config, time.time())
    if app.args.summary:
        return print_summary([pool_summary(pool.label, pool.host, snap, rows)], app.args.json)
    if app.args.json:
        say(json.dumps(rows, indent=2))
        return 0
    say("\n".join(status_table(rows, use_colour(app.args))))  # one write for 1,000 rows
    return 0


def status_table(rows, colour=False):
    """The lines of `status`'s table."""
    with_model = any("model" in r for r in rows)
    header = ["GPU", "STATUS", "USER", "DURATION", "TYPE", "DETAILS", "VALIDATION"]
    header += ["MODEL"] * with_model + ["NOTE"]
    table = []
    for r in rows:
        line = [str(r["gpu_id"]), r["status"], r.get("user") and display_user(r) or "-"]
        line += [
            r.get("duration") or "-",
            r.get("type") or "-",
            r.get("details", ""),
            r["validation"],
        ]
        if with_model:
            line.append(r["model"]["model"] if isinstance(r.get("model"), dict) else "-")
        line.append(r.get("note", ""))
        table.append(line)
    for line in render_table(header, table):
        if colour:
            for word, code in STATUS_COLOURS.items():
                line = line.replace(f" {word} ", f" \x1b[{code}m{word}\x1b[0m ", 1)
        yield line.rstrip()


SUMMARY_HEADER = ["POOL", "HOST", "GPUS", "FREE", "IN_USE", "UNRESERVED", "QUEUED", "MODELS"]
SSH_TIMEOUT = 30.0  # a remote `status` over ssh answers within this, or is one error line


def pool_summary(label, host, snap, rows):
    """One row of `status --summary`: a pool's counts."""
    count = {s: sum(r["status"] == s for r in rows) for s in STATUS_COLOURS}
    models = sorted({r["gpu_model"] for r in rows if r.get("gpu_model")})
    return {
        "pool": label,
        "host": host,
        "gpus": len(rows),
        "free": count["AVAILABLE"],
        "in_use": count["IN_USE"],
        "unreserved": count["UNRESERVED"],
        "queued": len(snap.queue) if snap is not None else None,
        "models": models,
    }


def print_summary(summaries, as_json):
    """`status --summary`: a row per pool, and a total row when there are several."""
    if as_json:
        say(json.dumps(summaries, indent=2))
        return 0 if any("error" not in s for s in summaries) else 1
    numbers = SUMMARY_HEADER[2:7]
    table, total = [], dict.fromkeys(numbers, 0)
    for s in summaries:
        if "error" in s:
            table.append([s["pool"], s.get("host") or "-", *["-"] * 5, f"error: {s['error']}"])
            continue
        cells = [s[k.lower()] for k in numbers]
        for k, v in zip(numbers, cells):
            total[k] += v or 0
        cells = ["-" if v is None else str(v) for v in cells]
        table.append([s["pool"], s["host"] or "-", *cells, ", ".join(s["models"]) or "-"])
    if len(summaries) > 1:
        table.append(["TOTAL", "", *[str(total[k]) for k in numbers], ""])
    for line in render_table(SUMMARY_HEADER, table):
        say(line.rstrip())
    return 0 if any("error" not in s for s in summaries) else 1


def remote_status(host):
    """`canhazgpu status --json` run on a host that keeps its own Redis, over ssh as
    the Go tool does it: its rows, or the CanhazError that says why not."""
    argv = [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        host,
        "canhazgpu",
        "status",
        "--json",
    ]
    try:
        p = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SSH_TIMEOUT
        )
    except FileNotFoundError:
        return CanhazError("ssh is not installed")
    except subprocess.TimeoutExpired:
        return CanhazError(f"no answer over ssh within {SSH_TIMEOUT:.0f}s")
    if p.returncode != 0:
        lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
        return CanhazError(lines[-1] if lines else f"ssh exited with {p.returncode}")
    try:
        rows = json.loads(p.stdout)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError
    except ValueError:
        return CanhazError("`canhazgpu status --json` there printed no status")
    return [
        r for r in rows if isinstance(r.get("gpu_id"), int) and isinstance(r.get("status"), str)
    ]


def remote_statuses(hosts):
    """{host: rows or CanhazError}, asked in parallel: a host that hangs costs its own
    time, not everyone's."""
    import threading

    out = {}
    threads = [
        threading.Thread(target=lambda h=h: out.__setitem__(h, remote_status(h)), daemon=True)
        for h in dict.fromkeys(hosts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


class Block:
    """One block of `status --all`: a pool of this Redis, or a host asked over ssh."""

    def __init__(self, label, host, rows, snap=None, over_ssh=False):
        self.label, self.host, self.rows, self.snap = label, host, rows, snap
        self.over_ssh = over_ssh
        self.failed = isinstance(rows, CanhazError)

    def summary(self):
        if self.failed:
            return {"pool": self.label, "host": self.host, "error": str(self.rows)}
        return pool_summary(self.label, self.host, self.snap, self.rows)

    def heading(self):
        """`== Pool gpu-a on gpu-a.lab: 8 x NVIDIA H100 80GB HBM3, 3 free ==`"""
        kind = "Host" if self.over_ssh else "Pool"
        where = f" on {self.host}" if self.host and self.host != self.label else ""
        if self.failed:
            return printable(f"== {kind} {self.label}{where} ==")
        models = sorted({r["gpu_model"] for r in self.rows if r.get("gpu_model")})
        free = sum(r["status"] == "AVAILABLE" for r in self.rows)
        what = f"{len(self.rows)} x {', '.join(models)}" if models else f"{len(self.rows)} GPUs"
        return printable(f"== {kind} {self.label}{where}: {what}, {free} free ==")


def fleet_blocks(app):
    """`status --all` / `--remote`: the pools of this Redis and the hosts over ssh (asked
    meanwhile, in parallel), as Blocks in name order."""
    import threading

    args = app.args
    hosts = list(args.remote or []) + (list(app.config["remote_hosts"] or []) if args.all else [])
    remote = {}
    asking = threading.Thread(target=lambda: remote.update(remote_statuses(hosts)), daemon=True)
    asking.start()
    blocks = []
    if args.all:
        fleet = app.fleet()
        now = time.time()
        for label, view in fleet.snapshots(fleet.labels()).items():
            if isinstance(view, CanhazError):
                blocks.append(Block(label, fleet.info.get(label, {}).get("host"), view))
            else:
                pool, snap, hw = view
                rows = status_rows(snap, hw, app.config, now)
                blocks.append(Block(label, pool.host or hw.remote, rows, snap))
    asking.join()
    for host in dict.fromkeys(hosts):
        label = host if all(b.label != host for b in blocks) else f"{host} (ssh)"
        blocks.append(Block(label, host, remote[host], over_ssh=True))
    return sorted(blocks, key=lambda b: b.label)


def fleet_status(app):
    blocks = fleet_blocks(app)
    code = 0 if any(not b.failed for b in blocks) or not blocks else 1
    if app.args.summary:
        return print_summary([b.summary() for b in blocks], app.args.json)
    if app.args.json:
        out = {b.label: {"error": str(b.rows)} if b.failed else b.rows for b in blocks}
        say(json.dumps(out, indent=2))
        return code
    if not blocks:
        say("No pools are registered in this Redis (`canhazgpu admin --pool NAME` adds one).")
    colour = use_colour(app.args)
    for k, block in enumerate(blocks):
        if k:
            say()
        say(block.heading())
        if block.failed:
            say(f"Error: {block.rows}")
            continue
        for line in status_table(block.rows, colour):
            say(line)
    return code


def display_user(row, user="user", account="actual_user"):
    """'account (display name)' when --user named someone else, else the name."""
    shown, actual = row[user], row.get(account)
    return f"{actual} ({shown})" if actual and actual != shown else shown


def render_table(header, rows):
    """Aligned columns; every cell printable(): users' names and notes, process names."""
    rows = [[printable(x) for x in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, *rows]:
        yield "  ".join(str(x).ljust(w) for x, w in zip(line, widths))


def request_from_args(app, kind):
    """Build a Request from run/reserve's flags and their config defaults."""
    args, config = app.args, app.config
    section = kind_key(kind)
    key = f"{section}.gpus"
    ids, count = args.gpu_ids, config[key]
    if ids:
        # --gpu-ids on the command line beats a count from a file or the default.
        if config.source(key).startswith("--") and count not in (1, len(ids)):
            raise UsageError(
                f"--gpus {count} does not match the {len(ids)} GPU(s) of --gpu-ids",
                hint="give one of them, or the same number in both",
            )
        count = len(ids)
    req = Request(
        kind,
        count,
        ids=ids,
        duration=config["reserve.duration"] if kind == "manual" else None,
        note=args.note,
        user=args.user,
        force=getattr(args, "force", False),
    )
    # A limit refuses a length typed on the command line, and trims one from a default.
    req.duration_given = kind == "manual" and config.source("reserve.duration").startswith("--")
    req.timeout = config["run.timeout"] if kind == "run" else None
    req.priority = config[f"{section}.priority"]
    return req


def cmd_reserve(app):
    req = request_from_args(app, "manual")
    pool = app.pool()  # imports redis-py: a signal meanwhile finds nothing to give back
    try:
        # Until the ids are printed, a signal gives the GPUs back: nobody was told of
        # them, and they would stay reserved for the whole duration.
        with CancelOnSignals():
            grant = reserve_gpus(pool, req, *wait_options(app.config, "manual", app.args.nonblock))
            gpus, duration = grant["gpus"], grant.get("duration") or req.duration
            if grant.get("capped"):
                tell(f"canhazgpu: reservations here last {format_span(duration)} at most")
            ids = ",".join(map(str, gpus))
            if app.args.short:
                say(ids)
            else:
                say(f"Reserved {len(gpus)} GPU(s): {gpus} for {format_duration(duration)}")
                say(f"export CUDA_VISIBLE_DEVICES={ids}")
    except Interrupted:
        pool.release(token=req.token, reason="cancel")
        raise
    return 0


def cmd_run(app):
    """Reserve, run the command after `--` under supervision, release."""
    args, config = app.args, app.config
    example = "example: canhazgpu run --gpus 1 -- python train.py"
    if args.stray:
        command = " ".join(args.stray)
        raise UsageError(f"put the command after `--`: canhazgpu run -- {command}", hint=example)
    if not args.argv:
        raise UsageError("`run` needs a command after `--`", hint=example)
    req = request_from_args(app, "run")
    find_command(args.argv[0])
    require_module("psutil", "python3-psutil")  # the supervisor needs it after the command
    pool = app.pool()
    if not pool.here:
        raise UsageError(
            f"pool {pool.label} is on {pool.host}: `run` runs the command here, on {this_host()}",
            hint=f"run it there (ssh {pool.host} canhazgpu run ...), or hold GPUs there "
            f"with `canhazgpu reserve --pool {pool.label}`",
        )
    Supervisor(
        pool,
        req,
        args.argv,
        wait_options(config, "run", args.nonblock),
        timeout=config["run.timeout"],
        timeout_signal=config["run.signal"],
        kill_after=config["run.kill_after"],
    ).run()


def refusal(r):
    """Why a GPU named with --gpu-ids was not released or extended: one line."""
    if r["result"] == "other":
        return f"is reserved by {display_user(r)}, not by you ({current_user()})"
    if r["result"] == "limit":
        return (
            f"would last {format_span(r['length'])}; {current_user()} may reserve for "
            f"at most {format_span(r['max'])}"
        )
    return {
        "free": "is not reserved",
        "range": "is not in the pool",
        "run": "is held by a run, which lasts as long as its command",
        "corrupt": "has an unreadable state in Redis (an admin can run `admin --force`)",
    }[r["result"]]


def cmd_release(app):
    """Exit 0 when everything asked for was released, 1 when any id was refused (one
    `Error:` line each), 2 for ids outside the pool (nothing is released then)."""
    pool = app.pool()
    ids = app.args.gpu_ids
    check_ids(ids or (), pool.require())
    results = pool.release(ids=ids)
    released = sorted(r["gpu"] for r in results if r["result"] == "released")
    if released:
        say(f"Released {len(released)} GPU(s): {released}")
    elif not ids:
        say("No manually reserved GPUs found for current user")
    refused = [r for r in results if r["result"] != "released"]
    for r in refused:
        tell(f"Error: GPU {r['gpu']} {refusal(r)}")
    return 1 if refused else 0


def cmd_extend(app):
    """Exit 0 when a reservation was extended (refused ids are one `Error:` line each),
    1 when none was."""
    pool = app.pool()
    ids = app.args.gpu_ids
    check_ids(ids or (), pool.require())
    results = pool.extend(app.args.duration, ids=ids)
    extended = sorted(r["gpu"] for r in results if r["result"] == "extended")
    for r in results:
        if r["result"] != "extended":
            tell(f"Error: GPU {r['gpu']} {refusal(r)}")
    if extended:
        soonest = min(r["expiry"] for r in results if r["result"] == "extended")
        say(
            f"Extended {len(extended)} GPU(s): {extended}; "
            f"expires in {format_duration(soonest - time.time())}"
        )
        return 0
    if not results:
        tell("Error: you hold no manual reservation to extend")
    return 1


REPORT_GRACE = 300  # records of the last minutes are read one by one: a host's clock may lag
REPORT_BATCH = 5000  # records folded into the roll-ups per script call


class Usage:
    """GPU time per (display name, account) over a window, clipped to it."""

    def __init__(self, since, now):
        self.since, self.now = since, now
        self.users = {}

    def row(self, user, account):
        account = account if isinstance(account, str) and account else user
        return self.users.setdefault(
            (user, account),
            {"name": user, "account": account, "seconds": 0.0, "idle": 0.0, "run": 0, "manual": 0},
        )

    def add(self, user, account, kind, start, end, idle=0.0):
        """A reservation, clipped to the window; its idle time is spread evenly over it."""
        start = self.since if start is None else start
        end = self.now if end is None else end
        seconds = max(0.0, min(end, self.now) - max(start, self.since))
        if end < self.since or not isinstance(user, str) or not user:
            return
        entry = self.row(user, account)
        entry["seconds"] += seconds
        if idle > 0 and end > start:
            entry["idle"] += min(idle, end - start) * seconds / (end - start)
        entry["manual" if kind == "manual" else "run"] += 1

    def add_record(self, rec):
        end = parse_time(rec.get("end_time"))
        if end is not None and end >= self.since:
            idle = rec.get("idle_seconds")
            self.add(
                rec.get("user"),
                rec.get("actual_user"),
                rec.get("reservation_type"),
                parse_time(rec.get("start_time")),
                end,
                idle if isinstance(idle, (int, float)) else 0.0,
            )

    def add_sum(self, kind, account, user, seconds, count, idle):
        """A roll-up: whole records of whole days inside the window, already summed."""
        if isinstance(user, str) and user:
            entry = self.row(user, account)
            entry["seconds"] += seconds
            entry["idle"] += idle
            entry["manual" if kind == "manual" else "run"] += int(count)

    def add_before(self, rec, split):
        """The part before `split` of a record the roll-ups split there: its time from the
        window's start (its count is the roll-ups')."""
        start, end = parse_time(rec.get("start_time")), parse_time(rec.get("end_time"))
        user = rec.get("user")
        if start is None or end is None or not isinstance(user, str) or not user:
            return
        part = min(end, split) - max(start, self.since)
        if part > 0 and end > start:
            entry = self.row(user, rec.get("actual_user"))
            entry["seconds"] += part
            idle = rec.get("idle_seconds")
            if isinstance(idle, (int, float)):
                entry["idle"] += min(idle, end - start) * part / (end - start)

    def add_held(self, gpu, idle_after):
        """An in-progress reservation, counted from its start; idle as free() would count it."""
        idle = gpu.data.get("idle_seconds")
        idle = idle if isinstance(idle, (int, float)) else 0.0
        gap = gpu.idle_seconds(self.now)
        if idle_after is not None and gap > idle_after:
            idle += gap
        self.add(gpu.user, gpu.owner, gpu.kind, gpu.time("start_time"), self.now, idle)


def build_report(records, held, days, now, rollup=None, idle_after=None):
    return report_object(usage_of(records, held, days, now, rollup, idle_after), days)


def usage_of(records, held, days, now, rollup=None, idle_after=None):
    """GPU hours per user over the window; in-progress reservations count from
    their start; everything is clipped to the window.  A row is a display name and
    the real account behind it (`--user` on a shared account); users are accounts.
    `rollup`: the report script's sums of whole days, [type, account, user, seconds,
    count, idle], and the records that crossed into them (`crossing`, at `split`)."""
    usage = Usage(now - days * 86400, now)
    for rec in records:
        usage.add_record(rec)
    rollup = rollup or {}
    for kind, account, user, seconds, count, idle in rollup.get("sums", ()):
        usage.add_sum(kind, account, user, seconds, count, idle)
    for rec in rollup.get("crossing", ()):
        usage.add_before(rec, rollup["split"])
    for gpu in held:
        usage.add_held(gpu, idle_after)
    return usage


def report_object(usage, days):
    """The `report --json` object of a Usage."""
    total = sum(u["seconds"] for u in usage.users.values())
    out = []
    for u in sorted(usage.users.values(), key=lambda u: (-u["seconds"], u["name"], u["account"])):
        out.append(
            {
                "name": u["name"],
                "account": u["account"],
                "gpu_hours": round(u["seconds"] / 3600, 4),
                "idle_gpu_hours": round(u["idle"] / 3600, 4),
                "percentage": round(100 * u["seconds"] / total, 2) if total else 0.0,
                "run_count": u["run"],
                "manual_count": u["manual"],
            }
        )
    return {
        "users": out,
        "total_gpu_hours": round(total / 3600, 4),
        "total_idle_gpu_hours": round(sum(u["idle"] for u in usage.users.values()) / 3600, 4),
        "total_reservations": sum(u["run_count"] + u["manual_count"] for u in out),
        "unique_users": len({u["account"] for u in out}),
        "start_date": rfc3339(usage.since),
        "end_date": rfc3339(usage.now),
        "days": days,
    }


def report_args(since, now):
    return {"since": since, "upto": math.floor(now - REPORT_GRACE), "batch": REPORT_BATCH,
            "now": now}  # fmt: skip


def report_reply(pool, since, now, reply=None):
    """(the report script's answer, the pool's snapshot) once every record is folded
    and the legacy keys of old versions (the unnamed pool's) have been read."""
    while True:
        if reply is None or len(reply) == 1:  # more to fold
            reply = pool.script("report", **report_args(since, now))
            continue
        answer = json.loads(reply[0])
        if answer.get("migrated") or pool.name:
            snap = Snapshot([*reply[1:], []])
            if not snap.count:
                raise not_initialised(pool.name)
            return answer, snap
        migrate_legacy(pool)
        reply = None


def migrate_legacy(pool):
    """Old versions wrote each record as a key of its own (usage_history:*): move them
    into the sorted set, once, so that no report ever scans the whole database."""
    batch = []
    for key in pool.store.do("scan_iter", pool.prefix + "usage_history:*", 1000):
        batch.append(key)
        if len(batch) == 500:
            pool.script("migrate", keys=batch)
            batch = []
    pool.script("migrate", keys=batch, done=True)


def report_for(pool, days, now=None):
    now = time.time() if now is None else now
    reply, snap = report_reply(pool, now - days * 86400, now)
    return report_from(pool, snap, reply, days, now)


def report_inputs(pool, snap, reply, days, now):
    """build_report()'s arguments from a pool's report script answer and snapshot."""
    held = [g for g in snap.gpus if g.held and not g.partial]
    records = [r for r in map(json_object, reply["records"]) if r is not None]
    crossing = [r for r in map(json_object, reply.get("crossing", ())) if r is not None]
    rollup = {"sums": reply["sums"], "crossing": crossing, "split": reply.get("split")}
    return records, held, days, now, rollup, pool.config["idle.after"]


def report_from(pool, snap, reply, days, now):
    return build_report(*report_inputs(pool, snap, reply, days, now))


def usage_from(pool, snap, reply, days, now):
    """The Usage of a pool, from its report script's answer and its snapshot."""
    return usage_of(*report_inputs(pool, snap, reply, days, now))


def fleet_report(app, days, now):
    """{label: Usage or CanhazError} of every pool, pipelined."""
    fleet = app.fleet()
    since = now - days * 86400
    reports = {}
    for label, view in fleet.views(fleet.labels(), "report", report_args(since, now)).items():
        try:
            if isinstance(view, CanhazError):
                raise view
            reply, snap = report_reply(view[0], since, now, view[1])
            reports[label] = usage_from(view[0], snap, reply, days, now)
        except CanhazError as e:
            reports[label] = e
    return reports


def merge_reports(reports, days, now):
    """The fleet's report: each user's time summed over the pools, with the pools it
    used (most hours first)."""
    usage = Usage(now - days * 86400, now)
    pools = {}
    for label, part in reports.items():
        if isinstance(part, CanhazError):
            continue
        for (name, account), u in part.users.items():
            entry = usage.row(name, account)
            for key in ("seconds", "idle", "run", "manual"):
                entry[key] += u[key]
            pools.setdefault((name, account), []).append((u["seconds"], label))
    merged = report_object(usage, days)
    for u in merged["users"]:
        used = sorted(pools.get((u["name"], u["account"]), []), key=lambda p: (-p[0], p[1]))
        u["pools"] = [label for _, label in used]
    return merged


def cmd_report(app):
    days = app.config["report.days"]
    now = time.time()
    if app.args.all:
        reports = fleet_report(app, days, now)
        report = merge_reports(reports, days, now)
        if app.args.json:  # each pool's own report, for JSON alone
            report["pools"] = {
                label: {"error": str(u)} if isinstance(u, CanhazError) else report_object(u, days)
                for label, u in reports.items()
            }
        else:
            report["pools"] = reports
        for label, rep in reports.items():
            if isinstance(rep, CanhazError):
                warn(f"pool {label}: {rep}")
    else:
        report = report_for(app.pool(), days, now)
    if app.args.json:
        say(json.dumps(report, indent=2))
        return 0
    print_report(report, days, fleet=app.args.all)
    return 0


def print_report(report, days, fleet=False):
    say("=== GPU Reservation Report" + (" (all pools)" if fleet else "") + " ===")
    span = f"{days} day" + ("s" if days != 1 else "")
    say(f"Period: {report['start_date'][:10]} to {report['end_date'][:10]} ({span})")
    say()
    columns = f"{'User':<20} {'GPU Hours':>14} {'Percentage':>15} {'Run':>10} {'Manual':>10}"
    columns += f" {'Idle GPU Hours':>15}" + ("  Pools" if fleet else "")
    rule = "-" * len(columns)
    say(columns)
    say(rule)
    for u in report["users"]:
        who = printable(display_user(u, "name", "account"))
        line = (
            f"{who:<20} {u['gpu_hours']:>14.2f} {u['percentage']:>14.1f}% "
            f"{u['run_count']:>10} {u['manual_count']:>10} {u['idle_gpu_hours']:>15.2f}"
        )
        if fleet:
            line += "  " + printable(
                ", ".join(u["pools"][:3]) + (" ..." if len(u["pools"]) > 3 else "")
            )
        say(line)
    if not report["users"]:
        say("(no reservations in this period)")
    say(rule)
    total_pct = 100.0 if report["users"] and report["total_gpu_hours"] else 0.0
    runs = sum(u["run_count"] for u in report["users"])
    manuals = sum(u["manual_count"] for u in report["users"])
    say(
        f"{'TOTAL':<20} {report['total_gpu_hours']:>14.2f} {total_pct:>14.1f}% "
        f"{runs:>10} {manuals:>10} {report['total_idle_gpu_hours']:>15.2f}"
    )
    say()
    say(f"Total reservations: {report['total_reservations']}")
    say(f"Unique users: {report['unique_users']}")
    if fleet:
        say(f"Pools: {len(report['pools'])}")


def queue_report(snap, now=None):
    """The queue in order, in the `queue --json` shape, with each waiter's estimated
    start (`eta`, RFC 3339, or null when a GPU it needs has no known end)."""
    now = time.time() if now is None else now
    etas = queue_etas(snap, now)
    entries = []
    for pos, e in enumerate(snap.queue, 1):
        enqueued = parse_time(e.get("enqueue_time"))
        entries.append(
            {
                "position": pos,
                "id": e.get("id"),
                "user": e.get("user"),
                "actual_user": e.get("actual_user") or e.get("user"),
                "requested_count": e.get("requested_count"),
                "requested_ids": e.get("requested_ids") or None,
                "allocated_gpus": e.get("allocated_gpus") or [],
                "reservation_type": e.get("reservation_type"),
                "priority": e.get("priority") if e.get("priority") in PRIORITIES else "normal",
                "note": e.get("note"),
                "enqueue_time": rfc3339(enqueued),
                "waiting_seconds": round(now - enqueued) if enqueued else None,
                "eta": rfc3339(etas.get(e.get("id"))),
            }
        )
    oldest = max((e["waiting_seconds"] or 0 for e in entries), default=0)
    return {"entries": entries, "total": len(entries), "oldest_wait_seconds": oldest}


def queue_rows(report, pool=None):
    """The table rows of a queue report, with a first POOL column for `--all`."""
    rows = []
    for e in report["entries"]:
        wanted = e["requested_ids"]
        requested = (
            "GPUs " + ",".join(map(str, wanted)) if wanted else f"{e['requested_count']} GPU(s)"
        )
        eta = parse_time(e["eta"])
        rows.append(
            [pool] * (pool is not None)
            + [
                str(e["position"]),
                display_user(e) if e["user"] else "?",
                requested,
                ",".join(map(str, e["allocated_gpus"])) or "-",
                (e["reservation_type"] or "run").upper(),
                e["priority"],
                format_duration(e["waiting_seconds"] or 0),
                f"starts by {clock(eta)}" if eta else "unknown",
            ]
        )
    return rows


QUEUE_HEADER = ["POS", "USER", "REQUESTED", "GATHERED", "TYPE", "PRIORITY", "WAITING", "ETA"]


def cmd_queue(app):
    if app.args.all:
        return fleet_queue(app)
    report = queue_report(app.pool().snapshot())
    if app.args.json:
        say(json.dumps(report, indent=2))
        return 0
    if not report["total"]:
        say("The queue is empty.")
        return 0
    for line in render_table(QUEUE_HEADER, queue_rows(report)):
        say(line.rstrip())
    say(f"Total: {report['total']} waiting")
    return 0


def fleet_queue(app):
    """`queue --all`: every pool's waiters, pool by pool."""
    fleet = app.fleet()
    views, now = fleet.views(fleet.labels()), time.time()
    reports = {
        label: view if isinstance(view, CanhazError) else queue_report(Snapshot(view[1]), now)
        for label, view in views.items()
    }
    if app.args.json:
        out = {
            k: {"error": str(v)} if isinstance(v, CanhazError) else v for k, v in reports.items()
        }
        say(json.dumps(out, indent=2))
        return 0
    rows = []
    for label, rep in reports.items():
        if isinstance(rep, CanhazError):
            warn(f"pool {label}: {rep}")
        else:
            rows += queue_rows(rep, label)
    if rows:
        for line in render_table(["POOL", *QUEUE_HEADER], rows):
            say(line.rstrip())
    total = len(rows)
    say(f"Total: {total} waiting in {len(reports)} pool(s)" if total else "Every queue is empty.")
    return 0


# ============================================================================
# Web
# ============================================================================
#
# `web` serves the dashboard (one self-contained page), a read-only JSON API in
# the shapes of `status --json`, `report --json` and `queue --json`, and
# Prometheus metrics.  Every request reads the pool afresh (one Redis script);
# the provider's answer is shared by every request for a few seconds, so any
# number of viewers start at most one nvidia-smi per window.  `--demo` reads a
# DemoStore instead of Redis, through the same code.

# ------------------------------ routes


WEB_CACHE_SECONDS = 5.0  # how long one provider answer serves every request
WEB_IO_TIMEOUT = 10.0  # a client silent this long mid-request (or idle) is dropped
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUS_STATES = ("AVAILABLE", "IN_USE", "UNRESERVED", "ERROR")


class WebError(Exception):
    """A request we answer with an HTTP error: a code and one line."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Site:
    """What the web server answers, from a store (Redis's, or a DemoStore): this host's
    pool, or with `fleet` every pool of the Redis (the others seen through what their
    hosts publish)."""

    def __init__(self, store, config, cache, pool, demo=False, fleet=False):
        self.store, self.config, self.cache = store, config, cache
        self.local, self.fleet = pool, fleet  # this host's Pool; whether to serve all
        self.page, self.csp = dashboard_page(this_host(), demo, fleet, pool.label)

    def get(self, path, params):
        """(code, content type, body) for GET `path`; raises WebError or CanhazError."""
        if path == "/":
            return 200, "text/html; charset=utf-8", self.page
        if path == "/api/status":
            pool = self.pool_of(params)
            return json_reply(self.rows(pool, pool.snapshot()))
        if path == "/api/report":
            pool = self.pool_of(params, "days")
            return json_reply(report_for(pool, self.report_days(params)))
        if path == "/api/queue":
            return json_reply(queue_report(self.pool_of(params).snapshot()))
        if path == "/api/pools":
            only(params, path)
            return json_reply(self.pools())
        if path == "/metrics":
            only(params, path)
            return 200, METRICS_TYPE, self.metrics()
        if path == "/healthz":
            self.store.do("ping")
            return json_reply({"status": "ok"})
        raise WebError(404, f"no such page: {path}")

    def pool_of(self, params, *allowed):
        """The pool a request names with ?pool= (this host's without one)."""
        only(params, "this route", "pool", *allowed)
        values = params.get("pool") or [self.local.label]
        if len(values) > 1:
            raise WebError(400, "pool is given more than once")
        label = values[0]
        if label == self.local.label:
            return self.local
        if not self.fleet:
            raise WebError(
                404,
                f"this dashboard shows pool {self.local.label} only "
                "(`canhazgpu web --fleet` shows every pool)",
            )
        if label != UNNAMED and not POOL_NAME.fullmatch(label):
            raise WebError(400, f"not a pool name: {label!r}")
        fleet = Fleet(self.store, self.config)
        if label not in fleet.labels():
            raise WebError(404, f"no pool named {label!r} in this Redis")
        pool = fleet.pool(label)
        pool.here = False  # only this host's own pool is looked at here
        return pool

    def hardware(self, pool, snap):
        if pool is self.local:
            return self.cache.hardware(snap.provider, snap.count)
        return published_hardware(snap.published, pool.host or pool.label)

    def rows(self, pool, snap):
        return status_rows(snap, self.hardware(pool, snap), self.config, time.time())

    def report_days(self, params):
        values = params.get("days") or [str(self.config["report.days"])]
        if len(values) > 1:
            raise WebError(400, "days is given more than once")
        try:
            return convert_setting("days", values[0])
        except ValueError:
            raise WebError(
                400,
                f"days must be a whole number from 1 to {HISTORY_DAYS}, got {values[0]!r}",
            ) from None

    def snapshots(self):
        """[(label, pool, snapshot or CanhazError)] of the pools this dashboard serves,
        in one round trip per Redis node."""
        if not self.fleet:
            return [(self.local.label, self.local, self.local.snapshot(required=False))]
        fleet = Fleet(self.store, self.config, self.local)
        out = []
        for label, view in fleet.views(fleet.labels(), observe=False).items():
            if isinstance(view, CanhazError):
                out.append((label, fleet.pool(label), view))
                continue
            pool, snap = view[0], Snapshot(view[1])
            pool.count, pool.kind = snap.count, snap.provider
            out.append((label, pool, snap))
        return out

    def views(self):
        """[(label, pool, snapshot, rows)] of the pools that could be read."""
        return [
            (label, pool, snap, self.rows(pool, snap) if snap.count else [])
            for label, pool, snap in self.snapshots()
            if not isinstance(snap, CanhazError)
        ]

    def pools(self):
        """`/api/pools`: a tile per pool, where it is, what it has and how busy it is."""
        tiles, now = [], time.time()
        for label, pool, snap in self.snapshots():
            if isinstance(snap, CanhazError) or not snap.count:
                error = str(snap) if isinstance(snap, CanhazError) else "not initialised"
                tiles.append({"pool": label, "host": pool.host if pool else None, "error": error})
                continue
            counts, idle, models = pool_counts(snap, self.hardware(pool, snap), self.config, now)
            tiles.append({
                "pool": label, "host": pool.host, "gpus": snap.count,
                "free": counts["AVAILABLE"], "in_use": counts["IN_USE"],
                "unreserved": counts["UNRESERVED"], "errors": counts["ERROR"],
                "queued": len(snap.queue), "idle": idle, "models": models,
                "local": label == self.local.label,
            })  # fmt: skip
        return {"pools": tiles, "local": self.local.label, "fleet": self.fleet}

    def metrics(self):
        out = Metrics()
        try:
            views = self.views()
        except CanhazError:
            views = None
        out.add(
            "canhazgpu_redis_up",
            "gauge",
            "1 if the pool could be read from Redis.",
            [({}, int(views is not None))],
        )
        if views is not None:
            pool_metrics(out, views, self.cache)
        out.add(
            "canhazgpu_provider_queries_total",
            "counter",
            "GPU provider queries (nvidia-smi, amd-smi runs) made by this server.",
            [({}, self.cache.runs)],
        )
        out.add(
            "canhazgpu_provider_query_failures_total",
            "counter",
            "GPU provider queries that failed.",
            [({}, self.cache.failures)],
        )
        return out.text()


def only(params, where, *allowed):
    """A request's query parameters: the ones a route knows, each once."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = " and ".join(f"{a}=" for a in allowed) or "no parameters"
        raise WebError(400, f"unknown parameter {unknown[0]!r}: {where} takes {takes}")


def pool_metrics(out, views, cache):
    """Every pool series, labelled with its pool: [(label, pool, snap, rows)]."""
    live = [(label, snap, rows) for label, _, snap, rows in views if snap.count]
    out.add(
        "canhazgpu_pool_gpus",
        "gauge",
        "GPUs in the pool (0: not initialised).",
        [({"pool": label}, snap.count) for label, _, snap, _ in views],
    )
    out.add(
        "canhazgpu_provider_up",
        "gauge",
        "1 if the last GPU provider query (this host's pool) worked.",
        [({"pool": views[0][0]}, int(cache.error is None))] if live else [],
    )
    states = [*STATUS_STATES, "IDLE"]
    out.add(
        "canhazgpu_gpus",
        "gauge",
        "GPUs by state (idle: held, and unused for longer than idle.after).",
        [
            ({"pool": label, "state": s.lower()}, state_count(rows, s))
            for label, _, rows in live
            for s in states
        ],
    )
    gpu_metrics(out, live)
    user_metrics(out, live)
    queue_metrics(out, live)


def gpu_metrics(out, live):
    """The series of each GPU: its state, idle time and memory."""
    out.add(
        "canhazgpu_gpu_state",
        "gauge",
        "1 for the state each GPU is in, else 0.",
        [
            ({"pool": label, "gpu": r["gpu_id"], "state": s.lower()}, int(r["status"] == s))
            for label, _, rows in live
            for r in rows
            for s in STATUS_STATES
        ],
    )
    out.add(
        "canhazgpu_gpu_idle_seconds",
        "gauge",
        "How long each held GPU has shown no use.",
        [
            ({"pool": label, "gpu": r["gpu_id"]}, r["idle_seconds"])
            for label, _, rows in live
            for r in rows
            if "idle_seconds" in r
        ],
    )
    for what, field, help in (
        ("used", "memory_mb", "GPU memory in use."),
        ("total", "memory_total_mb", "GPU memory in all."),
    ):
        samples = [
            ({"pool": label, "gpu": r["gpu_id"]}, r[field] * 2**20)
            for label, _, rows in live
            for r in rows
            if r.get(field) is not None
        ]
        out.add(f"canhazgpu_gpu_memory_{what}_bytes", "gauge", help, samples)


def queue_metrics(out, live):
    queues = [(label, queue_report(snap)) for label, snap, _ in live]
    out.add(
        "canhazgpu_queue_length",
        "gauge",
        "Requests waiting in the queue.",
        [({"pool": label}, q["total"]) for label, q in queues],
    )
    out.add(
        "canhazgpu_queue_oldest_wait_seconds",
        "gauge",
        "How long the longest-waiting request has waited (0: empty queue).",
        [({"pool": label}, q["oldest_wait_seconds"]) for label, q in queues],
    )


def state_count(rows, state):
    if state == "IDLE":
        return sum(bool(r.get("idle")) for r in rows)
    return sum(r["status"] == state for r in rows)


def user_metrics(out, live):
    """Labelled with the display name and the real account: one account using
    --user names counts once per name, and sums by account."""
    held, unreserved = {}, {}
    for label, _, rows in live:
        for r in rows:
            if r["status"] == "IN_USE":
                who = (label, r["user"], r.get("actual_user") or r["user"])
                held[who] = held.get(who, 0) + 1
            for user in r.get("unreserved_users", ()):
                unreserved[label, user, user] = unreserved.get((label, user, user), 0) + 1
    for name, counts, help in (
        ("reserved", held, "GPUs each user holds a reservation on."),
        ("unreserved", unreserved, "GPUs each user's processes use without a reservation."),
    ):
        samples = [
            ({"pool": p, "user": u, "account": a}, n) for (p, u, a), n in sorted(counts.items())
        ]
        out.add(f"canhazgpu_user_{name}_gpus", "gauge", help, samples)


def json_reply(obj, code=200):
    return code, "application/json", json.dumps(obj)


# ------------------------------ cache


class UsageCache:
    """The provider's answer, shared by every request for `ttl` seconds.

    Single-flight: the request that finds it stale queries while holding the
    lock; requests arriving meanwhile wait for that answer instead of starting
    their own nvidia-smi."""

    def __init__(self, query, ttl=WEB_CACHE_SECONDS):
        import threading

        self.query, self.ttl = query, ttl
        self.lock = threading.Lock()
        self.key, self.usage, self.expires = None, None, 0.0
        self.runs = self.failures = 0
        self.error = self.news = self.problem = None  # the last failure, warning, gap

    def get(self, name, count):
        """{index: GpuUsage}, or None while the provider fails."""
        with self.lock:
            if self.key != (name, count) or time.monotonic() >= self.expires:
                self.runs += 1
                error = problem = None
                try:
                    self.usage, problem = self.query(name, count)
                except ProviderError as e:
                    self.failures += 1
                    self.usage, error = None, str(e)
                news = f"cannot validate GPU usage: {error}" if error else None
                if problem:
                    news = incomplete(problem)
                if news != self.news:  # say it when it starts or changes, not every window
                    warn(news or "GPU validation is back")
                self.error, self.news, self.problem = error, news, problem
                self.key = (name, count)
                self.expires = time.monotonic() + self.ttl
            return self.usage

    def hardware(self, name, count):
        """The cached answer as a Hardware."""
        usage = self.get(name, count)
        return Hardware(usage, why=self.error, problem=self.problem)


def provider_usage(name, count):
    """(usage, what is missing from it or None); raises ProviderError."""
    provider = Provider.create(name, count)
    usage = provider.usage()
    inspect_processes(usage)
    return usage, provider.problem


# ------------------------------ metrics


class Metrics:
    """Prometheus text exposition format 0.0.4, written by hand (no dependency)."""

    def __init__(self):
        self.lines = []

    def add(self, name, kind, help, samples):
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            pairs = ",".join(f'{k}="{metric_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{pairs}}} {value}" if pairs else f"{name} {value}")

    def text(self):
        return "\n".join(self.lines) + "\n"


def metric_label(value):
    return str(value).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


# ------------------------------ server


class WebRequests:
    """How `web` answers a request: GET and HEAD from its Site, 405 for every other
    method.  Mixed into http.server's handler by web_handler(), so that only `web`
    imports http.server."""

    site = None  # the Site, set by web_handler()

    protocol_version = "HTTP/1.1"  # keep-alive: a dashboard polls
    timeout = WEB_IO_TIMEOUT  # a half-sent request holds only its own thread, this long
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall

    # http.server's own errors (a malformed request) as plain text, with a status
    # line even when the request line is too broken to tell its HTTP version.
    default_request_version = "HTTP/1.0"
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def version_string(self):
        return f"canhazgpu/{__version__}"

    def parse_request(self):
        if len(self.raw_requestline.split()) == 2:
            # `GET /` is HTTP/0.9: http.server would wait for headers that never come.
            self.command, self.requestline = None, ""
            self.request_version, self.close_connection = "HTTP/1.0", True
            self.send_error(400, "Bad request line: expected METHOD /path HTTP/1.1")
            return False
        return super().parse_request()

    def do_GET(self):
        self.answer(head=False)

    def do_HEAD(self):
        self.answer(head=True)

    def __getattr__(self, name):
        # Every other method, known or not, gets 405 (http.server's default is 501).
        if name.startswith("do_"):
            return self.refuse
        raise AttributeError(name)

    def refuse(self):
        self.close_connection = True  # a request body we never read must not pass for a request
        self.reply(
            405,
            "application/json",
            json.dumps({"error": "read-only: use GET"}),
            extra={"Allow": "GET, HEAD"},
        )

    def answer(self, head):
        from urllib.parse import parse_qs, urlsplit

        url = urlsplit(self.path)
        try:
            if not url.path.startswith("/"):
                raise WebError(400, "the request target must be a path starting with /")
            query = parse_qs(url.query, keep_blank_values=True)
            code, kind, body = self.site.get(url.path, query)
        except WebError as e:
            code, kind, body = json_reply({"error": str(e)}, e.code)
        except CanhazError as e:  # Redis unreachable, pool not initialised
            code, kind, body = json_reply({"error": str(e), "hint": e.hint}, 503)
        except Exception:
            import traceback

            traceback.print_exc()
            code, kind, body = json_reply({"error": "internal error: see the server log"}, 500)
        extra = {"Content-Security-Policy": self.site.csp} if kind.startswith("text/html") else {}
        self.reply(code, kind, body, head=head, extra=extra)

    def reply(self, code, kind, body, head=False, extra=None):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def log_request(self, code="-", size="-"):
        # No access log: at hundreds of requests a second it would cost more than
        # the answers.  Failures are still logged (send_error, 5xx).
        if str(code).isdigit() and int(code) >= 500:
            super().log_request(code, size)


def web_handler(site):
    from http.server import BaseHTTPRequestHandler

    return type("Handler", (WebRequests, BaseHTTPRequestHandler), {"site": site})


def web_server(site, host, port):
    """A ThreadingHTTPServer bound to host:port, answering from `site`."""
    import socket
    import socketserver
    from http.server import ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        daemon_threads = True  # a stuck client never delays shutdown
        request_queue_size = 128  # many viewers connecting at once
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def server_bind(self):
            # HTTPServer.server_bind looks up the host's FQDN: seconds without DNS.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = host, self.server_address[1]

        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                super().handle_error(request, client_address)  # a client hanging up is no news

    try:
        return Server((host, port), web_handler(site))
    except OSError as e:
        raise CanhazError(
            f"cannot listen on {host}:{port}: {e.strerror or e}",
            hint="choose another address with --host / --port",
        ) from None


PUBLISH_EVERY = 15.0  # seconds between the web server's looks at this host's GPUs


def cmd_web(app):
    import threading

    args, config = app.args, app.config
    host, port = config["web.host"], config["web.port"]
    if args.demo:
        store = DemoStore()
        pool = Pool(store, config, name=config["pool.name"])
        site = Site(store, config, UsageCache(demo_usage), pool, demo=True, fleet=args.fleet)
    else:
        pool = app.pool()
        site = Site(app.store(), config, UsageCache(provider_usage), pool, fleet=args.fleet)
        try:
            site.store.do("ping")
        except CanhazError as e:
            warn(f"{e}; the dashboard says so until Redis answers")
    server = web_server(site, host, port)
    if not args.demo and pool.here:
        keep_publishing(Pool(site.store, config, name=pool.name), site.cache)

    def stop(signum, frame):
        # shutdown() waits for serve_forever(), which runs in this very thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    shown = this_host() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    demo = " with demo data" if args.demo else ""
    port = server.server_address[1]
    tell(f"Serving the dashboard{demo} on http://{shown}:{port}/ (Ctrl-C to stop)")
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    tell("Stopped.")
    return 0


def keep_publishing(pool, cache):
    """Every 15 s, whether anyone looks or not: this host's GPUs as the provider shows
    them, noted on idle reservations and published for viewers on other hosts (so a
    `web` on each host is the fleet's publisher)."""
    import threading

    def loop():
        while True:
            try:
                pool.require()
                pool.publish(cache.hardware(pool.kind, pool.count))
            except CanhazError:
                pool.count = None  # not initialised yet, or Redis away: look again later
            time.sleep(PUBLISH_EVERY)

    threading.Thread(target=loop, name="publisher", daemon=True).start()


# ------------------------------ demo


class DemoStore:
    """`web --demo`: sample pools, queues and usage histories in the shapes Redis holds
    them, read through the same code as real data.  Times follow the clock.  This
    host's pool is the sample; with --fleet two more hosts' pools join it."""

    address = "demo data"
    mode = "plain"
    USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "eval-bot")
    OTHERS = {  # label: (host, GPUs, model)
        "a100-03": ("a100-03.lab", 4, "NVIDIA A100-SXM4-40GB"),
        "dgx-02": ("dgx-02.lab", 8, "NVIDIA H100 80GB HBM3"),
    }

    def __init__(self):
        self.t0 = time.time()
        self.records = {
            label: self.history_of(seed, gpus)
            for seed, (label, (_, gpus, _)) in enumerate(self.OTHERS.items(), 43)
        }
        self.records[None] = self.history_of(42, 8)

    def history_of(self, seed, gpus):
        """90 days of usage records, the same on every run."""
        import random

        rng = random.Random(seed)
        records = []
        for day in range(90):
            for user in self.USERS:
                if rng.random() < 0.35:
                    continue
                start = self.t0 - day * 86400 - rng.uniform(0, 80000)
                hours = rng.choice((0.5, 1, 2, 3, 4, 6, 8, 12)) * rng.uniform(0.6, 1.4)
                for gpu in rng.sample(range(gpus), min(gpus, rng.choice((1, 1, 2, 4)))):
                    records.append(
                        {
                            "user": user,
                            "gpu_id": gpu,
                            "start_time": start,
                            "end_time": start + hours * 3600,
                            "duration_seconds": hours * 3600,
                            "reservation_type": "manual" if rng.random() < 0.3 else "run",
                            "idle_seconds": hours * 3600 * rng.choice((0, 0, 0, 0.2, 0.6)),
                        }
                    )
        return [h for h in records if h["end_time"] < self.t0]

    @staticmethod
    def label_of(prefix):
        """Which demo pool a key prefix names (None: this host's, the sample)."""
        m = re.fullmatch(re.escape(KEY) + r"\{(.*)\}:", prefix)
        return m.group(1) if m and m.group(1) in DemoStore.OTHERS else None

    def registry(self):
        pools = {
            UNNAMED: {
                "host": this_host(),
                "gpu_count": 8,
                "provider": "nvidia",
                "models": ["NVIDIA H100 80GB HBM3"],
            }
        }
        for label, (host, gpus, model) in self.OTHERS.items():
            pools[label] = {
                "host": host,
                "gpu_count": gpus,
                "provider": "nvidia",
                "models": [model],
            }
        return {label: json.dumps(info) for label, info in pools.items()}

    def do(self, method, *args):
        if method == "ping":
            return True
        if method == "hgetall" and args == (REGISTRY,):
            return self.registry()
        if method == "hget" and args[0] == REGISTRY:
            return self.registry().get(args[1])
        if method == "exists":
            return 1
        raise CanhazError(f"the demo store cannot {method}")

    def pipeline(self, calls):
        return [self.do(*call) for call in calls]

    def scripts(self, calls):
        return [self.script(name, prefix, **args) for name, prefix, args in calls]

    def script(self, name, prefix=KEY, now=None, **args):
        label = self.label_of(prefix)
        if name == "report":
            since = args["since"]
            records = [json.dumps(h) for h in self.records[label] if h["end_time"] >= since]
            snap = self.script("snapshot", prefix, now=now)
            answer = {"sums": [], "records": records, "migrated": True}
            return [json.dumps(answer), *snap[:3]]
        if name != "snapshot":
            raise CanhazError("the demo is read-only")
        now = time.time() if now is None else now
        states, queue, usage = demo_pool(label, self.t0, now)
        # An absent key comes back as None, as redis-py returns the script's false.
        raws = [json.dumps({k: v for k, v in s.items() if v}) if s else None for s in states]
        published = json.dumps(usage) if usage else None
        return [len(states), "nvidia", raws, [json.dumps(q) for q in queue], published, 0, []]


def demo_pool(label, t0, now):
    """(states, queue, published usage) of a demo pool: the sample when label is None."""

    def run(user, started, note="", gpu_active=True):
        return {
            "user": user,
            "actual_user": user,
            "type": "run",
            "start_time": t0 - started,
            "last_heartbeat": now - (now - t0) % 60,
            "note": note,
            "last_active": now - (now - t0) % 15 if gpu_active else None,
        }

    def manual(user, started, hours, note="", actual=None, active=None):
        return {
            "user": user,
            "actual_user": actual or user,
            "type": "manual",
            "start_time": t0 - started,
            "expiry_time": t0 - started + hours * 3600,
            "note": note,
            "last_active": active,
        }

    if label is None:
        states = [
            run("alice", 11530, "llama-3 8B fine-tune, lr sweep 3/5"),
            run("alice", 11530, "llama-3 8B fine-tune, lr sweep 3/5"),
            manual("bob", 9840, 8, "notebook: attention ablations", active=now - 40),
            manual("eval-bot", 2400, 2, "nightly eval", actual="svc-ml"),
            {"last_released": t0 - 7260},
            run("frank", 2820),
            {"last_released": t0 - 2520},
            None,
        ]
        return states, demo_queue(t0, now), None
    return demo_other_pool(label, t0, now, run, manual)


def demo_other_pool(label, t0, now, run, manual):
    """A demo pool of another host: its states, no queue, and what that host published."""
    host, gpus, model = DemoStore.OTHERS[label]
    if label == "dgx-02":
        states = (
            [run("carol", 86000, "vllm serve, team endpoint")] * 2
            + [
                manual("dave", 20000, 12, "debugging NCCL", active=t0 - 9000),
                run("erin", 600),
            ]
            + [{"last_released": t0 - 3600 * k} for k in range(1, gpus - 3)]
        )
        busy = {0: (61000, "vllm"), 1: (60500, "vllm"), 3: (20480, "python3")}
    else:
        states = [
            manual("erin", 3000, 4, "notebook", active=now - 10),
            {"last_released": t0 - 600},
            None,
            None,
        ]
        busy = {0: (9000, "python3"), 2: (30000, "python3")}
    usage = {
        i: GpuUsage(
            i, f"GPU-{label}-{i}", model, busy.get(i, (3, ""))[0], 40960 if gpus == 4 else 81559
        )
        for i in range(gpus)
    }
    for i, (used, proc) in busy.items():
        usage[i].processes.append(GpuProcess(50000 + i, proc, used - 500))
    doc = usage_document(usage, "nvidia", now=now - (now - t0) % 15)
    doc["host"] = host
    return states, [], doc


def demo_queue(t0, now):
    """Two waiters on the sample pool: dave for GPUs 0 and 1, erin for GPU 2."""
    return [
        {
            "id": "5b0c7d1e-demo-0001",
            "user": "dave",
            "actual_user": "dave",
            "requested_count": 2,
            "requested_ids": [0, 1],
            "allocated_gpus": [],
            "reservation_type": "run",
            "note": "multi-node smoke test",
            "enqueue_time": t0 - 372,
            "last_heartbeat": now,
        },
        {
            "id": "5b0c7d1e-demo-0002",
            "user": "erin",
            "actual_user": "erin",
            "requested_count": 1,
            "requested_ids": [2],
            "allocated_gpus": [],
            "reservation_type": "manual",
            "expiry_duration": 2 * 3600 * 10**9,
            "enqueue_time": t0 - 100,
            "last_heartbeat": now,
        },
    ]


def demo_usage(name, count):
    """The sample pool's hardware, as nvidia-smi and /proc would tell it."""
    total = 81559
    busy = {  # gpu: (MiB used, pid, process, owner, command line)
        0: (
            71234,
            48213,
            "python3",
            "alice",
            ["torchrun", "train.py", "--model", "meta-llama/Meta-Llama-3-8B"],
        ),
        1: (
            70988,
            48214,
            "python3",
            "alice",
            ["torchrun", "train.py", "--model", "meta-llama/Meta-Llama-3-8B"],
        ),
        2: (12345, 39110, "python3", "bob", ["python3", "-m", "ipykernel_launcher"]),
        4: (38012, 51200, "vllm", "carol", ["vllm", "serve", "mistralai/Mistral-7B-Instruct-v0.3"]),
        5: (
            23456,
            50777,
            "python3",
            "frank",
            ["lm_eval", "--model_args", "pretrained=Qwen/Qwen2-7B,dtype=bfloat16"],
        ),
    }
    usage = {}
    for i in range(count):
        used, pid, proc, owner, cmdline = busy.get(i, (0, None, None, None, None))
        gpu = usage[i] = GpuUsage(i, f"GPU-demo-{i}", "NVIDIA H100 80GB HBM3", used, total)
        if pid:
            p = GpuProcess(pid, proc, used - 512)
            p.owner, p.model = owner, detect_model(cmdline)
            gpu.processes.append(p)
    return usage, None


# ------------------------------ page


def dashboard_page(host, demo, fleet=False, pool=UNNAMED):
    """The page (bytes) and its Content-Security-Policy: only the page's own
    script and style run, and they talk only to this server."""
    import base64
    import hashlib
    import html
    from urllib.parse import quote

    def digest(text):
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    values = {
        "HOST": html.escape(host),
        "DEMO": "1" if demo else "0",
        "FLEET": "1" if fleet else "0",
        "POOL": html.escape(pool),
        "VERSION": __version__,
        "ICON": "data:image/svg+xml," + quote(WEB_LOGO),
        "LOGO": WEB_LOGO,
        "CSS": WEB_CSS,
        "JS": WEB_JS,
    }
    page = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], WEB_HTML)
    csp = (
        f"default-src 'none'; script-src {digest(WEB_JS)}; style-src {digest(WEB_CSS)}; "
        "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page.encode(), csp


# ============================================================================
# Entry point
# ============================================================================


class Parser(argparse.ArgumentParser):
    """argparse with our error format: `Error: ...` and a hint, exit 2."""

    def error(self, message):
        self.exit(2, f"Error: {message}\nTry '{self.prog} --help'.\n")


def gpu_ids(text):
    """'1,3' -> [1, 3]; duplicates, negatives and non-numbers are errors."""
    ids = []
    for part in str(text).split(","):
        part = part.strip()
        if not re.fullmatch(r"\d+", part):
            raise argparse.ArgumentTypeError(f"expected GPU ids like 0,2,3, got {text!r}")
        if int(part) in ids:
            raise argparse.ArgumentTypeError(f"GPU {part} is listed twice in {text!r}")
        ids.append(int(part))
    return sorted(ids)


def arg_type(kind, what):
    def convert(text):
        try:
            return convert_setting(kind, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = what  # argparse names the type in its messages
    return convert


def limit_type(kind, off="none"):
    """An admin limit: a value of `kind`, or `none` (`off`) for no limit (False)."""

    def convert(text):
        if text.strip().lower() == off:
            return False
        try:
            return convert_setting(kind, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}, or {off}") from None

    convert.__name__ = kind
    return convert


def host_name(text):
    """A host for ssh: never an option (`-oProxyCommand=...`) or a control character."""
    host = text.strip()
    if not host or host.startswith("-") or CONTROL.search(host) or re.search(r"[\s,]", host):
        raise argparse.ArgumentTypeError(f"expected a host name, got {printable(text)!r}")
    return host


def plain_text(what):
    """An argparse type for text others will see: no control characters, so no
    escape sequence reaches their terminals and no newline breaks a table."""

    def convert(text):
        if CONTROL.search(text):
            raise argparse.ArgumentTypeError(
                f"the {what} must not contain control characters, got '{printable(text)}'"
            )
        if not text.strip():
            raise argparse.ArgumentTypeError(f"the {what} must not be empty")
        return text

    convert.__name__ = what
    return convert


def default_of(key):
    """A setting's built-in default as help texts show it: 8h, INT, 1024."""
    kind, default, _ = SETTINGS[key]
    if kind == "duration":
        return format_span(default)
    if kind == "signal":
        return signal.Signals(default).name[3:]
    return str(default)


def examples(*lines):
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def opt(*flags, **kwargs):
    """One option of the parser table: add_argument's arguments."""
    return flags, kwargs


def switch(*flags, help):
    return opt(*flags, action="store_true", help=help)


class OneOf(list):
    """Options of the parser table that exclude each other."""


def global_options():
    """Accepted before or after the command name (each command's parser has them too)."""
    return [
        opt("--config", metavar="PATH", help="config file to read"),
        opt("--redis-url", metavar="URL", type=arg_type("url", "URL"),
            help="redis://[:password@]host:port/db, rediss://... or unix:///path"),
        opt("--redis-host", metavar="HOST", type=arg_type("str", "host"),
            help=f"Redis host ({default_of('redis.host')})"),
        opt("--redis-port", metavar="N", type=arg_type("port", "port"),
            help=f"Redis port ({default_of('redis.port')})"),
        opt("--redis-db", metavar="N", type=arg_type("count0", "db"),
            help=f"Redis database number ({default_of('redis.db')})"),
        opt("--memory-threshold", metavar="MB", type=arg_type("count0", "threshold"),
            help=f"a GPU using more memory than this is in use ({default_of('memory.threshold')})"),
        opt("--pool", metavar="NAME", type=arg_type("pool", "pool"),
            help="the pool to act on (default: pool.name, else the unnamed pool); "
            "auto = this host's short name"),
        opt("--debug", action="store_true", help=argparse.SUPPRESS),
    ]  # fmt: skip


def request_options(kind):
    """What run and reserve share: how many GPUs, waiting, and how they are shown."""
    return [
        opt("-g", "--gpus", type=arg_type("count", "count"), metavar="N",
            help=f"number of GPUs (default {default_of(kind + '.gpus')})"),
        opt("-G", "--gpu-ids", type=gpu_ids, metavar="IDS", help="specific GPUs, e.g. 1,3"),
        OneOf([
            switch("--nonblock", help="fail at once instead of waiting in the queue"),
            opt("-w", "--wait", type=arg_type("duration", "duration"), metavar="D",
                help="wait in the queue at most D (e.g. 30m); default: as long as it takes"),
        ]),
        opt("-n", "--note", type=plain_text("note"), metavar="TEXT", help="a note shown in status"),
        opt("-u", "--user", type=plain_text("name"), metavar="NAME",
            help="display name for a shared account (ownership stays yours)"),
        opt("--priority", choices=PRIORITIES,
            help="queue class of this request (default: your class, normal unless an admin "
            "set another); you may lower it, never raise it"),
    ]  # fmt: skip


JSON_OPTION = switch("-j", "--json", help="print JSON")


def command_table():
    """The parser table: each command's name, function, help, examples and options."""
    return [
        ("admin", cmd_admin, "initialise a GPU pool; set its limits, priorities, idle policy", [
            "canhazgpu admin --gpus 8",
            "canhazgpu admin --pool auto --gpus 8     # this host's pool in a fleet",
            "canhazgpu admin --gpus 4 --force   # ends every reservation (asks first)",
            "canhazgpu admin --gpus 4 --force --yes   # from a script: no question",
            "canhazgpu admin --gpus 4 --provider fake   # a machine without GPUs",
            "canhazgpu admin --max-gpus 4 --max-duration 1d   # everyone's default",
            "canhazgpu admin --max-gpus 8 --priority high --for-group ml-infra",
            "canhazgpu admin --max-gpus none --for alice   # no cap for alice",
            "canhazgpu admin --idle-reclaim-after 2h   # end manual reservations idle 2h",
            "canhazgpu admin --show-limits",
        ], [
            opt("-g", "--gpus", type=arg_type("count", "count"), metavar="N",
                help="initialise the pool with N GPUs"),
            switch("--force", help="re-initialise an existing pool, ending every reservation"),
            switch("-y", "--yes", help="with --force: do not ask on a terminal"),
            opt("-p", "--provider", choices=PROVIDERS,
                help="how GPU usage is validated (default: detected)"),
            opt("--max-gpus", type=limit_type("count"), metavar="N|none",
                help="most GPUs one account holds, reserved and gathered while queued"),
            opt("--max-duration", type=limit_type("duration"), metavar="D|none",
                help="longest reservation, extensions included; runs get it as --timeout"),
            opt("--priority", choices=PRIORITIES,
                help="queue class: waiters are served high, normal, then low"),
            OneOf([
                opt("--for", dest="user_scope", type=plain_text("user"), metavar="USER",
                    help="set the limits of this account (its own win over its groups')"),
                opt("--for-group", dest="group_scope", type=plain_text("group"),
                    metavar="GROUP", help="set the limits of this Unix group"),
            ]),
            switch("--clear", help="remove the limits set for --for/--for-group (or the default)"),
            opt("--idle-reclaim-after", type=limit_type("duration", "off"), metavar="D|off",
                help="end manual reservations idle this long (default off; idle.reclaim_after)"),
            switch("--show-limits", help="show the limits, classes and idle policy"),
        ]),
        ("status", cmd_status, "show who holds which GPU, and who uses one unreserved", [
            "canhazgpu status",
            "canhazgpu status --json | jq '.[] | .status'",
            "canhazgpu status --all               # every pool of the fleet",
            "canhazgpu status --all --summary     # one line per pool",
            "canhazgpu status --pool gpu-b",
            "canhazgpu status --remote old-box    # a host with its own Redis, over ssh",
        ], [
            JSON_OPTION,
            switch("--no-color", help="no colours (also: NO_COLOR=1)"),
            switch("--all", help="every pool in this Redis, and the hosts of remote_hosts"),
            switch("--summary", help="one row per pool: free, in use, unreserved, queued"),
            opt("--remote", action="append", type=host_name, metavar="HOST",
                help="also show HOST's own status over ssh (repeatable)"),
        ]),
        ("run", cmd_run, "reserve GPUs, run a command on them, release them when it ends", [
            "canhazgpu run --gpus 2 -- python train.py",
            "canhazgpu run --gpu-ids 1,3 --timeout 2h -- ./train.sh",
            "canhazgpu run --nonblock -- python eval.py   # fail if none is free",
        ], [
            *request_options("run"),
            opt("-t", "--timeout", type=arg_type("duration", "duration"), metavar="D",
                help="stop the command after D (e.g. 2h); exit 124"),
            opt("--signal", type=arg_type("signal", "signal"), metavar="SIG",
                help=f"signal sent at the timeout (default {default_of('run.signal')})"),
            opt("--kill-after", type=arg_type("duration", "duration"), metavar="D",
                help="SIGKILL this long after the timeout signal "
                f"(default {default_of('run.kill_after')})"),
            opt("stray", nargs="*", help=argparse.SUPPRESS),  # a command without `--`
        ]),
        ("reserve", cmd_reserve, "reserve GPUs for interactive work", [
            "canhazgpu reserve                         # 1 GPU for 8h",
            "canhazgpu reserve --gpus 2 --duration 4h --note 'notebook'",
            "export CUDA_VISIBLE_DEVICES=$(canhazgpu reserve --short)",
            "canhazgpu reserve --gpu-ids 3 --force   # adopt work already running on GPU 3",
        ], [
            *request_options("reserve"),
            opt("-d", "--duration", type=arg_type("duration", "duration"), metavar="D",
                help=f"how long (default {default_of('reserve.duration')}; 30m, 0.5h, 2d, 1h30m)"),
            switch("-f", "--force", help="also take GPUs in use without a reservation"),
            switch("-s", "--short", help="print only the ids, e.g. 1,3"),
        ]),
        ("extend", cmd_extend, "add time to your manual reservations", [
            "canhazgpu extend --duration 2h            # all your manual reservations",
            "canhazgpu extend -G 1,3 -d 30m",
        ], [
            opt("-G", "--gpu-ids", type=gpu_ids, metavar="IDS",
                help="extend only these GPUs (default: all your manual reservations)"),
            opt("-d", "--duration", type=arg_type("duration", "duration"), metavar="D",
                required=True, help="time to add, e.g. 2h or 30m"),
        ]),
        ("release", cmd_release, "release your reservations", [
            "canhazgpu release              # all your manual reservations",
            "canhazgpu release --gpu-ids 1,3",
        ], [
            opt("-G", "--gpu-ids", type=gpu_ids, metavar="IDS",
                help="release these GPUs (yours, run or manual)"),
        ]),
        ("report", cmd_report, "GPU hours per user", [
            "canhazgpu report",
            "canhazgpu report --days 7 --json",
            "canhazgpu report --all --days 30   # the whole fleet, with each user's pools",
        ], [
            opt("-d", "--days", type=arg_type("days", "days"), metavar="N",
                help=f"days to cover, 1-{HISTORY_DAYS} (default {default_of('report.days')})"),
            JSON_OPTION,
            switch("--all", help="every pool in this Redis, summed, with a report per pool"),
        ]),
        ("queue", cmd_queue, "show who is waiting for GPUs, in order, and when they start", [
            "canhazgpu queue",
            "canhazgpu queue --json",
            "canhazgpu queue --all",
        ], [JSON_OPTION, switch("--all", help="the queues of every pool in this Redis")]),
        ("web", cmd_web, "serve the dashboard, a JSON API and Prometheus metrics", [
            "canhazgpu web --port 8080",
            "canhazgpu web --fleet   # every pool of the fleet",
            "canhazgpu web --demo   # sample data, no Redis",
        ], [
            opt("--host", metavar="HOST",
                help=f"address to listen on (default {default_of('web.host')})"),
            opt("-p", "--port", type=arg_type("port", "port"), metavar="N",
                help=f"port (default {default_of('web.port')})"),
            switch("--fleet", help="show every pool in this Redis, not only this host's"),
            switch("--demo", help="serve sample data without Redis"),
        ]),
    ]  # fmt: skip


def add_options(target, options, default=None):
    """Add parser-table options to a parser, group or exclusive group."""
    for option in options:
        if isinstance(option, OneOf):
            add_options(target.add_mutually_exclusive_group(), option, default)
            continue
        flags, kwargs = option
        target.add_argument(*flags, **(dict(kwargs, default=default) if default else kwargs))


COMMANDS = {}


def build_parser():
    parser = Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reserve GPUs on a shared machine, run commands on them, "
        "and see who holds what.",
        epilog=examples(
            "canhazgpu admin --gpus 8            # once, as the admin",
            "canhazgpu status                    # who holds what",
            "canhazgpu run --gpus 2 -- python train.py",
            "canhazgpu reserve --gpus 1 --duration 4h",
            "canhazgpu release",
            "canhazgpu report --days 7",
        )
        + "\n\nEach command has its own --help.  Configuration: CANHAZGPU_* variables,\n"
        "~/.canhazgpu.{yaml,json,toml}, /etc/canhazgpu/config.{toml,json,yaml}.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_options(parser.add_argument_group("global options"), global_options())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, func, help, lines, options in command_table():
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=examples(*lines),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # SUPPRESS: a global option given before the command is not reset by this parser.
        add_options(p.add_argument_group("global options"), global_options(), argparse.SUPPRESS)
        add_options(p, options)
        COMMANDS[name] = func
    run = sub.choices["run"]
    run.usage = run.format_usage()[len("usage: ") :].rstrip() + " -- COMMAND [ARG ...]"
    return parser


class App:
    """One invocation: its arguments, its configuration, and lazily its Redis."""

    NEEDS_PROVIDER = ("status", "run", "reserve")

    def __init__(self, args):
        self.args = args
        self.config = Config.load(args.config, flags=self.flags(args))
        self._store = self._pool = None
        self._early = None
        if args.command in self.NEEDS_PROVIDER and self.own_pool(self.config["pool.name"]):
            # Guess the provider and start its queries now, before Redis is even
            # imported: most of nvidia-smi's latency hides behind our start-up.
            guess = next((p for p in (NvidiaProvider, AmdProvider) if p.installed()), None)
            if guess is NvidiaProvider and nvml_installed():
                guess = None  # NVML answers in-process, in milliseconds: nothing to hide
            if guess is not None:
                self._early = guess()
                self._early.start()

    @staticmethod
    def flags(args):
        """{config key: (value, '--flag')} for the settings given on the command line:
        the global options, and `<command>.<option>` for a command's own (run.timeout)."""
        flags = {}
        for dest, value in vars(args).items():
            flag = dest.replace("_", "-")
            key = GLOBAL_OPTIONS.get(flag) or f"{args.command}.{dest}"
            if value is not None and key in SETTINGS:
                flags[key] = (value, "--" + flag)
        return flags

    def own_pool(self, name):
        """Whether `name` is this host's own pool without asking Redis: the one its
        config files name (or the unnamed pool), or its short host name."""
        return name == self.config.file_value("pool.name") or name == this_host().split(".")[0]

    @classmethod
    def for_api(cls, config):
        """An App for the Python API: its config, no command line."""
        app = cls.__new__(cls)
        app.args, app.config = argparse.Namespace(command=None), config
        app._store = app._pool = app._early = None
        return app

    def store(self):
        if self._store is None:
            self._store = Store(self.config)
        return self._store

    def pool(self):
        """The pool this command acts on.  Another host's pool (so the registry says) is
        seen through what that host publishes, never through this host's GPUs."""
        if self._pool is None:
            name = self.config["pool.name"]
            here, host = True, this_host()
            if not self.own_pool(name):
                info = json_object(self.store().do("hget", REGISTRY, name or UNNAMED)) or {}
                if isinstance(info.get("host"), str) and info["host"] != host:
                    here, host = False, info["host"]
            self._pool = Pool(self.store(), self.config, self._early if here else None, name, here)
            self._pool.host = host
        return self._pool

    def fleet(self):
        """Every pool of this Redis, this host's own among them."""
        try:
            here = self.pool()
        except UsageError:  # a Cluster with no pool named here: there is no own pool
            here = None
        return Fleet(self.store(), self.config, here if here is not None and here.here else None)

    def close(self):
        if self._pool is not None:
            self._pool.close()
        elif self._early is not None:
            self._early.discard()


def split_command(argv):
    """`run [options] -- CMD...` -> (options, CMD); CMD is None without `--`."""
    if "--" in argv:
        k = argv.index("--")
        return argv[:k], argv[k + 1 :]
    return argv, None


PASSWORDS = (
    re.compile(rb"(://[^:@/]*:)(.*)(@)", re.S),  # the userinfo's, up to the last '@'
    re.compile(rb"([?&]password=)([^&#]*)()", re.I),
)


def hide_passwords_from_ps():
    """A password given on the command line (--redis-url redis://:pw@...) shows in
    every user's `ps` for as long as we run, and a `run` lasts hours: overwrite it
    with asterisks in our own argv, which is what /proc/PID/cmdline reads."""
    if not any(p.search(os.fsencode(a)) for a in sys.argv for p in PASSWORDS):
        return
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5))
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            args = mem.read(end - start)
            for p in PASSWORDS:
                args = p.sub(lambda m: m[1] + b"*" * len(m[2]) + m[3], args)
            mem.seek(start)
            mem.write(args)
    except (OSError, ValueError, IndexError):  # not Linux, or /proc not mounted
        pass


def main(argv=None):
    quiet_interrupts()  # the console scripts of `pip install` start here
    if argv is None:
        hide_passwords_from_ps()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    options, command = split_command(argv)
    args = parser.parse_args(options)
    args.argv = command
    if args.command is None:
        parser.print_help()
        return 0
    if args.command != "run" and command is not None:
        parser.error(f"unexpected arguments after --: {' '.join(command)}")
    app = None
    try:
        app = App(args)
        return COMMANDS[args.command](app)
    except CanhazError as e:
        report_error(e, args)
        code = e.code
        return 125 if args.command == "run" and code == 1 else code
    except Interrupted as e:
        if app is not None:
            app.close()
        die_of(e.signum)
    finally:
        if app is not None:
            app.close()


def report_error(error, args):
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()
    tell(f"Error: {error}")
    if error.hint:
        tell(f"Hint: {error.hint}")


# ------------------------------ the Python API
#
#     import canhazgpu
#     with canhazgpu.gpus(2, duration="4h", note="sweep") as ids:   # before importing torch
#         ...
#
# The same settings (CANHAZGPU_* variables, config files) and identity as the command
# line; errors are canhazgpu.Error with the message the CLI prints.

Error = CanhazError


class Held:
    """GPUs reserved from Python (canhazgpu.reserve()): `ids`, `expires_at` (Unix s),
    `extend(duration)`, `release()`; a context manager that releases on exit.  While
    held, os.environ gives them to what the program starts or imports next."""

    def __init__(self, pool, req, grant):
        self.pool, self.token = pool, req.token
        self.ids = list(grant["gpus"])
        self.expires_at = time.time() + (grant.get("duration") or req.duration)
        self.released = False
        wanted = gpu_environment(self.ids, pool.kind, os.environ)
        self._saved = {key: os.environ.get(key) for key in wanted}
        os.environ.update(wanted)

    def __repr__(self):
        state = "released" if self.released else f"until {rfc3339(self.expires_at)}"
        return f"<canhazgpu.Held GPUs {self.ids} {state}>"

    def extend(self, duration):
        """Add `duration` ('2h', or seconds) to this reservation, within the limits."""
        if self.released:
            raise Error("this reservation was released")
        results = self.pool.extend(api_duration(duration, "duration"), token=self.token)
        done = [r for r in results if r["result"] == "extended"]
        if not done:
            refused = next((r for r in results if r["result"] == "limit"), None)
            why = f"GPU {refused['gpu']} {refusal(refused)}" if refused else "it has ended"
            raise Error(f"cannot extend GPUs {self.ids}: {why}")
        self.expires_at = min(r["expiry"] for r in done)
        return self.expires_at

    def release(self):
        """Give the GPUs back (again: nothing happens) and restore os.environ."""
        if self.released:
            return
        self.released = True
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.pool.release(token=self.token)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def api_duration(value, what):
    """'4h' or seconds (a number) -> seconds, or Error."""
    try:
        return parse_duration(value) if isinstance(value, str) else parse_duration(f"{value}s")
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None


def reserve(gpus=1, ids=None, duration=None, note=None, wait=None, user=None, pool=None,
            force=False, priority=None):  # fmt: skip
    """Reserve GPUs as `canhazgpu reserve` does, waiting in the queue unless `wait`
    bounds it (0: not at all).  Returns a Held.  Raises canhazgpu.Error."""
    config = Config.load(flags={"pool.name": (pool, "pool=")} if pool else None)
    if ids is not None:
        ids = sorted(set(int(i) for i in ids))
    req = Request(
        "manual",
        len(ids) if ids else int(gpus),
        ids=ids,
        duration=api_duration(duration, "duration") if duration else config["reserve.duration"],
        note=note,
        user=user,
        force=force,
    )
    req.duration_given = duration is not None
    req.priority = priority_setting(priority) if priority else None
    seconds = None if wait is None else (0 if not wait else api_duration(wait, "wait"))
    app = App.for_api(config)
    held_pool = app.pool()
    try:
        grant = acquire(held_pool, req, block=seconds != 0, wait=seconds or None)
    except Interrupted as e:
        if e.signum == signal.SIGINT:
            raise KeyboardInterrupt from None
        signal.raise_signal(e.signum)  # its own handler again, as if we had never caught it
        raise
    return Held(held_pool, req, grant)


class gpus:  # noqa: N801 - a function to its users: `with canhazgpu.gpus(2) as ids:`
    """with canhazgpu.gpus(2, duration="4h", note="sweep") as ids: ...

    Reserves (as reserve() does, with the same arguments), sets CUDA_VISIBLE_DEVICES
    and CUDA_DEVICE_ORDER in os.environ, gives the ids to the block, and releases them
    when the block ends: normally, by an exception or by a Ctrl-C."""

    def __init__(self, count=1, **options):
        self.count, self.options, self.held = count, options, None

    def __enter__(self):
        self.held = reserve(self.count, **self.options)
        return self.held.ids

    def __exit__(self, *exc):
        self.held.release()
        return False


# ============================================================================
# Data
# ============================================================================
#
# Templates and constants, last as in bottle.py: the dashboard's style, script and page.


# The dashboard: one self-contained page.  Its script builds every element
# from the JSON API with textContent, never from HTML strings.
WEB_CSS = r"""
:root {
  color-scheme: light;
  --bg: #f4f6f9; --panel: #ffffff; --sunken: #eef1f5; --border: #dde2e9; --text: #17202c;
  --muted: #5d6878; --accent: #2563eb; --track: #e4e8ee;
  --shadow: 0 1px 2px rgba(16, 24, 40, .05), 0 1px 3px rgba(16, 24, 40, .08);
  --ok: #15803d; --ok-bg: #dcfce7; --use: #2563eb; --use-bg: #dbeafe;
  --warn: #b45309; --warn-bg: #fef3c7; --err: #dc2626; --err-bg: #fee2e2;
}
:root[data-theme="dark"] {
  color-scheme: dark;
  --bg: #0d1117; --panel: #161b22; --sunken: #1c232c; --border: #2a313c; --text: #e6edf3;
  --muted: #8b949e; --accent: #6aa5ff; --track: #242c36; --shadow: none;
  --ok: #3fb950;
  --ok-bg: rgba(63, 185, 80, .16);
  --use: #6aa5ff;
  --use-bg: rgba(106, 165, 255, .16);
  --warn: #f0a63a;
  --warn-bg: rgba(240, 166, 58, .16);
  --err: #ff7070;
  --err-bg: rgba(255, 112, 112, .16);
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body {
  margin: 0; background: var(--bg); color: var(--text);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
    sans-serif;
}
.num { font-variant-numeric: tabular-nums; }
button, input { font: inherit; color: inherit; }
a { color: var(--accent); }
.top {
  display: flex;
  flex-wrap: wrap;
  align-items: center;
  justify-content: space-between;
  gap: 10px 16px;
  padding: 12px clamp(14px, 3vw, 28px);
  background: var(--panel);
  border-bottom: 1px solid var(--border);
}
.brand { display: flex; align-items: center; gap: 10px; min-width: 0; }
.logo { width: 30px; height: 30px; flex: none; }
.titles { display: flex; flex-direction: column; min-width: 0; }
.product { font-size: 12px; color: var(--muted); letter-spacing: .02em; }
.host { font-size: 18px; font-weight: 650; overflow-wrap: anywhere; }
.pill {
  font-size: 11px; font-weight: 600; text-transform: uppercase; letter-spacing: .05em;
  padding: 2px 8px; border-radius: 999px; background: var(--warn-bg); color: var(--warn);
}
.actions { display: flex; align-items: center; gap: 8px; flex-wrap: wrap; }
.updated { color: var(--muted); font-size: 12px; display: flex; align-items: center; gap: 6px; }
.dot { width: 8px; height: 8px; border-radius: 50%; background: var(--ok); }
.dot.stale { background: var(--err); }
.dot.busy { background: var(--warn); }
.btn {
  display: inline-flex; align-items: center; gap: 6px; cursor: pointer; border-radius: 8px;
  padding: 6px 12px; background: var(--sunken); border: 1px solid var(--border);
}
.btn:hover { border-color: var(--accent); }
.btn:focus-visible, .seg button:focus-visible, input:focus-visible {
  outline: 2px solid var(--accent);
  outline-offset: 1px;
}
main { max-width: 1320px; margin: 0 auto; padding: 18px clamp(12px, 3vw, 28px) 8px; }
section { margin-bottom: 26px; }
h2 {
  font-size: 13px;
  font-weight: 650;
  text-transform: uppercase;
  letter-spacing: .06em;
  color: var(--muted);
  margin: 0 0 10px; display: flex; align-items: center; gap: 8px;
}
.count {
  background: var(--sunken);
  border: 1px solid var(--border);
  color: var(--text);
  border-radius: 999px;
  padding: 0 8px; font-size: 12px; letter-spacing: 0; }
.banner {
  border: 1px solid var(--err); background: var(--err-bg); color: var(--text); border-radius: 10px;
  padding: 10px 14px; margin-bottom: 16px; overflow-wrap: anywhere;
}
.banner strong { color: var(--err); }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(130px, 1fr)); gap: 12px; }
.stat {
  background: var(--panel);
  border: 1px solid var(--border);
  border-radius: 12px;
  padding: 12px 14px;
  box-shadow: var(--shadow); display: flex; flex-direction: column; gap: 2px;
}
.stat .label {
  font-size: 12px;
  color: var(--muted);
  display: flex;
  align-items: center;
  gap: 6px;
}
.stat .value { font-size: 26px; font-weight: 650; line-height: 1.15; }
.swatch { width: 9px; height: 9px; border-radius: 3px; background: var(--c, var(--muted)); }
.s-available { --c: var(--ok); --c-bg: var(--ok-bg); }
.s-in_use { --c: var(--use); --c-bg: var(--use-bg); }
.s-unreserved { --c: var(--warn); --c-bg: var(--warn-bg); }
.s-error { --c: var(--err); --c-bg: var(--err-bg); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(285px, 1fr)); gap: 14px; }
.card {
  background: var(--panel);
  border: 1px solid var(--border);
  border-radius: 12px;
  padding: 14px 16px 16px;
  box-shadow: inset 0 3px 0 var(--c), var(--shadow);
  display: flex;
  flex-direction: column;
  gap: 10px;
  min-width: 0;
}
.card-head { display: flex; align-items: center; justify-content: space-between; gap: 8px; }
.gpu-id { font-size: 16px; font-weight: 650; }
.gpu-model { color: var(--muted); font-size: 12px; margin-top: -8px; overflow-wrap: anywhere; }
.badge {
  font-size: 12px; font-weight: 600; padding: 2px 10px; border-radius: 999px; white-space: nowrap;
  background: var(--c-bg);
  color: var(--c);
  border: 1px solid color-mix(in srgb, var(--c) 35%, transparent);
}
.who { display: flex; align-items: center; gap: 10px; min-width: 0; }
.avatar {
  width: 32px; height: 32px; border-radius: 50%; flex: none; display: grid; place-items: center;
  font-weight: 650; background: var(--c-bg); color: var(--c); text-transform: uppercase;
}
.who-text { display: flex; flex-direction: column; min-width: 0; }
.user { font-weight: 600; overflow-wrap: anywhere; }
.sub { color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.facts {
  display: grid;
  grid-template-columns: auto 1fr;
  gap: 4px 12px;
  margin: 0;
  font-size: 13px;
}
.facts > div { display: contents; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; min-width: 0; overflow-wrap: anywhere; }
.note {
  margin: 0; padding: 7px 10px; border-radius: 8px; background: var(--sunken); font-size: 13px;
  overflow-wrap: anywhere; white-space: pre-wrap; border-left: 3px solid var(--border);
}
.mem { margin-top: auto; }
.mem-label {
  display: flex;
  justify-content: space-between;
  gap: 8px;
  font-size: 12px;
  color: var(--muted);
  margin-bottom: 5px;
}
.bar { height: 8px; border-radius: 999px; background: var(--track); overflow: hidden; }
.fill {
  height: 100%;
  width: 0;
  border-radius: 999px;
  background: var(--c, var(--accent));
  transition: width .4s ease;
}
.panel {
  background: var(--panel);
  border: 1px solid var(--border);
  border-radius: 12px;
  box-shadow: var(--shadow);
}
.empty { color: var(--muted); padding: 16px; margin: 0; }
.queue { list-style: none; margin: 0; padding: 0; }
.q-item {
  display: grid; grid-template-columns: 40px minmax(0, 1.3fr) minmax(0, 1fr) minmax(0, 1fr) auto;
  grid-template-areas: "pos who req got wait" ". note note note note";
  gap: 4px 14px; align-items: center; padding: 10px 16px; border-top: 1px solid var(--border);
}
.q-item:first-child { border-top: 0; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; }
.tile {
  text-align: left; cursor: pointer; background: var(--panel); border: 1px solid var(--border);
  border-radius: 12px; padding: 10px 14px; box-shadow: var(--shadow); display: flex;
  flex-direction: column; gap: 3px; min-width: 0;
}
.tile:hover { border-color: var(--accent); }
.tile[aria-pressed="true"] {
  border-color: var(--accent); box-shadow: inset 0 0 0 1px var(--accent);
}
.tile-head { display: flex; align-items: center; justify-content: space-between; gap: 8px; }
.tile-name { font-weight: 650; overflow-wrap: anywhere; }
.tile-counts { display: flex; flex-wrap: wrap; gap: 4px 10px; font-size: 13px; }
.tile-count { display: inline-flex; align-items: center; gap: 5px; }
.tile-error { color: var(--err); font-size: 13px; overflow-wrap: anywhere; }
.pill.here { background: var(--use-bg); color: var(--use); }
.pool-name { text-transform: none; letter-spacing: 0; color: var(--text); }
.badges { display: flex; gap: 6px; flex-wrap: wrap; justify-content: flex-end; }
.badge.idle { background: var(--warn-bg); color: var(--warn);
  border-color: color-mix(in srgb, var(--warn) 35%, transparent); }
.q-eta { font-variant-numeric: tabular-nums; }
.q-pos { grid-area: pos; font-weight: 650; color: var(--muted); }
.q-who { grid-area: who; min-width: 0; }
.q-req { grid-area: req; }
.q-got { grid-area: got; }
.q-wait { grid-area: wait; text-align: right; white-space: nowrap; }
.q-note { grid-area: note; }
.toolbar {
  display: flex;
  flex-wrap: wrap;
  align-items: center;
  gap: 10px 14px;
  padding: 12px 16px;
  border-bottom: 1px solid var(--border);
}
.seg {
  display: inline-flex;
  border: 1px solid var(--border);
  border-radius: 8px;
  overflow: hidden;
}
.seg button {
  border: 0;
  background: transparent;
  padding: 5px 12px;
  cursor: pointer;
  border-left: 1px solid var(--border);
}
.seg button:first-child { border-left: 0; }
.seg button[aria-pressed="true"] { background: var(--accent); color: #fff; }
.days { display: inline-flex; align-items: center; gap: 6px; color: var(--muted); }
.days input {
  width: 64px;
  padding: 4px 8px;
  border-radius: 8px;
  border: 1px solid var(--border);
  background: var(--sunken);
}
.days input:invalid { border-color: var(--err); }
.totals { margin-left: auto; color: var(--muted); font-size: 13px; }
.rows { padding: 6px 16px 14px; }
.r-row {
  display: grid;
  grid-template-columns: minmax(90px, 200px) minmax(0, 1fr) 170px;
  gap: 4px 14px;
  align-items: center;
  padding: 7px 0;
}
.r-name { font-weight: 600; overflow-wrap: anywhere; }
.r-bar { height: 12px; border-radius: 6px; background: var(--track); overflow: hidden; }
.r-fill {
  height: 100%;
  background: linear-gradient(90deg, var(--accent),
    color-mix(in srgb, var(--accent) 65%, #a855f7));
  border-radius: 6px;
}
.r-val { text-align: right; white-space: nowrap; }
.r-val .sub { margin-left: 6px; }
.r-kind { grid-column: 2 / -1; margin-top: -4px; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 8px 16px 24px; }
footer a { color: inherit; }
@media (max-width: 640px) {
  .host { font-size: 16px; }
  .actions { width: 100%; justify-content: space-between; }
  .stats { grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 8px; }
  .stat { padding: 10px 12px; }
  .stat:last-child { grid-column: span 2; }
  .stat .value { font-size: 22px; }
  .grid { grid-template-columns: minmax(0, 1fr); }
  .q-item {
    grid-template-columns: 30px minmax(0, 1fr) auto;
    grid-template-areas: "pos who wait" ". req req" ". got got" ". note note";
  }
  .r-row { grid-template-columns: minmax(0, 1fr) auto; }
  .r-bar { grid-column: 1 / -1; grid-row: 2; }
  .r-kind { grid-column: 1 / -1; grid-row: 3; margin-top: 0; }
  .totals { margin-left: 0; width: 100%; }
}
@media (prefers-reduced-motion: reduce) { .fill { transition: none; } }
"""

WEB_JS = r"""
"use strict";
(function () {
  // Everything shown from the API goes in with textContent: never as HTML.
  var REFRESH_MS = 30000;
  var THEME_KEY = "canhazgpu-theme";
  var STATES = {
    AVAILABLE: { label: "Available", cls: "s-available" },
    IN_USE: { label: "In use", cls: "s-in_use" },
    UNRESERVED: { label: "Unreserved", cls: "s-unreserved" },
    ERROR: { label: "Error", cls: "s-error" }
  };
  var root = document.documentElement;
  var timer = null, lastLoad = 0, days = 30, reportSeq = 0;
  var fleet = false, localPool = "", pool = "";  // with --fleet: the pool shown below the tiles

  function stored(key) { try { return localStorage.getItem(key); } catch (e) { return null; } }
  function store(key, value) {
    try { localStorage.setItem(key, value); } catch (e) { /* private mode */ }
  }
  root.dataset.theme = stored(THEME_KEY) ||
    (matchMedia("(prefers-color-scheme: light)").matches ? "light" : "dark");

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function span(cls, text) { return el("span", cls, text); }
  function gib(mib) { return (mib / 1024).toFixed(1); }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }
  function ago(seconds) {
    var s = Math.max(0, Math.round(seconds || 0)), out = [];
    [[86400, "d"], [3600, "h"], [60, "m"], [1, "s"]].forEach(function (u) {
      if (s >= u[0] && out.length < 2) { out.push(Math.floor(s / u[0]) + u[1]); s %= u[0]; }
    });
    return out.join(" ") || "0s";
  }
  function hm(seconds) {
    var m = Math.floor(Math.max(0, seconds || 0) / 60);
    return Math.floor(m / 60) + "h " + (m % 60) + "m";
  }
  function clock(iso) {
    var d = new Date(iso), now = new Date();
    var t = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return d.toDateString() === now.toDateString() ? t
      : d.toLocaleDateString([], { weekday: "short" }) + " " + t;
  }
  // An API path for the pool shown: this host's needs no parameter.
  function api(path, extra) {
    var query = [];
    if (pool !== localPool) query.push("pool=" + encodeURIComponent(pool));
    if (extra) query.push(extra);
    return path + (query.length ? "?" + query.join("&") : "");
  }
  function userText(row) {
    if (row.actual_user && row.user && row.actual_user !== row.user) {
      return row.actual_user + " (" + row.user + ")";
    }
    return row.user || "";
  }

  async function getJSON(url) {
    var response = await fetch(url, {
      cache: "no-store", headers: { Accept: "application/json" }
    });
    var body = null;
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) {
      var message = (body && body.error) || ("HTTP " + response.status);
      throw new Error(message + (body && body.hint ? " (" + body.hint + ")" : ""));
    }
    return body;
  }

  function showErrors(errors) {
    var banner = $("banner");
    banner.replaceChildren();
    banner.hidden = errors.length === 0;
    errors.forEach(function (e, i) {
      var line = el("div");
      line.append(el("strong", null, e[0] + ": "), span(null, e[1].message));
      banner.append(line);
    });
    $("dot").className = "dot" + (errors.length ? " stale" : "");
  }

  function renderStats(rows, queue) {
    var counts = { AVAILABLE: 0, IN_USE: 0, UNRESERVED: 0, ERROR: 0 };
    rows.forEach(function (r) { if (r.status in counts) counts[r.status] += 1; });
    var tiles = Object.keys(STATES).map(function (key) {
      var tile = el("div", "stat " + STATES[key].cls);
      var label = el("div", "label");
      label.append(span("swatch"), span(null, STATES[key].label));
      var value = el("div", "value num", counts[key]);
      if (key === "AVAILABLE") value.append(span("sub", " / " + rows.length));
      tile.append(label, value);
      tile.dataset.state = key;
      return tile;
    });
    var q = el("div", "stat");
    var qlabel = el("div", "label");
    qlabel.append(span("swatch"), span(null, "Waiting"));
    q.append(qlabel, el("div", "value num", queue ? queue.total : "–"));
    tiles.push(q);
    $("stats").replaceChildren.apply($("stats"), tiles);
  }

  function fact(list, label, value) {
    if (value === undefined || value === null || value === "") return;
    var row = el("div");
    row.append(el("dt", null, label), el("dd", null, value));
    list.append(row);
  }

  // status's details ("heartbeat 0h 0m 5s ago"), as a label and a value for a card
  var DETAILS = [["heartbeat ", "Heartbeat"], ["expires ", "Expires"], ["free for ", "Free for"],
    ["never used", "Last used"]];
  function detail(row) {
    var text = (row.details || "").replace(/, idle \d+h \d+m$/, "");  // a fact of its own
    if (row.status === "UNRESERVED") return ["Usage", text];
    if (row.status === "ERROR") return ["Problem", text];
    for (var i = 0; i < DETAILS.length; i++) {
      if (text.indexOf(DETAILS[i][0]) === 0) {
        return [DETAILS[i][1], text.slice(DETAILS[i][0].length) || "never"];
      }
    }
    return ["Details", text];
  }

  function memory(row) {
    var box = el("div", "mem"), label = el("div", "mem-label"), bar = el("div", "bar");
    var fill = el("div", "fill"), used = row.memory_mb, total = row.memory_total_mb;
    label.append(span(null, "Memory"));
    bar.append(fill);
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-label", "GPU " + row.gpu_id + " memory");
    if (typeof used === "number" && typeof total === "number" && total > 0) {
      var pct = Math.min(100, (100 * used) / total);
      label.append(
        span("num", gib(used) + " / " + gib(total) + " GiB · " + Math.round(pct) + "%"));
      fill.style.width = pct.toFixed(1) + "%";
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", String(total));
      bar.setAttribute("aria-valuenow", String(used));
    } else {
      label.append(span(null, typeof used === "number" ? used + " MiB used" : "not reported"));
    }
    box.append(label, bar);
    return box;
  }

  function card(row) {
    var state = STATES[row.status] || STATES.ERROR;
    var node = el("article", "card " + state.cls);
    node.dataset.gpu = row.gpu_id;
    var head = el("div", "card-head"), badges = span("badges");
    badges.append(span("badge", state.label));
    if (row.idle) badges.append(span("badge idle", "Idle " + hm(row.idle_seconds)));
    head.append(span("gpu-id", "GPU " + row.gpu_id), badges);
    node.append(head);
    if (row.idle) node.classList.add("is-idle");
    if (row.gpu_model) node.append(el("div", "gpu-model", row.gpu_model));
    var user = userText(row);
    if (user) {
      var who = el("div", "who"), text = el("div", "who-text");
      who.append(span("avatar", user.trim().charAt(0) || "?"));
      text.append(span("user", user));
      var sub = [];
      if (row.type) sub.push(row.type === "MANUAL" ? "manual reservation" : "run");
      if (row.status === "UNRESERVED") sub.push("no reservation");
      if (row.duration) sub.push("for " + row.duration);
      if (sub.length) text.append(span("sub", sub.join(" · ")));
      who.append(text);
      node.append(who);
    }
    var facts = el("dl", "facts");
    var details = detail(row);
    fact(facts, details[0], details[1]);
    fact(facts, "Model", row.model && row.model.model);
    if (row.idle) fact(facts, "Idle", hm(row.idle_seconds) + " without use");
    fact(facts, "Validation", row.validation);
    node.append(facts);
    if (row.note) node.append(el("p", "note", row.note));
    node.append(memory(row));
    return node;
  }

  function renderStatus(rows) {
    var grid = $("gpus");
    grid.replaceChildren.apply(grid, rows.map(card));
    grid.setAttribute("aria-busy", "false");
  }

  function renderQueue(queue) {
    var box = $("queue");
    $("queue-count").textContent = String(queue.total);
    if (!queue.total) {
      box.replaceChildren(el("p", "empty", "Nobody is waiting for a GPU."));
      return;
    }
    var list = el("ol", "queue");
    queue.entries.forEach(function (e) {
      var item = el("li", "q-item");
      var who = el("div", "q-who");
      who.append(el("div", "user", userText(e) || "?"),
        el("div", "sub", (e.reservation_type === "manual" ? "manual reservation" : "run")));
      var wanted = e.requested_ids && e.requested_ids.length
        ? "GPU" + (e.requested_ids.length > 1 ? "s " : " ") + e.requested_ids.join(", ")
        : plural(e.requested_count || 1, "GPU");
      var got = e.allocated_gpus && e.allocated_gpus.length
        ? "gathered " + e.allocated_gpus.join(", ") : "nothing gathered yet";
      var wait = el("div", "q-wait num", "waiting " + ago(e.waiting_seconds));
      wait.append(el("div", "sub q-eta", e.eta ? "starts by " + clock(e.eta) : "start unknown"));
      if (e.priority && e.priority !== "normal") got += " · " + e.priority + " priority";
      item.append(span("q-pos num", "#" + e.position), who, el("div", "q-req", "wants " + wanted),
        el("div", "q-got sub", got), wait);
      if (e.note) item.append(el("p", "note q-note", e.note));
      list.append(item);
    });
    box.replaceChildren(list);
  }

  function renderReport(report) {
    var d = report.days;
    $("report-totals").textContent = report.total_gpu_hours.toFixed(1) + " GPU hours · " +
      plural(report.total_reservations, "reservation") + " · " +
      plural(report.unique_users, "user") +
      " · " + report.start_date.slice(0, 10) + " to " + report.end_date.slice(0, 10);
    var rows = $("report-rows");
    if (!report.users.length) {
      rows.replaceChildren(
        el("p", "empty", "No reservations in the last " + plural(d, "day") + "."));
      return;
    }
    var top = Math.max.apply(null, report.users.map(function (u) { return u.gpu_hours; })) || 1;
    rows.replaceChildren.apply(rows, report.users.map(function (u) {
      var row = el("div", "r-row"), bar = el("div", "r-bar"), fill = el("div", "r-fill");
      fill.style.width = Math.max(0.5, (100 * u.gpu_hours) / top).toFixed(1) + "%";
      bar.append(fill);
      var value = el("div", "r-val num", u.gpu_hours.toFixed(1) + " h");
      value.append(span("sub", u.percentage.toFixed(1) + "%"));
      var who = u.account && u.account !== u.name ? u.account + " (" + u.name + ")" : u.name;
      var kinds = plural(u.run_count, "run") + " · " + u.manual_count + " manual";
      if (u.idle_gpu_hours) kinds += " · " + u.idle_gpu_hours.toFixed(1) + " h idle";
      row.append(el("div", "r-name", who), bar, value, el("div", "r-kind sub", kinds));
      return row;
    }));
  }

  function setDays(value) {
    days = value;
    $("days").value = String(value);
    document.querySelectorAll(".seg button").forEach(function (b) {
      b.setAttribute("aria-pressed", String(Number(b.dataset.days) === value));
    });
    store("canhazgpu-days", String(value));
  }

  async function loadReport() {
    var seq = ++reportSeq;  // a slow answer for an older choice must not win
    var report = await getJSON(api("/api/report", "days=" + days));
    if (seq === reportSeq) renderReport(report);
  }

  function tile(p) {
    var node = el("button", "tile" + (p.error ? " s-error" : ""));
    node.type = "button";
    node.dataset.pool = p.pool;
    node.setAttribute("aria-pressed", String(p.pool === pool));
    var head = el("div", "tile-head");
    head.append(span("tile-name", p.pool));
    if (p.local) head.append(span("pill here", "this host"));
    node.append(head, el("div", "sub", p.host || "host unknown"));
    if (p.error) {
      node.append(el("div", "tile-error", p.error));
    } else {
      node.append(el("div", "sub", (p.models || []).join(", ") || plural(p.gpus, "GPU")));
      var counts = el("div", "tile-counts num");
      [["free", "s-available"], ["in_use", "s-in_use"], ["unreserved", "s-unreserved"]]
        .forEach(function (c) {
          var part = span("tile-count " + c[1]);
          part.append(span("swatch"), span(null, p[c[0]] + " " + c[0].replace("_", " ")));
          counts.append(part);
        });
      node.append(counts, el("div", "sub", plural(p.gpus, "GPU") + " · " +
        p.queued + " queued" + (p.idle ? " · " + p.idle + " idle" : "")));
    }
    node.addEventListener("click", function () { selectPool(p.pool); });
    return node;
  }

  function renderPools(data) {
    $("pools-count").textContent = String(data.pools.length);
    var box = $("pools");
    box.replaceChildren.apply(box, data.pools.map(tile));
  }

  function selectPool(label) {
    pool = label;
    $("pool-name").textContent = fleet ? "· " + pool : "";
    if (fleet) history.replaceState(null, "", pool === localPool ? location.pathname
      : "#pool=" + encodeURIComponent(pool));
    refresh();
  }

  async function load() {
    $("dot").className = "dot busy";
    var calls = [getJSON(api("/api/status")), getJSON(api("/api/queue")), loadReport()];
    if (fleet) calls.push(getJSON("/api/pools"));
    var results = await Promise.allSettled(calls);
    var errors = [];
    var names = ["GPU status", "Queue", "Report", "Pools"];
    results.forEach(function (r, i) {
      if (r.status === "rejected") errors.push([names[i], r.reason]);
    });
    if (fleet && results[3].status === "fulfilled") renderPools(results[3].value);
    if (results[0].status === "fulfilled") renderStatus(results[0].value);
    if (results[1].status === "fulfilled") renderQueue(results[1].value);
    if (results[0].status === "fulfilled") {
      renderStats(results[0].value, results[1].status === "fulfilled" ? results[1].value : null);
    }
    showErrors(errors);
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  }

  function schedule() {
    clearTimeout(timer);
    if (document.hidden) return;  // paused while nobody looks; caught up on return
    timer = setTimeout(refresh, Math.max(0, REFRESH_MS - (Date.now() - lastLoad)));
  }

  async function refresh() {
    clearTimeout(timer);
    lastLoad = Date.now();
    try { await load(); } finally { schedule(); }
  }

  function start() {
    var host = document.querySelector('meta[name="canhazgpu-host"]').content;
    $("host").textContent = host;
    document.title = host + " · canhazgpu";
    $("demo").hidden = document.querySelector('meta[name="canhazgpu-demo"]').content !== "1";
    fleet = document.querySelector('meta[name="canhazgpu-fleet"]').content === "1";
    localPool = pool = document.querySelector('meta[name="canhazgpu-pool"]').content;
    $("pools-section").hidden = !fleet;
    var asked = /^#pool=(.+)$/.exec(location.hash);
    if (fleet && asked) pool = decodeURIComponent(asked[1]);
    $("pool-name").textContent = fleet ? "· " + pool : "";
    var saved = Number(stored("canhazgpu-days"));
    setDays(saved >= 1 && saved <= 90 && Math.floor(saved) === saved ? saved : 30);
    $("refresh").addEventListener("click", refresh);
    $("theme").addEventListener("click", function () {
      root.dataset.theme = root.dataset.theme === "dark" ? "light" : "dark";
      store(THEME_KEY, root.dataset.theme);
    });
    document.querySelectorAll(".seg button").forEach(function (b) {
      b.addEventListener("click", function () { setDays(Number(b.dataset.days)); reload(); });
    });
    $("days").addEventListener("change", function () {
      var value = Number($("days").value);
      if ($("days").checkValidity() && value >= 1 && value <= 90) { setDays(value); reload(); }
    });
    document.addEventListener("visibilitychange", schedule);
    refresh();
  }

  function reload() {
    loadReport().then(
      function () { showErrors([]); },
      function (e) { showErrors([["Report", e]]); });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
"""

WEB_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="dark light">
<meta name="canhazgpu-host" content="{{HOST}}">
<meta name="canhazgpu-demo" content="{{DEMO}}">
<meta name="canhazgpu-fleet" content="{{FLEET}}">
<meta name="canhazgpu-pool" content="{{POOL}}">
<title>{{HOST}} · canhazgpu</title>
<link rel="icon" href="{{ICON}}">
<style>{{CSS}}</style>
<script>{{JS}}</script>
</head>
<body>
<header class="top">
  <div class="brand">
    {{LOGO}}
    <div class="titles">
      <span class="product">canhazgpu</span><span class="host" id="host"></span>
    </div>
    <span class="pill" id="demo" hidden>demo data</span>
  </div>
  <div class="actions">
    <span class="updated">
      <span class="dot" id="dot"></span><span id="updated">Loading…</span>
    </span>
    <span>
      <button class="btn" id="refresh" type="button"
        title="Refresh now (automatic every 30 s)">&#x21bb; Refresh</button>
      <button class="btn" id="theme" type="button"
        title="Switch between dark and light" aria-label="Switch theme">&#x25d0;</button>
    </span>
  </div>
</header>
<main>
  <div class="banner" id="banner" role="alert" hidden></div>
  <section id="pools-section" hidden>
    <h2>Pools <span class="count num" id="pools-count">–</span></h2>
    <div class="tiles" id="pools"></div>
  </section>
  <section aria-label="Summary"><div class="stats" id="stats"></div></section>
  <section>
    <h2>GPUs <span class="pool-name" id="pool-name"></span></h2>
    <div class="grid" id="gpus" aria-busy="true"></div>
  </section>
  <section>
    <h2>Queue <span class="count num" id="queue-count">–</span></h2>
    <div class="panel" id="queue"><p class="empty">Loading…</p></div>
  </section>
  <section>
    <h2>Reservation report</h2>
    <div class="panel">
      <div class="toolbar">
        <div class="seg" role="group" aria-label="Report period">
          <button type="button" data-days="1">1 day</button>
          <button type="button" data-days="7">7 days</button>
          <button type="button" data-days="30">30 days</button>
          <button type="button" data-days="90">90 days</button>
        </div>
        <label class="days">Days
          <input id="days" type="number" min="1" max="90" step="1" value="30" inputmode="numeric">
        </label>
        <span class="totals" id="report-totals"></span>
      </div>
      <div class="rows" id="report-rows"><p class="empty">Loading…</p></div>
    </div>
  </section>
</main>
<footer>
  canhazgpu {{VERSION}} · refreshes every 30 s while visible ·
  <a href="/api/status">/api/status</a> · <a href="/api/queue">/api/queue</a> ·
  <a href="/api/report">/api/report</a> · <a href="/api/pools">/api/pools</a> ·
  <a href="/metrics">/metrics</a>
</footer>
</body>
</html>
"""


WEB_LOGO = (
    '<svg class="logo" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32" aria-hidden="true">'
    '<rect width="32" height="32" rx="7" fill="#2563eb"/>'
    '<rect x="7" y="9" width="18" height="14" rx="2" fill="none" stroke="#fff" stroke-width="2.5"/>'
    '<path d="M11 13h4v6h-4z" fill="#fff"/>'
    '<path d="M10 5v4M16 5v4M22 5v4M10 23v4M16 23v4M22 23v4" stroke="#fff" stroke-width="2"/>'
    "</svg>"
)


if __name__ == "__main__":
    sys.exit(main())
