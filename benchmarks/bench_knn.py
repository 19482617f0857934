"""Exact kNN: torch (chunked matmul + topk) against pykeops (LazyTensor argKmin), side by side,
over feature dimensions, on one device. This is the measurement behind ``backend="auto"``.

    python benchmarks/bench_knn.py                          # N = 20000, d = 3, 16, 64, 512, CPU
    python benchmarks/bench_knn.py --device cuda --n 200000

The first keops call per dimension compiles a kernel; it is timed separately ("compile").
"""

from __future__ import annotations

import argparse

import torch

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
    print(f"N = {args.n}, k = {args.k}, device {device}, torch {torch.get_num_threads()} threads")
    print("| d | torch s | keops s | keops compile s | keops / torch | same neighbours |")
    print("|---|---|---|---|---|---|")
    for d in (int(v) for v in args.dims.split(",")):
        x = torch.nn.functional.normalize(torch.randn(args.n, d, device=device, generator=None), dim=1)
        (sims_t, idx_t), t_torch = timed(lambda: knn(x, x, args.k, exclude_self=True, backend="torch"), device)
        _, t_compile = timed(lambda: knn(x[:100], x[:100], args.k, exclude_self=True, backend="keops"), device)
        (sims_k, idx_k), t_keops = timed(lambda: knn(x, x, args.k, exclude_self=True, backend="keops"), device)
        same = (idx_t == idx_k).float().mean().item()
        print(f"| {d} | {t_torch:.2f} | {t_keops:.2f} | {t_compile:.1f} | {t_keops / t_torch:.1f}x | {same:.2%} |", flush=True)


if __name__ == "__main__":
    main()
