"""What the benchmarks watch while a run goes: memory of every process of the run, the GPU's busy fraction, and
the machine itself."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import psutil


class MemorySampler:
    """Memory of this process and all its descendants: the driver, Ray's GCS, raylet, object store and every
    worker of the local Ray started here.

    Two figures: the peak of the total PSS (shared pages counted once), sampled every `interval_s`, which
    can miss a peak shorter than that; and the sum of each process's own peak RSS (Linux VmHWM, reset when
    sampling starts), which misses nothing but counts shared pages once per process.
    """

    def __init__(self, interval_s: float = 2.0):
        self.interval_s, self.peak_bytes, self._stop = interval_s, 0, threading.Event()
        self.peak_rss: dict[int, int] = {}
        self.names: dict[int, str] = {}  # pid -> process title (Ray workers: ray::TaskName)
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _processes() -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *me.children(recursive=True)]

    def _sample(self) -> None:
        total = 0
        for proc in self._processes():
            try:
                total += proc.memory_full_info().pss
                self.peak_rss[proc.pid] = max(self.peak_rss.get(proc.pid, 0), peak_rss_bytes(proc.pid))
                self.names.setdefault(proc.pid, " ".join(proc.cmdline()[:1]) or proc.name())
            except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                pass
        self.peak_bytes = max(self.peak_bytes, total)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    @property
    def peak_rss_sum_bytes(self) -> int:
        return sum(self.peak_rss.values())

    def __enter__(self):
        for proc in self._processes():  # forget peaks from before: earlier runs in the same Ray workers
            with contextlib.suppress(OSError):
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()  # the high-water marks of processes still alive, up to the end


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size since start or its last reset (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class GpuBusySampler:
    """GPU 0's utilisation from NVML (the share of time a kernel was running) every 0.1 s, for the fraction of
    the steady window the GPU was busy. Without a GPU or NVML, busy_fraction is None."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.samples, self._stop = interval_s, [], threading.Event()
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no NVML library, no driver, no GPU: nothing to sample
            self._handle = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self.samples.append((time.time(), self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def busy_fraction(self, start: float, end: float) -> float | None:
        inside = [util for t, util in self.samples if start <= t <= end]
        return round(sum(inside) / len(inside) / 100, 3) if inside else None

    def __enter__(self):
        if self._handle is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def ray_version() -> str | None:
    try:
        import ray
    except ImportError:
        return None
    return ray.__version__


def machine() -> dict:
    import platform

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "ray": ray_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
