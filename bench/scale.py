"""Scale: what a busy pool's history, a shared Redis and a fleet cost each command.

report   200,000 usage records over 90 days in one pool: `report --days 90` against
         `--days 1` (target <= 1.5x) and against `status` (target <= +0.2 s); the
         first report, which builds the per-day roll-ups once, is shown on its own.
keys     the same `report --days 1` with 300,000 unrelated keys in the database
         (target <= 1.1x of without).
gpus     `status` of a 1,024-GPU pool against an 8-GPU one (target <= 1.3x).
fleet    256 pools x 8 GPUs, half held, 1,000 records each: `status --all --summary`
         against `status` of one pool (<= 3x), the server time of /api/pools (median
         <= 50 ms), `report --all --days 30` against one pool's (<= 2x), and Redis
         memory per pool.

  python3 bench/scale.py [--rounds 7]
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from benchredis import PROGRAM, canhazgpu, figure, print_table, private_redis

DAY = 86400


def timed(*args, env=None):
    """Wall seconds of one `canhazgpu ARGS` run (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(PROGRAM), *map(str, args)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    return time.perf_counter() - start


def median_of(rounds, *args):
    return statistics.median(timed(*args) for _ in range(rounds))


def seed_pool(r, name, gpus, records, days=90, held=None, now=None):
    """A pool of `gpus` fake GPUs, half of them (or `held`) held, with `records` usage
    records ending over the last `days` days, written as canhazgpu writes them."""
    now = time.time() if now is None else now
    prefix = canhazgpu.pool_prefix(name)
    rng = random.Random(name)
    pipe = r.pipeline(transaction=False)
    pipe.mset({prefix + "gpu_count": gpus, prefix + "provider": "fake"})
    users = [f"user{k:02d}" for k in range(20)]
    for i in range(gpus // 2 if held is None else held):
        start = now - rng.uniform(60, 6 * 3600)
        state = {
            "user": rng.choice(users),
            "type": "manual",
            "start_time": start,
            "expiry_time": now + 3600,
            "reservation_id": f"r{i}",
            "last_heartbeat": start,
        }
        state["actual_user"] = state["user"]
        pipe.set(f"{prefix}gpu:{i}", json.dumps(state))
    for k in range(records):
        end = now - rng.uniform(120, days * DAY)
        length = rng.choice((600, 1800, 3600, 4 * 3600, 12 * 3600))
        user = rng.choice(users)
        rec = {
            "user": user,
            "actual_user": user,
            "gpu_id": rng.randrange(gpus),
            "start_time": end - length,
            "end_time": end,
            "duration_seconds": length,
            "reservation_type": rng.choice(("run", "manual")),
            "end_reason": "exit",
        }
        pipe.zadd(prefix + "usage_history_sorted", {json.dumps(rec): int(end)})
        if k % 5000 == 4999:
            pipe.execute()
    info = {"host": f"host-{name}", "gpu_count": gpus, "provider": "fake", "models": ["Fake GPU"]}
    pipe.hset(canhazgpu.REGISTRY, name, json.dumps(info))
    pipe.execute()


def report_figures(r, rounds):
    seed_pool(r, "hist", 8, 200_000)
    first = timed("--pool", "hist", "report", "--days", "90")
    status = median_of(rounds, "--pool", "hist", "status")
    days1 = median_of(rounds, "--pool", "hist", "report", "--days", "1")
    days90 = median_of(rounds, "--pool", "hist", "report", "--days", "90")
    out = [
        figure("report 200k records, first (builds roll-ups)", first, "s", note="once"),
        figure(
            "report --days 90, 200k records",
            days90,
            "s",
            "report --days 1",
            days1,
            "<= 1.5x",
            days90 / days1 <= 1.5,
        ),
        figure(
            "report --days 90 over status",
            days90 - status,
            "s+",
            "status",
            status,
            "<= +0.2 s",
            days90 - status <= 0.2,
        ),
    ]
    pipe = r.pipeline(transaction=False)
    for k in range(300_000):
        pipe.set(f"someone-else:{k}", "x")
        if k % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    crowded = median_of(rounds, "--pool", "hist", "report", "--days", "1")
    out.append(
        figure(
            "report --days 1, 300k unrelated keys",
            crowded,
            "s",
            "without them",
            days1,
            "<= 1.1x",
            crowded / days1 <= 1.1,
        )
    )
    return out


def gpu_figures(r, rounds):
    seed_pool(r, "small", 8, 100)
    seed_pool(r, "big", 1024, 100)
    small = median_of(rounds, "--pool", "small", "status", "--no-color")
    big = median_of(rounds, "--pool", "big", "status", "--no-color")
    return [figure("status, 1,024 GPUs", big, "s", "8 GPUs", small, "<= 1.3x", big / small <= 1.3)]


def fleet_figures(r, rounds, pools=256):
    before = r.info("memory")["used_memory"]
    for k in range(pools):
        seed_pool(r, f"node{k:03d}", 8, 1000)
    per_pool = (r.info("memory")["used_memory"] - before) / pools
    one = median_of(rounds, "--pool", "node000", "status", "--no-color")
    every = median_of(rounds, "status", "--all", "--summary")
    timed("report", "--all", "--days", "30")  # the first report folds every pool's records
    report_one = median_of(rounds, "--pool", "node000", "report", "--days", "30")
    report_all = median_of(rounds, "report", "--all", "--days", "30")
    server = api_pools_server_time(rounds * 3)
    return [
        figure(
            f"status --all --summary, {pools} pools",
            every,
            "s",
            "status of one pool",
            one,
            "<= 3x",
            every / one <= 3,
        ),
        figure("/api/pools server time", server, "s", target="<= 50 ms", met=server <= 0.05),
        figure(
            f"report --all --days 30, {pools} pools",
            report_all,
            "s",
            "one pool's",
            report_one,
            "<= 2x",
            report_all / report_one <= 2,
        ),
        figure("Redis memory per pool", per_pool / 1024, "KiB", note="8 GPUs, 1,000 records"),
    ]


def api_pools_server_time(rounds):
    """The median time `web --fleet` takes to answer /api/pools, in-process (no HTTP)."""
    config = canhazgpu.Config.load(None)
    store = canhazgpu.Store(config)
    pool = canhazgpu.Pool(store, config, name="node000")
    site = canhazgpu.Site(
        store, config, canhazgpu.UsageCache(canhazgpu.provider_usage), pool, fleet=True
    )
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        code, _, body = site.get("/api/pools", {})
        times.append(time.perf_counter() - start)
        assert code == 200 and len(json.loads(body)["pools"]) > 1
    return statistics.median(times)


def measure(rounds=7):
    figures = []
    with private_redis():
        r = canhazgpu.Store(canhazgpu.Config.load(None)).redis
        figures += report_figures(r, rounds)
        figures += gpu_figures(r, rounds)
    with private_redis():
        r = canhazgpu.Store(canhazgpu.Config.load(None)).redis
        figures += fleet_figures(r, rounds)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    print_table(measure(parser.parse_args().rounds))


if __name__ == "__main__":
    os.environ.pop("CANHAZGPU_POOL", None)
    main()
