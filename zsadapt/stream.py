"""Stream mode: test-time adaptation that carries what it learned from one batch to the next.

Where you are: public API, beside :func:`zsadapt.refine`. A :class:`Stream` holds the class
embeddings, one solver with a ``fit_with_prior(problem, prior)`` hook, and a state of per-class
sufficient statistics (:class:`~zsadapt.solvers.statistics.ClassStatistics`: weighted counts, sums
and sums of squares, O(C d) whatever the stream's length). For batch t,

    prior_t = gamma * S_{t-1}                        (forgetting, gamma = ``forgetting``)
    r_tc    = 1 - exp(-sum_i softmax_c(s x_i.t))      (class c's presence in batch t, below)
    p_t     = solver.fit_with_prior(X_t, r_t * prior_t, population=prior_t)
                                                     (the gated prior is added to the batch's
                                                      statistics in every M-step; the whole one
                                                      centres the zero-shot anchors)
    S_t     = prior_t + stats(X_t, W_t),   W_ic = [c = argmax_k p_ik] * max(2 q_ic - 1, 0),
    q_i     = softmax(s x_i.t)                       (the zero-shot posterior: owes nothing to the state)

so S_t = sum_u gamma^(t-u) stats(X_u, W_u): with gamma = 1 exactly the statistics of one pass over
every row seen with these weights (tested), and otherwise an exponential window of about
1 / (1 - gamma) batches. The cost of a batch is that of one batch-wise solve plus O(N C + C d).

Why the presence r. What the stream knows of class c helps batch t only if c is in the batch; a
class the stream has statistics for but that is absent now would otherwise keep a sharp
data-estimated component that takes the images of present classes near it (their components are
still mostly their text anchors), measured: most of the extra errors of a stream over a
batch-wise solve at xi = 0.1 went to such classes. With the zero-shot expected count
n_c = sum_i softmax_c(s x_i.t) of the batch (s the solver's ``logit_scale``, 100), r_c = 1 - exp(-n_c)
is the probability that a Poisson count of mean n_c is not zero: a class no image of the batch
looks like brings nothing of its history (it is solved as in a batch-wise solve), a class the batch
holds brings all of it. The state itself is not gated: it keeps everything seen.

Why the whole state as the population. ``anchored`` expresses the zero-shot classifier as Gaussians
about the mean image g of the images it fits (its module docstring); a batch's own g is the mean of
whatever classes it holds. A batch of two images of one class has g at that class's mean, where the
class's data term carries no evidence, and the class keeps only part of its zero-shot evidence
while the others keep all of it: the images go to the next class. Measured on Stanford Cars in file
order (runs of one class), batches of 2 images: 41.0% with g from the batch and the gated prior,
60.8% with g from the batch and the whole state (zero-shot 59.0%). In random order, where a
batch's mean is already near the population's, the mean gain over zero-shot on the 7 shared pools
went from +0.72 to +0.49 points at 2 images and fell by at most 0.1 at 4 to 128; the worst pool at 2
images went from -2.45 to -0.19 (docs/streams.md, Batch size).

Why the weights W. An image enters the state under the stream's label, weighted by how much more
likely that label is right than wrong, q - (1 - q), nothing below q = 1/2, where q is the
probability the zero-shot classifier alone gives the label, not the stream's own p. Storing the
solver's EM assignments (nearly one-hot: a 512-d Gaussian's posteriors are far too sharp) puts
every wrong label into the state at full weight, and later batches are pulled to those classes: a
confirmation bias that grows with the stream. Weighting by the stream's calibrated p is the same
bias, milder: p already holds the state, so a class whose history is a sharp data component
vouches for the images it takes, they enter its history with a large weight, and it takes more
(measured on Stanford Cars, xi = 0.1, one stream: the two largest states, 12.6 and 11.2 images'
weight against about 1.5 for a typical class, held 15% and 17% images of their own class, and most
extra errors of the stream over a batch-wise solve went to such classes from classes without
history). Earlier, one Cars stream: zero-shot 59.05, state of EM assignments 56.32, state of the
true labels 62.70 (the statistics do carry information; the errors in them are the problem). Evidence that is to be counted again must come from
outside the state: q is the one posterior of the batch that no earlier batch shaped, so a label
the state imposed against zero-shot enters with weight 0, and one zero-shot backs enters as much as
zero-shot backs it. Measured, ``anchored``, 7 shared pools, 2 streams each (docs/streams.md):
at xi = 0.1 the mean went from 51.29 to 52.02 and the worst stream from 1.04 below zero-shot to
0.46 below; at xi = 0.01 from 53.89 to 54.15.

Classes. A class absent from the stream for long has its counts decay geometrically, so the
solver's prior for it falls back to its anchor (the zero-shot classifier); a class that appears
later starts from there, exactly as in a batch solve. Which classes a batch holds: the gate r
decides which histories it gets, the solver's own class-presence step which classes its mixture
keeps.

Method. ``method=None`` is the library's default (``solvers.DEFAULT_METHOD``) when that method has
a ``fit_with_prior`` hook, and otherwise :data:`STREAM_FALLBACK` (``anchored``, the streaming
method of the library: a Gaussian mixture anchored to the zero-shot classifier), see
:func:`stream_method`.

A batch that fails validation (another dimension, NaN or infinite values, an all-zero row, no
rows) raises a one-line ``ValueError`` and leaves the state as it was; so does a solver error.

Saved streams are one ``.safetensors`` file: the class embeddings and the state as tensors, and
JSON metadata (format, zsadapt version, method, parameters, forgetting, seed, counters, class
names, a checksum of the class embeddings); nothing is unpickled on load.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from . import solvers
from ._version import __version__
from .arrays import like_input, resolve_device, to_tensor
from .messages import first_line
from .models import _check_header, text_checksum
from .result import Result
from .zeroshot import CLIP_LOGIT_SCALE, zeroshot_logits
from .solvers.statistics import ClassStatistics
from .validation import _check_matrix, check_classnames, check_seed, l2_normalise

#: The ``format`` entry of a saved stream's metadata (saved models have ``"zsadapt-model"``).
FORMAT = "zsadapt-stream"
#: Bumped whenever a file written by this version could not be read by an older one.
FORMAT_VERSION = 1

#: Default forgetting factor gamma: the state remembers about 1 / (1 - gamma) = 100 batches.
FORGETTING = 0.99


#: The method of ``Stream(method=None)`` when the library's default has no stream mode.
STREAM_FALLBACK = "anchored"


def _streams(name: str) -> bool:
    return callable(getattr(solvers.get_solver(name), "fit_with_prior", None))


def stream_method(method: Optional[str] = None) -> str:
    """The method a stream runs: ``method`` itself when it has a ``fit_with_prior`` hook (else a
    one-line ``ValueError`` listing those that do); for ``None`` the library's default
    (``solvers.DEFAULT_METHOD``) when it has one, else :data:`STREAM_FALLBACK`."""
    if method is None:
        return solvers.DEFAULT_METHOD if _streams(solvers.DEFAULT_METHOD) else STREAM_FALLBACK
    if not _streams(method):  # get_solver raises the one-line error of an unknown name
        with_hook = [m for m in solvers.available() if _streams(m)]
        raise ValueError(f"method {method!r} cannot run as a stream (it has no fit_with_prior); stream methods: "
                         f"{', '.join(with_hook) or 'none'}")
    return method


def batch_presence(X: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """r_c = 1 - exp(-n_c) (C,), n_c = sum_i softmax_c(logit_scale x_i.t) the batch's zero-shot
    expected count of class c: the probability that class c is in the batch ``X`` (N, d) under a
    Poisson count of mean n_c (module docstring). ``text`` (C, d) unit rows."""
    expected = torch.softmax(zeroshot_logits(X, text, logit_scale), dim=1).sum(dim=0)  # (C,)
    return -torch.expm1(-expected)


def state_labels(probs: torch.Tensor, evidence: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a batch adds to the state: each image's label argmax_c p_ic of ``probs`` (N, C) and
    its weight max(2 q - 1, 0) (N,), q the probability ``evidence`` (N, C; default ``probs``)
    gives that label. :meth:`Stream.refine` passes the zero-shot posterior as ``evidence``
    (module docstring)."""
    label = probs.argmax(dim=1)
    evidence = probs if evidence is None else evidence.to(device=probs.device, dtype=probs.dtype)
    if evidence.shape != probs.shape:
        raise ValueError(f"state_labels: evidence of shape {tuple(evidence.shape)}, probs {tuple(probs.shape)}")
    rows = torch.arange(probs.shape[0], device=probs.device)
    return label, (2.0 * evidence[rows, label] - 1.0).clamp_min(0.0)


