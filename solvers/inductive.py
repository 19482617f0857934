"""Neighbour transfer: one inductive rule for every transductive solver.

A transductive fit refines the probabilities Z (N, C) of the pool it was given. An image that was
not in the pool has no row of Z, and each method's own inductive rule (an E-step with the fitted
mixture, ZLaP's dual solution) keeps only part of what made the transduction work: the zero-shot
prior, or the neighbours, or neither (Cars, fit on a random half, predict the other half,
zero-shot 59.78%: gmm's E-step 39.73, zlap's dual 50.61, transclip 51.71, em 53.55). This rule
keeps all of it. For a new image x (unit row), four log-linear experts over the classes c:

* the zero-shot prior  f0_c(x) = log softmax_c(s x . t_c)  (T = (t_c) the initial classifier
  (C, d), s its logit scale, 100 for CLIP), where the transduction started from;
* the neighbours  f1_c(x) = log q_c(x),  q(x) = (sum_j w_j Z_j + w_0 pi) / (sum_j w_j + w_0)
  over the k nearest pool images j (cosine similarity s_j, w_j = max(s_j, 0)), pi = mean_i Z_i
  the pool's class proportions and w_0 = min_j w_j one pseudo-neighbour holding them (a class no
  neighbour votes for keeps the pool's share instead of probability 0);
* the refined class centroids  f2_c(x) = s x . m_c,  m_c = sum_i Z_ic x_i / |sum_i Z_ic x_i|;
* the method's own inductive rule  f3_c(x) = log((1 - eps) p_own,c(x) + eps / C)  (eps =
  :data:`OWN_MIX`), where the method has one;

combined as p(x) ∝ exp(a f0 + b f1 + c f2 + e f3). With (a, b, c, e) = (1, 0, 0, 0) it is
zero-shot; with (0, 0, 0, 1) the method's own rule. An image that is in the pool (cosine at least
:data:`SAME_IMAGE` to a pool image) gets the transduction's own row of Z instead, so
``fit(X).predict(X)`` labels X as the transduction did.

The weights are neither tuned per pool nor set by hand: they are fitted, without labels, to make
the rule reproduce the transduction on images it has not seen (cross-fitting). A seeded
:data:`HOLDOUT` share H of the pool is held out, the solver is re-run on the rest R alone
(``refit``), the rule is built from R's refined probabilities and R's own rule, and the weights
minimise its cross-entropy to the full transduction's Z on H, the images "new" to it labelled as
the transduction labels them when they are in the pool:

    (a, b, c, e) = argmin  -(1/|H|) sum_{i in H} sum_c Z_ic log p_c(x_i | rule from R),

convex in the weights (a multinomial logistic model with four features; projected Newton, all
weights >= 0, on at most :data:`FIT_ROWS` rows). Where neighbours, centroids or the method's own
rule carry the transduction to new images the fit weighs them; where they do not (on Stanford
Cars, with about four images per class in a half pool, a new image's neighbours mostly belong to
other classes, and the mixtures' E-steps fall far below zero-shot) it keeps a large and the rest
small: close to zero-shot. Because the target is the soft Z, the probabilities are on the
transduction's scale. The held-out share is small (20%) so that R's fit is nearly the full one;
with half the pool held out the rule under-used the transduction (Flowers, gmm, without f3:
62.9% on the test images with half held out, 68.6% with 20%).

Without ``refit`` the weights are fitted by leave-one-out on the pool instead (each pool image
predicted from the others, its own share removed from pi and the centroids exactly; no f3). That
is optimistic, because the neighbours' Z was fitted with the left-out image in the pool: on Cars
half pools it chose centroid weights that put transclip and em 2.7 and 2.9 points below
zero-shot on the other half (cross-fitting, without f3: 0.4 above and 1.0 below); pass
``refit`` whenever the solver can be re-run.

Solvers use it through :func:`attach_transfer` at the end of ``fit`` (nothing is computed then:
the transduction's outputs are unchanged and a fit never used inductively costs nothing more)
and :func:`transferred` in ``predict`` (the ``predict`` of :class:`TransfersToNewImages`, a mixin
around the solver's ``_own_predict``), which fits the rule on first use (:func:`ensure_transfer`;
also run by ``Solver.fitted_state`` before a model file is written, and before pickling). The
re-run costs about one fit on 80% of the pool.

Fitted state (what a model file stores, :mod:`zsadapt.models`): the pool features as float16
(N, d) and the top-``top`` entries of each row of Z (values float16, classes int32, renormalised),
pi (C,), the centroid sums (C, d), T (C, d) and the weights: 2 d + 6 ``top`` bytes per pool image
(1072 bytes at d = 512, ``top`` = 8) plus 8 C d + 4 C bytes, besides the method's own state.

Direct use (numpy in gives numpy out, torch in gives torch out)::

    rule = NeighbourTransfer().fit(pool, Z, classifier, refit=lambda rows: (Z_of_a_fit_on(rows), None))
    probs = rule.predict(new_images)  # (M, C)
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..arrays import like_input, resolve_device, to_tensor
from ..graphs import knn
from ..zeroshot import CLIP_LOGIT_SCALE
from .base import NotFittedError
from .mixture import log_softmax_rows

#: At most this many evenly spaced held-out rows fit the weights (a, b, c).
FIT_ROWS = 4096

#: Newton iterations of the weight fit (a 3-parameter convex problem: a handful suffice).
NEWTON_STEPS = 30

#: Share of the pool held out by cross-fitting (the solver is re-run on the rest).
HOLDOUT = 0.2

#: The own rule's probabilities are mixed with this share of the uniform distribution before the
#: log: a class it gives probability 0 (one its fit left out) costs log(OWN_MIX / C), not -inf, so
#: one disagreement over which classes exist does not veto the expert.
OWN_MIX = 1e-3

#: A new image at least this similar (cosine) to a pool image is that image: it gets the
#: transduction's probabilities for it (the stored top-``top`` entries of its row of Z).
SAME_IMAGE = 1 - 1e-3

#: Below this many pool images the rule is zero-shot (too few to split and to have neighbours).
MIN_POOL = 16

#: Principal directions of the pool on which new images are compared with pool images to find the
#: ones that can be pool images (an exact filter: a projection cannot lengthen a difference). More
#: directions pass fewer rows that are not pool images, fewer make the k-d tree query cheaper.
#: Cars pool, 65,536 new rows (pool images plus noise of norm 0.5, benchmarks/bench_label.py):
#: the k-d tree query passed 14,747 rows in 0.07 s with 8 directions, 411 in 0.09 s with 16, none
#: in 0.13 s with 32 (a passed row then costs a query of the pool images near it).
FILTER_DIMS = 16

#: Added to the filter's squared-distance bound, so that float32 rounding cannot drop a pool image.
FILTER_SLACK = 1e-3

#: ``predict`` works through new images in blocks of this many (row, class) entries (4 MiB in
#: float32): its (rows, C) temporaries then stay in the CPU's cache.
PREDICT_BLOCK_ELEMENTS = 1 << 20

#: ... and of at least this many rows, so that with very many classes (C = 20,000: 52 rows) the
#: per-block cost of a few dozen small operations does not dominate (zsadapt.labelling's
#: ``LABEL_BLOCK_MIN_ROWS`` has the measurement, for both floors together).
MIN_BLOCK_ROWS = 256

Refit = Callable[[torch.Tensor], torch.Tensor]


class NeighbourTransfer:
    """Label new images from a fitted pool: zero-shot prior x neighbours x refined centroids x the
    method's own rule (module docstring).

    Parameters
    ----------
    k : int
        Pool neighbours per new image (cosine similarity; fewer when the pool is smaller).
    top : int
        Entries of each pool row of Z kept (the rest are 0; rows renormalised). 0 keeps all C.
    seed : int
        Seed of the cross-fitting split.

    Attributes
    ----------
    pool_ : (N, d) float16 tensor
        The fitted pool's unit rows.
    values_, classes_ : (N, s) float16 and int32 tensors
        The kept entries of each row of Z and their classes.
    prior_ : (C,) tensor
        pi, the pool's class proportions.
    sums_ : (C, d) tensor
        The centroid sums S = Z^T X.
    classifier_ : (C, d) tensor
        The initial classifier T.
    logit_scale_ : float
    weights_ : tuple of float
        (a, b, c) or (a, b, c, e).
    criterion_ : str
        How they were fitted: "cross-fit", "leave-one-out" or "zero-shot".
    heldout_agreement_ : float
        Share of the held-out rows whose fitted label equals the transduction's.
    """

    def __init__(self, k: int = 10, top: int = 8, seed: int = 0) -> None:
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"NeighbourTransfer: k must be an int >= 1, got {k!r}")
        if not (isinstance(top, int) and top >= 0):
            raise ValueError(f"NeighbourTransfer: top must be an int >= 0, got {top!r}")
        self.k, self.top, self.seed = k, top, seed

    # --- fit ---------------------------------------------------------------------------------

    def fit(self, pool: Any, refined: Any, classifier: Any, *, logit_scale: float = CLIP_LOGIT_SCALE,
            refit: Optional[Refit] = None) -> "NeighbourTransfer":
        """Store the pool and fit the weights (a, b, c), and e with an own rule (module docstring).

        Parameters
        ----------
        pool : (N, d) image features the transduction was fitted on (rows are L2-normalised here)
        refined : (N, C) its probabilities Z (rows sum to 1)
        classifier : (C, d) unit rows of the initial classifier it started from
        logit_scale : float
            s in the zero-shot expert log softmax(s x T^T).
        refit : callable, optional
            ``refit(index)`` with ``index`` (n,) int64 rows of ``pool`` returns ``(probs, own)``:
            the (n, C) probabilities of the same solver fitted on those rows alone (cross-fitting)
            and None or that fit's own inductive rule, a callable (M, d) -> (M, C) probabilities
            (then a fourth expert, f3 = log of it, weighted with the others). None: leave-one-out
            on the pool (optimistic; module docstring).

        Returns
        -------
        self
        """
        device = resolve_device(None, pool)
        # float64 stays float64 (reference tests); anything else computes in float32.
        dtype = torch.float64 if getattr(pool, "dtype", None) in (torch.float64, np.float64) else torch.float32
        X = to_tensor(pool, "pool", device, dtype=dtype)
        Z = to_tensor(refined, "refined probabilities", device, dtype=dtype)
        T = to_tensor(classifier, "classifier", device, dtype=dtype)
        if X.ndim != 2 or Z.ndim != 2 or T.ndim != 2 or Z.shape[0] != X.shape[0] or T.shape != (Z.shape[1], X.shape[1]):
            raise ValueError(f"NeighbourTransfer.fit: pool (N, d), refined (N, C) and classifier (C, d) expected, "
                             f"got {tuple(X.shape)}, {tuple(Z.shape)}, {tuple(T.shape)}")
        if X.shape[0] < 1:
            raise ValueError("NeighbourTransfer.fit: the pool is empty")
        X = _unit(X)
        Z = _rows_to_one(Z.clamp_min(0))
        self.classifier_, self.logit_scale_ = _unit(T), float(logit_scale)
        self._store(X, Z)
        n = X.shape[0]
        if n < MIN_POOL:
            self.weights_, self.criterion_, self.heldout_agreement_ = (1.0, 0.0, 0.0), "zero-shot", float("nan")
            return self
        if refit is None:
            rows = torch.arange(0, n, max(1, math.ceil(n / FIT_ROWS)), device=device)
            features = self._features(X[rows], loo=(rows, Z[rows]))
            target, self.criterion_ = Z[rows], "leave-one-out"
        else:
            generator = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(n, generator=generator).to(device)
            cut = n - max(1, round(HOLDOUT * n))
            first, second = order[:cut].sort().values, order[cut:].sort().values
            second = second[:: max(1, math.ceil(second.shape[0] / FIT_ROWS))]
            probs, own = refit(first)
            part = copy.copy(self)
            part._store(X[first], _rows_to_one(to_tensor(probs, "refit probabilities", device, dtype=dtype).clamp_min(0)))
            features = part._features(X[second])
            if own is not None:
                own_log = _own_log(own(X[second]))
                features = torch.cat([features, own_log.double()[..., None]], dim=2)
            target, self.criterion_ = Z[second], "cross-fit"
        self.weights_, self.heldout_agreement_ = _fit_weights(features, target)
        return self

    def _store(self, X: torch.Tensor, Z: torch.Tensor) -> None:
        """The state of a pool X (N, d) with refined probabilities Z (N, C)."""
        self.prior_ = Z.mean(dim=0)  # (C,) pi
        self.sums_ = Z.T @ X  # (C, d) S = Z^T X, the unnormalised class centroids
        self.pool_ = X.to(torch.float16)
        s = Z.shape[1] if not self.top or self.top >= Z.shape[1] else self.top
        top = torch.topk(Z, s, dim=1)
        self.values_ = _rows_to_one(top.values).to(torch.float16)  # (N, s)
        self.classes_ = top.indices.to(torch.int32)  # (N, s)

    # --- the experts ---------------------------------------------------------------------------

    def _features(self, X: torch.Tensor, loo: Optional[tuple] = None) -> torch.Tensor:
        """(M, C, 3) float64: f0, f1, f2 for unit rows X (M, d). ``loo``: (rows (M,), Z rows
        (M, C)) when X are pool images, each left out of its neighbours, pi and the centroids."""
        own = None if loo is None else loo[1]
        return torch.stack([
            self._zeroshot(X).double(),
            self._neighbours(X, exclude=None if loo is None else loo[0], own=own).double(),
            self._centroids(X, own=own).double(),
        ], dim=2)

    def _zeroshot(self, X: torch.Tensor) -> torch.Tensor:
        """f0 = log softmax(s X T^T), (M, C)."""
        return torch.log_softmax(self.logit_scale_ * X @ self.classifier_.T, dim=1)

    def _knn(self, X: torch.Tensor, extra: int = 0) -> tuple:
        """The min(k, N - extra) + extra nearest pool images of each row of X: (M, k') similarities
        and indices."""
        n = self.pool_.shape[0]
        return knn(X, self.pool_.to(X.dtype), min(self.k, n - extra) + extra)

    def _neighbours(self, X: torch.Tensor, exclude: Optional[torch.Tensor] = None,
                    own: Optional[torch.Tensor] = None, found: Optional[tuple] = None) -> torch.Tensor:
        """f1 = log q (M, C): the similarity-weighted vote of each row's k nearest pool images and
        one pseudo-neighbour holding pi (module docstring). ``exclude`` (M,): each row's own pool
        index, left out of its neighbours, and ``own`` (M, C) its Z, removed from pi. ``found``:
        :meth:`_knn` of X, when already computed."""
        n = self.pool_.shape[0]
        extra = 0 if exclude is None else 1
        k = min(self.k, n - extra)
        if k < 1:
            return torch.log(self.prior_.clamp_min(torch.finfo(X.dtype).tiny)).expand(X.shape[0], -1)
        sims, idx = found if found is not None else self._knn(X, extra)  # (M, k [+ 1])
        prior = self.prior_[None, :]  # (1, C)
        if exclude is not None:
            keep = idx != exclude[:, None]
            keep[keep.all(dim=1), -1] = False  # own row not found (a duplicate ranked first): drop the last
            sims, idx = sims[keep].view(-1, k), idx[keep].view(-1, k)
            prior = ((n * prior - own) / (n - 1)).clamp_min(0)  # (M, C) pi without the row itself
        weights = sims.clamp_min(0)  # (M, k) w_j = max(s_j, 0)
        vote = weights.min(dim=1, keepdim=True).values.clamp_min(1e-3) * prior  # (M, C) w_0 pi
        values, classes = self.values_.to(X.dtype), self.classes_.long()
        for j in range(k):  # k (M, s) scatters, never an (M, k, C) tensor
            vote = vote.scatter_add(1, classes[idx[:, j]], weights[:, j:j + 1] * values[idx[:, j]])
        return torch.log(_rows_to_one(vote).clamp_min(torch.finfo(vote.dtype).tiny))

    def _centroids(self, X: torch.Tensor, own: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f2 = s cos(x, m_c) (M, C), m_c = S_c / |S_c|. ``own`` (M, C): the rows' own Z (they are
        pool images), removed from S exactly: x.S_c^-i = x.S_c - Z_ic and
        |S_c^-i|^2 = |S_c|^2 - 2 Z_ic x.S_c + Z_ic^2 (|x| = 1)."""
        dots = X @ self.sums_.T  # (M, C)
        norms = (self.sums_ * self.sums_).sum(dim=1)[None, :]  # (1, C)
        if own is not None:
            norms = norms - 2 * own * dots + own * own
            dots = dots - own
        return self.logit_scale_ * dots / norms.clamp_min(1e-12).sqrt()

    # --- predict -----------------------------------------------------------------------------

    def outputs(self, image: torch.Tensor, own: Optional[torch.Tensor] = None) -> tuple:
        """(log p, p), both (M, C), for unit rows ``image`` (M, d), a float tensor on the state's
        device; ``own`` (M, C): the solver's own inductive probabilities, needed when the rule
        weighs them.

        Computed in as few passes as the weights allow (:meth:`_fast_state`): a f0 + c f2 is one
        (M, d) x (d, C) product (log softmax's row constant cancels in the final one); the
        k-nearest-neighbour search against the pool runs only when the neighbours are weighed
        (b > 0); otherwise an exact filter finds the rows that can be pool images (their
        transduction's row of Z, :data:`SAME_IMAGE`) and only those are searched. p takes one
        exp per entry (:func:`~zsadapt.solvers.mixture.log_softmax_rows`)."""
        if not hasattr(self, "weights_"):
            raise NotFittedError("NeighbourTransfer: call fit first")
        a, b, c, *rest = self.weights_
        e = rest[0] if rest else 0.0
        stacked, pool_filter = self._fast_state(image.dtype)
        both = image @ stacked.T  # (M, C + r): [a s X T^T + c s X M^T, X P]
        n_classes = self.prior_.shape[0]
        logits = both[:, :n_classes]  # (M, C)
        if b:
            found = self._knn(image)  # (M, k) the nearest pool images
            logits = logits + b * self._neighbours(image, found=found)
            same = found[0][:, 0] >= SAME_IMAGE  # (M,) rows that are pool images
            nearest = found[1][same, 0]
        else:
            same, nearest = self._pool_images(image, both[:, n_classes:], pool_filter)
        if e:
            if own is None:
                raise ValueError("NeighbourTransfer: this rule weighs the solver's own predict; pass own=")
            logits.add_(_own_log(own), alpha=e)
        log_p, probs = log_softmax_rows(logits)  # (M, C) each
        if bool(same.any()):
            stored = torch.zeros(int(same.sum()), log_p.shape[1], dtype=log_p.dtype, device=log_p.device)
            stored.scatter_(1, self.classes_[nearest].long(), self.values_[nearest].to(log_p.dtype))
            stored = _rows_to_one(stored)
            probs[same] = stored
            log_p[same] = torch.log(stored.clamp_min(torch.finfo(log_p.dtype).tiny))
        return log_p, probs

    def _pool_images(self, image: torch.Tensor, projected: torch.Tensor, pool_filter: "PoolImageFilter") -> tuple:
        """Which rows of ``image`` (M, d) are pool images (cosine >= :data:`SAME_IMAGE` to one),
        and the most similar pool image of each: (M,) bool and (number of them,) int64. Only the
        rows the filter passes (``projected`` = X P, (M, r)) are compared with pool images: with
        the k-d tree, only with the pool images within its radius in the projection (all that
        can be that similar); otherwise with the whole pool."""
        candidates = pool_filter.passes(projected).nonzero()[:, 0]  # (m,)
        same = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
        if not candidates.numel():
            return same, candidates
        if pool_filter.tree is None:
            sims, idx = self._knn(image[candidates])
            hit = sims[:, 0] >= SAME_IMAGE
            same[candidates[hit]] = True
            return same, idx[hit, 0]
        balls = pool_filter.tree.query_ball_point(projected[candidates].double().numpy(), pool_filter.radius,
                                                  return_sorted=True)  # m lists of pool indices, ascending
        counts = torch.tensor([len(ball) for ball in balls])  # (m,)
        members = torch.from_numpy(np.concatenate(balls).astype(np.int64))  # (pairs,)
        owner = torch.repeat_interleave(torch.arange(len(balls)), counts)  # (pairs,) candidate of each pair
        cosine = (image[candidates[owner]] * self.pool_[members].to(image.dtype)).sum(dim=1)  # (pairs,)
        best = torch.full((len(balls),), -math.inf, dtype=cosine.dtype).scatter_reduce(0, owner, cosine, "amax")
        hit = best >= SAME_IMAGE  # (m,)
        # the lowest pool index among each hit's most similar pool images
        first = torch.where((cosine == best[owner]) & hit[owner], members, torch.iinfo(torch.int64).max)
        nearest = torch.full((len(balls),), torch.iinfo(torch.int64).max).scatter_reduce(0, owner, first, "amin")
        same[candidates[hit]] = True
        return same, nearest[hit]

    def _fast_state(self, dtype: torch.dtype) -> tuple:
        """([W; P^T] (C + r, d), F), derived from the fitted state once per weights and dtype and
        kept outside the instance (a model file does not hold them): W = s (a T + c M), M the unit
        centroids, so X W^T = a f0 + c f2 up to a row constant; F the :class:`PoolImageFilter` of
        the pool and P its (d, r) projection, so that one product gives the logits and the
        filter's coordinates."""
        key = (self.weights_, dtype, self.prior_.device)
        cached = _FAST.get(self)
        if cached is not None and cached[0] == key:
            return cached[1]
        a, _, c, *_ = self.weights_
        norms = (self.sums_ * self.sums_).sum(dim=1, keepdim=True).clamp_min(1e-12).sqrt()
        linear = (self.logit_scale_ * (a * self.classifier_ + c * self.sums_ / norms)).to(dtype)
        pool_filter = PoolImageFilter(self.pool_.to(dtype))
        state = (torch.cat([linear, pool_filter.projection.T]).contiguous(), pool_filter)
        _FAST[self] = (key, state)
        return state

    def uses_own(self) -> bool:
        """Whether :meth:`predict` needs the solver's own inductive probabilities."""
        return len(self.weights_) > 3 and self.weights_[3] > 0

    def predict(self, image: Any, own: Any = None) -> Any:
        """Probabilities (M, C) for new images (M, d) (numpy in, numpy out; torch in, torch out
        on its device). Rows are L2-normalised here. ``own`` (M, C): the solver's own inductive
        probabilities for them (when :meth:`uses_own`)."""
        if not hasattr(self, "weights_"):
            raise NotFittedError("NeighbourTransfer: call fit first")
        X = to_tensor(image, "image", self.prior_.device, dtype=self.prior_.dtype)
        if X.ndim != 2 or X.shape[1] != self.pool_.shape[1]:
            raise ValueError(f"NeighbourTransfer.predict: expected (M, {self.pool_.shape[1]}) images, "
                             f"got {tuple(X.shape)}")
        own_t = None if own is None else to_tensor(own, "own", X.device, dtype=X.dtype)
        return like_input(self.outputs(_unit(X), own_t)[1], image)

    def nbytes(self) -> int:
        """Bytes of the fitted tensors (what a model file holds for this rule)."""
        return sum(t.numel() * t.element_size() for t in
                   (self.pool_, self.values_, self.classes_, self.prior_, self.sums_, self.classifier_))


class PoolImageFilter:
    """Which new images can be pool images (cosine >= :data:`SAME_IMAGE` to one): an exact filter
    that never drops one, so that only the rows it passes need the search against the pool.

    For unit x and a pool row p (float16: |p| is not exactly 1), x . p >= 1 - delta gives
    |x - p|^2 <= B_p = |p|^2 - 1 + 2 delta, and an orthonormal projection P (d, r) cannot lengthen
    x - p: |P^T x - P^T p| <= sqrt(B_p). P holds the pool's top :data:`FILTER_DIMS` principal
    directions (where pool images differ most, so few of them lie near any x), and
    :data:`FILTER_SLACK` is added to B_p against float32 rounding.

    On the CPU the rows within sqrt(max_p B_p) of some P^T p are found by a k-d tree query
    (scipy's ``cKDTree``, exact with ``distance_upper_bound``): O(M log N) instead of the (M, N)
    product, which on the Cars pool (N = 1635) was a quarter of a labelling batch's predict; a
    passed row is then compared only with the pool images in its ball of that radius
    (:meth:`NeighbourTransfer._pool_images`). On other devices, one (M, r) x (r, N) product:
    2 (P^T x).(P^T p) - |P^T p|^2 + B_p >= |P^T x|^2 for some p, then a search of the whole pool.
    """

    def __init__(self, pool: torch.Tensor, tree: bool = True) -> None:
        """``pool`` (N, d) unit rows; ``tree``: False asks for the product on the CPU too (the
        k-d tree is CPU-only)."""
        r = min(FILTER_DIMS, pool.shape[1])
        centred = pool.double() - pool.double().mean(dim=0)
        _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        self.projection = vectors[:, -r:].to(pool.dtype).contiguous()  # (d, r) P, orthonormal columns
        pp = pool @ self.projection  # (N, r)
        length2 = (pool.double() * pool.double()).sum(dim=1)  # (N,) |p|^2
        bound = length2 - 1 + 2 * (1 - SAME_IMAGE) + FILTER_SLACK  # (N,) B_p with slack
        self.tree = None
        if tree and pool.device.type == "cpu":
            from scipy.spatial import cKDTree

            self.tree = cKDTree(pp.double().numpy())
            self.radius = float(bound.max().clamp_min(0).sqrt()) * (1 + 1e-6)
        else:
            self.doubled = (2 * pp).T.contiguous()  # (r, N): one addmm below
            self.offsets = (bound - (pp.double() * pp.double()).sum(dim=1)).to(pool.dtype)  # (N,)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(M,) bool: the rows of ``image`` (M, d), unit rows, that may be pool images."""
        return self.passes(image @ self.projection)

    def passes(self, px: torch.Tensor) -> torch.Tensor:
        """(M,) bool: which rows may be pool images, from their projections ``px`` = X P (M, r)."""
        if self.tree is not None:
            distance, _ = self.tree.query(px.double().numpy(), k=1, distance_upper_bound=self.radius)
            return torch.from_numpy(np.isfinite(distance))
        best = torch.addmm(self.offsets[None, :], px, self.doubled).amax(dim=1)  # (M,)
        return best >= (px * px).sum(dim=1)


def _own_log(probs: torch.Tensor) -> torch.Tensor:
    """f3 = log((1 - OWN_MIX) p_own + OWN_MIX / C), (M, C), for rows of probabilities ``probs``
    (every solver's own rule gives a softmax or normalised posteriors)."""
    return torch.log(probs.mul(1 - OWN_MIX).add_(OWN_MIX / probs.shape[1]))


def _unit(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)


def _rows_to_one(Z: torch.Tensor) -> torch.Tensor:
    return Z / Z.sum(dim=1, keepdim=True).clamp_min(torch.finfo(Z.dtype).tiny)


def _fit_weights(features: torch.Tensor, target: torch.Tensor) -> tuple:
    """(a, b, c) >= 0 minimising -mean_i sum_c target_ic log softmax(features_i theta)_c, by
    projected Newton steps with backtracking from zero-shot (1, 0, 0); and the share of rows
    whose argmax matches the target's. ``features`` (n, C, F) float64, ``target`` (n, C)."""
    target = target.double()
    theta = torch.zeros(features.shape[2], dtype=torch.float64, device=features.device)
    theta[0] = 1.0

    def loss(t: torch.Tensor) -> float:
        return float(-(target * torch.log_softmax(features @ t, dim=1)).sum(dim=1).mean())

    current = loss(theta)
    for _ in range(NEWTON_STEPS):
        p = torch.softmax(features @ theta, dim=1)  # (n, C)
        grad = ((p - target)[..., None] * features).sum(dim=1).mean(dim=0)  # (F,)
        centred = features - (p[..., None] * features).sum(dim=1, keepdim=True)  # (n, C, F)
        hess = torch.einsum("nc,nci,ncj->ij", p, centred, centred) / features.shape[0]  # (F, F)
        hess = hess + 1e-9 * torch.eye(hess.shape[0], dtype=hess.dtype, device=hess.device)
        direction = -torch.linalg.solve(hess, grad)
        size, moved = 1.0, False
        while size > 1e-6:  # backtracking: the loss must not go up
            candidate = (theta + size * direction).clamp_min(0.0)
            value = loss(candidate)
            if value <= current:
                moved = True
                break
            size /= 2
        if not moved:
            break
        change = float((candidate - theta).abs().max())
        theta, current = candidate, value
        if change < 1e-7:
            break
    agreement = float(((features @ theta).argmax(dim=1) == target.argmax(dim=1)).double().mean())
    return tuple(float(v) for v in theta), agreement


def fit_transfer(solver: Any, problem: Any, refined: torch.Tensor, *, own: bool = True,
                 **options: Any) -> NeighbourTransfer:
    """The :class:`NeighbourTransfer` of a fitted ``solver`` on ``problem`` (a
    :class:`~zsadapt.solvers.base.Problem`) whose transduction gave ``refined`` (N, C), cross-fitted
    by re-running a fresh solver of the same kind and settings on the pool less a held-out
    :data:`HOLDOUT` share (quietly; ``solver`` itself is untouched). ``own``: the solver's own
    ``predict`` is a fourth expert (its weight fitted with the others; the caller then passes
    its probabilities to :meth:`NeighbourTransfer.predict`). ``options`` go to the rule."""
    from .base import Problem, Solver

    has_own = type(solver).predict is not Solver.predict

    def refit(index: torch.Tensor) -> tuple:
        part = Problem(
            problem.image[index], problem.classifier, seed=problem.seed, progress=False,
            initial_logits=None if problem.initial_logits is None else problem.initial_logits[index],
            image_space=problem.image_space,
        )
        twin = type(solver)(**solver.config)
        _TWINS.add(twin)  # its fit leaves no rule pending (no cross-fit inside a cross-fit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probs = twin.fit(part).probs
        if not own or not has_own:
            return probs, None
        return probs, lambda images: twin.predict(images).probs  # the twin's predict is its own rule

    options.setdefault("seed", problem.seed)
    return NeighbourTransfer(**options).fit(problem.image, refined, problem.classifier, refit=refit)


#: Solvers whose rule is pending (what :func:`fit_transfer` needs), and the twins a cross-fit
#: re-runs (no rule of their own). Kept outside the solvers, so no model file or copy sees them.
_PENDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TWINS: "weakref.WeakSet" = weakref.WeakSet()

#: Per rule: the tables :meth:`NeighbourTransfer._fast_state` derives for predicting (not saved).
_FAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def attach_transfer(solver: Any, problem: Any, refined: torch.Tensor) -> None:
    """At the end of a solver's ``fit``: remember what its rule needs. The rule itself
    (:func:`fit_transfer`, which re-runs the solver) is fitted on first use, by :func:`ensure_transfer`
    (``predict``, or ``fitted_state`` for a model file), so a fit that is never used inductively
    costs nothing more. No rule in the twin a cross-fit re-runs, or on pools under
    :data:`MIN_POOL` images (``transfer_`` None: the method's own rule)."""
    solver.transfer_ = None
    _PENDING.pop(solver, None)
    if problem.image.shape[0] >= MIN_POOL and solver not in _TWINS:
        _PENDING[solver] = (problem, refined)


def ensure_transfer(solver: Any) -> Optional[NeighbourTransfer]:
    """``solver.transfer_``, fitted now if its ``fit`` left it pending (:func:`attach_transfer`);
    solvers held by ``solver`` (a delegate) are completed too."""
    source = _PENDING.pop(solver, None)
    if source is not None:
        solver.transfer_ = fit_transfer(solver, *source)
    from .base import Solver

    for value in list(vars(solver).values()):
        if isinstance(value, Solver) and value is not solver:
            ensure_transfer(value)
    return getattr(solver, "transfer_", None)


class TransfersToNewImages:
    """Mixin for a solver whose ``predict`` is the neighbour-transfer rule (:func:`transferred`)
    around its own inductive rule ``_own_predict(image)``; list it before
    :class:`~zsadapt.solvers.base.Solver` among the solver's bases."""

    def predict(self, image: torch.Tensor) -> Any:
        """New images (M, d): the neighbour-transfer rule (zero-shot prior, the pool's refined
        neighbours and centroids, and ``_own_predict``, weighted by cross-fitting), or
        ``_own_predict`` alone for a model without that rule."""
        return transferred(self, image, self._own_predict)  # type: ignore[attr-defined]


def transferred(solver: Any, image: torch.Tensor, own_predict: Callable) -> Any:
    """A solver's ``predict`` for new images (M, d), unit rows: the rule ``solver.transfer_`` (a
    :class:`~zsadapt.solvers.base.SolverOutput` with log-probabilities as scores), calling
    ``own_predict(image)`` (the method's own inductive rule) only when the rule weighs it; the
    own rule alone when there is no rule (a model saved before it, a tiny pool).

    Rows are predicted in blocks of :data:`PREDICT_BLOCK_ELEMENTS` / C rows: every step is row-wise,
    and each makes a few (rows, C) temporaries, which in small blocks stay in the CPU's cache
    (Cars, 65,536 rows at once: 1.53 s; in blocks of 4,096: 1.00 s)."""
    from .base import SolverOutput

    transfer = ensure_transfer(solver)
    if transfer is None:
        return own_predict(image)
    dtype = transfer.prior_.dtype
    n_classes = transfer.prior_.shape[0]
    step = max(MIN_BLOCK_ROWS, PREDICT_BLOCK_ELEMENTS // n_classes)
    log_p = image.new_empty(image.shape[0], n_classes)  # (M, C)
    probs = torch.empty_like(log_p)  # (M, C)
    for start in range(0, image.shape[0], step):
        rows = image[start:start + step].to(dtype)  # (b, d)
        own = own_predict(rows).probs.to(dtype) if transfer.uses_own() else None
        log_p[start:start + step], probs[start:start + step] = transfer.outputs(rows, own)
    return SolverOutput(scores=log_p, probs=probs, info={"inductive": "neighbour transfer"})
