"""Start-up cost: what `canhazgpu status` and `canhazgpu run -- true` add over the
unavoidable floor, a Python that imports redis-py and makes one Redis round trip.

All commands are timed interleaved, round after round, against one private
redis-server and a fake pool of 8 GPUs, so machine noise hits each alike.  Prints
medians and the ratio of each command to the floor.

    python3 bench/startup.py [--rounds 25]
"""

import argparse
import statistics
import subprocess
import sys
import time

from benchredis import PROGRAM, private_redis

FLOOR = (
    "import os, redis; "
    "redis.Redis.from_url(os.environ['CANHAZGPU_REDIS_URL']).get('canhazgpu:gpu_count')"
)
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "floor: import redis + 1 GET": [sys.executable, "-c", FLOOR],
    "canhazgpu --version": [sys.executable, str(PROGRAM), "--version"],
    "canhazgpu status": [sys.executable, str(PROGRAM), "status", "--no-color"],
    "canhazgpu reserve+release": None,  # two commands, timed together
    "canhazgpu run -- true": [sys.executable, str(PROGRAM), "run", "--nonblock", "--", "true"],
}


def timed(argv):
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def reserve_release():
    reserve = [sys.executable, str(PROGRAM), "reserve", "--nonblock", "--short"]
    return timed(reserve) + timed([sys.executable, str(PROGRAM), "release"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    rounds = parser.parse_args().rounds
    with private_redis():
        admin = [sys.executable, str(PROGRAM), "admin", "--gpus", "8", "--provider", "fake"]
        subprocess.run(admin, check=True, stdout=subprocess.DEVNULL)
        times = {name: [] for name in COMMANDS}
        for _ in range(rounds):
            for name, argv in COMMANDS.items():
                times[name].append(reserve_release() if argv is None else timed(argv))
    floor = statistics.median(times["floor: import redis + 1 GET"])
    print(f"{rounds} rounds, medians (ms); ratio = command / floor")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"  {name:<30} {median * 1000:7.1f} ms   x{median / floor:4.2f}")


if __name__ == "__main__":
    main()
