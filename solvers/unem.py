"""UNEM: the generalized-EM iterations of :mod:`zsadapt.solvers.em` unrolled into L layers with
learned per-layer hyper-parameters.

Zhou et al., "UNEM: UNrolled Generalized EM for Transductive Few-Shot Learning". Layer l runs
one M-step and one E-step of :class:`~zsadapt.solvers.em.GeneralizedEM` with its own class-balance
weight and temperature,

    lambda_l = softplus(a_l),   T_l = 1 + softplus(b_l),

and all layers share the feature temperature tau = softplus(c) (the logit scale of the zero-shot
posterior y_hat that starts the iterations, is the text prior, and is the Dirichlet data) and the
text-prior weight beta = softplus(e) (beta is an addition to the paper: it is what keeps the method
zero-shot, see :mod:`~zsadapt.solvers.em`). The raw parameters (a, b, c, e) are learned by
backpropagation through the L layers on labelled validation pools, minimising the cross-entropy of
the last layer's assignments (:func:`tune`; ``zsadapt tune --method unem``).

With lambda_l = lam and T_l = T for every layer, ``unem`` computes exactly what ``em`` computes
in L iterations. Without explicit values, the parameters come from the shipped defaults
``zsadapt/data/unem_default.json`` (learned on the validation pools of ``../shared/data``; see the
README), which ``--params params.json`` from ``zsadapt tune`` replaces.

``predict`` is the neighbour-transfer rule (:mod:`zsadapt.solvers.inductive`) with the last layer's
E-step as one expert: on a held-out half of Stanford Cars 55.1% against zero-shot 59.8% (the
E-step alone: 50.2%; ``benchmarks/fit_on_sample.py``), so ``inductive_below_initial`` is set:
saving a model warns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..messages import note
from . import register
from .base import NotFittedError, Param, Problem, Solver, SolverOutput
from .inductive import TransfersToNewImages, attach_transfer
from .em import LIKELIHOODS, GeneralizedEM, zeroshot_log_probs
from .timing import StageTimer

#: The parameters learned by ``zsadapt tune`` on the shared validation pools, shipped in the wheel.
DEFAULT_PARAMS = "unem_default.json"


def default_params() -> dict:
    """The shipped ``unem`` parameters (a dict of ``layers``, ``lam``, ``temperature``,
    ``logit_scale``, ``prior``, ...)."""
    text = resources.files("zsadapt").joinpath("data", DEFAULT_PARAMS).read_text()
    return json.loads(text)["unem"]


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0): x = y + log(1 - exp(-y))."""
    return y + torch.log(-torch.expm1(-y))


