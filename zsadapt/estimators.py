"""scikit-learn estimators, one per method.

The class embeddings are a constructor parameter (like ``KMeans(init=array)``): ``fit(X)`` refines
the zero-shot predictions of the pool ``X`` and stores them in ``transduction_``; ``predict`` and
``predict_proba`` label new images inductively from the fitted state.

Without ``text_features``, ``fit(X, y)`` builds the initial classifier from the labels: each
class's prototype is the L2-normalised mean of its rows of ``X`` (a nearest-class-mean
classifier), and the solver then refines the predictions for all of ``X`` from those prototypes.
That makes every estimator a plain scikit-learn classifier. For a few labelled examples plus an
unlabelled pool, build the prototypes with :func:`zsadapt.class_prototypes` from the labelled
examples and pass them (the first of the two arrays it returns) as ``text_features``.

Fitted attributes (numpy): ``classes_`` (C,), ``transduction_`` (N,) labels of ``X``,
``label_distributions_`` (N, C) probabilities, ``n_iter_``, ``n_features_in_``, ``result_`` (the
:class:`~zsadapt.result.Result` of the fit) and ``solver_``.

Estimators whose method has a stream mode (``anchored``) also have ``partial_fit(X)``
(scikit-learn's incremental convention): each call refines one batch with what the earlier calls
taught it (:class:`zsadapt.Stream`, kept in ``stream_``) and sets the attributes above for that
batch; ``fit`` starts over.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_consistent_length, check_is_fitted, column_or_1d, validate_data

from .api import make_solver
from .arrays import resolve_device
from .initial import initial_problem
from .result import Result
from .validation import check_seed, l2_normalise, prepare_features


def class_prototypes(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Class prototypes: the L2-normalised mean of each class's L2-normalised features.

    Parameters
    ----------
    features : array-like, shape (M, d)
    labels : array-like, shape (M,)

    Returns
    -------
    prototypes : numpy.ndarray, shape (C, d), one row per class in ``classes`` order
    classes : numpy.ndarray, shape (C,), the sorted distinct labels

    Pass the prototypes as ``text_features``, and to ``GMM`` and ``Auto`` the number of examples
    per class as ``prior_images``: the mixture's class means are then anchored at the prototypes
    with that weight (:mod:`zsadapt.solvers.gmm`).
    """
    X = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = np.asarray(labels)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"class_prototypes: features (M, d) and labels (M,) expected, got {tuple(X.shape)} and {y.shape}")
    prototypes, classes = _prototypes(X, y)
    return prototypes.numpy(), classes


