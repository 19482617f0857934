"""Saved models: one ``.safetensors`` file holds what a fitted solver's ``predict`` needs.

Fit once on a pool (or a sample of a collection), save, and label any number of new images later,
on another machine, without refitting and without executing code from the file:

* the tensors of the solver's fitted state (:meth:`zsadapt.solvers.Solver.fitted_state`: by
  default its attributes ending in ``_``) are the safetensors tensors;
* everything else is JSON in the safetensors header: ``format`` (``"zsadapt-model"``),
  ``format_version``, ``zsadapt_version``, ``method``, ``params``, ``classnames``, ``classes``,
  ``n_features`` (d), ``n_classes`` (C), ``text_sha256`` (a checksum of the text features the
  model was fitted with), ``class_text_sha256`` (:func:`text_checksum` of the ``text_features``
  tensor, when present), ``context`` (initial classifier, weighting, seed) and ``state``: the
  fitted state as a tree whose leaves are JSON values or references to tensors (with their shape
  and dtype), and whose inner nodes are lists, tuples, dicts and small objects of zsadapt's own
  classes (``SimilarityScale``, ``ClassSupport``...), rebuilt field by field without calling
  their constructors.

Model files also hold the class text embeddings as the tensor
``text_features`` (C, d) (unit rows; a (C, P, d) prompt ensemble as the mean over templates): what
``zsadapt label --adapt`` starts a :class:`zsadapt.Stream` from. Files saved before this was
added lack it and load as before (:attr:`SavedModel.text_features` is None); so do models fitted on class prototypes.

Loading rebuilds the solver with ``make_solver(method, **params)`` and hands it the state
(:meth:`~zsadapt.solvers.Solver.load_fitted_state`), then predicts one probe image to check that
the tensors fit together. Every problem with a file (another format version, a truncated file,
tensors whose shapes differ from the metadata, a pickle renamed ``.safetensors``, a file that is
not a zsadapt model) is a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from . import solvers
from ._version import __version__
from .arrays import ArrayLike, like_input, resolve_device, to_tensor
from .io import atomic_write, check_output
from .messages import first_line
from .validation import l2_normalise, plain_unit_rows

PathLike = Union[str, os.PathLike]

#: The ``format`` entry of every zsadapt model file.
FORMAT = "zsadapt-model"
#: Bumped whenever a file written by this version could not be read by an older one.
FORMAT_VERSION = 1
#: Prefix of the tensor names of the fitted state.
STATE_PREFIX = "state/"
SUFFIX = ".safetensors"


@dataclasses.dataclass
class FittedSolver:
    """A fitted solver with what a model file says about it (``Result.fitted``).

    Attributes
    ----------
    solver : Solver
        Fitted; its ``predict`` labels new images.
    n_features : int
        d, the feature dimension it was fitted on.
    n_classes : int
        C, the number of columns of its probabilities.
    text_sha256 : str or None
        :func:`text_checksum` of the text features it was fitted with (None: class prototypes).
    context : dict
        How the initial classifier was made (``initial``, ``weighting``, ``seed``).
    text_features : array or tensor, (C, d) or (C, P, d), optional
        The class text embeddings the fit started from (None: class prototypes); saved as the
        file's ``text_features`` tensor (:func:`class_text`).
    """

    solver: solvers.Solver
    n_features: int
    n_classes: int
    text_sha256: Optional[str] = None
    context: dict = dataclasses.field(default_factory=dict)
    text_features: Any = None

#: Name of the class text embeddings tensor in a model file (outside the ``state/`` names).
TEXT_TENSOR = "text_features"


def class_text(text_features: Any, dim: Optional[int] = None) -> torch.Tensor:
    """The class text embeddings a model file stores: (C, d) float32 unit rows on the CPU, from
    (C, d) embeddings (or (d, C) when only that reading fits ``dim``, as refine reads them) or a
    (C, P, d) prompt ensemble (the normalised mean over templates, the ``mean`` weighting's
    classifier)."""
    text = torch.as_tensor(text_features.detach().cpu() if isinstance(text_features, torch.Tensor)
                           else np.asarray(text_features)).to(torch.float32)
    if text.ndim == 3:
        text = torch.nn.functional.normalize(text, dim=2).mean(dim=1)
    if text.ndim != 2:
        raise ValueError(f"class text embeddings must be (C, d) or (C, P, d), got shape {tuple(text.shape)}")
    if dim is not None and text.shape[1] != dim and text.shape[0] == dim:
        text = text.T
    return torch.nn.functional.normalize(text, dim=1).contiguous()


def text_checksum(text_features: Any) -> str:
    """SHA-256 (hex) of the text features as given: their shape and float32 values (C order)."""
    if isinstance(text_features, torch.Tensor):
        array = text_features.detach().to("cpu", torch.float32).numpy()
    else:
        array = np.asarray(text_features, dtype=np.float32)
    digest = hashlib.sha256(json.dumps(list(array.shape)).encode())
    digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


def has_predict(solver: solvers.Solver) -> bool:
    """Whether ``solver``'s class implements an inductive ``predict``."""
    return type(solver).predict is not solvers.Solver.predict


