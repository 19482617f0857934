"""How many CPU threads torch should use: the CPUs this process may run on, less those other
processes keep busy.

torch's default (one thread per core of the machine) is the fastest choice on an idle machine, but
its parallel loops wait at every barrier for their slowest thread: when another process holds a
core, the thread sharing that core makes every loop wait for the scheduler, and a run gets slower
(``benchmarks/bench_threads.py`` measures it: 1.2-2x on 2026-12-07, 5-15x on 2026-12-02, on the
same kind of 2-core machine). :func:`choose_threads` counts the CPUs this
process may use (its affinity mask, and the cgroup CPU quota of a container) and subtracts the
share of them other processes keep busy (the machine's busy CPU time over a short window, less this
process's own).

Precedence of :func:`set_threads`: an explicit count, then ``ZSADAPT_THREADS``, then
``OMP_NUM_THREADS`` (torch already follows it: left alone), then :func:`choose_threads`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional, Union

from .messages import note

#: The environment variable that sets the thread count (a positive integer, or ``auto``).
ENV = "ZSADAPT_THREADS"

#: Shortest window over which :func:`busy_cpus` measures the machine's load (seconds): 10 clock
#: ticks of each CPU at the kernel's usual 100 per second, enough to tell a busy core from an idle one.
MIN_WINDOW = 0.1

#: Longest window (seconds) :func:`busy_cpus` reuses from its previous call; older, it samples anew.
MAX_WINDOW = 10.0

#: The second sample of the last :func:`busy_cpus` call, and its answer.
_last: Optional[tuple["CpuSample", float]] = None


def usable_cpus(cgroup_root: Union[str, os.PathLike] = "/sys/fs/cgroup") -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup v2 CPU quota.

    ``cpu.max`` holds ``"<quota> <period>"`` in microseconds (``"max <period>"``: no quota); a
    quota of 150000 per 100000 lets the group use 1.5 CPUs, counted as 2 (rounded up: the last
    CPU is still worth a thread).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = (Path(cgroup_root) / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2, or an unreadable file: the affinity mask alone
    return max(1, cpus)


class CpuSample(NamedTuple):
    """CPU time counters at one moment (:func:`sample_cpus`)."""

    busy: int  #: non-idle clock ticks of the whole machine since boot, every CPU summed
    total: int  #: all clock ticks (busy + idle + iowait) since boot
    cpus: int  #: CPUs the kernel lists (the ``cpuN`` lines)
    own: float  #: this process's CPU seconds, every thread (``time.process_time()``)
    at: float  #: ``time.monotonic()`` seconds


def sample_cpus(stat: Union[str, os.PathLike] = "/proc/stat") -> Optional[CpuSample]:
    """Read the machine's CPU time counters (``/proc/stat``) and this process's CPU time; None
    where there is no such file (not Linux) or it cannot be parsed.

    Busy ticks are user, nice, system, irq and softirq; idle and iowait are idle. Steal (the time
    a hypervisor runs other machines on our virtual CPUs) is left out of both: it slows every
    thread alike, where a process of this machine holds a core of its own, which is what the
    thread choice avoids sharing."""
    try:
        lines = Path(stat).read_text().splitlines()
        fields = [int(value) for value in lines[0].split()[1:9]]
        cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
    except (OSError, ValueError, IndexError):
        return None
    if len(fields) < 8 or not lines[0].startswith("cpu "):
        return None
    user, nice, system, idle, iowait, irq, softirq, _steal = fields
    busy = user + nice + system + irq + softirq
    return CpuSample(busy, busy + idle + iowait, max(1, cpus), time.process_time(), time.monotonic())


def busy_cpus(since: Optional[CpuSample] = None, stat: Union[str, os.PathLike] = "/proc/stat",
              min_window: float = MIN_WINDOW) -> float:
    """How many CPUs other processes keep busy, over the whole machine, measured now.

    The machine's busy share of its CPU time between a first and a second sample at least
    ``min_window`` seconds apart, times its CPUs, less what this process used meanwhile. The first
    sample is ``since``, else the second sample of the previous call if it is at most
    :data:`MAX_WINDOW` seconds old, else one taken now (and waited on); a call within
    ``min_window`` of the previous one returns the previous answer. So a process that asks
    repeatedly, as the tests do, waits for nothing; :func:`set_threads` samples before importing
    torch, so the import is the window. (The 1-minute load average, used until 2026-12-07, still
    counts a run that ended a minute ago: a command started right after another one on an idle
    2-core machine took one thread.) 0 where the counters cannot be read.
    """
    global _last
    if since is None and _last is not None:
        age = time.monotonic() - _last[0].at
        if age < min_window:
            return _last[1]
        if age <= MAX_WINDOW:
            since = _last[0]
    first = since if since is not None else sample_cpus(stat)
    if first is None:
        return 0.0
    wait = min_window - (time.monotonic() - first.at)
    if wait > 0:
        time.sleep(wait)
    second = sample_cpus(stat)
    if second is None:
        return 0.0
    busy = 0.0
    if second.total > first.total:
        machine = (second.busy - first.busy) / (second.total - first.total) * second.cpus
        own = (second.own - first.own) / max(second.at - first.at, 1e-9)
        busy = max(0.0, machine - own)
    _last = (second, busy)
    return busy


def choose_threads(cpus: Optional[int] = None, busy: Optional[float] = None,
                   machine_cpus: Optional[int] = None) -> int:
    """Threads for torch: the usable CPUs less the busy share of them (at least 1).

    Parameters
    ----------
    cpus : int, optional
        CPUs this process may use (default :func:`usable_cpus`).
    busy : float, optional
        CPUs of the whole machine other processes keep busy (default :func:`busy_cpus`).
    machine_cpus : int, optional
        CPUs of the whole machine (default ``os.cpu_count()``). The load is machine-wide, so a
        process limited to ``cpus`` of them expects ``busy * cpus / machine_cpus`` of its own to be
        taken.
    """
    cpus = usable_cpus() if cpus is None else int(cpus)
    busy = busy_cpus() if busy is None else float(busy)
    machine = max(cpus, os.cpu_count() or cpus) if machine_cpus is None else max(cpus, int(machine_cpus))
    taken = min(float(cpus), busy * cpus / machine)
    return max(1, min(cpus, int(cpus - taken + 0.5)))


def parse_threads(value: Union[str, int, None], where: str) -> Optional[int]:
    """A thread count from the user: a positive int, or ``None`` for "choose" (``None``, ``""``,
    ``"auto"``, ``0``). One-line ``ValueError`` naming ``where`` otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        count = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number of threads (0 or 'auto': choose), got {value!r}") from None
    if count < 0:
        raise ValueError(f"{where}: expected a number of threads (0 or 'auto': choose), got {value!r}")
    return count or None


def set_threads(threads: Union[int, str, None] = None) -> int:
    """Set torch's intra-op thread count before work starts, and return it.

    Parameters
    ----------
    threads : int or str, optional
        A positive count; ``None``/``"auto"``/``0`` reads ``ZSADAPT_THREADS``, then leaves
        ``OMP_NUM_THREADS`` to torch when it is set, and otherwise uses :func:`choose_threads`
        (with a note on stderr when that is fewer than the usable CPUs).
    """
    # A first import of torch (1-2 s) is busy_cpus' window; once imported, its previous window.
    before_import = None if "torch" in sys.modules else sample_cpus()
    import torch

    count = parse_threads(threads, "threads")
    if count is None:
        count = parse_threads(os.environ.get(ENV), ENV)
    if count is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    if count is None:
        cpus, busy = usable_cpus(), busy_cpus(since=before_import)
        count = choose_threads(cpus, busy)
        if count < cpus:
            note(f"{count} of {cpus} CPU threads: other processes keep about {busy:.1f} CPUs busy "
                 f"(--threads or {ENV} to choose)")
    if count != torch.get_num_threads():
        torch.set_num_threads(count)
    return count
