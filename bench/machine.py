"""What a benchmark ran on, in one line for its results: the CPU model matters as much as the
count (this project's 2-vCPU machines have been Intel and AMD hosts, whose kernels differ in
speed and, for some convolutions, in rounding, so a seeded run may freeze at other steps)."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """e.g. 'x86_64, AMD EPYC, 2 CPUs, 24 GB, no GPU, torch 2.14.1'."""
    parts = [platform.machine(), cpu_model(), f"{os.cpu_count()} CPUs"]
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        parts.append(f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB")
    torch = sys.modules.get("torch")  # asked only where the bench has loaded it
    if torch is not None and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    else:
        parts.append("no GPU")
    try:
        parts.append(f"torch {metadata.version('torch')}")
    except metadata.PackageNotFoundError:
        pass
    return ", ".join(parts)


PROBE = "one thread, 128 products of two 256x256 float32 matrices, median of 5"


def speed_probe_ms() -> float:
    """Milliseconds this machine takes for a fixed piece of work (PROBE) right now. This project's
    VMs run 5-45% slower or faster from one hour to the next, so a time compares with another only
    where the probes beside them agree."""
    import torch  # the probe is the kind of work the runs do; only the benches that time runs ask for it
    with one_torch_thread():
        a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
        out = torch.empty_like(a)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(128):
                torch.mm(a, a, out=out)
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)


@contextmanager
def one_torch_thread():
    """torch on one thread within the block; the thread count as it was after it."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
