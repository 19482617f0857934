"""How many CPU threads torch should use: the CPUs this process may run on, less those other
processes keep busy.

torch's default (one thread per core of the machine) is the fastest choice on an idle machine, but
its parallel loops wait at every barrier for their slowest thread: when another process holds a
core, the thread sharing that core makes every loop wait for the scheduler, and a run gets 5-10x
slower (``benchmarks/bench_threads.py`` measures it). :func:`choose_threads` counts the CPUs this
process may use (its affinity mask, and the cgroup CPU quota of a container) and subtracts the
share of them other processes keep busy (the runnable processes the kernel reports, less this one).

Precedence of :func:`set_threads`: an explicit count, then ``ZSADAPT_THREADS``, then
``OMP_NUM_THREADS`` (torch already follows it: left alone), then :func:`choose_threads`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

from .messages import note

#: The environment variable that sets the thread count (a positive integer, or ``auto``).
ENV = "ZSADAPT_THREADS"


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


def busy_cpus(loadavg: Union[str, os.PathLike] = "/proc/loadavg") -> float:
    """How many CPUs other processes keep busy, over the whole machine.

    The larger of the 1-minute load average and the processes runnable right now (the 4th field
    of ``/proc/loadavg``, ``running/total``), less one for this process, which is running while it
    reads the file. The load average lags by a minute and the instant count is noisy; the larger
    of the two errs toward fewer threads, which costs little (one thread fewer on an idle
    machine) where too many costs 5-10x.
    """
    try:
        fields = Path(loadavg).read_text().split()
        average = float(fields[0])
        running = int(fields[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    # The instant count includes this process; the 1-minute average of a process that just
    # started hardly does (call this at start-up, before torch's threads run).
    return max(0.0, average, running - 1.0)


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
        raise ValueError(f"{where}: expected a positive number of threads or 'auto', got {value!r}") from None
    if count < 0:
        raise ValueError(f"{where}: expected a positive number of threads or 'auto', got {value!r}")
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
    import torch

    count = parse_threads(threads, "threads")
    if count is None:
        count = parse_threads(os.environ.get(ENV), ENV)
    if count is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    if count is None:
        cpus, busy = usable_cpus(), busy_cpus()
        count = choose_threads(cpus, busy)
        if count < cpus:
            note(f"{count} of {cpus} CPU threads: other processes keep about {busy:.1f} CPUs busy "
                 f"(--threads or {ENV} to choose)")
    if count != torch.get_num_threads():
        torch.set_num_threads(count)
    return count
