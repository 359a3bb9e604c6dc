"""The nvidia provider through NVML (nvidia-ml-py's pynvml), against a stand-in module
(tests/nvml/pynvml.py) that answers with values recorded on a real host: the same rows
as the nvidia-smi path, no nvidia-smi run, and the same failure handling."""

import json
import os

import pytest
from conftest import REPO
from poolstate import hold, init_pool

NVML_DIR = REPO / "tests" / "nvml"
MIB = 2**20


@pytest.fixture
def nvml(cli, tmp_path):
    """Puts the pynvml stand-in on the CLI's path; nvml.set(...) writes its state."""

    class Nvml:
        state = tmp_path / "nvml.json"
        log = tmp_path / "nvml.log"

        def set(self, **state):
            self.state.write_text(json.dumps(state))

        def calls(self):
            return self.log.read_text().split() if self.log.exists() else []

    cli.env["PYTHONPATH"] = os.pathsep.join([str(NVML_DIR), cli.env.get("PYTHONPATH", "")])
    cli.env["FAKE_NVML_STATE"] = str(Nvml.state)
    cli.env["FAKE_NVML_LOG"] = str(Nvml.log)
    return Nvml()


def rows(cli):
    return json.loads(cli("status", "--json", check=True).stdout)


def busy_pool(r, nvml, fake_smi):
    """GPU 1 held and busy; GPU 2 busy without a reservation: told alike to both."""
    init_pool(r, 4)
    hold(r, 1, user="alice")
    nvml.set(
        gpus=[{}, {"used": 30210 * MIB}, {"used": 5000 * MIB}, {}],
        processes=[
            {"pid": 999999, "gpu": 1, "used": 30200 * MIB, "name": "/usr/bin/torchrun"},
            {"pid": 999998, "gpu": 2, "used": 4990 * MIB, "name": "python3"},
        ],
    )
    fake_smi.set(
        gpus=[{"memory_used": "540"}, {"memory_used": "30210"}, {"memory_used": "5000"},
              {"memory_used": "540"}],
        processes=[
            {"pid": 999999, "name": "/usr/bin/torchrun", "gpu": 1, "used_memory": "30200"},
            {"pid": 999998, "name": "python3", "gpu": 2, "used_memory": "4990"},
        ],
    )  # fmt: skip


def test_nvml_answers_as_nvidia_smi_does_without_running_it(cli, r, nvml, fake_smi):
    busy_pool(r, nvml, fake_smi)
    fake_smi.clear_calls()
    got = rows(cli)
    assert fake_smi.calls() == []  # in-process: no nvidia-smi at all
    assert "nvmlInit" in nvml.calls() and "nvmlDeviceGetMemoryInfo" in nvml.calls()
    assert [row["status"] for row in got] == ["AVAILABLE", "IN_USE", "UNRESERVED", "AVAILABLE"]
    assert got[1]["validation"] == "30210MB, 1 process"
    assert got[1]["process_info"][0]["name"] == "torchrun"
    assert got[2]["details"] == "5000MB used by PID 999998 (python3)"
    assert got[0]["memory_total_mb"] == 81559 and got[0]["gpu_model"] == "NVIDIA H100 80GB HBM3"
    # The same pool read through nvidia-smi gives the same rows, UUIDs aside.
    del cli.env["PYTHONPATH"]
    smi = rows(cli)
    assert fake_smi.calls()
    drop = {"duration", "duration_seconds", "details", "idle_seconds", "last_active", "idle"}
    assert [{k: v for k, v in x.items() if k not in drop} for x in got] == [
        {k: v for k, v in x.items() if k not in drop} for x in smi
    ]


def test_without_a_driver_nvml_gives_way_to_nvidia_smi(cli, r, nvml, fake_smi):
    init_pool(r, 2)
    nvml.set(init="driver")
    fake_smi.set(gpus=2)
    fake_smi.clear_calls()
    assert [row["validation"] for row in rows(cli)] == ["0MB used", "0MB used"]
    assert fake_smi.calls()  # nvidia-smi answered


def test_an_nvml_failure_is_validation_unavailable_with_one_warning(cli, r, nvml, fake_smi):
    init_pool(r, 2)
    nvml.set(fail="GetMemoryInfo")
    p = cli("status", "--json", check=True)
    assert {row["validation"] for row in json.loads(p.stdout)} == {"unavailable"}
    assert p.stderr == "Warning: cannot validate GPU usage: NVML failed: Unknown Error\n"
    p = cli("reserve", "--short", check=True)  # allocation goes on with reservations alone
    assert p.stdout == "0\n" and "allocating on reservations alone" in p.stderr


def test_what_nvml_cannot_tell_is_unknown_not_a_failure(cli, r, nvml, fake_smi):
    init_pool(r, 2)
    hold(r, 0, user="alice")
    nvml.set(
        gpus=[{"memory": "not-supported"}, {}],
        processes=[{"pid": 4242, "gpu": 0, "used": None}],  # another namespace's process
    )
    got = rows(cli)
    assert got[0]["validation"] == "1 process" and got[0]["process_info"][0]["memory_mb"] is None
    assert got[0]["process_info"][0]["name"] == "?"
    assert got[1]["validation"] == "540MB used"


def test_admin_detects_nvidia_through_nvml_alone(cli, r, nvml, fake_smi):
    fake_smi.uninstall()
    nvml.set(gpus=4)
    p = cli("admin", "--gpus", 4, check=True)
    assert p.stdout == "Initialised the GPU pool: 4 GPU(s), provider nvidia\n" and p.stderr == ""