def state_weights(probs: torch.Tensor, evidence: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W (N, C) of a batch: row i is zero but for ``state_labels``' weight at its label."""
    label, weight = state_labels(probs, evidence)
    weights = torch.zeros_like(probs)
    weights[torch.arange(probs.shape[0], device=probs.device), label] = weight
    return weights


class Stream:
    """Refine zero-shot predictions batch after batch, carrying per-class statistics forward.

    Parameters
    ----------
    text_features : numpy array or torch tensor, shape (C, d)
        Class embeddings: the zero-shot classifier (rows are L2-normalised; float16 upcast).
    method : str, optional
        A registered method with a ``fit_with_prior`` hook; ``None``: the library's default when
        it has one, else ``anchored`` (:func:`stream_method`).
    forgetting : float in (0, 1]
        gamma: the state is multiplied by it before each batch (1: never forget, every image seen
        weighs the same; 0.99: a window of about 100 batches).
    device : str or torch.device, optional
        Where to compute; ``None``: the device of ``text_features`` (CPU for numpy).
    seed : int
        Seed of the solver's random choices (the same for every batch: deterministic).
    classnames : sequence of str, optional
        Class names, kept in saved streams.
    **params
        The method's hyper-parameters.

    Attributes
    ----------
    statistics : ClassStatistics or None
        The state S_t (float64, on ``device``): the statistics of the images seen, weighted by
        :func:`state_weights` (the stream's labels, the zero-shot posterior's confidence in them)
        and the forgetting; None before the first batch and after
        :meth:`reset`. Each batch updates it in place (at many classes a copy costs more than
        the batch): ``statistics.clone()`` keeps a snapshot.
    n_batches, n_images : int
        Batches and images refined since the start or the last :meth:`reset`.

    Examples
    --------
    >>> stream = zsadapt.Stream(text_features)           # doctest: +SKIP
    >>> for batch in batches:                            # doctest: +SKIP
    ...     result = stream.refine(batch)                # labels for this batch; the state learns
    >>> stream.save("stream.safetensors")                # doctest: +SKIP
    """

    def __init__(self, text_features: Any, method: Optional[str] = None, *, forgetting: float = FORGETTING,
                 device: Union[str, torch.device, None] = None, seed: int = 0,
                 classnames: Optional[Sequence[str]] = None, **params: Any) -> None:
        self.method = stream_method(method)
        self.solver = solvers.get_solver(self.method)(**params)
        forgetting = float(forgetting)
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}")
        self.forgetting = forgetting
        self.seed = check_seed(seed)
        self.device = resolve_device(device, text_features)
        text = self._class_embeddings(text_features, "text_features")  # (C, d)
        if text.shape[0] < 2:  # as zsadapt.refine: one class leaves nothing to choose
            raise ValueError(f"text_features: needs at least 2 classes, got {text.shape[0]}")
        self.text = text
        self.classnames = check_classnames(classnames, self.text.shape[0], "classnames")
        self.reset()

    # ------------------------------------------------------------------ shape and state
    @property
    def n_classes(self) -> int:
        return self.text.shape[0]

    @property
    def dim(self) -> int:
        return self.text.shape[1]

    @property
    def params(self) -> dict:
        """Every hyper-parameter of the solver, defaults included."""
        return dict(self.solver.config)

    def reset(self) -> None:
        """Forget every batch: the next one is refined as a batch-wise solve would."""
        self.statistics: Optional[ClassStatistics] = None
        self.n_batches = 0
        self.n_images = 0

    def _population(self, factor: float, dtype: torch.dtype) -> Optional[ClassStatistics]:
        """``factor`` * S_{t-1} in ``dtype`` (a copy of the float64 state), or None before the
        first batch."""
        if self.statistics is None:
            return None
        copy = ClassStatistics(*(t.to(dtype=dtype, copy=True) for t in
                                 (self.statistics.counts, self.statistics.sums, self.statistics.squares)))
        return copy.scale_(factor)

    # ------------------------------------------------------------------ batches
    def check_classes(self, text_features: Any, name: str = "text_features") -> None:
        """Raise ``ValueError`` unless ``text_features`` (C, d) are this stream's class embeddings
        (up to the length of each row): a stream's state is per class, so batches of a pool whose
        classes are other ones, or the same ones in another order, would be labelled wrongly."""
        text = self._class_embeddings(text_features, name)
        if tuple(text.shape) != (self.n_classes, self.dim):
            raise ValueError(f"{name}: text_features have shape {tuple(text.shape)}, the stream was made for "
                             f"({self.n_classes}, {self.dim})")
        if not torch.allclose(text.to(self.text.dtype), self.text, rtol=0.0, atol=1e-5):
            raise ValueError(f"{name}: text_features are not the class embeddings the stream was made for "
                             "(other classes, or the same in another order)")

    def _class_embeddings(self, text_features: Any, name: str) -> torch.Tensor:
        """``text_features`` as validated float32 unit rows (C, d) on the stream's device."""
        text = to_tensor(text_features, name, self.device)
        _check_matrix(text, name, "(C, d)")
        return l2_normalise(text, name)[0]

    def _batch(self, batch: Any, name: str) -> torch.Tensor:
        """``batch`` as validated float32 unit rows (N, d) on the stream's device."""
        X = to_tensor(batch, name, self.device)
        if X.ndim != 2:
            raise ValueError(f"{name}: expected a 2-d array (N, d), got shape {tuple(X.shape)}")
        if X.shape[1] != self.dim:
            hint = (" (were the class embeddings given as (d, C)? the stream takes them as (C, d))"
                    if X.shape[1] == self.n_classes else "")
            raise ValueError(f"{name}: has dimension {X.shape[1]}, the stream's class embeddings have d = "
                             f"{self.dim}{hint}")
        if X.shape[0] == 0:
            raise ValueError(f"{name}: the batch is empty (0 images)")
        _check_matrix(X, name, "(N, d)")
        X, _ = l2_normalise(X, name)
        return X

    def _logit_scale(self) -> float:
        return float(self.solver.config.get("logit_scale", CLIP_LOGIT_SCALE))

    def _solve(self, X: torch.Tensor, population: Optional[ClassStatistics]) -> solvers.SolverOutput:
        """The solver on batch ``X`` with ``population`` (in X's dtype) as the population and,
        gated by the batch's class presence r, as the prior; a batch of
        one image gets the initial classifier's prediction (``info["single_image"]``), as in
        :func:`zsadapt.refine`: one image holds no batch to adapt to, and a mixture refitted on it
        collapses (its class's spread is 0, so the shared variance falls to ``reg_covar``: on
        Caltech101 in random order, batches of one image fell 42.5 points below zero-shot)."""
        problem = solvers.Problem(X, self.text, seed=self.seed)
        if X.shape[0] == 1:
            output = solvers.get_solver("zeroshot")(logit_scale=self._logit_scale()).fit(problem)
            output.info["single_image"] = True
            return output
        if population is None:
            return self.solver.fit_with_prior(problem, None, population=None)
        r = batch_presence(X, self.text, self._logit_scale())
        return self.solver.fit_with_prior(problem, population.scaled_per_class(r), population=population)

    def _result(self, output: solvers.SolverOutput, like: Any, info: dict) -> Result:
        return Result(
            labels=like_input(output.probs.argmax(dim=1), like),
            probs=like_input(output.probs.float(), like),
            scores=like_input(output.scores.float(), like),
            method=self.method,
            params=dict(self.solver.config, forgetting=self.forgetting),
            info=dict(output.info, **info),
        )

    def refine(self, batch: Any) -> Result:
        """Refine one batch with everything the stream has seen, then add it to the state.

        Parameters
        ----------
        batch : numpy array or torch tensor, shape (N, d), N >= 1

        Returns
        -------
        Result
            Labels, probabilities and scores of this batch (numpy in, numpy out; torch in, torch
            out on the batch's device); ``info["stream"]`` gives the batch number, the images seen
            and the state's weight in images (sum of its counts).
        """
        start = time.perf_counter()
        X = self._batch(batch, f"batch {self.n_batches + 1}")
        output = self._solve(X, self._population(self.forgetting, X.dtype))
        if tuple(output.probs.shape) != (X.shape[0], self.n_classes):
            raise ValueError(f"{self.method}: fit_with_prior returned probabilities of shape "
                             f"{tuple(output.probs.shape)}, expected ({X.shape[0]}, {self.n_classes})")
        zeroshot = torch.softmax(zeroshot_logits(X, self.text, self._logit_scale()), dim=1)
        labels, weights = state_labels(output.probs, zeroshot)
        # Commit only now: a batch that failed above leaves the state as it was. In place: the
        # state is O(C d) float64, which at tens of thousands of classes cost more to copy than
        # the batch's solve.
        if self.statistics is None:
            self.statistics = ClassStatistics.zeros(self.n_classes, self.dim, dtype=torch.float64, device=X.device)
        self.statistics.scale_(self.forgetting).add_rows_(X, labels, weights)
        self.n_batches += 1
        self.n_images += X.shape[0]
        info = {"stream": {"batch": self.n_batches, "images_seen": self.n_images,
                           "state_weight": float(self.statistics.counts.sum())}}
        info["seconds"] = dict(output.info.get("seconds", {}), total=time.perf_counter() - start)
        return self._result(output, batch, info)

    def predict_result(self, X: Any) -> Result:
        """The :class:`Result` of refining ``X`` (M, d) with the current state as prior, without
        adding ``X`` to the state (as the next :meth:`refine` would see it, minus its forgetting)."""
        images = self._batch(X, "X")
        output = self._solve(images, self._population(1.0, images.dtype))
        return self._result(output, X, {"stream": {"batch": None, "images_seen": self.n_images}})

    def predict(self, X: Any) -> Any:
        """Labels (M,) int64 for ``X`` (M, d) given the state; the state is not updated."""
        return self.predict_result(X).labels

    def predict_proba(self, X: Any) -> Any:
        """Probabilities (M, C) for ``X`` (M, d) given the state; the state is not updated."""
        return self.predict_result(X).probs

    def __repr__(self) -> str:
        return (f"Stream(method={self.method!r}, C={self.n_classes}, d={self.dim}, forgetting={self.forgetting:g}, "
                f"batches={self.n_batches}, images={self.n_images})")

    # ------------------------------------------------------------------ saving
    def metadata(self) -> dict:
        """What a saved stream records besides its tensors (JSON-serialisable)."""
        return {
            "method": self.method, "params": self.params,
            "forgetting": self.forgetting, "seed": self.seed, "n_batches": self.n_batches,
            "n_images": self.n_images, "n_classes": self.n_classes, "dim": self.dim,
            "classnames": self.classnames, "text_sha256": text_checksum(self.text),
        }

    def save(self, path: Union[str, Path], *, overwrite: bool = False) -> Path:
        """Write the stream (class embeddings, state, metadata) to one ``.safetensors`` file,
        atomically; an existing file is replaced only with ``overwrite``."""
        from safetensors.torch import save

        from .io import atomic_write, check_output

        path = check_output(path, overwrite=overwrite, suffix=".safetensors")
        tensors = {"text_features": self.text.detach().contiguous().cpu()}
        if self.statistics is not None:
            tensors.update(self.statistics.to_dict("state."))
        header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "zsadapt_version": __version__,
                  "stream": json.dumps(self.metadata())}
        blob = save(tensors, metadata=header)
        return atomic_write(path, lambda handle: handle.write(blob), overwrite=overwrite)

    @classmethod
    def load(cls, path: Union[str, Path], *, device: Union[str, torch.device, None] = None) -> "Stream":
        """A stream saved by :meth:`save`, ready to go on (``device``: where to compute; default
        CPU; ``zsadapt.load_model`` calls this for stream files). A file that is not a saved
        stream, of another format version, truncated, a pickle, or with tensors of the wrong
        shapes is a one-line ``ValueError`` naming it."""
        path = Path(path)
        tensors, meta = _read_stream_file(path)
        text = tensors.get("text_features")
        if text is None or tuple(text.shape) != (meta.get("n_classes"), meta.get("dim")):
            raise ValueError(f"{path}: text_features missing or not of shape "
                             f"({meta.get('n_classes')}, {meta.get('dim')}) as the metadata says")
        if text_checksum(text) != meta.get("text_sha256"):
            raise ValueError(f"{path}: the class embeddings do not match their checksum (corrupt file)")
        try:
            stream = cls(text, meta["method"], forgetting=meta["forgetting"], device=device or "cpu",
                         seed=meta["seed"], classnames=meta.get("classnames"), **meta["params"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: incomplete or invalid stream metadata ({err})") from None
        stream.text = text.to(device=stream.device, dtype=torch.float32)  # the saved unit rows, bit for bit
        if any(key.startswith("state.") for key in tensors):
            state = ClassStatistics.from_dict(tensors, "state.", where=str(path))
            if (state.n_classes, state.dim) != (stream.n_classes, stream.dim):
                raise ValueError(f"{path}: the state is for {state.n_classes} classes in dimension {state.dim}, "
                                 f"the class embeddings are ({stream.n_classes}, {stream.dim})")
            stream.statistics = state.to(dtype=torch.float64, device=stream.device)
        stream.n_batches, stream.n_images = int(meta.get("n_batches", 0)), int(meta.get("n_images", 0))
        return stream


def _read_stream_file(path: Path) -> tuple:
    """``(tensors, metadata)`` of a saved stream; one-line ``ValueError`` for anything else."""
    from safetensors import safe_open

    _check_header(path)  # folders, missing files, pickles, zip archives, truncated headers
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # the safetensors parser's errors on a corrupt file
        raise ValueError(f"{path}: not a readable .safetensors file ({first_line(err)})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a saved zsadapt stream (no '{FORMAT}' metadata)")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{path}: stream format version {header.get('format_version')} (written by zsadapt "
                         f"{header.get('zsadapt_version')}); this zsadapt ({__version__}) reads version "
                         f"{FORMAT_VERSION}")
    try:
        meta = json.loads(header.get("stream", ""))
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: malformed stream metadata (not a JSON object)")
    return tensors, meta
