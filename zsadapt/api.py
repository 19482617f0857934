"""The one-call API: ``refine(image_features, text_features, method=...)``."""

from __future__ import annotations

import time
from typing import Any, Optional, Union

import torch

from . import solvers
from .arrays import like_input, resolve_device
from .initial import initial_problem, read_init_alias
from .models import FittedSolver, text_checksum
from .messages import note
from .prompts import prepare_text
from .solvers.calibration import calibrate as calibrate_probs
from .result import Result
from .validation import check_seed

#: Parameters that count neighbours among the pool's other images, by method. A pool of N images
#: has N - 1 of them: a larger value is reduced to N - 1 (a note says so and ``info["reduced"]``
#: records it), which is what the method would do with every image as a neighbour. ``zlap`` is
#: not here: its image search includes the image itself (min(k, N) neighbours) and its ``k`` also
#: counts class neighbours (min(k, C)), so it takes any k as given and notes a k above N itself.
NEIGHBOUR_PARAMS = {"transclip": "k"}


def methods() -> list:
    """Names of the registered methods (``"zeroshot"``, ``"zlap"``, ...)."""
    return solvers.available()


def describe_methods() -> list:
    """One dict per method: ``name``, ``summary``, ``reference`` and ``params`` (name -> Param)."""
    out = []
    for name in methods():
        cls = solvers.get_solver(name)
        out.append({"name": name, "summary": cls.summary, "reference": cls.reference, "params": dict(cls.params)})
    return out


def make_solver(method: str, **params: Any) -> solvers.Solver:
    """An unfitted solver for ``method`` with ``params`` checked against its parameter table."""
    return solvers.get_solver(method)(**params)


def _reference_logits(problem: Any, params: dict) -> torch.Tensor:
    """The initial classifier's logits (N, C) the calibration leans on: ``problem.logits()`` at
    the method's ``logit_scale`` when the caller gave one (an encoder with another similarity
    range), else at CLIP's 100."""
    scale = params.get("logit_scale")
    return problem.logits() if scale is None else problem.logits(float(scale))