def _prototypes(X: torch.Tensor, y: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    classes, index = np.unique(y, return_inverse=True)
    X_unit, _ = l2_normalise(X, "features", allow_zero=True)  # (M, d)
    sums = torch.zeros(len(classes), X.shape[1], dtype=X.dtype, device=X.device)  # (C, d)
    sums.index_add_(0, torch.as_tensor(index.reshape(-1), device=X.device), X_unit)
    prototypes, _ = l2_normalise(sums, "class prototypes", allow_zero=True)
    return prototypes, classes


class TransductiveClassifier(ClassifierMixin, BaseEstimator):
    """Base class: subclasses set ``method`` and declare their hyper-parameters in ``__init__``.

    Attributes common to every subclass: ``text_features`` (C, d) array or None, ``device``
    (None: CPU for numpy input) and ``seed``.
    """

    method: str = ""
    #: Constructor arguments that are not solver hyper-parameters (``initial``: estimators that take
    #: it start from the text classifier or from InMaP proxies, see :func:`zsadapt.refine`).
    _non_solver_params = ("text_features", "device", "seed", "initial")

    def _solver_params(self) -> dict:
        return {k: v for k, v in self.get_params().items() if k not in self._non_solver_params}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = self.text_features is None
        tags.non_deterministic = False
        return tags

    def fit(self, X: Any, y: Optional[Any] = None) -> "TransductiveClassifier":
        """Refine the predictions for the pool ``X``.

        Parameters
        ----------
        X : array-like, shape (N, d)
            Image features of the pool.
        y : array-like of shape (N,), optional
            Ignored when ``text_features`` is set (but refused if its length is not N).
            Otherwise the labels to build the class prototypes from.

        Returns
        -------
        self
        """
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        self.__dict__.pop("stream_", None)  # a later partial_fit starts a new stream
        device = resolve_device(self.device, None)
        if self.text_features is not None:
            if y is not None:  # ignored, but a y of another length is a mistake worth naming
                check_consistent_length(X, y)
            _, classifier = prepare_features(X, self.text_features, device, image_name="X")
            self.classes_ = np.arange(classifier.shape[0])
        else:
            classifier = self._fit_prototypes(X, y, device)
        X_t, _ = l2_normalise(torch.as_tensor(X, dtype=torch.float32, device=device), "X", allow_zero=True)
        params = self._solver_params()
        solver = make_solver(self.method, **params)
        output = solver.fit(initial_problem(X_t, classifier, initial=getattr(self, "initial", "text"),
                                            logit_scale=params.get("logit_scale"), seed=check_seed(self.seed)))
        probs = output.probs.float().cpu().numpy()
        self.solver_ = solver
        self.label_distributions_ = probs
        self.transduction_ = self.classes_[probs.argmax(axis=1)]
        self.n_iter_ = int(output.info.get("iterations", 0))
        self.result_ = Result(
            labels=probs.argmax(axis=1),
            probs=probs,
            scores=output.scores.float().cpu().numpy(),
            method=self.method,
            params=dict(solver.config),
            info=dict(output.info),
        )
        return self

    def _has_stream_mode(self) -> bool:
        from .stream import stream_method

        try:
            return stream_method(self.method) == self.method
        except ValueError:
            return False

    @available_if(_has_stream_mode)
    def partial_fit(self, X: Any, y: Optional[Any] = None, classes: Optional[Any] = None) -> "TransductiveClassifier":
        """Refine the batch ``X`` (N, d) with what the earlier batches taught the estimator, then
        learn from it (:class:`zsadapt.Stream`, default forgetting ``zsadapt.stream.FORGETTING``).

        The first call starts the stream (class embeddings from ``text_features``, or prototypes
        from ``y`` as in :meth:`fit`; ``y`` is ignored afterwards); ``classes`` is accepted for
        scikit-learn's signature and ignored. ``transduction_``, ``label_distributions_`` and
        ``result_`` are those of this batch; ``predict`` uses the stream's latest state.

        Returns
        -------
        self
        """
        from .stream import Stream

        first = not hasattr(self, "stream_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=first)
        if first:
            device = resolve_device(self.device, None)
            if self.text_features is not None:
                _, classifier = prepare_features(X, self.text_features, device, image_name="X")
                self.classes_ = np.arange(classifier.shape[0])
            else:
                classifier = self._fit_prototypes(X, y, device)
            self.stream_ = Stream(classifier, self.method, device=device, seed=self.seed, **self._solver_params())
        result = self.stream_.refine(X.astype(np.float32, copy=False))
        self.solver_ = self.stream_.solver
        self.label_distributions_ = result.probs
        self.transduction_ = self.classes_[result.labels]
        self.n_iter_ = int(result.info.get("iterations", 0))
        self.result_ = result
        return self

    def _fit_prototypes(self, X: np.ndarray, y: Optional[Any], device: torch.device) -> torch.Tensor:
        """Unit class prototypes (C, d) from labels ``y``; sets ``classes_``."""
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None "
                "(give text_features for zero-shot use)"
            )
        y = column_or_1d(y, warn=True)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"y has {y.shape[0]} labels for {X.shape[0]} rows of X")
        check_classification_targets(y)
        prototypes, self.classes_ = _prototypes(torch.as_tensor(X, dtype=torch.float32, device=device), y)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes in y; got 1 class")
        return prototypes

    def _new_images(self, X: Any) -> torch.Tensor:
        """``X`` (M, d) as unit rows; an all-zero row is an error with class embeddings, as in
        ``fit`` (it has no direction), and left at zero for generic data fitted on labels."""
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        device = resolve_device(self.device, None)
        X_t, _ = l2_normalise(torch.as_tensor(X, dtype=torch.float32, device=device), "X",
                              allow_zero=self.text_features is None)
        return X_t

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (M, C) for new images ``X`` (M, d), inductively."""
        check_is_fitted(self)
        return self.solver_.predict(self._new_images(X)).probs.float().cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Class labels (M,) for new images ``X`` (M, d), inductively."""
        probs = self.predict_proba(X)  # (M, C); checks that the estimator is fitted
        return self.classes_[probs.argmax(axis=1)]

    def save(self, path: Any, *, classnames: Optional[list] = None, overwrite: bool = False) -> Any:
        """Save the fitted model to a ``.safetensors`` file (:func:`zsadapt.models.save_model`;
        load it with :func:`zsadapt.load_model`); returns the path."""
        from .models import FittedSolver, save_model, text_checksum

        check_is_fitted(self)
        checksum = None if self.text_features is None else text_checksum(self.text_features)
        fitted = FittedSolver(self.solver_, self.n_features_in_, len(self.classes_), checksum,
                              {"initial": getattr(self, "initial", "text"), "seed": self.seed},
                              text_features=self.text_features)
        return save_model(path, fitted, classnames=classnames, classes=self.classes_, overwrite=overwrite)


