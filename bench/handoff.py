"""Queue hand-off latency: how soon a waiting `canhazgpu reserve` gets the GPU it waits
for once the holder releases it.

Each round: this process reserves GPU 0 of a 1-GPU fake pool; a real `canhazgpu reserve
--gpu-ids 0 --short` subprocess starts, queues and settles into its wait; then this
process releases GPU 0 (the same Lua release script `canhazgpu release` runs) and
measures two moments, both from just before that release:

  wake     the waiter's allocation script ran: the reservation's start_time in Redis,
           which the waiter stamps with its own clock right before the script, so the
           bench never polls Redis (polling would steal CPU from the waiter);
  printed  the waiter wrote its GPU ids on stdout: what a user or a script sees, and
           the number the target applies to (p50 <= 50 ms).

Baseline: the Go implementation's waiter polls every 2 s, so a release at a random moment
is picked up after 1 s at the median (half the poll interval); that figure is computed,
not measured here.

    python3 bench/handoff.py [--rounds 30]
"""

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time

from benchredis import canhazgpu, cli, connect, init_pool, percentile, private_redis

GO_POLL_INTERVAL = 2.0


def one_handoff(store, pool):
    holder = canhazgpu.Request("manual", 1, ids=[0], duration=3600)
    canhazgpu.acquire(pool, holder, block=False)
    waiter = subprocess.Popen(
        cli("reserve", "--gpu-ids", 0, "--short"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not store.redis.zcard(canhazgpu.KEY + "queue"):
            if waiter.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the waiter did not queue (exit {waiter.poll()})")
            time.sleep(0.01)
        time.sleep(0.3)  # let it reach its wait, as a waiter that has waited a while has

        released_at = time.time()
        pool.release(ids=[0])
        ready, _, _ = select.select([waiter.stdout], [], [], 30)
        line = waiter.stdout.readline() if ready else b""
        printed_at = time.time()
        if line.strip() != b"0":
            sys.exit(f"the waiter printed {line!r}, expected its GPU id")
        waiter.wait(30)
        state = json.loads(store.redis.get(canhazgpu.KEY + "gpu:0"))
        woke = float(state["start_time"]) - released_at
        pool.release(ids=[0])
        return woke, printed_at - released_at
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="hand-offs to measure (>= 20)")
    args = parser.parse_args()
    with private_redis():
        store, pool = connect()
        init_pool(store, 1)
        one_handoff(store, pool)  # warm-up: page cache, bytecode
        woke, printed = [], []
        for _ in range(args.rounds):
            w, p = one_handoff(store, pool)
            woke.append(w * 1000)
            printed.append(p * 1000)

    go_median = GO_POLL_INTERVAL / 2 * 1000
    p50 = statistics.median(printed)
    print(f"queue hand-off: release -> waiter, {args.rounds} hand-offs, {os.cpu_count()} CPUs")
    print(
        f"  wake (waiter's script ran):  p50 {statistics.median(woke):7.1f} ms"
        f"  p95 {percentile(woke, 95):7.1f} ms  max {max(woke):7.1f} ms"
    )
    print(
        f"  printed (waiter's stdout):   p50 {p50:7.1f} ms"
        f"  p95 {percentile(printed, 95):7.1f} ms  max {max(printed):7.1f} ms"
    )
    print(f"  target p50 <= 50 ms: {'met' if p50 <= 50 else 'NOT met'}")
    print(
        f"  Go baseline (2 s poll, computed median {go_median:.0f} ms): "
        f"{go_median / p50:.0f}x slower than ours"
    )
    return 0 if p50 <= 50 else 1


if __name__ == "__main__":
    sys.exit(main())