# --- the fitted state as tensors + a JSON tree -------------------------------------------------


class _Encoder:
    """Turns a fitted state into safetensors tensors and a JSON tree referencing them."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.tensors: dict = {}
        self._seen: dict = {}  # id(tensor) -> name: a tensor held twice is stored once

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            number = float(value)
            return number if math.isfinite(number) else {"$float": repr(number)}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, "torch", where)
        if isinstance(value, np.ndarray):
            if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
                self._refuse(where, f"a numpy array of dtype {value.dtype}")
            return self._tensor(value, "numpy", where)
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                self._refuse(where, "a dict with keys that are not strings")
            return {"$dict": {k: self.encode(v, f"{where}.{k}") for k, v in value.items()}}
        return self._object(value, where)

    def _tensor(self, value: Any, kind: str, where: str) -> dict:
        name = self._seen.get(id(value))
        if name is None:
            tensor = value.detach() if kind == "torch" else torch.from_numpy(np.ascontiguousarray(value))
            name = STATE_PREFIX + where
            # A copy on the CPU: safetensors refuses tensors that share memory (views of each other).
            self.tensors[name] = tensor.to("cpu").contiguous().clone()
            self._seen[id(value)] = name
        tensor = self.tensors[name]
        return {"$" + kind: name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}

    def _object(self, value: Any, where: str) -> dict:
        cls = type(value)
        ours = cls.__module__ == "zsadapt" or cls.__module__.startswith("zsadapt.")
        if dataclasses.is_dataclass(value) and ours:
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        elif ours and hasattr(value, "__dict__") and not hasattr(cls, "__slots__"):
            fields = vars(value)
        else:
            self._refuse(where, f"a {cls.__module__}.{cls.__qualname__}")
        return {"$object": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {k: self.encode(v, f"{where}.{k}") for k, v in fields.items()}}

    def _refuse(self, where: str, what: str) -> None:
        raise TypeError(
            f"{self.method}: fitted state {where} holds {what}, which a model file cannot store "
            "(override Solver.fitted_state / load_fitted_state for it)"
        )


class _Decoder:
    """Rebuilds a fitted state from the JSON tree and the file's tensors."""

    def __init__(self, path: Path, handle: Any, device: torch.device) -> None:
        self.path, self.handle, self.device = path, handle, device
        self.names = set(handle.keys())

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            self._malformed(f"unexpected {type(node).__name__}")
        if "$float" in node:
            return float(node["$float"])
        if "$tuple" in node:
            return tuple(self.decode(v) for v in node["$tuple"])
        if "$dict" in node:
            return {str(k): self.decode(v) for k, v in node["$dict"].items()}
        if "$torch" in node:
            return self._tensor(node["$torch"], node).to(self.device)
        if "$numpy" in node:
            return self._tensor(node["$numpy"], node).numpy()
        if "$object" in node:
            return self._object(node["$object"], node.get("fields", {}))
        self._malformed(f"unknown entry {sorted(node)}")

    def _tensor(self, name: str, node: dict) -> torch.Tensor:
        if name not in self.names:
            raise ValueError(f"{self.path}: tensor {name} is missing (the file is incomplete or edited)")
        tensor = self.handle.get_tensor(name)
        dtype = str(tensor.dtype).replace("torch.", "")
        if list(tensor.shape) != list(node.get("shape", [])) or dtype != node.get("dtype"):
            raise ValueError(
                f"{self.path}: tensor {name} has shape {tuple(tensor.shape)} ({dtype}), the model's "
                f"metadata says {tuple(node.get('shape', []))} ({node.get('dtype')})"
            )
        # No fit stores a NaN, and one would label every image that reaches it with NaN confidence
        # (infinities can be legitimate: log-weights of dropped classes).
        if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
            raise ValueError(f"{self.path}: tensor {name} holds NaN values; the file is damaged or was edited")
        return tensor

    def _object(self, spec: str, fields: dict) -> Any:
        module, _, qualname = str(spec).partition(":")
        if not (module == "zsadapt" or module.startswith("zsadapt.")) or not qualname:
            self._malformed(f"{spec!r} is not one of zsadapt's classes")
        try:
            cls: Any = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError):
            raise ValueError(f"{self.path}: the model needs {spec}, which this zsadapt ({__version__}) "
                             "does not have (saved by another version?)") from None
        if not isinstance(cls, type):
            self._malformed(f"{spec!r} is not a class")
        obj = cls.__new__(cls)  # data only: no constructor runs
        for key, value in fields.items():
            object.__setattr__(obj, str(key), self.decode(value))  # also sets frozen dataclass fields
        return obj

    def _malformed(self, why: str) -> None:
        raise ValueError(f"{self.path}: malformed model state ({why})")


