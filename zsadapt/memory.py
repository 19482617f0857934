"""Will a pool's result fit in memory? Refuse up front what cannot, instead of being killed later.

Every method returns (N, C) float32 scores and probabilities: 8 N C bytes that no method can do
without (zero-shot itself holds its logits and their softmax). A pool of 60,000 images and 100,000
classes needs 48 GB for them alone; on a machine with less, the operating system's OOM killer
would end the process minutes later, with no message. :func:`check_result_fits` turns that into
one line saying what to do instead. It refuses only what cannot fit (the methods need more than
this floor, so a pool that passes may still run out), and it says nothing where the free memory
cannot be read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

#: Bytes per (image, class) pair that every method's result holds: float32 scores and probabilities.
RESULT_BYTES_PER_PAIR = 8

#: A cgroup memory limit at or above this is "no limit" (cgroup v1 writes 2^63 rounded to a page).
NO_LIMIT = 1 << 60


def check_result_fits(n_images: int, n_classes: int, device: torch.device) -> None:
    """Raise ``ValueError`` when the (N, C) scores and probabilities of a pool of ``n_images`` x
    ``n_classes`` cannot fit in the memory free on ``device`` (RAM and swap on the CPU, the free
    and cached memory of a CUDA device)."""
    check_fits(RESULT_BYTES_PER_PAIR * n_images * n_classes, device,
               f"{n_images} images x {n_classes} classes: the (N, C) scores and probabilities alone",
               "refine a sample (zsadapt refine SAMPLE --save-model MODEL, then zsadapt label MODEL "
               "SOURCE, which holds one batch at a time) or use fewer classes")


def check_fits(need: int, device: torch.device, what: str, instead: str) -> None:
    """Raise ``ValueError`` ("``what`` need X GB and ... has Y GB free; ``instead``") when ``need``
    bytes cannot fit in the memory free on ``device``; say nothing where that cannot be read."""
    free = available_bytes(device)
    if free is None or need <= free:
        return
    where = "this machine" if device.type == "cpu" else str(device)
    raise ValueError(f"{what} need {need / 1e9:.1f} GB and {where} has {free / 1e9:.1f} GB free; {instead}")


def available_bytes(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can still get on ``device``, or None where that cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch has cached but not handed out are free to it, though not to the driver.
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return _host_available()
    return None


def _host_available() -> Optional[int]:
    """MemAvailable + SwapFree from /proc/meminfo, capped by the cgroup's memory limit (a
    container's limit, which /proc/meminfo does not show); None off Linux."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        swap = int(fields.get("SwapFree", "0 kB").split()[0]) * 1024
        free = int(fields["MemAvailable"].split()[0]) * 1024 + swap
    except (OSError, KeyError, ValueError):
        return None
    room = _cgroup_room()
    return free if room is None else min(free, room + swap)


def _cgroup_room() -> Optional[int]:
    """Limit minus usage of this process's memory cgroup (v2, else v1), None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= NO_LIMIT or not usage.isdigit():
            return None
        return max(0, int(limit) - int(usage))
    return None