class ZeroShot(TransductiveClassifier):
    """The zero-shot baseline: softmax of ``logit_scale`` x cosine similarity to the classes.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    logit_scale : float, default 100
    device : str, optional
    seed : int, default 0
    """

    method = "zeroshot"

    def __init__(self, text_features=None, *, logit_scale=100.0, device=None, seed=0):
        self.text_features = text_features
        self.logit_scale = logit_scale
        self.device = device
        self.seed = seed


class ZLaP(TransductiveClassifier):
    """ZLaP label propagation (Stojnic et al., CVPR 2024); see :mod:`zsadapt.solvers.zlap`.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    k : int, default 5
        Image neighbours and class neighbours per image.
    gamma : float, default 5.0
        Power on image-to-class similarities.
    alpha : float, default 0.3
        Propagation weight in L = I - alpha Wn.
    tol : float, default 1e-6
        Conjugate-gradient relative tolerance.
    max_iter : int, default 50
        Conjugate-gradient iteration cap (``ConvergenceWarning`` when reached).
    scale_sim : bool, default False
        Min-max scale similarities before the gamma power (for image-space classifiers).
    degree_power : float, optional
        Multiply class c's scores by d_c^(degree_power/2) (d_c: class node degree); 0 is the
        published method, 1 removes its penalty on popular classes. Default: 0 on a graph of
        every class, 0.5 where ``robust`` left classes out.
    calibration : {"zeroshot", "mass"}, default "zeroshot"
        How scores become probabilities: the power of the mass whose mean confidence matches the
        zero-shot softmax, or the plain share of mass.
    dual_topk : int, default 0
        Inductive predict keeps the top-``dual_topk`` entries per row of Z (0: all).
    knn_backend : {"auto", "torch", "keops"}, default "auto"
    robust : bool, default True
        Build the graph on the classes the pool supports only (class presence checked by held-out
        GMM likelihood, as ``GMM``); False: every class, the published graph.
    logit_scale : float, default 100
        Zero-shot softmax(logit_scale x cosine) of the pool analysis and the confidence that
        ``calibration="zeroshot"`` matches.
    initial : {"text", "inmap"}, default "text"
        Propagate from the class embeddings, or from InMaP proxies learned from them first
        (similarities are then min-max scaled, as the official code does).
    device : str, optional
    seed : int, default 0

    Examples
    --------
    >>> import zsadapt
    >>> pool = zsadapt.make_pool(n_images=300, n_classes=5, dim=32)
    >>> model = zsadapt.ZLaP(text_features=pool.text_features).fit(pool.image_features)
    >>> model.transduction_.shape
    (300,)
    """

    method = "zlap"

    def __init__(
        self,
        text_features=None,
        *,
        k=5,
        gamma=5.0,
        alpha=0.3,
        tol=1e-6,
        max_iter=50,
        scale_sim=False,
        degree_power=None,
        calibration="zeroshot",
        dual_topk=0,
        knn_backend="auto",
        robust=True,
        logit_scale=100.0,
        initial="text",
        device=None,
        seed=0,
    ):
        self.text_features = text_features
        self.k = k
        self.gamma = gamma
        self.alpha = alpha
        self.tol = tol
        self.max_iter = max_iter
        self.scale_sim = scale_sim
        self.degree_power = degree_power
        self.calibration = calibration
        self.dual_topk = dual_topk
        self.knn_backend = knn_backend
        self.robust = robust
        self.logit_scale = logit_scale
        self.initial = initial
        self.device = device
        self.seed = seed


