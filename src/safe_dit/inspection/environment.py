"""What a measurement ran on: machine, versions, device. Recorded in every results file."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch


def environment(device: str = "cpu") -> dict:
    import diffusers

    info = {
        "machine": platform.node(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    from safe_dit import __version__

    info["safe_dit"] = __version__
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: str = "cpu", warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time in seconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak memory allocated during one call of ``fn()`` beyond what was live before, in MiB.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events,
    replayed in time order (torch allocations only, which is what attention masks cost).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with quiet_profiler() as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


@contextlib.contextmanager
def quiet_profiler():
    """A CPU profiler whose native 'USDT ... profiler_start/stop' lines (written straight to fd 2
    by this torch build, not silenced by any log level) are dropped; Python errors still raise."""
    from torch.profiler import ProfilerActivity, profile

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield prof
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
