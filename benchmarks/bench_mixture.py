"""GMM and TransCLIP speed, side by side in one run, on synthetic CLIP-like pools (d = 512).

For each (N, C) it times, on the same pool and for the same number of iterations:

* ``gmm``: zsadapt's GMM (float32, log-likelihood expanded into matmuls, chunked over N), against
  ``gmm float64``: a straightforward float64 implementation of the same EM updates with explicit
  (chunk, C, d) residual tensors, and against scikit-learn's ``GaussianMixture`` started from the
  same parameters: ``"diag"`` (per-component diagonal covariances: a richer model, sklearn's fastest
  path) and ``"tied"`` (a shared full covariance: the closest model; its E-step is O(N C d^2), so it
  is skipped above 2e11 multiply-adds);
* ``transclip``: zsadapt's TransCLIP (float32) against ``transclip float64 (official structure)``:
  float64, the Gaussian term as (chunk, C, d) residual tensors as in the official code's
  ``Gaussian.forward``, the variance update over (chunk, C, d) tensors, a per-class loop in the mean
  initialisation, a sparse COO affinity. Both use zsadapt's chunked kNN for the affinity (the
  official code forms the dense N x N similarity matrix, which does not fit at N = 50k in float64).

Both zsadapt solvers run with ``robust=False`` here, the algorithm the float64 versions
implement; the step that ``robust=True`` (the default) adds is timed on its own (``class
support``: the variational-Bayes presence fit on the zero-shot probabilities and, where it would
drop classes, the 2-fold held-out check of four GMM fits on half pools). ``--support-only`` times
just that step. ``--tiny`` measures accuracy instead, on pools of a few random images (2, 5, 30) of
the built-in pool and of Stanford Cars (``ZSADAPT_DATA``): zero-shot, ``gmm``, ``transclip`` and the
published ``transclip`` (robust=False), mean over draws; it writes ``docs/results/tiny-pools.md``.

It prints seconds, accuracy, the agreement of the labels, and the speed-up ratios.

    python benchmarks/bench_mixture.py                              # N = 10k, 50k x C = 100, 1000
    python benchmarks/bench_mixture.py --sizes 10000x100 --iters 3  # a quick run
    python benchmarks/bench_mixture.py --device cuda --no-sklearn
    ZSADAPT_DATA=../shared/data python benchmarks/bench_mixture.py --tiny
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import zsadapt
from results_page import echo, write_page
from timing import timed
from zsadapt.graphs import knn
from zsadapt.shared_pools import load_shared_pool
from zsadapt.solvers import Problem, get_solver
from zsadapt.solvers.pool_analysis import supported_classes

#: Elements of a (chunk, C, d) float64 block in the straightforward versions (256 MiB).
DENSE_BLOCK = 1 << 25


def dense_loglik(X, mu, var):
    """-1/2 sum_j (x_j - mu_cj)^2 / v_j - 1/2 sum log v - d/2 log 2 pi via (chunk, C, d) residuals."""
    n, d = X.shape
    chunk = max(1, DENSE_BLOCK // (mu.shape[0] * d))
    out = torch.empty(n, mu.shape[0], dtype=X.dtype, device=X.device)
    const = -0.5 * torch.log(var).expand(d).sum() - 0.5 * d * np.log(2 * np.pi)
    for s in range(0, n, chunk):
        residual = X[s:s + chunk, None, :] - mu[None]  # (b, C, d)
        out[s:s + chunk] = -0.5 * torch.einsum("bcd,d->bc", residual ** 2, (1 / var).expand(d)) + const
    return out


def dense_variance(X, z, mu):
    """sum_ic z_ic (x_i - mu_c)^2 / sum z over (chunk, C, d) residuals, (d,)."""
    n, d = X.shape
    chunk = max(1, DENSE_BLOCK // (mu.shape[0] * d))
    total = torch.zeros(d, dtype=X.dtype, device=X.device)
    for s in range(0, n, chunk):
        total += torch.einsum("bc,bcd->d", z[s:s + chunk], (X[s:s + chunk, None, :] - mu[None]) ** 2)
    return total / z.sum()


def gmm_float64(X, T, iters, reg=1e-6):
    """The same EM as solvers/gmm.py (init=zeroshot, diag), float64, dense residuals."""
    X, T = X.double(), T.double()
    r = torch.softmax(100 * X @ T.T, dim=1)
    path = []
    for it in range(iters + 1):
        nk = r.sum(0)
        mu = (r.T @ X) / nk.clamp_min(1e-12)[:, None]  # the same guard as mixture.weighted_means
        var = dense_variance(X, r, mu) + reg
        log_joint = torch.log(nk / X.shape[0]) + dense_loglik(X, mu, var)
        evidence = torch.logsumexp(log_joint, dim=1)
        r = torch.exp(log_joint - evidence[:, None])
        path.append(float(evidence.mean()))
    return r.argmax(1), path[:-1]


def transclip_float64(X, T, rounds, k=3):
    """The published zero-shot TransCLIP updates in the official code's structure, float64."""
    X, T = X.double(), T.double()
    n, d = X.shape
    c = T.shape[0]
    y_hat = torch.softmax(100 * X @ T.T, dim=1)
    z = y_hat.clone()
    top = torch.topk(z, 8, dim=0).indices  # (8, C)
    mu = torch.zeros(c, d, dtype=X.dtype, device=X.device)
    for cls in range(c):  # per-class loop, as in the official init
        rows = top[:, cls]
        mu[cls] = (X[rows] * z[rows, cls, None]).mean(0)
    mu = mu / mu.norm(dim=1, keepdim=True)
    var = torch.full((d,), 1.0 / d, dtype=X.dtype, device=X.device)
    sims, idx = knn(X.float(), X.float(), k, exclude_self=True)
    rows = torch.arange(n, device=X.device).repeat_interleave(k)
    W = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), sims.reshape(-1).double(), (n, n),
                                check_invariants=False)
    for r in range(rounds + 1):
        loglik = dense_loglik(X, mu, var)
        for _ in range(5):
            inter = loglik + (50 / (2 * k)) * (W.T @ z + W @ z)
            inter = inter - inter.max(dim=1, keepdim=True).values
            inter = y_hat * torch.exp(inter / 50)
            z = inter / inter.sum(dim=1, keepdim=True)
        if r == rounds:
            break
        mu = (z.T @ X) / z.sum(0)[:, None]
        mu = mu / mu.norm(dim=1, keepdim=True)
        var = dense_variance(X, z, mu)
    return z.argmax(1)