class SelfTraining(TransductiveClassifier):
    """Pseudo-label self-training of a cosine student (Menghini et al., NeurIPS 2023); see
    :mod:`zsadapt.solvers.self_training`. ``predict`` is the trained student.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    strategy : {"fpl", "ifpl", "grip"}, default "grip"
    k : int, default 16
        Pseudo-labels per class (fpl, ifpl).
    rounds : int, default 10
        ifpl rounds.
    growth : float, default 0.1
        grip: fraction of the pool added per round.
    quota : {"mixture", "balanced", "proportional"}, default "mixture"
        Per-class quotas: proportional to the class proportions estimated from the pool's
        clusters, equal (published), or following the current teacher's estimate each round.
    adapter : bool, default False
        Residual linear adapter in the student.
    lr : float, default 1e-3
        Adam learning rate.
    epochs : int, default 100
        Epoch cap per round.
    patience : int, default 10
        Early stopping on the held-out pseudo-labels.
    holdout : float, default 0.2
        Held-out fraction of the pseudo-labelled set.
    batch_size : int, default 0
        0: full batch when it fits.
    logit_scale : float, default 100
        Zero-shot softmax(logit_scale x cosine) of the first teacher and the pool analysis, and
        the student's starting scale.
    initial : {"text", "inmap"}, default "text"
    device : str, optional
    seed : int, default 0
    """

    method = "self_training"

    def __init__(self, text_features=None, *, strategy="grip", k=16, rounds=10, growth=0.1, quota="mixture",
                 adapter=False, lr=1e-3, epochs=100, patience=10, holdout=0.2, batch_size=0,
                 logit_scale=100.0, initial="text", device=None, seed=0):
        self.text_features = text_features
        self.strategy = strategy
        self.k = k
        self.rounds = rounds
        self.growth = growth
        self.quota = quota
        self.adapter = adapter
        self.lr = lr
        self.epochs = epochs
        self.patience = patience
        self.holdout = holdout
        self.batch_size = batch_size
        self.logit_scale = logit_scale
        self.initial = initial
        self.device = device
        self.seed = seed