# --- saving ------------------------------------------------------------------------------------


def check_model_path(path: PathLike, *, overwrite: bool = False) -> Path:
    """``path`` if a model can be written there (a ``.safetensors`` file, not existing unless
    ``overwrite``); the CLI calls this before fitting so a bad ``--save-model`` fails at once."""
    return check_output(path, overwrite=overwrite, suffix=SUFFIX)


def save_model(path: PathLike, fitted: FittedSolver, *, classnames: Optional[list] = None,
               classes: Optional[Any] = None, overwrite: bool = False) -> Path:
    """Write ``fitted`` to ``path`` (``.safetensors``, atomically; refuses to replace a file
    unless ``overwrite``), with its class text embeddings ``fitted.text_features`` as (C, d) unit
    rows (:func:`class_text`) when the fit had them.

    Parameters
    ----------
    path : path ending in ``.safetensors``
    fitted : FittedSolver
        The solver and its shapes (``Result.fitted``, or an estimator's).
    classnames : list of str, optional
        One name per class (C,), carried into ``zsadapt label`` outputs.
    classes : array-like of int or str, optional
        The label of each column (C,) (scikit-learn ``classes_``); default 0..C-1.

    Returns
    -------
    Path
        ``path``. ``TypeError`` when the solver has no inductive ``predict`` or holds state a model
        file cannot store; ``ValueError`` for a bad path or inconsistent class names.
    """
    from safetensors.torch import save as safetensors_bytes

    path = check_model_path(path, overwrite=overwrite)
    solver = fitted.solver
    if not has_predict(solver):
        raise TypeError(f"{solver.name} has no inductive predict: there is no model to save")
    n_classes = int(fitted.n_classes)
    if classnames is not None:
        classnames = [str(c) for c in classnames]
        if len(classnames) != n_classes:
            raise ValueError(f"{path}: {len(classnames)} class names for a model of {n_classes} classes")
    classes = list(range(n_classes)) if classes is None else np.asarray(classes).tolist()
    if len(classes) != n_classes or not all(isinstance(c, (int, str)) for c in classes):
        raise ValueError(f"{path}: classes must be {n_classes} ints or strings")
    if solver.inductive_below_initial:
        warnings.warn(
            f"{solver.name}: its predict labelled new images worse than the initial classifier on at "
            "least one shared real pool (figures: docs/results/fit_on_sample.md): check the labels on "
            "a few labelled held-out images before relying on them",
            UserWarning, stacklevel=2,
        )
    encoder = _Encoder(solver.name)
    state = encoder.encode(solver.fitted_state(), "solver")
    text = None if fitted.text_features is None else class_text(fitted.text_features, int(fitted.n_features))
    if text is not None and tuple(text.shape) != (n_classes, int(fitted.n_features)):
        raise ValueError(f"{path}: class text embeddings of shape {tuple(text.shape)} for a model of "
                         f"{n_classes} classes in dimension {int(fitted.n_features)}")
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "zsadapt_version": __version__,
        "method": solver.name,
        "params": json.dumps(encoder.encode(dict(solver.config), "params")),
        "classnames": json.dumps(classnames),
        "classes": json.dumps(classes),
        "n_features": str(int(fitted.n_features)),
        "n_classes": str(n_classes),
        "text_sha256": json.dumps(fitted.text_sha256),
        "context": json.dumps(encoder.encode(dict(fitted.context), "context")),
        "state": json.dumps(state),
    }
    tensors = dict(encoder.tensors)
    if text is not None:
        tensors[TEXT_TENSOR] = text
        metadata["class_text_sha256"] = text_checksum(text)
    if any(name.startswith(STATE_PREFIX + "params") or name.startswith(STATE_PREFIX + "context")
           for name in encoder.tensors):
        raise TypeError(f"{solver.name}: parameters must be plain values, not arrays")
    payload = safetensors_bytes(tensors, metadata=metadata)
    return atomic_write(path, lambda handle: handle.write(payload), overwrite=overwrite)


