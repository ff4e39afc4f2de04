"""The machine a bench runs on: its CPUs, pinning a thread to some of them, the hardware split
each bench prints, the GPU's name and the memory of processes."""

from __future__ import annotations

import os
from pathlib import Path

ALL_CPUS = sorted(os.sched_getaffinity(0))


def pin(cpus) -> None:
    """Pin the calling thread (Linux: pid 0 is the calling thread) to ``cpus``."""
    os.sched_setaffinity(0, set(cpus))


def hardware_split(local: tuple[str, ...], tiny: bool, device: str, dtype: str,
                   replay_acceptance: float | None) -> str:
    """Where everything runs, in words: the draft service on the first CPU, the target service on
    the last, one thread each, the coordinator unpinned; the in-process contenders ``local``
    (``-1t``: one thread on the target's CPU; ``-all``: every CPU)."""
    from benchmarks.replay import replay_note

    one = " / ".join(c for c in local if c.endswith("-1t"))
    every = " / ".join(c for c in local if c.endswith("-all"))
    if tiny:
        split = ("--tiny: the services and the in-process contenders in this process, no "
                 "pinning (a harness check, not a measurement)")
    elif device == "cuda":
        split = (f"draft, target and coordinator services as separate processes sharing the one "
                 f"GPU, one torch thread each, {dtype}; {every}: in this process on the same GPU")
    else:
        d, t = ALL_CPUS[0], ALL_CPUS[-1]
        split = (f"draft service: CPU {d}, target service: CPU {t}, one thread each, {dtype}; "
                 f"coordinator: unpinned; {one}: CPU {t}, 1 thread; {every}: CPUs "
                 f"{','.join(map(str, ALL_CPUS))}, {len(ALL_CPUS)} threads")
    if replay_acceptance is not None:
        split += "; " + replay_note(replay_acceptance)
    return split


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def rss_mb(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return None


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), or its current RSS where that is unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss_mb(pid)