class InMaP(TransductiveClassifier):
    """InMaP vision proxies (Qian et al., NeurIPS 2023); see :mod:`zsadapt.solvers.inmap`.
    ``predict`` classifies with the proxies; ``solver_.proxies_`` holds them (C, d).

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    logit_scale : float, default 100
        Zero-shot softmax(logit_scale x cosine) of the pool analysis and of the pseudo-labels
        unless ``tau_t`` is given.
    tau_t : float, optional
        Temperature of the zero-shot pseudo-labels; None: 1 / ``logit_scale`` (0.01, official).
    tau_i : float, default 0.04
        Temperature of the proxy classifier.
    confidence : float, default 0.6
        Pseudo-labels above it become one-hot (official alpha).
    marginals : {"mixture", "uniform", "zeroshot"}, default "mixture"
        Sinkhorn class marginals: the class proportions estimated from the pool's clusters,
        uniform (published), or (sum of zero-shot probabilities)^marginal_power.
    marginal_power : float, default 1.0
        Exponent for ``marginals="zeroshot"`` (official gamma).
    sinkhorn_iter : int, default 20
    lr : float, default 10.0
        Initial gradient step (halved when the gradient norm rises).
    max_iter : int, default 2000
        Gradient steps at most (the published fixed count).
    tol : float, default 1e-4
        Stop when the proxies turn less than ``tol`` radians per step (rms over classes) for 10
        consecutive steps (0: all ``max_iter`` steps, as published).
    device : str, optional
    seed : int, default 0
    """

    method = "inmap"

    def __init__(self, text_features=None, *, logit_scale=100.0, tau_t=None, tau_i=0.04, confidence=0.6,
                 marginals="mixture", marginal_power=1.0, sinkhorn_iter=20, lr=10.0, max_iter=2000, tol=1e-4,
                 device=None, seed=0):
        self.text_features = text_features
        self.logit_scale = logit_scale
        self.tau_t = tau_t
        self.tau_i = tau_i
        self.confidence = confidence
        self.marginals = marginals
        self.marginal_power = marginal_power
        self.sinkhorn_iter = sinkhorn_iter
        self.lr = lr
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.seed = seed


class GMM(TransductiveClassifier):
    """Gaussian-mixture clustering with a shared covariance, fitted by EM; see
    :mod:`zsadapt.solvers.gmm`.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    init : {"zeroshot", "text", "kmeans++"}, default "zeroshot"
        Start from one M-step on the zero-shot probabilities, from the class embeddings as means,
        or from a free k-means++ clustering matched to classes by the Hungarian algorithm.
    covariance : {"diag", "spherical"}, default "diag"
        The covariance shared by all components.
    tol : float, default 1e-3
        Stop when the mean log-likelihood changes by less.
    max_iter : int, default 100
        EM iteration cap (``ConvergenceWarning`` when reached).
    reg_covar : float, default 1e-6
        Added to the variance.
    logit_scale : float, default 100
        Zero-shot logit scale for ``init="zeroshot"``.
    robust : bool, default True
        Drop the classes the pool does not support before EM (variational empirical Bayes on the
        zero-shot class proportions), so classes absent from the pool cannot take its images; no
        change on a pool read as balanced. False: plain EM.
    prior_images : float, default 0
        For prototype classifiers (``text_features`` that are means of labelled image features,
        e.g. from :func:`class_prototypes`): how many images each prototype averages. The class
        means are then MAP estimates anchored at the prototypes with that weight. 0: plain EM.
    device : str, optional
    seed : int, default 0
        Seeds the k-means++ draw.

    Examples
    --------
    >>> import zsadapt
    >>> pool = zsadapt.make_pool(n_images=300, n_classes=5, dim=32)
    >>> model = zsadapt.GMM(text_features=pool.text_features).fit(pool.image_features)
    >>> model.transduction_.shape
    (300,)
    """

    method = "gmm"

    def __init__(
        self,
        text_features=None,
        *,
        init="zeroshot",
        covariance="diag",
        tol=1e-3,
        max_iter=100,
        reg_covar=1e-6,
        logit_scale=100.0,
        robust=True,
        prior_images=0.0,
        device=None,
        seed=0,
    ):
        self.text_features = text_features
        self.init = init
        self.covariance = covariance
        self.tol = tol
        self.max_iter = max_iter
        self.reg_covar = reg_covar
        self.logit_scale = logit_scale
        self.robust = robust
        self.prior_images = prior_images
        self.device = device
        self.seed = seed


