"""Time per method of the pseudo-label solvers next to zero-shot and ZLaP on synthetic pools.

    python benchmarks/bench_pseudolabels.py                       # N = 10k, 50k x C = 100, 1000, d = 512
    python benchmarks/bench_pseudolabels.py --sizes 10000x100 --inmap-iter 200 --epochs 20

Every method runs at its defaults unless capped: ``--inmap-iter`` caps InMaP's gradient steps (also
for zlap initial=inmap) and ``--epochs`` the student's epochs per round, for quick CPU runs; the table
then also gives seconds per InMaP step so the full 2000-step time can be read off. Seconds are wall
clock of ``zsadapt.refine`` (CUDA synchronised by the solvers' stage timers) on the chosen device.
"""

from __future__ import annotations

import argparse
import time

import torch

import zsadapt

METHODS = {
    "zeroshot": ("zeroshot", {}),
    "zlap": ("zlap", {}),
    "inmap": ("inmap", {}),
    "self_training fpl": ("self_training", {"strategy": "fpl"}),
    "self_training ifpl": ("self_training", {"strategy": "ifpl"}),
    "self_training grip": ("self_training", {"strategy": "grip"}),
    "zlap initial=inmap": ("zlap", {"initial": "inmap"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000x100,10000x1000,50000x100,50000x1000",
                        help="comma-separated NxC pool sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names among the table's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inmap-iter", type=int, default=0, help="cap InMaP's gradient steps (0: default 2000)")
    parser.add_argument("--epochs", type=int, default=0, help="cap the student's epochs per round (0: default 100)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    zsadapt.set_quiet(True)
    names = args.methods.split(",")
    print(f"device {args.device}, d = {args.dim}, torch {torch.__version__}, threads {torch.get_num_threads()}"
          + (f", InMaP capped at {args.inmap_iter} steps" if args.inmap_iter else "")
          + (f", student capped at {args.epochs} epochs" if args.epochs else ""))
    print("| N | C | method | seconds | accuracy % | note |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n, c = (int(v) for v in size.lower().split("x"))
        pool = zsadapt.make_pool(n_images=n, n_classes=c, dim=args.dim, seed=0)
        X = torch.as_tensor(pool.image_features, device=args.device)
        T = torch.as_tensor(pool.text_features, device=args.device)
        for name in names:
            method, params = METHODS[name]
            params = dict(params)
            initial_params = None
            if args.inmap_iter and method == "inmap":
                params["max_iter"] = args.inmap_iter
            if args.inmap_iter and params.get("initial") == "inmap":
                initial_params = {"max_iter": args.inmap_iter}
            if args.epochs and method == "self_training":
                params["epochs"] = args.epochs
            if initial_params:
                params["initial_params"] = initial_params
            start = time.perf_counter()
            result = zsadapt.refine(X, T, method, **params)
            if X.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            acc = zsadapt.accuracy(result.labels.cpu().numpy(), pool.labels)
            note = ""
            seconds_by_stage = result.info.get("seconds", {})
            if method == "inmap":  # the pseudo-labels include the mixture estimate of the marginals
                note = (f"{seconds_by_stage['proxies'] / max(1, result.info['iterations']) * 1e3:.1f} ms/step, "
                        f"pseudo-labels {seconds_by_stage['pseudo_labels']:.1f} s")
            if method == "self_training":
                note = (f"{len(result.info['rounds'])} rounds, epochs {[r['epoch'] for r in result.info['rounds']]}, "
                        f"class proportions {seconds_by_stage['proportions']:.1f} s")
            print(f"| {n} | {c} | {name} | {seconds:.2f} | {acc:.2f} | {note} |", flush=True)


if __name__ == "__main__":
    main()