# --- loading -----------------------------------------------------------------------------------


def _check_header(path: Path) -> None:
    """One-line errors for files that are not safetensors at all (before the parser sees them)."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a .safetensors model file")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(9)
    size = os.path.getsize(path)
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:2] == b"PK"):  # a header size may start with 0x80
        kind = "a pickle" if head[:1] == b"\x80" else "a zip archive (a torch .pt or an .npz)"
        raise ValueError(f"{path}: is {kind}, not a safetensors model; zsadapt never unpickles model files")
    header = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) < 9 or head[8:9] != b"{" or header <= 0:
        raise ValueError(f"{path}: not a safetensors file (corrupt or truncated)")
    if 8 + header > size:
        raise ValueError(f"{path}: truncated ({size} bytes, its header alone claims {8 + header})")


def _metadata(path: Path, raw: Optional[dict]) -> dict:
    """The parsed zsadapt metadata; one-line errors for other files and other versions."""
    raw = raw or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a zsadapt model (no '{FORMAT}' metadata; a pool or another "
                         "library's weights?)")
    version = raw.get("format_version")
    if version is None:
        raise ValueError(f"{path}: malformed zsadapt metadata (no format_version: edited, or not written by zsadapt)")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{path}: model format version {version} (written by zsadapt {raw.get('zsadapt_version')}); "
            f"this zsadapt ({__version__}) reads version {FORMAT_VERSION}: re-save the model with it"
        )
    try:
        meta = {key: raw[key] for key in ("format", "format_version", "zsadapt_version", "method")}
        for key in ("params", "classnames", "classes", "text_sha256", "context", "state"):
            meta[key] = json.loads(raw[key])
        meta["n_features"], meta["n_classes"] = int(raw["n_features"]), int(raw["n_classes"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: malformed zsadapt metadata ({type(err).__name__}: {err})") from None
    return meta


class SavedModel:
    """A model loaded from a file (:func:`load_model`): predicts new images.

    Attributes
    ----------
    method : str
    classes_ : numpy array (C,)
        The label of each column of the probabilities (0..C-1 unless saved from an estimator fitted
        on labels).
    classnames : list of str or None
    n_features_in_ : int
        d.
    text_features : torch tensor (C, d) or None
        The class text embeddings the model was fitted from (unit rows, CPU), None for files
        saved before model files held them, or fitted on class prototypes.
    metadata : dict
        Everything the file says (method, params, zsadapt version, text checksum...), without the
        fitted state.
    path : Path
    """

    def __init__(self, path: Path, metadata: dict, state: dict, device: Optional[torch.device],
                 text_features: Optional[torch.Tensor] = None) -> None:
        self.path = path
        self.text_features = text_features
        self.method = metadata["method"]
        self.metadata = {k: v for k, v in metadata.items() if k != "state"}
        self.classes_ = np.asarray(metadata["classes"])
        self.classnames = metadata["classnames"]
        self.n_features_in_ = metadata["n_features"]
        self.n_classes = metadata["n_classes"]
        self._device = device  # None: compute on the input's device
        self._state = state  # decoded on the CPU (or on ``device``)
        self._solvers: dict = {}

    def __repr__(self) -> str:
        return (f"SavedModel(method={self.method!r}, d={self.n_features_in_}, C={self.n_classes}, "
                f"path={str(self.path)!r})")

    def solver(self, device: Union[str, torch.device, None] = None) -> solvers.Solver:
        """The fitted solver with its tensors on ``device`` (default: where they were loaded)."""
        device = torch.device(device) if device is not None else (self._device or torch.device("cpu"))
        key = str(device)
        if key not in self._solvers:
            from .api import make_solver

            solver = make_solver(self.method, **self.metadata["params"])
            solver.load_fitted_state(_to_device(self._state, device))
            self._solvers[key] = solver
        return self._solvers[key]

    def features(self, X: Any, device: torch.device, name: str = "X") -> torch.Tensor:
        """``X`` (M, d) as unit float32 rows on ``device``; one-line errors for the wrong d, a NaN
        or inf, or an all-zero row (``name`` says where they came from)."""
        t = to_tensor(X, name, device)
        if t.ndim != 2 or t.shape[1] != self.n_features_in_:
            raise ValueError(f"{name}: the model {self.path.name} expects (M, {self.n_features_in_}) "
                             f"features, got shape {tuple(t.shape)}")
        unit = plain_unit_rows(t)
        if unit is not None:
            return unit
        finite = torch.isfinite(t).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"{name}: row {int((~finite).nonzero()[0, 0])} holds NaN or inf")
        return l2_normalise(t, name)[0]

    def _compute_device(self, X: Any, device: Union[str, torch.device, None]) -> torch.device:
        if device is not None:
            return resolve_device(device, X)
        if self._device is not None:
            return self._device
        return resolve_device(None, X)

    def predict_proba(self, X: Any, *, device: Union[str, torch.device, None] = None) -> ArrayLike:
        """Class probabilities (M, C) for images ``X`` (M, d): numpy in, numpy out; torch in, torch
        out on the input's device. ``device``: where to compute (default: where the model was
        loaded, else the input's device)."""
        where = self._compute_device(X, device)
        probs = self.solver(where).predict(self.features(X, where)).probs.float()  # (M, C)
        return like_input(probs, X)

    def predict(self, X: Any, *, device: Union[str, torch.device, None] = None) -> ArrayLike:
        """Labels (M,) for images ``X`` (M, d): ``classes_`` at each row's most probable column
        (numpy in, numpy out; torch in, an int64 tensor on the input's device)."""
        probs = self.predict_proba(X, device=device)
        if isinstance(probs, torch.Tensor):
            if self.classes_.dtype.kind not in "iu":
                raise TypeError(f"{self.path}: class labels are strings; pass numpy to predict")
            return torch.as_tensor(self.classes_, device=probs.device)[probs.argmax(dim=1)]
        return self.classes_[probs.argmax(axis=1)]


