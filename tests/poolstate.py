"""Helpers for end-to-end tests: write and read the pool's Redis state directly (the
keys of SPEC.md section 4) and parse `status`'s table."""

import json
import os
import pwd
import re
import time
import uuid

KEY = "canhazgpu:"


def me():
    """The real OS account the CLI runs as (what `actual_user` holds)."""
    return pwd.getpwuid(os.getuid()).pw_name


def prefix(pool=None):
    """The key prefix of a pool: the Go layout for the unnamed one, a hash tag for a named one."""
    return f"{KEY}{{{pool}}}:" if pool else KEY


def init_pool(r, gpus=8, provider="nvidia", pool=None):
    """An initialised pool without running `admin` (faster; admin has its own tests)."""
    r.mset({prefix(pool) + "gpu_count": gpus, prefix(pool) + "provider": provider})


def hold(r, gpu, user="bob", kind="run", actual=None, age=3600, pool=None, **fields):
    """Write a reservation of GPU `gpu` the way canhazgpu does (Unix-seconds numbers)."""
    now = time.time()
    st = {
        "user": user,
        "actual_user": actual or user,
        "type": kind,
        "start_time": now - age,
        "last_heartbeat": now - 5,
        "reservation_id": uuid.uuid4().hex,
    }
    if kind == "manual":
        st["expiry_time"] = now + 3 * 3600
    st.update(fields)
    r.set(f"{prefix(pool)}gpu:{gpu}", json.dumps({k: v for k, v in st.items() if v is not None}))
    return st


def gpu(r, i, pool=None):
    """GPU `i`'s state, {} when it has none."""
    return gpu_state(r, i, pool) or {}


def gpu_state(r, gpu, pool=None):
    raw = r.get(f"{prefix(pool)}gpu:{gpu}")
    return None if raw is None else json.loads(raw)


def holders(r, gpus=8, pool=None):
    """{gpu: state} of the GPUs that are held."""
    out = {}
    for i in range(gpus):
        st = gpu_state(r, i, pool)
        if st and st.get("user"):
            out[i] = st
    return out


def history(r, pool=None):
    """The usage records, oldest first."""
    return [json.loads(m) for m in r.zrange(prefix(pool) + "usage_history_sorted", 0, -1)]


def add_record(r, user, gpu, start, end, kind="run", pool=None, **fields):
    rec = {
        "user": user,
        "gpu_id": gpu,
        "start_time": start,
        "end_time": end,
        "duration_seconds": end - start,
        "reservation_type": kind,
        **fields,
    }
    r.zadd(prefix(pool) + "usage_history_sorted", {json.dumps(rec): end})


# What any command that looks at the pool may write: the provider answer it publishes,
# the fleet registry and its refresh mark, the report roll-ups and their marks.
BOOKKEEPING = re.compile(
    r"canhazgpu:(\{[^}]*\}:)?(usage|registered|pools|usage_folded|legacy_migrated|usage_day:.*)$"
)


def dump(r):
    """Every key and value but the bookkeeping, to check that a command changed nothing
    that anyone holds or waits for."""
    out = {}
    for key in sorted(k for k in r.keys("*") if not BOOKKEEPING.match(k)):
        kind = r.type(key)
        if kind == "string":
            out[key] = r.get(key)
        elif kind == "zset":
            out[key] = r.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = kind
    return out


def parse_table(text):
    """`status` output -> (column names, [ {column: cell} ]); cells are cut at the
    header's column starts (cells such as DETAILS hold spaces)."""
    lines = text.rstrip("\n").splitlines()
    spans = [(m.group(), m.start()) for m in re.finditer(r"\S+", lines[0])]
    names = [name for name, _ in spans]
    rows = []
    for line in lines[1:]:
        row = {}
        for k, (name, start) in enumerate(spans):
            end = spans[k + 1][1] if k + 1 < len(spans) else None
            row[name] = line[start:end].strip()
        rows.append(row)
    return names, rows


def wait_for(condition, timeout=20.0, what="condition"):
    """Poll `condition` until it returns something truthy (returned); fail naming `what`."""
    import pytest

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(0.02)
