"""The longest stretch a command stays silent on stderr (issue 13 item 7: long stages show progress).

    ZSADAPT_DATA=../shared/data python benchmarks/silent_stretch.py --method inmap
    python benchmarks/silent_stretch.py -- zsadapt refine pool.npz --method em    # any command

Runs the command in a subprocess, reads its stderr as it comes, and time-stamps every line or
``\\r`` update; the longest silence is the largest gap between the start and those updates (the
last of which comes when the work is done: "no --out given", or the demo's closing line). The
seconds from the last update to the exit (the interpreter unloading torch and the solvers, about
1 s of CPU) are a column of their own. Without a command after ``--`` it runs ``zsadapt refine``
on the shared Cars pool (``stanford_cars_val``) with ``--method``. Prints one markdown row; stdout
of the command is read and counted (its bytes), so a progress line that leaked there would show.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def silences(command: list, env: dict, timeline: bool = False) -> dict:
    """Run ``command``; return the longest silence before its last stderr update (s), the seconds
    from that update to the exit, the number of updates, the total seconds, the exit code and the
    stdout byte count. ``timeline``: echo each stderr chunk to
    stderr, prefixed by its time since the start (to see which stage a silence belongs to)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    stamps = [start]
    out_bytes = []
    reader = threading.Thread(target=lambda: out_bytes.append(len(proc.stdout.read())))
    reader.start()
    while True:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        now = time.perf_counter()
        stamps.extend([now] * (chunk.count(b"\n") + chunk.count(b"\r")))
        if timeline:
            for line in chunk.decode(errors="replace").replace("\r", "\n").splitlines():
                if line.strip():
                    print(f"[{now - start:6.1f} s] {line}", file=sys.stderr, flush=True)
    proc.wait()
    reader.join()
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])] or [end - start]
    return {"longest": max(gaps), "exit": end - stamps[-1], "updates": len(stamps) - 1, "seconds": end - start,
            "rc": proc.returncode, "stdout_bytes": out_bytes[0] if out_bytes else 0}


def main() -> None:
    argv = sys.argv[1:]
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("ZSADAPT_DATA", "../shared/data"))
    parser.add_argument("--method", default="inmap")
    parser.add_argument("--quiet", action="store_true", help="pass --quiet to zsadapt refine")
    parser.add_argument("--timeline", action="store_true", help="echo the command's stderr, time-stamped")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not command:
        cars = Path(args.data) / "stanford_cars_val"
        exe = shutil.which("zsadapt") or str(Path(sys.executable).with_name("zsadapt"))
        command = [exe, "refine", "--image-features", str(cars / "image_features.npy"),
                   "--text-features", str(cars / "text_features.npy"), "--method", args.method]
        command += ["--quiet"] if args.quiet else []
    found = silences(command, dict(os.environ), timeline=args.timeline)
    print("| command | longest silence (s) | last update to exit (s) | stderr updates | total (s) | exit code "
          "| stdout bytes |")
    print("|---|---|---|---|---|---|---|")
    print(f"| `{' '.join(Path(command[0]).name if i == 0 else c for i, c in enumerate(command))}` | "
          f"{found['longest']:.1f} | {found['exit']:.1f} | {found['updates']} | {found['seconds']:.1f} | {found['rc']} | "
          f"{found['stdout_bytes']} |")


if __name__ == "__main__":
    main()
