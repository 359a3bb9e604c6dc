"""`make bench`: every benchmark of bench/ in one run, printed as one table (each figure a
median, with its ratio to a baseline measured in the same run, and its target) and
written as JSON to bench/results.json.  About four minutes on 2 CPUs.

    python3 bench/run.py [--out bench/results.json] [--only startup,handoff,...]
"""

import argparse
import json
import os
import sys
import time

import allocation
import handoff
import scale
import startup
import web
from benchredis import REPO, machine, print_table

SUITES = {
    "startup": startup.measure,
    "handoff": handoff.measure,
    "scale": scale.measure,
    "web": web.measure,
    "allocation": allocation.measure,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    parser.add_argument("--only", help="comma-separated: " + ", ".join(SUITES))
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(SUITES)
    os.environ.pop("CANHAZGPU_POOL", None)
    started = time.monotonic()
    figures = []
    for name in chosen:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        figures += [dict(f, suite=name) for f in SUITES[name]()]
    where = machine()
    took = time.monotonic() - started
    print(f"\ncanhazgpu benchmarks: {where['cpus']} CPUs, {where['system']}, Python "
          f"{where['python']}, redis-py {where['redis_py']}, redis-server "
          f"{where['redis_server']}; medians; {took:.0f} s\n")  # fmt: skip
    print_table(figures)
    with open(args.out, "w") as f:
        json.dump({"machine": where, "date": time.strftime("%Y-%m-%d"), "seconds": round(took),
                   "figures": figures}, f, indent=2)  # fmt: skip
    missed = [f["name"] for f in figures if f["met"] is False]
    print(f"\n{len(figures)} figures, {len(missed)} target(s) not met" + (": " if missed else "")
          + "; ".join(missed))  # fmt: skip
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