def sklearn_gmm(X, log_pi, means, var, iters, covariance):
    c, d = means.shape
    prec = 1.0 / var.expand(d).double().cpu().numpy()
    precisions = np.tile(prec, (c, 1)) if covariance == "diag" else np.diag(prec)
    weights = torch.exp(log_pi.double()).cpu().numpy()
    model = GaussianMixture(
        c, covariance_type=covariance, weights_init=weights / weights.sum(),
        means_init=means.double().cpu().numpy(), precisions_init=precisions, max_iter=iters, tol=0.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    return model.predict(X)


def time_support(X, T, device):
    """(seconds, info) of the class-support step robust=True adds before gmm and transclip."""
    support, seconds = timed(lambda: supported_classes(X, torch.log_softmax(100 * X @ T.T, dim=1)), device)
    return seconds, support.info()


def run(n, c, d, device, iters, rounds, use_sklearn, support_only):
    # text_noise 5: zero-shot well below 100% at d = 512, like CLIP on fine-grained data
    pool = zsadapt.make_pool(n_images=n, n_classes=c, dim=d, seed=0, imbalance=0.5, text_noise=5.0)
    X = torch.tensor(pool.image_features, device=device)
    T = torch.tensor(pool.text_features, device=device)
    if support_only:
        seconds, info = time_support(X, T, device)
        print(f"N={n} C={c} d={d}: class support {seconds:.2f} s, {info}", flush=True)
        return
    y = pool.labels
    acc = lambda labels: zsadapt.accuracy(np.asarray(labels.cpu() if torch.is_tensor(labels) else labels), y)  # noqa: E731
    rows = []
    zero = acc((X @ T.T).argmax(1))
    print(f"\nN={n} C={c} d={d} device={device}: zero-shot {zero:.2f}%", flush=True)

    t_support, support_info = time_support(X, T, device)
    solver = get_solver("gmm")(tol=0.0, max_iter=iters, robust=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        out, t_ours = timed(lambda: solver.fit(Problem(X, T)), device)
    ours_labels = out.probs.argmax(1)
    rows.append(("gmm (zsadapt, float32)", t_ours, acc(ours_labels), 1.0))
    (ref_labels, ref_path), t_ref = timed(lambda: gmm_float64(X, T, iters), device)
    same = float((ref_labels == ours_labels).double().mean()) * 100
    rows.append(("gmm float64 (N,C,d) chunks", t_ref, acc(ref_labels), same))
    print(f"  gmm mean log-likelihood path, max relative difference to float64: "
          f"{max(abs(a - b) / abs(b) for a, b in zip(out.info['log_likelihood'], ref_path)):.2e}", flush=True)
    if use_sklearn:
        init = solver._m_step(X, torch.softmax(100 * X @ T.T, dim=1))  # init=zeroshot: one M-step
        Xn = pool.image_features.astype(np.float64)
        labels, t_sk = timed(lambda: sklearn_gmm(Xn, *init, iters, "diag"), device)
        rows.append(("sklearn GaussianMixture diag", t_sk, acc(labels), float((labels == ours_labels.cpu().numpy()).mean()) * 100))
        if n * c * d * d <= 2e11:
            labels, t_sk = timed(lambda: sklearn_gmm(Xn, *init, iters, "tied"), device)
            rows.append(("sklearn GaussianMixture tied", t_sk, acc(labels), float((labels == ours_labels.cpu().numpy()).mean()) * 100))
        else:
            print("  sklearn tied skipped: its E-step is O(N C d^2)", flush=True)

    tc = get_solver("transclip")(outer_iter=rounds, robust=False)
    out, t_tc = timed(lambda: tc.fit(Problem(X, T)), device)
    tc_labels = out.probs.argmax(1)
    rows.append(("transclip (zsadapt, float32)", t_tc, acc(tc_labels), 1.0))
    ref, t_tref = timed(lambda: transclip_float64(X, T, rounds), device)
    rows.append(("transclip float64 official structure", t_tref, acc(ref), float((ref == tc_labels).double().mean()) * 100))

    rows.append(("class support (robust=True's extra step)", t_support, float("nan"), 1.0))
    print(f"  class support: {support_info}", flush=True)
    print(f"  {'implementation':<38} {'seconds':>9} {'acc %':>7} {'same labels %':>14}")
    for name, seconds, accuracy, same in rows:
        same_text = "-" if same == 1.0 else f"{same:.2f}"
        print(f"  {name:<38} {seconds:9.2f} {accuracy:7.2f} {same_text:>14}")
    print(f"  ratios: gmm float64 / zsadapt = {rows[1][1] / t_ours:.1f}x", end="")
    for name, seconds, _, _ in rows[2:-3]:
        print(f"; {name.split()[-1]} sklearn / zsadapt = {seconds / t_ours:.1f}x", end="")
    print(f"; transclip float64 / zsadapt = {t_tref / t_tc:.1f}x", flush=True)


TINY_SIZES = (2, 5, 30)
TINY_METHODS = (("gmm", {}), ("transclip", {}), ("transclip published", {"robust": False}))


def tiny_pools(draws):
    """Mean accuracy (%) over ``draws`` random pools of N images (N in TINY_SIZES), one table."""
    pools = {"built-in (30 classes)": zsadapt.make_pool(seed=0)}
    if os.environ.get("ZSADAPT_DATA"):
        pools["Stanford Cars (196)"] = load_shared_pool(os.environ["ZSADAPT_DATA"], "stanford_cars_val")
    lines = []
    echo(lines, f"Mean accuracy (%) over {draws} random pools of N images (seeded draws).\n")
    echo(lines, "| pool | N | zero-shot | " + " | ".join(name for name, _ in TINY_METHODS) + " |")
    echo(lines, "|---|---:|---:|" + "---:|" * len(TINY_METHODS))
    for pool_name, pool in pools.items():
        for n in TINY_SIZES:
            rng = np.random.default_rng(n)
            scores = np.zeros(1 + len(TINY_METHODS))
            for _ in range(draws):
                rows = rng.choice(pool.labels.size, n, replace=False)
                images, truth = pool.image_features[rows], pool.labels[rows]
                scores[0] += np.mean((images @ pool.text_features.T).argmax(1) == truth)
                for j, (name, params) in enumerate(TINY_METHODS, start=1):
                    result = zsadapt.refine(images, pool.text_features, name.split()[0], **params)
                    scores[j] += np.mean(result.labels == truth)
            cells = " | ".join(f"{100 * v / draws:.1f}" for v in scores)
            echo(lines, f"| {pool_name} | {n} | {cells} |")
    write_page("tiny-pools", "GMM and TransCLIP on pools of a few images", "\n".join(lines),
               intro="Issue 13 item 14: on 2-image pools the published TransCLIP updates collapse "
                     "(the shared variance shrinks onto the images); `robust=True` keeps the initial "
                     "variance when a pool has fewer images than classes.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000x100,10000x1000,50000x100,50000x1000",
                        help="comma-separated NxC")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10, help="EM iterations for every GMM")
    parser.add_argument("--rounds", type=int, default=10, help="TransCLIP outer rounds (published: 10)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--support-only", action="store_true", help="time only robust=True's class-support step")
    parser.add_argument("--tiny", action="store_true", help="accuracy on pools of 2, 5, 30 images instead")
    parser.add_argument("--draws", type=int, default=10, help="random pools per size for --tiny")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            tiny_pools(args.draws)
        return
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"GMM {args.iters} EM iterations, TransCLIP {args.rounds} rounds")
    for size in args.sizes.split(","):
        n, c = (int(v) for v in size.lower().split("x"))
        run(n, c, args.dim, device, args.iters, args.rounds, not args.no_sklearn, args.support_only)


if __name__ == "__main__":
    main()