@dataclass
class UnrolledParameters:
    """Raw (unconstrained) learnable parameters: ``a`` (L,), ``b`` (L,), ``c`` and ``e`` (0-d)."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    e: torch.Tensor

    @classmethod
    def from_natural(cls, lam: Sequence[float], temperature: Sequence[float], logit_scale: float,
                     prior: float, dtype=torch.float32, device=None) -> "UnrolledParameters":
        """Raw parameters giving lambda_l = ``lam[l]``, T_l = ``temperature[l]`` (> 1), tau and beta
        (values at 0 are represented by 1e-6: softplus never reaches 0)."""
        def raw(values, shift=0.0):
            t = torch.as_tensor(values, dtype=torch.float64) - shift
            return inverse_softplus(t.clamp_min(1e-6)).to(dtype=dtype, device=device)
        return cls(raw(lam), raw(temperature, 1.0), raw(logit_scale), raw(prior))

    def tensors(self) -> list:
        return [self.a, self.b, self.c, self.e]

    @property
    def lam(self) -> torch.Tensor:
        return F.softplus(self.a)  # (L,)

    @property
    def temperature(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.b)  # (L,)

    @property
    def logit_scale(self) -> torch.Tensor:
        return F.softplus(self.c)

    @property
    def prior(self) -> torch.Tensor:
        return F.softplus(self.e)

    def natural(self) -> dict:
        """lam, temperature (lists), logit_scale and prior as plain floats (for JSON)."""
        return {
            "layers": int(self.a.numel()),
            "lam": [float(v) for v in self.lam.detach().double()],
            "temperature": [float(v) for v in self.temperature.detach().double()],
            "logit_scale": float(self.logit_scale.detach()),
            "prior": float(self.prior.detach()),
        }


def unrolled_em(image: torch.Tensor, classifier: torch.Tensor, raw: UnrolledParameters, *,
                likelihood: str = "gaussian", mean_prior: float = 3.0, var_prior: float = 1000.0
                ) -> tuple[torch.Tensor, GeneralizedEM, object]:
    """Run the L layers on one pool (differentiable in ``raw``).

    Returns
    -------
    u : (N, C) tensor, the last layer's assignments
    model : the :class:`GeneralizedEM` (for inductive prediction)
    params : the class parameters the last layer's E-step used
    """
    model = GeneralizedEM(image, classifier, logit_scale=raw.logit_scale, likelihood=likelihood,
                          mean_prior=mean_prior, var_prior=var_prior)
    u = model.initial()
    lam, temperature, prior = raw.lam, raw.temperature, raw.prior
    params = None
    for layer in range(lam.numel()):
        params = model.m_step(u)
        u = model.e_step(params, lam=lam[layer], temperature=temperature[layer], prior=prior)
    return u, model, params


def _per_layer(values: Optional[tuple], fallback: Sequence[float], layers: int, name: str,
               given: bool) -> list:
    """``values`` stretched to ``layers`` entries: a single value repeats; the shipped defaults are
    cut or extended with their last value; a user list of another length is an error."""
    source = list(values) if values is not None else list(fallback)
    if len(source) == layers:
        return source
    if len(source) == 1:
        return source * layers
    if given:
        raise ValueError(f"unem: parameter {name} has {len(source)} values for layers={layers}")
    return (source + [source[-1]] * layers)[:layers]


@register
class UNEMSolver(TransfersToNewImages, Solver):
    name = "unem"
    inductive_below_initial = True  # benchmarks/fit_on_sample.py (module docstring)
    summary = "unrolled generalized EM with per-layer class balance and temperature learned by `zsadapt tune`"
    reference = "Zhou et al., UNEM: UNrolled Generalized EM for Transductive Few-Shot Learning, 2024"
    params = {
        "layers": Param(None, int, "unrolled layers L (default: as many as lam lists when it lists "
                        "several, else the shipped parameters' 10)", minimum=1),
        "lam": Param(None, tuple, "per-layer lambda_l (comma-separated; one value: all layers; default: shipped)", minimum=0.0),
        "temperature": Param(None, tuple, "per-layer T_l >= 1 (comma-separated; one value: all layers; default: shipped)", minimum=1.0),
        "logit_scale": Param(None, float, "feature temperature tau (default: shipped)", minimum=1e-6),
        "prior": Param(None, float, "weight beta of the zero-shot prior log y_hat (default: shipped)", minimum=0.0),
        "likelihood": Param("gaussian", str, "class-conditional likelihood", choices=LIKELIHOODS),
        "mean_prior": Param(3.0, float, "pseudo-count kappa pulling class means to the pool mean", minimum=0.0),
        "var_prior": Param(1000.0, float, "pseudo-count nu pulling the variance to 1/d", minimum=0.0),
    }

    def resolved(self) -> dict:
        """The per-layer values in use: given ones, else the shipped defaults."""
        cfg = self.config
        shipped = default_params() if any(cfg[k] is None for k in ("layers", "lam", "temperature",
                                                                   "logit_scale", "prior")) else {}
        layers = cfg["layers"] if cfg["layers"] is not None else (
            len(cfg["lam"]) if cfg["lam"] is not None and len(cfg["lam"]) > 1 else shipped["layers"])
        return {
            "layers": layers,
            "lam": _per_layer(cfg["lam"], shipped.get("lam", [0.0]), layers, "lam", cfg["lam"] is not None),
            "temperature": _per_layer(cfg["temperature"], shipped.get("temperature", [1.0]), layers,
                                      "temperature", cfg["temperature"] is not None),
            "logit_scale": cfg["logit_scale"] if cfg["logit_scale"] is not None else shipped["logit_scale"],
            "prior": cfg["prior"] if cfg["prior"] is not None else shipped["prior"],
        }

    def fit(self, problem: Problem) -> SolverOutput:
        cfg = self.config
        values = self.resolved()
        raw = UnrolledParameters.from_natural(values["lam"], values["temperature"], values["logit_scale"],
                                              values["prior"], dtype=problem.image.dtype, device=problem.device)
        timer = StageTimer(problem.device)
        if problem.progress:
            note(f"unem: {values['layers']} layers on {problem.image.shape[0]} images")
        with timer("unem"), torch.no_grad():
            u, model, params = unrolled_em(problem.image, problem.classifier, raw, likelihood=cfg["likelihood"],
                                           mean_prior=cfg["mean_prior"], var_prior=cfg["var_prior"])
        self.model_, self.params_, self.raw_ = model, params, raw
        info = {"iterations": values["layers"], "converged": True, "layers": values["layers"],
                "class_proportions_max": float(params.pi.max()), "seconds": timer.seconds}
        attach_transfer(self, problem, u)
        return SolverOutput(torch.log(u.clamp_min(1e-38)), u, info)

    def _own_predict(self, image: torch.Tensor) -> SolverOutput:
        """The last layer's E-step, with its class parameters, for new images (M, d)."""
        if not hasattr(self, "params_"):
            raise NotFittedError("unem: call fit first")
        raw = self.raw_
        with torch.no_grad():
            log_y = zeroshot_log_probs(image, self.model_.W, raw.logit_scale)
            u = self.model_.e_step(self.params_, lam=raw.lam[-1], temperature=raw.temperature[-1],
                                   prior=raw.prior, image=image, log_prior=log_y)
        return SolverOutput(torch.log(u.clamp_min(1e-38)), u, {})


