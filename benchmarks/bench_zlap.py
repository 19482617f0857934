"""ZLaP speed, side by side in one run, on synthetic CLIP-like pools (d = 512).

For each (N, C) it times, on the same pool:

* ``zsadapt``: zsadapt's ZLaP (chunked torch kNN, torch sparse graph, one block solve for all C
  classes), with its per-stage breakdown, on the published graph of every class (``robust=False``,
  the graph the baselines build), without ``refine``'s label-free calibration (``calibrate=False``);
* ``CG solve`` / ``Chebyshev solve``: the solve stage alone on that graph, by block conjugate
  gradient (the solver up to this release) and by the Chebyshev iteration zlap now uses at
  ``alpha`` = 0.3, with the largest difference of their solutions; and the Chebyshev solve with
  every column in one block, against its default cache-sized column blocks on CPU (whether both
  give the same Z bit for bit);
* ``class support``: the pool-analysis step ``robust=True`` (the default) adds before the graph
  (class presence and, where it would drop classes, the held-out check; the fastest of
  ``--repeats`` runs, as ZLaP), and its cost over that of the ZLaP it protects (``--no-support``
  skips it);
* ``per-class CG``: the official code's structure: the same kNN lists, a scipy sparse Laplacian
  built as the official ``knn2laplacian`` does, and one scipy CG per class (tol 1e-6, 50 iterations);
* ``LabelSpreading``: scikit-learn's ``LabelSpreading(kernel="knn")`` with the C class embeddings as
  the labelled points and the N images unlabelled (skip with --no-sklearn);
* ``matmul floor``: one plain (N, d) x (d, N) matmul, the exact kNN's unavoidable work;
* ``self-kNN``: the pool's own k = 5 neighbours, ``knn(X, X, 5)``, which computes only the half of
  the product on and above the diagonal (:mod:`zsadapt.graphs.knn`), against the full product cut
  into query chunks (the path every other search takes): whether both give the same similarities,
  and in how many rows the neighbours of exactly tied similarities come in another order.

It prints seconds per stage, the kNN stage and the whole of ZLaP as a multiple of the matmul
floor (each the fastest of ``--repeats`` runs, alternated), the speed-up over the per-class solve,
and whether both solves give the same labels; the table goes to ``docs/results/zlap-speed.md``
(``--no-page``: print only).

    python benchmarks/bench_zlap.py --threads 1           # N = 7000, 50k x C = 1000
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
from results_page import echo, write_page
from timing import timed
from zsadapt.graphs import chebyshev, conjugate_gradient, knn
from zsadapt.graphs.knn import DEFAULT_BLOCK_ELEMENTS
from zsadapt.solvers import Problem
from zsadapt.solvers.pool_analysis import analyse_pool
from zsadapt.solvers.zlap import SimilarityScale, image_edges, unit_sources, zlap_graph


def synthetic(n, c, d, seed=0):
    pool = zsadapt.make_pool(n_images=n, n_classes=c, dim=d, seed=seed, imbalance=0.5)
    return pool


def matmul_floor(X, repeats=2):
    """Seconds for one (N, d) x (d, N) product, computed in row blocks like the kNN (same
    memory), without the top-k selection: best of ``repeats``."""
    device = X.device
    n = X.shape[0]
    chunk = max(1, (1 << 24) // n)

    def run():
        for start in range(0, n, chunk):
            X[start:start + chunk] @ X.T

    best = min(timed(run, device)[1] for _ in range(repeats))
    return best


ZLAP_STAGES = ("knn", "graph", "solve", "probabilities")


def zlap_and_floor(X, T, repeats):
    """ZLaP's fastest of ``repeats`` runs (``robust=False``, no calibration; its Result) and the
    matmul floor's, alternated so that both see the same machine: a shared CPU's speed drifts
    by 10-20% within a minute, more than the margin a single run of each could resolve."""
    runs, floors = [], []
    for _ in range(repeats):
        runs.append(zsadapt.refine(X, T, "zlap", robust=False, calibrate=False))
        floors.append(matmul_floor(X, repeats=1))
    best = min(runs, key=lambda result: sum(result.info["seconds"][name] for name in ZLAP_STAGES))
    return best, min(floors)


def self_knn(X, k=5):
    """(half-product seconds, full-product seconds, whether both give the same similarities, rows
    whose neighbour lists differ) of the pool's own kNN. With the same similarities, a list can
    only differ where two similarities tie exactly (the order of equal values is arbitrary)."""
    device = X.device
    chunk = max(1, DEFAULT_BLOCK_ELEMENTS // X.shape[0])  # passing chunk takes the full-product path
    (half_sims, half_idx), half_s = min((timed(lambda: knn(X, X, k), device) for _ in range(2)), key=lambda r: r[1])
    (full_sims, full_idx), full_s = min((timed(lambda: knn(X, X, k, chunk=chunk), device) for _ in range(2)),
                                        key=lambda r: r[1])
    return half_s, full_s, torch.equal(half_sims, full_sims), int((half_idx != full_idx).any(dim=1).sum())


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


def solves(X, T, device, k=5, gamma=5.0, alpha=0.3, tol=1e-6, max_iter=50):
    """Seconds of the block CG, of the Chebyshev solve of (I - alpha Wn) Z = E_C on the zlap graph
    of (X, T) (in its default column blocks) and of the same Chebyshev solve with every column in
    one block; the largest absolute difference of the CG and Chebyshev solutions, and whether the
    two Chebyshev solves agree bit for bit."""
    wn, _ = zlap_graph(image_edges(X, X, T, k=k, gamma=gamma, scale=SimilarityScale()), T.shape[0])
    wn = wn.to_csr()
    rhs = unit_sources(wn.shape[0], torch.arange(T.shape[0], device=wn.device), wn)  # (C+N, C): E_C

    def matvec(p):
        return torch.sparse.addmm(p, wn, p, beta=1.0, alpha=-alpha)

    (z_cg, _), cg_s = timed(lambda: conjugate_gradient(matvec, rhs, tol=tol, max_iter=max_iter), device)
    (z_ch, _), ch_s = timed(
        lambda: chebyshev(matvec, rhs, low=1 - alpha, high=1 + alpha, tol=tol, max_iter=max_iter), device)
    (z_one, _), one_s = timed(lambda: chebyshev(matvec, rhs, low=1 - alpha, high=1 + alpha, tol=tol,
                                                max_iter=max_iter, column_block=rhs.shape[1]), device)
    return cg_s, ch_s, float((z_cg - z_ch).abs().max()), one_s, torch.equal(z_ch, z_one)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="7000x1000,50000x1000", help="comma-separated NxC")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3,
                        help="ZLaP and the matmul floor: fastest of this many runs each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-sklearn", action="store_true", help="skip LabelSpreading")
    parser.add_argument("--no-per-class", action="store_true", help="skip the per-class CG baseline")
    parser.add_argument("--no-support", action="store_true", help="skip the class-support step")
    parser.add_argument("--no-page", action="store_true", help="do not write docs/results/zlap-speed.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    zsadapt.set_quiet(True)
    device = torch.device(args.device)
    lines = []
    echo(lines, f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    echo(lines)
    header = ("N", "C", "knn s", "graph s", "solve s", "probs s", "zlap s", "matmul s", "knn/mm", "zlap/floor",
              "CG solve s", "Chebyshev solve s", "CG/Chebyshev", "max diff", "Chebyshev one block s",
              "one block/blocks", "same Z", "class support s", "support/zlap",
              "per-class s", "speed-up", "same labels", "LabelSpr s", "acc zs/zlap/LS", "self-kNN half s",
              "self-kNN full s", "full/half", "same similarities", "rows with tied neighbours reordered")
    echo(lines, "| " + " | ".join(header) + " |")
    echo(lines, "|" + "---|" * len(header))
    for size in args.sizes.split(","):
        n, c = (int(v) for v in size.lower().split("x"))
        pool = synthetic(n, c, args.dim)
        X = torch.from_numpy(pool.image_features).to(device)
        T = torch.from_numpy(pool.text_features).to(device)
        zsadapt.refine(X[:2000], T, "zlap", robust=False, calibrate=False)  # warm-up (allocator, threads)
        result, floor = zlap_and_floor(X, T, args.repeats)
        stages = result.info["seconds"]
        zlap_s = sum(stages[name] for name in ZLAP_STAGES)
        half_s, full_s, same_sims, reordered = self_knn(X)
        labels = result.labels.cpu().numpy()
        acc_zs = zsadapt.refine(X, T, "zeroshot").accuracy(pool.labels)
        acc_zlap = zsadapt.accuracy(labels, pool.labels)
        cg_s, ch_s, diff, one_s, same_z = solves(X, T, device)
        support_s, ratio = "-", "-"
        if not args.no_support:
            # timed as ZLaP is, the fastest of --repeats (a fresh Problem each: no cached analysis)
            seconds = min(timed(lambda: analyse_pool(Problem(X, T)), device)[1] for _ in range(args.repeats))
            support_s, ratio = f"{seconds:.2f}", f"{seconds / zlap_s:.2f}"
        per_class_s, same, speedup = "-", "-", "-"
        if not args.no_per_class:
            ref_labels, ref_seconds = per_class_cg(X.cpu(), T.cpu())
            per_class_s = f"{ref_seconds['total']:.2f}"
            same = f"{100 * np.mean(ref_labels == labels):.2f}%"
            speedup = f"{ref_seconds['total'] / zlap_s:.1f}x"
        ls_s, acc_ls = "-", "-"
        if not args.no_sklearn:
            ls_labels, ls_seconds = label_spreading(pool.image_features, pool.text_features)
            ls_s, acc_ls = f"{ls_seconds:.2f}", f"{zsadapt.accuracy(ls_labels, pool.labels):.1f}"
        row = (n, c, f"{stages['knn']:.2f}", f"{stages['graph']:.2f}", f"{stages['solve']:.2f}",
               f"{stages['probabilities']:.2f}", f"{zlap_s:.2f}", f"{floor:.2f}", f"{stages['knn'] / floor:.2f}x",
               f"{zlap_s / floor:.2f}x", f"{cg_s:.2f}", f"{ch_s:.2f}", f"{cg_s / ch_s:.2f}x", f"{diff:.1e}",
               f"{one_s:.2f}", f"{one_s / ch_s:.2f}x", "yes" if same_z else "NO",
               support_s, ratio, per_class_s, speedup, same, ls_s, f"{acc_zs:.1f}/{acc_zlap:.1f}/{acc_ls}",
               f"{half_s:.2f}", f"{full_s:.2f}", f"{full_s / half_s:.2f}x", "yes" if same_sims else "NO", reordered)
        echo(lines, "| " + " | ".join(str(v) for v in row) + " |")
    if not args.no_page:
        write_page("zlap-speed", "ZLaP speed", "\n".join(lines),
                   intro="Side by side in one run (`benchmarks/bench_zlap.py`): zsadapt's ZLaP stages "
                         "(`robust=False`, no calibration), the solve stage by block CG and by Chebyshev "
                         "iteration on the same graph (in cache-sized column blocks, and in one block), "
                         "the class-support step `robust=True` adds (and its "
                         "cost over ZLaP's), the official per-class CG, the matmul floor of exact kNN, and "
                         "the pool's own kNN from half the product against the full product.")


if __name__ == "__main__":
    main()
