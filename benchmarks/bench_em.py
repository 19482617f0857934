"""Time ``em`` against a straightforward float64 implementation of the same updates.

The reference is what one writes from the equations: numpy float64, one class at a time for the
squared distances sum_j (x_ij - mu_kj)^2 / v_j and for the variance's residuals. ``em`` expands
them into float32 matmuls chunked over N (zsadapt.solvers.mixture). Both run the same fixed number
of iterations from the same start on a synthetic CLIP-like pool; the table gives seconds per
iteration, the ratio, and the share of labels on which the two agree.

    python benchmarks/bench_em.py                                   # N = 10k, 50k x C = 100, 1000
    python benchmarks/bench_em.py --sizes 10000x100,10000x1000 --iters 3
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import zsadapt
from timing import timed


def reference_em(X, W, *, iters, lam, temperature, prior, logit_scale, mean_prior, var_prior):
    """The em updates in float64 numpy, class by class (no matmul expansion)."""
    X = X.astype(np.float64)
    W = W.astype(np.float64)
    n, d = X.shape
    C = W.shape[0]
    logits = logit_scale * X @ W.T
    log_y = logits - logits.max(1, keepdims=True)
    log_y -= np.log(np.exp(log_y).sum(1, keepdims=True))
    u = np.exp(log_y)
    xbar = X.mean(0)
    for _ in range(iters):
        counts = u.sum(0)
        pi = counts / counts.sum()
        means = np.empty((C, d))
        resid = np.zeros(d)
        for k in range(C):
            means[k] = (u[:, k] @ X + mean_prior * xbar) / (counts[k] + mean_prior)
            resid += u[:, k] @ (X - means[k]) ** 2
        var = (resid + var_prior / d) / (n + var_prior)
        loglik = np.empty((n, C))
        for k in range(C):
            loglik[:, k] = -0.5 * (((X - means[k]) ** 2) / var).sum(1)
        z = (loglik + lam * np.log(np.maximum(pi, 1e-12))) / temperature + prior * log_y
        z -= z.max(1, keepdims=True)
        u = np.exp(z)
        u /= u.sum(1, keepdims=True)
    return u


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000x100,10000x1000,50000x100,50000x1000", help="NxC,...")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = zsadapt.make_solver("em").config  # the defaults, resolved for the gaussian likelihood
    hyper = {k: defaults[k] for k in ("lam", "temperature", "prior", "logit_scale", "mean_prior", "var_prior")}
    print(f"device {args.device}, d = {args.dim}, {args.iters} iterations, torch threads {torch.get_num_threads()}")
    print("N       C     em s/iter  float64 s/iter  ratio  label agreement  acc em / ref / zero-shot")
    for size in args.sizes.split(","):
        n, c = (int(v) for v in size.lower().split("x"))
        pool = zsadapt.make_pool(n_images=n, n_classes=c, dim=args.dim, seed=0)
        X, W = pool.image_features, pool.text_features
        Xt = torch.from_numpy(X).to(args.device)
        Wt = torch.from_numpy(W).to(args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tol=0 hits max_iter by design
            zsadapt.refine(Xt[:200], Wt, "em", max_iter=1, tol=0.0)  # warm-up
            ours, seconds = timed(lambda: zsadapt.refine(Xt, Wt, "em", max_iter=args.iters, tol=0.0), Xt.device)
        t_ours = seconds / args.iters
        start = time.perf_counter()
        ref = reference_em(X, W, iters=args.iters, **hyper)
        t_ref = (time.perf_counter() - start) / args.iters
        labels = ours.labels.cpu().numpy()
        agree = float((labels == ref.argmax(1)).mean() * 100)
        zs = zsadapt.accuracy(zsadapt.refine(X, W, "zeroshot").labels, pool.labels)
        print(f"{n:<7} {c:<5} {t_ours:9.3f}  {t_ref:14.3f}  {t_ref / t_ours:5.1f}  {agree:14.2f}%  "
              f"{zsadapt.accuracy(labels, pool.labels):.2f} / {zsadapt.accuracy(ref.argmax(1), pool.labels):.2f}"
              f" / {zs:.2f}", flush=True)


if __name__ == "__main__":
    main()