@dataclass
class TuningPool:
    """A labelled pool to learn from: ``image`` (N, d) and ``classifier`` (C, d) unit rows,
    ``labels`` (N,) int64, all tensors on one device; ``name`` for messages."""

    image: torch.Tensor
    classifier: torch.Tensor
    labels: torch.Tensor
    name: str = ""


def tune(pools: Sequence[TuningPool], *, layers: int = 10, init: Optional[dict] = None,
         likelihood: str = "gaussian", steps: int = 100, lr: float = 0.05,
         mean_prior: float = 3.0, var_prior: float = 1000.0, frozen: Sequence[str] = (),
         progress: bool = False) -> dict:
    """Learn the unrolled parameters by Adam on the mean cross-entropy over ``pools``.

    Parameters
    ----------
    pools : sequence of TuningPool
        Labelled validation pools (each weighs the same in the loss).
    layers : int
    init : dict, optional
        Start values ``lam``, ``temperature`` (one value or one per layer), ``logit_scale``,
        ``prior``; default: ``em``'s defaults (so training starts from plain EM).
    steps, lr : int, float
        Adam steps; each raw parameter's learning rate is ``lr * max(1, |initial raw value|)``
        (the logit scale sits near 100, the class balance near 1).
    frozen : sequence of {"lam", "temperature", "logit_scale", "prior"}
        Parameters kept at their start values (e.g. keep the text prior as it is when the
        validation pools' classifiers are not text, see the README).

    Returns
    -------
    dict
        ``{"unem": {layers, lam, temperature, logit_scale, prior, likelihood, mean_prior,
        var_prior}, "loss": [first, last], "steps": steps}``: the first entry is what
        ``refine --method unem --params`` reads.
    """
    from .em import LIKELIHOOD_DEFAULTS, EMSolver

    if not pools:
        raise ValueError("tune: no pools given")
    start = dict(init or {})
    em_defaults = {k: p.default for k, p in EMSolver.params.items()}
    em_defaults.update(LIKELIHOOD_DEFAULTS.get(likelihood, {}))
    lam = _per_layer(_as_tuple(start.get("lam", em_defaults["lam"])), [], layers, "lam", True)
    temperature = _per_layer(_as_tuple(start.get("temperature", em_defaults["temperature"])), [], layers,
                             "temperature", True)
    first = pools[0]
    raw = UnrolledParameters.from_natural(lam, temperature, start.get("logit_scale", em_defaults["logit_scale"]),
                                          start.get("prior", em_defaults["prior"]),
                                          dtype=first.image.dtype, device=first.image.device)
    unknown = set(frozen) - {"lam", "temperature", "logit_scale", "prior"}
    if unknown:
        raise ValueError(f"tune: cannot freeze {', '.join(sorted(unknown))}")
    groups = []
    for key, tensor in zip(("lam", "temperature", "logit_scale", "prior"), raw.tensors()):
        if key in frozen:
            continue
        tensor.requires_grad_(True)
        scale = max(1.0, float(tensor.detach().abs().max()))
        groups.append({"params": [tensor], "lr": lr * scale})
    optimiser = torch.optim.Adam(groups)
    losses = []
    for step in range(steps + 1):
        optimiser.zero_grad()
        total = 0.0
        for pool in pools:
            u, _, _ = unrolled_em(pool.image, pool.classifier, raw, likelihood=likelihood,
                                  mean_prior=mean_prior, var_prior=var_prior)
            loss = F.nll_loss(torch.log(u.clamp_min(1e-12)), pool.labels) / len(pools)
            if step < steps:
                loss.backward()
            total += float(loss.detach())
        losses.append(total)
        if not math.isfinite(total):
            raise ValueError(f"tune: the loss became {total} at step {step}; lower --lr")
        if step < steps:
            optimiser.step()
        if progress and (step % 10 == 0 or step == steps):
            note(f"tune: step {step}/{steps}, cross-entropy {total:.4f}")
    learned = raw.natural()
    learned.update(likelihood=likelihood, mean_prior=mean_prior, var_prior=var_prior)
    return {"unem": learned, "loss": [losses[0], losses[-1]], "steps": steps, "frozen": sorted(frozen)}


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (float(value),)
