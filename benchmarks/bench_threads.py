"""Wall time of `zsadapt demo` and `zsadapt compare` with zsadapt's thread choice against
torch's default, while a busy process holds a CPU core (issue 13 item 5).

    ZSADAPT_DATA=../shared/data python benchmarks/bench_threads.py [--workloads demo,compare] [--repeats 1]

torch's default is one intra-op thread per core of the machine. Its parallel loops wait at every
barrier for their slowest thread, so when another process keeps a core busy, the thread that
shares that core holds every loop up, and a run gets several times slower. zsadapt's default
(``--threads auto``, :func:`zsadapt.threads.choose_threads`) counts the CPUs this process may
use and subtracts the ones other processes keep busy. Each workload runs as a user would run it,
a fresh ``zsadapt`` process with ``OMP_NUM_THREADS`` and ``ZSADAPT_THREADS`` removed from its
environment, once per setting:

* ``auto``: no ``--threads`` (zsadapt's default);
* ``torch default``: ``--threads <cores of the machine>``, what torch would use;

with the settings interleaved within each repeat (both see the same machine), and a spinning
process (``while True: pass``) started before and stopped after. The table gives each wall time
and the ratio torch default / auto (above 1: zsadapt's choice is faster). It also prints the
thread count ``auto`` chose (the note on stderr, or the cores when it chose all of them).

A second table, after the spinner is stopped: each workload run three times in a row, each run
started as soon as the previous one ended, the second with zsadapt's choice and the third with one
thread, what the 1-minute load average (zsadapt's measure of busy CPUs until 2026-12-07) chose
there, because it still counted the run before. On a
machine that other users keep busy the absolute times move from run to run; the ratio of two
runs made side by side is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_page import echo, write_page

WORKLOADS = ("demo", "compare")


def zsadapt_command() -> str:
    """The ``zsadapt`` entry point of this interpreter's environment."""
    beside = Path(sys.executable).with_name("zsadapt")
    return str(beside) if beside.exists() else (shutil.which("zsadapt") or "zsadapt")


def workload_args(name: str, data: Path, methods: str) -> list:
    """The command line of one workload (without ``--threads``)."""
    if name == "demo":
        return ["demo", "--methods", methods]
    cars = data / "stanford_cars_val"
    return ["compare", "--image-features", str(cars / "image_features.npy"), "--text-features",
            str(cars / "text_features.npy"), "--labels", str(cars / "labels.npy"), "--methods", methods]


def workload_label(name: str, methods: str) -> str:
    """A workload's name in the tables."""
    return ("`zsadapt demo`" if name == "demo" else "`zsadapt compare` (Cars)") + f", --methods {methods}"


def timed_run(args: list, env: dict) -> tuple:
    """Wall seconds of one ``zsadapt`` process, and what it said on stderr."""
    start = time.perf_counter()
    done = subprocess.run([zsadapt_command(), *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"zsadapt {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds, done.stderr


def chosen_threads(stderr: str, cores: int) -> int:
    """The thread count ``auto`` chose: from its note, or all cores when it printed none."""
    found = re.search(r"(\d+) of \d+ CPU threads", stderr)
    return int(found.group(1)) if found else cores


def back_to_back(lines: list, workloads: list, data: Path, methods: str, env: dict, cores: int) -> None:
    """Each workload on the machine as it is (no spinner), every command started right after the
    previous one: zsadapt's choice against one thread, what the 1-minute load average (zsadapt's
    rule until 2026-12-07) chose there because it still counted the run before."""
    echo(lines)
    echo(lines, "Then without the spinning process, each command started as soon as the previous one "
                "ended (a first run of the workload before them):")
    echo(lines)
    echo(lines, "| workload | auto: threads | auto (s) | 1 thread (s) | 1 thread / auto |")
    echo(lines, "|---|---|---|---|---|")
    for name in workloads:
        command = workload_args(name, data, methods)
        timed_run(command, env)  # the run before
        auto, stderr = timed_run(command, env)
        one, _ = timed_run(command + ["--threads", "1"], env)
        print(f"  {name}, right after another run: auto {auto:.1f} s, 1 thread {one:.1f} s", file=sys.stderr,
              flush=True)
        echo(lines, f"| {workload_label(name, methods)} | {chosen_threads(stderr, cores)} | {auto:.1f} | "
                    f"{one:.1f} | {one / auto:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("ZSADAPT_DATA", "../shared/data"))
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="demo, compare (the Cars pool)")
    parser.add_argument("--methods", default="all", help="--methods of both workloads")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-busy", action="store_true", help="no spinning process (an idle-machine control)")
    parser.add_argument("--no-page", action="store_true", help="print only; leave docs/results/threads.md")
    args = parser.parse_args()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    data = Path(args.data)
    if "compare" in workloads and not (data / "stanford_cars_val").is_dir():
        parser.error(f"compare needs the shared Cars pool: {data}/stanford_cars_val not found (--data)")
    cores = os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ZSADAPT_THREADS")}
    settings = {"auto": [], "torch default": ["--threads", str(cores)]}

    busy = None if args.no_busy else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    lines: list = []
    try:
        time.sleep(0.0 if busy is None else 2.0)  # let the spinner show in the load figures
        with open("/proc/loadavg") as handle:
            load = handle.read().split()[0]
        echo(lines, f"{cores} cores; {'one spinning process' if busy else 'no spinning process'}; "
                    f"1-minute load average {load} at the start; {args.repeats} repeat(s).")
        echo(lines)
        echo(lines, "| workload | auto: threads | auto (s) | torch default: threads | torch default (s) "
                    "| torch default / auto |")
        echo(lines, "|---|---|---|---|---|---|")
        for name in workloads:
            times = {setting: [] for setting in settings}
            picked = []
            for _ in range(args.repeats):
                for setting, extra in settings.items():
                    seconds, stderr = timed_run(workload_args(name, data, args.methods) + extra, env)
                    times[setting].append(seconds)
                    if setting == "auto":
                        picked.append(chosen_threads(stderr, cores))
                    print(f"  {name}, {setting}: {seconds:.1f} s", file=sys.stderr, flush=True)
            auto, default = statistics.median(times["auto"]), statistics.median(times["torch default"])
            chosen = "/".join(map(str, sorted(set(picked))))
            echo(lines, f"| {workload_label(name, args.methods)} | {chosen} | {auto:.1f} | {cores} | "
                        f"{default:.1f} | {default / auto:.2f} |")
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    back_to_back(lines, workloads, data, args.methods, env, cores)
    if not args.no_page:
        page = write_page("threads", "Threads on a busy machine", "\n".join(lines), intro=(
            "Wall time of whole `zsadapt` commands with zsadapt's thread choice (`--threads auto`, "
            "the default) against torch's default of one thread per core, while a spinning process "
            "holds a core, and then on the machine as it is with each command started right after "
            "the previous one; the runs of one workload are made side by side. How zsadapt chooses, and "
            "`--threads` / `ZSADAPT_THREADS`: [Troubleshooting](../troubleshooting.md)."))
        print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