def _to_device(value: Any, device: torch.device) -> Any:
    """A decoded state with every tensor on ``device`` (objects are copied, never shared)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if hasattr(value, "__dict__") and type(value).__module__.startswith("zsadapt."):
        copy = type(value).__new__(type(value))
        for key, item in vars(value).items():
            object.__setattr__(copy, key, _to_device(item, device))
        return copy
    return value


def load_model(path: PathLike, *, device: Union[str, torch.device, None] = None) -> SavedModel:
    """Load a model saved by ``zsadapt refine --save-model``, ``Result.save`` or an estimator's
    ``save``. Nothing in the file is executed (safetensors tensors + JSON).

    Parameters
    ----------
    path : path to a ``.safetensors`` model file
    device : str or torch.device, optional
        Where the tensors live and predictions are computed; None: the CPU, moved to each input's
        device on first use.

    Returns
    -------
    SavedModel
        With ``predict``, ``predict_proba``, ``classes_``, ``classnames``, ``metadata``. (A file
        saved by ``zsadapt.Stream.save`` loads as that :class:`~zsadapt.stream.Stream`.)
    """
    from safetensors import safe_open

    path = Path(path)
    _check_header(path)
    load_device = resolve_device(device, None) if device is not None else None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = handle.metadata()
            if (raw or {}).get("format") == "zsadapt-stream":  # a saved zsadapt.Stream
                from .stream import Stream

                return Stream.load(path, device=device)
            meta = _metadata(path, raw)
            decoder = _Decoder(path, handle, load_device or torch.device("cpu"))
            state = decoder.decode(meta["state"])
            meta["params"], meta["context"] = decoder.decode(meta["params"]), decoder.decode(meta["context"])
            text = handle.get_tensor(TEXT_TENSOR) if TEXT_TENSOR in set(handle.keys()) else None
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot be read as a safetensors model ({first_line(err)})") from None
    except Exception as err:  # the safetensors parser's errors on a corrupt file
        raise ValueError(f"{path}: cannot be read as a safetensors model ({first_line(err)})") from None
    if meta["method"] not in solvers.available():
        raise ValueError(f"{path}: method {meta['method']!r} is not in this zsadapt ({__version__}); "
                         f"available: {', '.join(solvers.available())}")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: malformed model state (not a mapping)")
    _check_labels(path, meta)
    model = SavedModel(path, meta, state, load_device)
    _probe(model)
    model.text_features = _check_class_text(path, text, raw, meta)  # after the probe: its errors come first
    return model


def _check_class_text(path: Path, text: Optional[torch.Tensor], raw: dict, meta: dict) -> Optional[torch.Tensor]:
    """The file's class text embeddings (C, d), checked against the metadata; None if absent."""
    if text is None:
        return None
    if tuple(text.shape) != (meta["n_classes"], meta["n_features"]) or text.dtype != torch.float32:
        raise ValueError(f"{path}: class text embeddings of shape {tuple(text.shape)} ({text.dtype}), the "
                         f"metadata says ({meta['n_classes']}, {meta['n_features']}) float32")
    if text_checksum(text) != raw.get("class_text_sha256"):
        raise ValueError(f"{path}: the class text embeddings do not match their checksum (corrupt or edited file)")
    return text


