"""Exact kNN: torch (chunked matmul + topk) against pykeops (LazyTensor argKmin), side by side,
over feature dimensions, on one device. This is the measurement behind ``backend="auto"``.

    python benchmarks/bench_knn.py                          # N = 20000, d = 3, 16, 64, 512, CPU
    python benchmarks/bench_knn.py --device cuda --n 200000

The first keops call per dimension compiles a kernel; it is timed separately ("compile"). The
table is also written to the docs site's results page ``docs/results/bench_knn.md``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from results_page import echo, write_page
from timing import timed
from zsadapt.graphs import keops_available, knn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dims", default="3,16,64,512")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not keops_available():
        raise SystemExit("pykeops is not installed: pip install pykeops")
    lines: list = []
    echo(lines, f"N = {args.n}, k = {args.k}, device {device}, torch {torch.get_num_threads()} threads")
    echo(lines)
    echo(lines, "| d | torch s | keops s | keops compile s | keops / torch | same neighbours |")
    echo(lines, "|---|---|---|---|---|---|")
    for d in (int(v) for v in args.dims.split(",")):
        x = torch.nn.functional.normalize(torch.randn(args.n, d, device=device, generator=None), dim=1)
        (sims_t, idx_t), t_torch = timed(lambda: knn(x, x, args.k, exclude_self=True, backend="torch"), device)
        _, t_compile = timed(lambda: knn(x[:100], x[:100], args.k, exclude_self=True, backend="keops"), device)
        (sims_k, idx_k), t_keops = timed(lambda: knn(x, x, args.k, exclude_self=True, backend="keops"), device)
        same = (idx_t == idx_k).float().mean().item()
        echo(lines, f"| {d} | {t_torch:.2f} | {t_keops:.2f} | {t_compile:.1f} | {t_keops / t_torch:.1f}x "
                    f"| {same:.2%} |")
    page = write_page("bench_knn", "Exact kNN: torch against pykeops", "\n".join(lines), intro=(
        "Seconds of one exact kNN search (k neighbours of every point among N unit vectors), torch's "
        "chunked matmul + topk against pykeops' LazyTensor argKmin, side by side on one device; the "
        "keops kernel's compilation is timed apart. This is the measurement behind "
        "`knn_backend=\"auto\"`."))
    print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