class TransCLIP(TransductiveClassifier):
    """Zero-shot TransCLIP (Zanella et al., NeurIPS 2024): a GMM with a Laplacian term and a KL term
    to the zero-shot predictions; see :mod:`zsadapt.solvers.transclip`.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    k : int, default 3
        Nearest images per image in the affinity.
    kl_weight : float, default 1.0
        lambda, the power of the zero-shot predictions in the z-update.
    temperature : float, default 50
        The Gaussian log-likelihood is divided by it.
    outer_iter : int, default 10
        Rounds of z-updates, mean and variance updates.
    z_iter : int, default 5
        z-updates per round.
    n_confident : int, default 8
        Most confident images per class that initialise its mean.
    logit_scale : float, default 100
    robust : bool, default True
        Weight classes by how much the pool supports them (variational empirical Bayes on the
        zero-shot class proportions), so classes absent from the pool fade; no change on a pool
        read as balanced. False: the published algorithm.
    knn_backend : {"auto", "torch", "keops"}, default "auto"
    device : str, optional
    seed : int, default 0

    Examples
    --------
    >>> import zsadapt
    >>> pool = zsadapt.make_pool(n_images=300, n_classes=5, dim=32)
    >>> model = zsadapt.TransCLIP(text_features=pool.text_features).fit(pool.image_features)
    >>> model.transduction_.shape
    (300,)
    """

    method = "transclip"

    def __init__(
        self,
        text_features=None,
        *,
        k=3,
        kl_weight=1.0,
        temperature=50.0,
        outer_iter=10,
        z_iter=5,
        n_confident=8,
        logit_scale=100.0,
        robust=True,
        knn_backend="auto",
        device=None,
        seed=0,
    ):
        self.text_features = text_features
        self.k = k
        self.kl_weight = kl_weight
        self.temperature = temperature
        self.outer_iter = outer_iter
        self.z_iter = z_iter
        self.n_confident = n_confident
        self.logit_scale = logit_scale
        self.robust = robust
        self.knn_backend = knn_backend
        self.device = device
        self.seed = seed


class EM(TransductiveClassifier):
    """Generalized EM with class balance and the zero-shot prior; see :mod:`zsadapt.solvers.em`.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    likelihood : {"gaussian", "dirichlet"}, default "gaussian"
    lam : float, default 3.0
        Class-balance weight lambda/N on log pi (larger: fewer classes survive).
    temperature : float, default 10.0
        Temperature T dividing the log-likelihood.
    prior : float, default 2.0
        Weight beta of the zero-shot prior log y_hat.
    logit_scale : float, default 100.0
        Feature temperature tau of y_hat = softmax(tau x W^T).
    mean_prior, var_prior : float, default 3.0 and 1000.0
        Pseudo-counts of the class means (towards the pool mean) and the variance (towards 1/d).
    max_iter : int, default 50
        Iteration cap (``ConvergenceWarning`` when reached).
    stop : {"labels", "posteriors"}, default "labels"
        Stopping rule: the labels have settled (``label_tol``, ``patience``), or the earlier rule,
        no assignment moves by more than ``tol``.
    label_tol : float, default 1e-3
        ``stop="labels"``: largest fraction of the images whose label may change in an iteration.
    patience : int, default 3
        ``stop="labels"``: iterations in a row the labels must stay settled.
    tol : float, default 1e-4
        ``stop="posteriors"``: stop when no assignment moves by more than ``tol``.
    device : str, optional
    seed : int, default 0

    Examples
    --------
    >>> import zsadapt
    >>> pool = zsadapt.make_pool(n_images=300, n_classes=5, dim=32)
    >>> model = zsadapt.EM(text_features=pool.text_features).fit(pool.image_features)
    >>> model.transduction_.shape
    (300,)
    """

    method = "em"

    def __init__(self, text_features=None, *, likelihood="gaussian", lam=3.0, temperature=10.0, prior=2.0,
                 logit_scale=100.0, mean_prior=3.0, var_prior=1000.0, max_iter=50, stop="labels",
                 label_tol=1e-3, patience=3, tol=1e-4, device=None, seed=0):
        self.text_features = text_features
        self.likelihood = likelihood
        self.lam = lam
        self.temperature = temperature
        self.prior = prior
        self.logit_scale = logit_scale
        self.mean_prior = mean_prior
        self.var_prior = var_prior
        self.max_iter = max_iter
        self.stop = stop
        self.label_tol = label_tol
        self.patience = patience
        self.tol = tol
        self.device = device
        self.seed = seed