def _check_labels(path: Path, meta: dict) -> None:
    """One-line errors for class names or labels that do not give one entry per class."""
    n_classes, names, classes = meta["n_classes"], meta["classnames"], meta["classes"]
    if names is not None and (not isinstance(names, list) or len(names) != n_classes
                              or not all(isinstance(name, str) for name in names)):
        count = f"{len(names)} entries" if isinstance(names, list) else type(names).__name__
        raise ValueError(f"{path}: malformed class names ({count} where the metadata says {n_classes} classes)")
    if not isinstance(classes, list) or len(classes) != n_classes:
        count = f"{len(classes)} entries" if isinstance(classes, list) else type(classes).__name__
        raise ValueError(f"{path}: malformed class labels ({count} where the metadata says {n_classes} classes)")


def _probe(model: SavedModel) -> None:
    """Predict one image, so that tensors that do not fit together fail at load time, in one line."""
    probe = np.zeros((1, model.n_features_in_), dtype=np.float32)
    probe[0, 0] = 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probs = model.predict_proba(probe)
    except Exception as err:
        raise ValueError(f"{model.path}: the stored model does not predict ({type(err).__name__}: "
                         f"{first_line(err)}); the file is damaged or was edited") from None
    if probs.shape != (1, model.n_classes):
        raise ValueError(f"{model.path}: the stored model predicts {probs.shape[1]} classes, its "
                         f"metadata says {model.n_classes}")
    if not np.isfinite(probs).all():
        raise ValueError(f"{model.path}: the stored model predicts non-finite probabilities; the file is damaged "
                         "or was edited")
