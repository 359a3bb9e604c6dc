"""Allocation under contention: N allocators start at the same instant on a pool of G
GPUs (24 on 8 by default), each asking for one GPU without waiting (--nonblock), over
several rounds.  Each allocator is its own process with its own Redis connection; the
time measured is its allocation call (the pool check, the provider query, the Lua
script), not Python's start-up.

Checked every round: exactly min(N, G) allocators got a GPU, no GPU went to two, and
every other one failed with "not enough GPUs" (no lock time-out, no "try again").

Baseline, labelled as what it is: a SIMULATION of the Go implementation's lock strategy,
not the Go binary: the same allocation call wrapped in SET canhazgpu:allocation_lock NX
EX 10, retried up to 5 times after sleeping 2^attempt s + up to 1 s of jitter (the Go
client's AcquireAllocationLock), run under the same contention.

    python3 bench/allocation.py [--allocators 24] [--gpus 8] [--rounds 10] [--go-rounds 3]
"""

import argparse
import multiprocessing
import random
import statistics
import sys
import time

from benchredis import canhazgpu, connect, figure, init_pool, percentile, private_redis

LOCK = canhazgpu.KEY + "allocation_lock"


def go_style_lock(store, allocate):
    """The Go client's AcquireAllocationLock around `allocate` (simulated)."""
    for attempt in range(5):
        if store.redis.set(LOCK, "locked", nx=True, ex=10):
            try:
                return allocate()
            finally:
                store.redis.delete(LOCK)
        time.sleep(2**attempt + random.random())
    raise canhazgpu.CanhazError("failed to acquire allocation lock after 5 attempts")


def allocator(strategy, barrier, results):
    store, pool = connect()
    store.do("ping")  # connected before the start line
    req = canhazgpu.Request("manual", 1, duration=3600)

    def allocate():
        return canhazgpu.acquire(pool, req, block=False)

    barrier.wait()
    started = time.perf_counter()
    try:
        ids = (go_style_lock(store, allocate) if strategy == "go-sim" else allocate())["gpus"]
        results.put(("ok", ids, time.perf_counter() - started))
    except canhazgpu.CanhazError as e:
        results.put(("error", str(e), time.perf_counter() - started))


def one_round(strategy, allocators, gpus):
    store, _ = connect()
    init_pool(store, gpus)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(allocators), ctx.Queue()
    args = (strategy, barrier, results)
    procs = [ctx.Process(target=allocator, args=args) for _ in range(allocators)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    granted = [ids for kind, ids, _ in outcomes if kind == "ok"]
    flat = [i for ids in granted for i in ids]
    problems = []
    if len(granted) != min(allocators, gpus):
        problems.append(f"{len(granted)} allocators got a GPU, expected {min(allocators, gpus)}")
    if len(flat) != len(set(flat)):
        problems.append(f"a GPU was given twice: {sorted(flat)}")
    others = [msg for kind, msg, _ in outcomes if kind == "error" and "not enough GPUs" not in msg]
    return [dt * 1000 for _, _, dt in outcomes], len(granted), others, problems


def run(strategy, rounds, allocators, gpus):
    times, granted, others, problems = [], 0, [], []
    for _ in range(rounds):
        t, g, o, p = one_round(strategy, allocators, gpus)
        times += t
        granted += g
        others += o
        problems += p
    return times, granted, others, problems


def report(label, times, granted, others, problems):
    print(f"  {label}")
    print(
        f"    per allocation: median {statistics.median(times):8.1f} ms  "
        f"p95 {percentile(times, 95):8.1f} ms  max {max(times):8.1f} ms"
    )
    print(
        f"    granted {granted}, 'not enough GPUs' {len(times) - granted - len(others)}, "
        f"other failures {len(others)}{': ' + others[0] if others else ''}"
    )
    for p in problems:
        print(f"    PROBLEM: {p}")


def measure(allocators=24, gpus=8, rounds=5, go_rounds=1):
    """For bench/run.py: the median allocation under contention, against one alone and
    against the simulated lock strategy."""
    with private_redis():
        run("ours", 1, allocators, gpus)  # warm-up
        alone = run("ours", 10, 1, gpus)
        ours = run("ours", rounds, allocators, gpus)
        go = run("go-sim", go_rounds, allocators, gpus)
    m_alone, m_ours, m_go = (statistics.median(x[0]) / 1000 for x in (alone, ours, go))
    clean = not (ours[2] or ours[3])
    return [
        figure(f"allocation, {allocators} at once on {gpus} GPUs", m_ours, "s", "one alone",
               m_alone, "no retries, no double grant", clean),
        figure("  simulated Go lock and back-off", m_go, "s", "ours", m_ours),
    ]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocators", type=int, default=24)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--go-rounds", type=int, default=3, help="rounds of the slow baseline")
    args = parser.parse_args()
    with private_redis():
        run("ours", 1, args.allocators, args.gpus)  # warm-up
        alone = run("ours", 20, 1, args.gpus)
        ours = run("ours", args.rounds, args.allocators, args.gpus)
        go = run("go-sim", args.go_rounds, args.allocators, args.gpus)

    n, g = args.allocators, args.gpus
    print(f"allocation under contention: {n} allocators on {g} GPUs at once, 1 GPU each")
    report("one allocator alone (20 rounds), for reference", *alone)
    report(f"ours, one Lua script, no lock ({args.rounds} rounds)", *ours)
    go_label = "SIMULATED Go lock strategy: SET NX EX 10 + 2^n s back-off"
    report(f"{go_label} ({args.go_rounds} rounds)", *go)
    m_alone, m_ours, m_go = (statistics.median(x[0]) for x in (alone, ours, go))
    print(
        f"  ratios of medians: ours contended / alone {m_ours / m_alone:.1f}x; "
        f"simulated Go lock / ours {m_go / m_ours:.0f}x"
    )
    failed = ours[2] or ours[3] or alone[2] or alone[3]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