def refine(
    image_features: Any,
    text_features: Any,
    method: Optional[str] = None,
    *,
    device: Union[str, torch.device, None] = None,
    seed: int = 0,
    progress: bool = False,
    weighting: str = "mean",
    initial: str = "text",
    initial_params: Optional[dict] = None,
    calibrate: bool = True,
    **params: Any,
) -> Result:
    """Refine zero-shot predictions on an unlabeled pool.

    Parameters
    ----------
    image_features : numpy array or torch tensor, shape (N, d)
        Image embeddings of the pool (any float dtype; float16 is upcast; rows are L2-normalised).
    text_features : numpy array or torch tensor, shape (C, d) (or (d, C) when unambiguous), or (C, P, d)
        Class embeddings: the zero-shot classifier; or one embedding per class and prompt template,
        combined by ``weighting``.
    method : str, optional
        A name from :func:`methods`; ``None`` means the library's default,
        ``zsadapt.solvers.DEFAULT_METHOD``.
    device : str or torch.device, optional
        Where to compute; ``None`` means the device of ``image_features`` (CPU for numpy).
    seed : int
        Seed for solvers that make random choices, in ``0..2**63 - 1``.
    progress : bool
        Show progress of long stages on stderr.
    weighting : {"mean", "zpe", "autoclip"}
        How (C, P, d) template embeddings become the zero-shot classifier (see
        :func:`zsadapt.zeroshot_classifier`); (C, d) text allows only "mean".
    initial : {"text", "inmap"}
        The initial classifier the method starts from: the (weighted) text classifier, or InMaP
        vision proxies learned from it first (``zlap`` then min-max scales its similarities).
    initial_params : dict, optional
        Hyper-parameters of that InMaP run (its ``logit_scale`` is the method's unless given here).
    calibrate : bool
        Calibrate the method's probabilities without labels (:mod:`zsadapt.solvers.calibration`):
        each image's top probability becomes the confidence in the method's label of the
        equal-weight pool of the initial (zero-shot) classifier and the method tempered to
        zero-shot's confidence where the two agree, reached by tempering the image's row. Labels
        and scores are unchanged; ``info["calibration"]`` holds the temperature and the mean
        confidence. ``False``: the method's own (published) probabilities. The zero-shot
        probabilities are softmax(100 x cosine), CLIP's, or at the method's ``logit_scale`` when
        one is given.
    **params
        The method's hyper-parameters (see ``zsadapt.describe_methods()`` or ``zsadapt refine --help``).
        ``init="inmap"`` (the spelling of ZLaP's and TransCLIP's papers) is read as
        ``initial="inmap"``, for every method. A neighbour count above N - 1 (``transclip``'s
        ``k``) is reduced to N - 1, with a note; ``zlap`` links each image to all N pool images
        (itself included) when ``k`` > N, and keeps min(k, C) class neighbours.
        A pool of one image gets the initial classifier's prediction, whatever the method
        (``info["single_image"]``): one image holds nothing to adapt to.

    Returns
    -------
    Result
        ``labels`` (N,), ``probs`` (N, C), ``scores`` (N, C) of the same kind as
        ``image_features`` (numpy, or torch on its device), plus ``method``, ``params``, ``info``.
    """
    initial, params = read_init_alias(initial, params)
    method = solvers.DEFAULT_METHOD if method is None else method
    seed = check_seed(seed)
    if not isinstance(calibrate, bool):
        raise TypeError(f"calibrate must be True or False, got {calibrate!r}")
    solver = make_solver(method, **params)
    compute_device = resolve_device(device, image_features)
    X, T = prepare_text(image_features, text_features, compute_device)
    single = X.shape[0] == 1
    solver, reduced = (solver, {}) if single else _fit_neighbours(solver, method, params, X.shape[0])
    start = time.perf_counter()
    problem = initial_problem(X, T, weighting=weighting, initial=initial, initial_params=initial_params,
                              logit_scale=params.get("logit_scale"), seed=seed, progress=progress)
    # One image holds no pool to learn from: every method's answer is the initial classifier's.
    output = (make_solver("zeroshot") if single else solver).fit(problem)
    info = dict(output.info)
    if single:
        if method != "zeroshot":
            note(f"{method}: a pool of one image: the initial classifier's prediction")
        info["single_image"] = True
    if reduced:
        info["reduced"] = reduced
    labels = output.probs.argmax(dim=1)  # (N,) the scores' argmax wherever the solver has mass
    probs = output.probs
    if calibrate:
        calibration = calibrate_probs(output.scores, probs, torch.softmax(_reference_logits(problem, params), dim=1))
        probs, info["calibration"] = calibration.probs, calibration.info()
    info.setdefault("seconds", {})
    info["seconds"] = dict(info["seconds"], total=time.perf_counter() - start)
    return Result(
        labels=like_input(labels, image_features),
        probs=like_input(probs.float(), image_features),
        scores=like_input(output.scores.float(), image_features),
        method=method,
        params=dict(solver.config, **({"weighting": weighting} if weighting != "mean" else {}),
                    **({"initial": initial} if initial != "text" else {})),
        info=info,
        fitted=None if single else FittedSolver(solver, X.shape[1], output.probs.shape[1], text_checksum(text_features),
                                                {"initial": initial, "weighting": weighting, "seed": seed},
                                                text_features=T),
    )


def _fit_neighbours(solver: solvers.Solver, method: str, params: dict, n_images: int) -> tuple:
    """``solver`` with its neighbour count (:data:`NEIGHBOUR_PARAMS`) at most ``n_images - 1``, and
    ``{name: {"given": k, "used": n_images - 1}}`` for what was reduced (empty when nothing was)."""
    name = NEIGHBOUR_PARAMS.get(method)
    if name is None or solver.config.get(name) is None or solver.config[name] <= n_images - 1:
        return solver, {}
    given, used = solver.config[name], n_images - 1
    note(f"{method}: {name} = {given} is more than the {used} other images of the pool; using {name} = {used}")
    return make_solver(method, **dict(params, **{name: used})), {name: {"given": given, "used": used}}
