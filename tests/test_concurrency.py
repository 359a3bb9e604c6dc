"""Many allocators at once: the Lua allocation never hands one GPU out twice, and the
losers fail at once with a clear line (no lock, no retries)."""

import subprocess
import time

from poolstate import KEY, holders, init_pool

RACERS = 24
GPUS = 8


def test_24_reservers_race_for_8_gpus(cli, r, fake_smi):
    # The fake provider and no nvidia-smi on PATH: the race is about Redis, not the tool.
    fake_smi.uninstall()
    init_pool(r, GPUS, provider="fake")
    # A Go client's global lock, held meanwhile: we neither wait for it nor break it.
    r.set(KEY + "allocation_lock", "go-client-1234", ex=60)
    procs = [
        cli.popen(
            "reserve", "--nonblock", "--short", "--note", f"racer {k}",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k in range(RACERS)
    ]  # fmt: skip
    results = []
    deadline = time.monotonic() + 120
    for k, proc in enumerate(procs):
        out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        results.append((k, proc.returncode, out, err))
    for _, _, _, err in results:
        assert "Traceback" not in err, err

    winners = [(k, out) for k, code, out, _ in results if code == 0]
    losers = [(k, code, err) for k, code, _, err in results if code != 0]
    assert len(winners) == GPUS
    assert len(losers) == RACERS - GPUS
    for _, code, err in losers:
        assert code == 1
        assert err.startswith("Error: not enough GPUs available: requested 1, available 0"), err

    # Every GPU went to exactly one winner, and Redis agrees with what each was told.
    granted = {int(out.strip()): k for k, out in winners}
    assert sorted(granted) == list(range(GPUS))
    held = holders(r, GPUS)
    assert sorted(held) == list(range(GPUS))
    for gpu, k in granted.items():
        assert held[gpu]["note"] == f"racer {k}"
    assert len({st["reservation_id"] for st in held.values()}) == GPUS
    assert r.zcard(KEY + "queue") == 0
    assert r.get(KEY + "allocation_lock") == "go-client-1234" and r.ttl(KEY + "allocation_lock") > 0