class UNEM(TransductiveClassifier):
    """Unrolled generalized EM with learned per-layer parameters; see :mod:`zsadapt.solvers.unem`.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    layers : int, optional
        Unrolled layers L (default: the shipped parameters', 10).
    lam, temperature : tuple of float, optional
        Per-layer lambda_l and T_l (one value: every layer). Default: the shipped parameters.
    logit_scale, prior : float, optional
        Feature temperature tau and zero-shot prior weight beta. Default: the shipped parameters.
    likelihood : {"gaussian", "dirichlet"}, default "gaussian"
    mean_prior, var_prior : float, default 3.0 and 1000.0
    device : str, optional
    seed : int, default 0
    """

    method = "unem"

    def __init__(self, text_features=None, *, layers=None, lam=None, temperature=None, logit_scale=None,
                 prior=None, likelihood="gaussian", mean_prior=3.0, var_prior=1000.0, device=None, seed=0):
        self.text_features = text_features
        self.layers = layers
        self.lam = lam
        self.temperature = temperature
        self.logit_scale = logit_scale
        self.prior = prior
        self.likelihood = likelihood
        self.mean_prior = mean_prior
        self.var_prior = var_prior
        self.device = device
        self.seed = seed


class StatA(TransductiveClassifier):
    """StatA (Zanella et al., CVPR 2025): TransCLIP's z-update with per-class diagonal Gaussians
    shrunk to the text embeddings; see :mod:`zsadapt.solvers.stata`.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    alpha : float, default 1.0
        Anchor weight: beta_k = n_k / (alpha + n_k), n_k the hard class counts.
    k : int, default 3
        Nearest images per image in the affinity.
    kl_weight : float, default 1.0
        lambda, the power of the zero-shot predictions in the z-update.
    temperature : float, default 50
        The Gaussian log-likelihood is divided by it.
    outer_iter : int, default 10
    z_iter : int, default 5
    logit_scale : float, default 100
    log_det : bool, default True
        Include the Gaussians' log-determinants (False: the official code's likelihood).
    knn_backend : {"auto", "torch", "keops"}, default "auto"
    device : str, optional
    seed : int, default 0
    """

    method = "stata"

    def __init__(self, text_features=None, *, alpha=1.0, k=3, kl_weight=1.0, temperature=50.0, outer_iter=10,
                 z_iter=5, logit_scale=100.0, log_det=True, knn_backend="auto", device=None, seed=0):
        self.text_features = text_features
        self.alpha = alpha
        self.k = k
        self.kl_weight = kl_weight
        self.temperature = temperature
        self.outer_iter = outer_iter
        self.z_iter = z_iter
        self.logit_scale = logit_scale
        self.log_det = log_det
        self.knn_backend = knn_backend
        self.device = device
        self.seed = seed


class MOON(TransductiveClassifier):
    """MOON (Huang et al., 2026): a von Mises-Fisher mixture anchored to the text, with class
    shrinkage from zero-shot confidence and entropy weights; see :mod:`zsadapt.solvers.moon`.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    k : int, default 3
        m, nearest images per image in the affinity.
    n_iter : int, default 10
        T, rounds of z-update and parameter updates.
    logit_scale : float, default 100
    temperature : float, default 50
        The vMF log-likelihood is divided by it in the z-update (1: eq. 12 as printed).
    knn_backend : {"auto", "torch", "keops"}, default "auto"
    device : str, optional
    seed : int, default 0
    """

    method = "moon"

    def __init__(self, text_features=None, *, k=3, n_iter=10, logit_scale=100.0, temperature=50.0,
                 knn_backend="auto", device=None, seed=0):
        self.text_features = text_features
        self.k = k
        self.n_iter = n_iter
        self.logit_scale = logit_scale
        self.temperature = temperature
        self.knn_backend = knn_backend
        self.device = device
        self.seed = seed


