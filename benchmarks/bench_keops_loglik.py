"""The mixture solvers' log-evidence, torch matmuls against a pykeops reduction, side by side.

The quantity is the E-step's normaliser and the GMM's objective,

    log p(x_i) = logsumexp_c ( log pi_c + log N(x_i | mu_c, diag(v)) ),   i = 1..N,

computed two ways on the same inputs:

* ``torch``: :func:`zsadapt.solvers.mixture.gaussian_loglik` (the expansion -1/2 (x^2 . p) +
  x (mu p)^T - 1/2 (mu^2 . p) as a chunked matmul, (chunk, C) blocks) and ``torch.logsumexp``;
* ``keops``: a LazyTensor formula -1/2 |(x_i - mu_c) / sqrt(v)|^2 + log pi_c reduced by
  ``logsumexp`` over c, which never forms the (N, C) matrix.

This is the measurement the issue asks for before a pykeops path may replace the matmuls
("use it where it wins"); the first keops call per shape compiles a kernel, timed separately.
The table is also written to the docs site's results page ``docs/results/bench_keops_loglik.md``.

    python benchmarks/bench_keops_loglik.py                             # CPU, N = 10k, C = 100, 1000
    python benchmarks/bench_keops_loglik.py --device cuda --sizes 50000x1000,1000000x1000
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from results_page import echo, write_page
from timing import timed
from zsadapt.graphs import keops_available
from zsadapt.solvers.mixture import gaussian_loglik


def torch_log_evidence(X, means, var, log_pi):
    """(N,) log-evidence via the chunked matmul log-likelihood."""
    return torch.logsumexp(gaussian_loglik(X, means, var) + log_pi, dim=1)  # (N,)


def keops_log_evidence(X, means, var, log_pi):
    """(N,) log-evidence via a pykeops logsumexp reduction over the components."""
    from pykeops.torch import LazyTensor

    scale = var.rsqrt()  # (d,)
    x_i = LazyTensor((X * scale)[:, None, :].contiguous())  # (N, 1, d)
    mu_j = LazyTensor((means * scale)[None, :, :].contiguous())  # (1, C, d)
    pi_j = LazyTensor(log_pi[None, :, None].contiguous())  # (1, C, 1)
    quad = ((x_i - mu_j) ** 2).sum(-1)  # (N, C) symbolic
    const = -0.5 * torch.log(var).sum() - 0.5 * X.shape[1] * math.log(2 * math.pi)
    return (pi_j - 0.5 * quad).logsumexp(dim=1).view(-1) + const  # (N,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000x100,10000x1000", help="NxC pairs")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not keops_available():
        raise SystemExit("pykeops is not installed: pip install pykeops")
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    lines: list = []
    echo(lines, f"d = {args.dim}, device {device}, torch {torch.get_num_threads()} threads")
    echo(lines)
    echo(lines, "| N x C | torch s | keops s | keops compile s | keops / torch | max abs difference |")
    echo(lines, "|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n, c = (int(v) for v in size.split("x"))
        X = torch.nn.functional.normalize(torch.randn(n, args.dim, generator=gen), dim=1).to(device)  # (N, d)
        means = torch.nn.functional.normalize(torch.randn(c, args.dim, generator=gen), dim=1).to(device)  # (C, d)
        var = torch.full((args.dim,), 1.0 / args.dim, device=device)  # (d,)
        log_pi = torch.log_softmax(torch.randn(c, generator=gen), dim=0).to(device)  # (C,)
        reference, t_torch = timed(lambda: torch_log_evidence(X, means, var, log_pi), device)
        _, t_compile = timed(lambda: keops_log_evidence(X[:10], means, var, log_pi), device)
        keops, t_keops = timed(lambda: keops_log_evidence(X, means, var, log_pi), device)
        diff = float((keops - reference).abs().max())
        echo(lines, f"| {n} x {c} | {t_torch:.2f} | {t_keops:.2f} | {t_compile:.1f} | {t_keops / t_torch:.1f}x "
                    f"| {diff:.1e} |")
    page = write_page("bench_keops_loglik", "The mixtures' log-evidence: matmuls against pykeops", "\n".join(lines),
                      intro=("Seconds to compute log p(x_i) = logsumexp_c(log pi_c + log N(x_i | mu_c, diag v)) "
                             "for every image, with zsadapt's chunked matmuls and with a pykeops reduction "
                             "that never forms the (N, C) matrix, side by side on one device."))
    print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
