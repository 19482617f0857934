"""ZLaP speed, side by side in one run, on synthetic CLIP-like pools (d = 512).

For each (N, C) it times, on the same pool:

* ``zsadapt``: zsadapt's ZLaP (chunked torch kNN, torch sparse graph, one block CG for all C
  classes), with its per-stage breakdown, on the published graph of every class (``robust=False``,
  the graph the baselines build; the class-support step that ``robust=True`` adds is timed by
  ``bench_mixture.py --support-only``);
* ``per-class CG``: the official code's structure: the same kNN lists, a scipy sparse Laplacian
  built as the official ``knn2laplacian`` does, and one scipy CG per class (tol 1e-6, 50 iterations);
* ``LabelSpreading``: scikit-learn's ``LabelSpreading(kernel="knn")`` with the C class embeddings as
  the labelled points and the N images unlabelled (skip with --no-sklearn);
* ``matmul floor``: one plain (N, d) x (d, N) matmul, the exact kNN's unavoidable work.

It prints seconds per stage, the kNN stage's GFLOP/s next to the plain matmul's, the whole of ZLaP
as a multiple of the matmul floor, the speed-up over the per-class solve, and whether both solves
give the same labels.

    python benchmarks/bench_zlap.py                       # N = 10k, 50k x C = 100, 1000
    python benchmarks/bench_zlap.py --sizes 10000x100     # a quick run
    python benchmarks/bench_zlap.py --device cuda --sizes 1000000x1000 --no-sklearn
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

import zsadapt
from timing import timed
from zsadapt.graphs import knn


def synthetic(n, c, d, seed=0):
    pool = zsadapt.make_pool(n_images=n, n_classes=c, dim=d, seed=seed, imbalance=0.5)
    return pool


def matmul_floor(X):
    """Seconds for one (N, d) x (d, N) product, computed in row blocks like the kNN (same
    memory), without the top-k selection: best of two."""
    device = X.device
    n = X.shape[0]
    chunk = max(1, (1 << 24) // n)

    def run():
        for start in range(0, n, chunk):
            X[start:start + chunk] @ X.T

    best = min(timed(run, device)[1] for _ in range(2))
    return best


def per_class_cg(X, T, k=5, gamma=5.0, alpha=0.3):
    """The official code's structure on CPU: kNN lists, scipy Laplacian, one scipy CG per class.
    Returns (labels, seconds per stage)."""
    seconds = {}
    n, c = X.shape[0], T.shape[0]
    start = time.perf_counter()
    sim_ii, knn_ii = knn(X, X, min(k, n))
    sim_it, knn_it = knn(X, T, min(k, c))
    seconds["knn"] = time.perf_counter() - start
    start = time.perf_counter()
    knn_all = np.concatenate([knn_ii.numpy() + c, knn_it.numpy()], axis=1)  # (N, 2k)
    sim_all = np.concatenate([sim_ii.numpy(), sim_it.numpy()], axis=1)
    sim_all[sim_all < 0] = 0
    sim_all[:, k:] = sim_all[:, k:] ** gamma
    rows = np.repeat(np.arange(c, c + n), knn_all.shape[1])
    W = scipy.sparse.csr_matrix((sim_all.ravel(), (rows, knn_all.ravel())), shape=(n + c, n + c))
    W = W + W.T
    W = W - scipy.sparse.diags(W.diagonal())
    S = np.asarray(W.sum(axis=1)).ravel()
    S[S == 0] = 1
    D = scipy.sparse.diags(1.0 / np.sqrt(S))
    L = scipy.sparse.eye(n + c) - alpha * (D @ W @ D)
    L = L.tocsr()
    seconds["graph"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = np.zeros((n, c), dtype=np.float32)
    for idx in range(c):
        y = np.zeros(n + c)
        y[idx] = 1
        x, _ = scipy.sparse.linalg.cg(L, y, rtol=1e-6, maxiter=50)
        scores[:, idx] = x[c:]
    seconds["solve"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())
    return scores.argmax(1), seconds


def label_spreading(X, T, k=5):
    from sklearn.semi_supervised import LabelSpreading

    data = np.concatenate([T, X])
    y = np.concatenate([np.arange(T.shape[0]), -np.ones(X.shape[0], dtype=np.int64)])
    start = time.perf_counter()
    model = LabelSpreading(kernel="knn", n_neighbors=k, alpha=0.3, max_iter=50).fit(data, y)
    return model.transduction_[T.shape[0]:], time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000x100,10000x1000,50000x100,50000x1000",
                        help="comma-separated NxC")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-sklearn", action="store_true", help="skip LabelSpreading")
    parser.add_argument("--no-per-class", action="store_true", help="skip the per-class CG baseline")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    header = ("N", "C", "knn s", "graph s", "solve s", "probs s", "zlap s", "matmul s", "knn GF/s", "mm GF/s",
              "knn/mm", "zlap/floor", "per-class s", "speed-up", "same labels", "LabelSpr s", "acc zs/zlap/LS")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for size in args.sizes.split(","):
        n, c = (int(v) for v in size.lower().split("x"))
        pool = synthetic(n, c, args.dim)
        X = torch.from_numpy(pool.image_features).to(device)
        T = torch.from_numpy(pool.text_features).to(device)
        zsadapt.refine(X[:2000], T, "zlap", robust=False)  # warm-up (allocator, threads)
        result = zsadapt.refine(X, T, "zlap", robust=False)
        stages = result.info["seconds"]
        floor = matmul_floor(X)
        flops = 2.0 * n * n * args.dim
        labels = result.labels.cpu().numpy()
        acc_zs = zsadapt.refine(X, T, "zeroshot").accuracy(pool.labels)
        acc_zlap = zsadapt.accuracy(labels, pool.labels)
        per_class_s, same = "-", "-"
        if not args.no_per_class:
            ref_labels, ref_seconds = per_class_cg(X.cpu(), T.cpu())
            per_class_s = f"{ref_seconds['total']:.2f}"
            same = f"{100 * np.mean(ref_labels == labels):.2f}%"
            speedup = f"{ref_seconds['total'] / stages['total']:.1f}x"
        else:
            speedup = "-"
        ls_s, acc_ls = "-", "-"
        if not args.no_sklearn:
            ls_labels, ls_seconds = label_spreading(pool.image_features, pool.text_features)
            ls_s, acc_ls = f"{ls_seconds:.2f}", f"{zsadapt.accuracy(ls_labels, pool.labels):.1f}"
        row = (n, c, f"{stages['knn']:.2f}", f"{stages['graph']:.2f}", f"{stages['solve']:.2f}",
               f"{stages['probabilities']:.2f}",
               f"{stages['total']:.2f}", f"{floor:.2f}", f"{flops / stages['knn'] / 1e9:.0f}",
               f"{flops / floor / 1e9:.0f}", f"{floor / stages['knn']:.0%}",
               f"{stages['total'] / floor:.2f}x", per_class_s, speedup, same, ls_s,
               f"{acc_zs:.1f}/{acc_zlap:.1f}/{acc_ls}")
        print(" | ".join(str(v) for v in row), flush=True)


if __name__ == "__main__":
    main()