class Anchored(TransductiveClassifier):
    """Gaussian mixture with class means anchored to the zero-shot classifier; see
    :mod:`zsadapt.solvers.anchored`.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    prior_strength : float, default 2.0
        Images' worth of the anchor prior on each class mean.
    tol : float, default 1e-3
        Stop when the mean change of an image's assignment is below this.
    max_iter : int, default 100
        EM iteration cap (``ConvergenceWarning`` when reached).
    reg_covar : float, default 1e-6
        Added to the shared variance.
    logit_scale : float, default 100
        Zero-shot logit scale the anchors reproduce.
    robust : bool, default True
        Weight classes by how much the pool supports them (class presence).
    calibration : {"zeroshot", "none"}, default "zeroshot"
        One temperature matching the zero-shot mean confidence, or the raw posteriors.
    device : str, optional
    seed : int, default 0

    Examples
    --------
    >>> import zsadapt
    >>> pool = zsadapt.make_pool(n_images=300, n_classes=5, dim=32)
    >>> model = zsadapt.estimators.Anchored(text_features=pool.text_features).fit(pool.image_features)
    >>> model.transduction_.shape
    (300,)
    """

    method = "anchored"

    def __init__(self, text_features=None, *, prior_strength=2.0, tol=1e-3, max_iter=100, reg_covar=1e-6,
                 logit_scale=100.0, robust=True, calibration="zeroshot", device=None, seed=0):
        self.text_features = text_features
        self.prior_strength = prior_strength
        self.tol = tol
        self.max_iter = max_iter
        self.reg_covar = reg_covar
        self.logit_scale = logit_scale
        self.robust = robust
        self.calibration = calibration
        self.device = device
        self.seed = seed


class Auto(TransductiveClassifier):
    """The default method: ``gmm`` where the pool holds at least ``min_images`` images per class
    its pool analysis supports, ``stata`` where it holds fewer; see :mod:`zsadapt.solvers.auto`.

    Parameters
    ----------
    text_features : array-like of shape (C, d), optional
        Class embeddings. Without them, ``fit(X, y)`` uses class prototypes from ``y``.
    min_images : float, default 2.0
        Images per supported class from which a Gaussian per class is fitted.
    logit_scale : float, default 100.0
        Zero-shot probabilities softmax(logit_scale x cosine) (CLIP's scale), for the pool
        analysis and the chosen method.
    prior_images : float, default 0
        For prototype classifiers: the labelled images each prototype averages, passed to the
        ``gmm`` branch (see :class:`GMM`). 0: plain EM.
    device : str, optional
    seed : int, default 0

    Examples
    --------
    >>> import zsadapt
    >>> pool = zsadapt.make_pool(n_images=300, n_classes=5, dim=32)
    >>> model = zsadapt.estimators.Auto(text_features=pool.text_features).fit(pool.image_features)
    >>> model.result_.info["branch"]
    'gmm'
    """

    method = "auto"

    def __init__(self, text_features=None, *, min_images=2.0, logit_scale=100.0, prior_images=0.0, device=None,
                 seed=0):
        self.text_features = text_features
        self.min_images = min_images
        self.logit_scale = logit_scale
        self.prior_images = prior_images
        self.device = device
        self.seed = seed


#: Estimator class per registered method name.
ESTIMATORS = {"zeroshot": ZeroShot, "zlap": ZLaP, "gmm": GMM, "transclip": TransCLIP, "em": EM, "unem": UNEM,
              "self_training": SelfTraining, "inmap": InMaP, "stata": StatA, "moon": MOON,
              "anchored": Anchored, "auto": Auto}
