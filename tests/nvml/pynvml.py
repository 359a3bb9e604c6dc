"""Stand-in for nvidia-ml-py's `pynvml`, for tests on machines without a GPU: the same
names, types and errors, answering with values recorded from nvidia-ml-py on an
8-GPU H100 host (memory in bytes, names and UUIDs as str, a process's memory None when
NVML cannot tell).

State: JSON in $FAKE_NVML_STATE (missing: 8 idle H100s):
  {"init": "ok" | "driver" | "library",         # nvmlInit succeeds or raises
   "fail": null | "count" | "memory" | "processes",  # that query raises NVML_ERROR_UNKNOWN
   "gpus": 8 | [{"uuid", "name", "used", "total", "memory": "ok" | "not-supported"}],
   "processes": [{"pid", "gpu", "used" (bytes or null), "name"}]}
Each call is appended to $FAKE_NVML_LOG as a line (its name), if set.
"""

import json
import os

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_UNKNOWN = 999
MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}
H100_TOTAL = 85520809984  # bytes: nvidia-smi shows 81559 MiB
H100_IDLE = 566231040  # bytes in use on an idle H100 (540 MiB)


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return MESSAGES.get(self.value, f"Unknown Error code {self.value}")


class c_nvmlMemory_t:  # noqa: N801 - pynvml's own name
    def __init__(self, total, used):
        self.total, self.used, self.free = total, used, total - used


class c_nvmlProcessInfo_t:  # noqa: N801
    def __init__(self, pid, used):
        self.pid, self.usedGpuMemory = pid, used


_initialised = False


def _state():
    path = os.environ.get("FAKE_NVML_STATE")
    state = json.load(open(path)) if path and os.path.exists(path) else {}
    gpus = state.get("gpus", 8)
    if isinstance(gpus, int):
        gpus = [{} for _ in range(gpus)]
    state["gpus"] = [
        {"uuid": g.get("uuid", f"GPU-4f5e6d7c-8b9a-4c3d-2e1f-0a9b8c7d{k:04x}"),
         "name": g.get("name", "NVIDIA H100 80GB HBM3"), "used": g.get("used", H100_IDLE),
         "total": g.get("total", H100_TOTAL), "memory": g.get("memory", "ok")}
        for k, g in enumerate(gpus)
    ]  # fmt: skip
    return state


def _call(name):
    if os.environ.get("FAKE_NVML_LOG"):
        with open(os.environ["FAKE_NVML_LOG"], "a") as log:
            log.write(name + "\n")
    if name != "nvmlInit" and not _initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    state = _state()
    if state.get("fail") and name.lower().endswith(state["fail"].lower()):
        raise NVMLError(NVML_ERROR_UNKNOWN)
    return state


def nvmlInit():
    global _initialised
    how = _call("nvmlInit").get("init", "ok")
    if how == "driver":
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    if how == "library":
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    _initialised = True


def nvmlShutdown():
    global _initialised
    _initialised = False


def nvmlDeviceGetCount():
    return len(_call("nvmlDeviceGetCount")["gpus"])


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < len(_call("nvmlDeviceGetHandleByIndex")["gpus"]):
        raise NVMLError(2)
    return index


def nvmlDeviceGetUUID(handle):
    return _call("nvmlDeviceGetUUID")["gpus"][handle]["uuid"]


def nvmlDeviceGetName(handle):
    return _call("nvmlDeviceGetName")["gpus"][handle]["name"]


def nvmlDeviceGetMemoryInfo(handle):
    gpu = _call("nvmlDeviceGetMemoryInfo")["gpus"][handle]
    if gpu["memory"] == "not-supported":
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return c_nvmlMemory_t(gpu["total"], gpu["used"])


def nvmlDeviceGetComputeRunningProcesses(handle):
    state = _call("nvmlDeviceGetComputeRunningProcesses")
    return [c_nvmlProcessInfo_t(p["pid"], p.get("used")) for p in state.get("processes", ())
            if p["gpu"] == handle]  # fmt: skip


def nvmlSystemGetProcessName(pid):
    for p in _call("nvmlSystemGetProcessName").get("processes", ()):
        if p["pid"] == pid and "name" in p:
            return p["name"]
    raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # e.g. a process of another namespace
