"""How busy the rest of the machine is while this process measures.

Timings taken while other processes compute describe the machine under that load, not this host's costs: a cost
table measured then would mislead CAST on every later run that reads it from the cache, and a llama.cpp run (its
threads spin at barriers) slows down many times over. Counted from /proc: all CPUs' busy time minus this process's
own, so this process's threads (OpenMP's spinning ones too) never count as "others".
"""

from __future__ import annotations

import os
import time

CpuTimes = tuple[int, int, int]  # (all CPUs' jiffies, their idle jiffies, this process's jiffies)


def cpu_times() -> CpuTimes | None:
    """The machine's and this process's CPU time so far, in clock ticks; None where /proc is not available."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        own = int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of proc(5))
    except (OSError, ValueError, IndexError):
        return None
    return sum(values[:8]), idle, own


def others_busy_cores(before: CpuTimes | None, after: CpuTimes | None, cpus: int | None = None) -> float | None:
    """Cores that other processes kept busy on average between two `cpu_times` readings (None if unknown)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    total = after[0] - before[0]
    busy = total - (after[1] - before[1])
    own = after[2] - before[2]
    return round(max(busy - own, 0) * (cpus or os.cpu_count() or 1) / total, 2)


def busy_cores(seconds: float = 0.3) -> float | None:
    """Cores the rest of the machine keeps busy, over a short window of `seconds`."""
    before = cpu_times()
    time.sleep(seconds)
    return others_busy_cores(before, cpu_times())
