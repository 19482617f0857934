"""Reading feature files and writing results.

Pool files: ``.npz``, torch ``.pt`` (loaded with ``weights_only=True``) or ``.safetensors``,
holding ``image_features`` (N, d), ``text_features`` (C, d), and optionally ``labels`` (N,) and
``classnames`` (C,) (in ``.safetensors``: a JSON list in the metadata under ``classnames``; in a
``.pt`` dict: a list of str). Other entries of a ``.pt`` dict that are not arrays (a model name, an
epoch) are ignored. Single arrays may also come as ``.npy``. Every problem is a one-line
``ValueError`` that names the file. Outputs are written atomically and never over an existing file
unless asked.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np

from .messages import first_line
from .pool import Pool

PathLike = Union[str, os.PathLike]
POOL_SUFFIXES = (".npz", ".pt", ".pth", ".safetensors")
ARRAY_SUFFIXES = (".npy",) + POOL_SUFFIXES
#: ``zsadapt encode`` writes the (C, P, d) embeddings of every prompt template under this key beside
#: their mean ``text_features`` (C, d); a pool reader uses them (prompt weighting needs them).
TEMPLATES_KEY = "text_features_per_template"
POOL_KEYS = ("image_features", "text_features", TEMPLATES_KEY, "labels", "classnames")


def _suffix(path: Path, allowed: tuple) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(allowed)}"
        )
    return suffix


class _NotAnArray(ValueError):
    """A file entry that holds something other than an array (metadata, a nested dict...)."""


def _to_numpy(value: Any, where: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            value = value.float()  # numpy has no bfloat16
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return np.asarray(value)  # e.g. labels saved as a plain list
    if isinstance(value, np.ndarray):
        return value
    raise _NotAnArray(f"{where}: holds a {type(value).__name__}, expected an array")


def npy_problem(path: PathLike) -> Optional[str]:
    """Why a ``.npy`` file cannot hold an embedding array, read from its header alone, or None.

    np.load's own messages mislead here: a file without the ``.npy`` magic string is tried as a
    pickle ("contains pickled (object) data ... load it unsafely"), and an object array is
    "Object arrays cannot be loaded" or "can't be memory-mapped". zsadapt never unpickles. None
    also when the file cannot be opened or its header is damaged: np.load's message says which."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                return "no NUMPY header: corrupt, empty or not a .npy file"
            handle.seek(0)
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            dtype = read_header(handle)[2] if read_header else None
    except (OSError, ValueError):
        return None
    if dtype is not None and dtype.hasobject:
        return "it holds Python objects, a pickle, which zsadapt never loads"
    return None


def _from_dict(obj: dict, path: Path) -> dict:
    """The arrays of a loaded ``.pt`` dict. Entries that are not arrays are skipped as metadata,
    unless they sit under one of the pool keys, whose contents must be arrays."""
    arrays = {}
    for key, value in obj.items():
        try:
            arrays[str(key)] = _to_numpy(value, f"{path}: {key}")
        except _NotAnArray:
            if str(key) in POOL_KEYS:
                raise
    return arrays


def read_arrays(path: PathLike) -> dict:
    """All named arrays of a feature file (``.npy`` gives one array under the key ``""``).

    Returns a dict of numpy arrays (class names as a list of str). Raises ``ValueError`` naming the
    file when it is missing, unreadable, or of an unsupported type.
    """
    path = Path(path)
    suffix = _suffix(path, ARRAY_SUFFIXES)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a {suffix} file")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ValueError(f"{path}: cannot be opened ({err.strerror or first_line(err)})") from None
    if suffix == ".npz" and not zipfile.is_zipfile(path):
        # np.load would fall back to pickle and complain about "pickled data": say what it is.
        raise ValueError(f"{path}: cannot be read as .npz (not a zip archive: corrupt or truncated)")
    problem = npy_problem(path) if suffix == ".npy" else None
    if problem:
        raise ValueError(f"{path}: cannot be read as .npy ({problem})")
    try:
        if suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        if suffix in (".pt", ".pth"):
            import torch

            try:
                with warnings.catch_warnings():
                    # Its warnings ("Detected pickle protocol 4 ...") would come before the one-line
                    # error below, or be noise about a file that reads.
                    warnings.simplefilter("ignore")
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                if "weights only" in str(err).lower() or "weights_only" in str(err):
                    raise ValueError(
                        f"{path}: cannot be read as .pt with weights_only=True (corrupt, not a "
                        "torch file, or it pickles Python objects other than tensors and dicts)"
                    ) from None
                raise
            if not isinstance(obj, dict):
                return {"": _to_numpy(obj, str(path))}
            return _from_dict(obj, path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            arrays = {k: _to_numpy(handle.get_tensor(k), f"{path}: {k}") for k in handle.keys()}
            meta = handle.metadata() or {}
        if "classnames" in meta:
            try:
                names = json.loads(meta["classnames"])
            except json.JSONDecodeError:
                names = None
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ValueError(
                    f"{path}: metadata 'classnames' must be a JSON list of strings"
                )
            arrays["classnames"] = names
        return arrays
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot be read as {suffix} ({first_line(err)})") from None
    except Exception as err:  # any parser failure on a corrupt file is the same user error
        raise ValueError(f"{path}: cannot be read as {suffix} ({first_line(err)})") from None


def _read_named(path: PathLike, key: str) -> tuple:
    """One array from a file and how messages should name it: the file's only array (named by
    the file), or the one called ``key`` (named ``"<file>: <key>"``)."""
    arrays = read_arrays(path)
    if len(arrays) == 1:
        ((name, array),) = arrays.items()
        return array, (f"{path}: {name}" if name else str(path))
    if key in arrays:
        return arrays[key], f"{path}: {key}"
    raise ValueError(
        f"{path}: no array named {key!r} (found: {', '.join(sorted(arrays)) or 'nothing'})"
    )


def read_array(path: PathLike, key: str) -> np.ndarray:
    """One array from a file: the only array it holds, or the one named ``key``."""
    return _read_named(path, key)[0]


def read_pool(
    path: Optional[PathLike] = None,
    *,
    image_features: Optional[PathLike] = None,
    text_features: Optional[PathLike] = None,
    labels: Optional[PathLike] = None,
) -> Pool:
    """Read and validate a pool: one pool file, or separate image and text feature files.

    Parameters
    ----------
    path : path, optional
        A pool file (``.npz``, ``.pt``/``.pth`` dict, ``.safetensors``) with ``image_features``
        (N, d) and ``text_features`` (C, d) or (d, C), optionally ``labels`` (N,), ``classnames`` (C,).
    image_features, text_features : path, optional
        Instead of ``path``: separate files (``.npy``, or one of the pool formats holding a single
        array or one under that name).
    labels : path, optional
        Ground-truth labels (N,), overriding any in the pool file.

    Returns
    -------
    Pool
        Validated: float32, L2-normalised rows, text as (C, d). Errors are one-line
        ``ValueError`` naming the file (and array) at fault.
    """
    label_array, label_name = (None, None) if labels is None else _read_named(labels, "labels")
    if path is not None:
        if image_features is not None or text_features is not None:
            raise ValueError("give either a pool file or --image-features/--text-features, not both")
        path = Path(path)
        _suffix(path, POOL_SUFFIXES)
        arrays = read_arrays(path)
        missing = [k for k in ("image_features", "text_features") if k not in arrays]
        if missing:
            raise ValueError(
                f"{path}: missing {' and '.join(missing)} "
                f"(found: {', '.join(sorted(k for k in arrays if k)) or 'no named arrays'})"
            )
        extras = {k: v for k, v in arrays.items() if k not in POOL_KEYS}
        text, text_name = _text_of(arrays, path)
        pool = Pool(
            arrays["image_features"],
            text,
            arrays.get("labels") if labels is None else label_array,
            arrays.get("classnames"),
            source=str(path),
            extras=extras,
        )
        return pool.validated(text_name=text_name, labels_name=label_name)
    if image_features is None or text_features is None:
        raise ValueError("give a pool file, or both --image-features and --text-features")
    image, image_name = _read_named(image_features, "image_features")
    text_arrays = read_arrays(text_features)
    if "text_features" in text_arrays:
        text, text_name = _text_of(text_arrays, text_features)
    else:
        text, text_name = _read_named(text_features, "text_features")
    pool = Pool(image, text, label_array, source=f"{image_features} + {text_features}")
    return pool.validated(image_name=image_name, text_name=text_name, labels_name=label_name)


def _text_of(arrays: dict, path: PathLike) -> tuple:
    """The class embeddings of a file and how messages name them: the per-template (C, P, d)
    array when the file has one (``zsadapt encode`` writes it beside the (C, d) mean, which must
    agree with it in C and d), else ``text_features``."""
    text = arrays["text_features"]
    templates = arrays.get(TEMPLATES_KEY)
    if templates is None or np.ndim(text) == 3:
        return text, f"{path}: text_features"
    if np.ndim(templates) != 3:
        raise ValueError(f"{path}: {TEMPLATES_KEY} must be 3-d (C, P, d), got shape {np.shape(templates)}")
    if np.ndim(text) != 2 or (np.shape(templates)[0], np.shape(templates)[2]) != np.shape(text):
        raise ValueError(
            f"{path}: {TEMPLATES_KEY} {np.shape(templates)} does not match text_features "
            f"{np.shape(text)} (expected (C, P, d) beside (C, d))"
        )
    return templates, f"{path}: {TEMPLATES_KEY}"


def write_pool(path: PathLike, pool: Pool, *, overwrite: bool = False) -> Path:
    """Write ``pool`` as an ``.npz`` pool file (atomically; refuses to replace a file unless
    ``overwrite``)."""
    text = pool.text_templates if pool.text_templates is not None else pool.text_features
    arrays = {"image_features": pool.image_features, "text_features": text}  # (C, d) or (C, P, d)
    if pool.labels is not None:
        arrays["labels"] = np.asarray(pool.labels, dtype=np.int64)
    if pool.classnames is not None:
        arrays["classnames"] = np.asarray(pool.classnames, dtype=str)
    return write_npz(path, arrays, overwrite=overwrite)


def check_output(path: PathLike, *, overwrite: bool = False, suffix: Optional[str] = None,
                 inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """``path`` as a ``Path`` if it can be written: the right ``suffix`` (when given), not a
    folder, not one of ``inputs`` (the same file after links are resolved: refused even with
    ``overwrite``), not an existing file unless ``overwrite``, in a folder that exists and where a
    file can be created (tried with a temporary file). The CLI calls this before computing so a
    bad ``--out`` fails at once; otherwise a one-line ``ValueError``."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{path}: output must be a {suffix} file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a file to write")
    if path.exists():
        for given in inputs:
            if given is not None and os.path.exists(given) and os.path.samefile(path, given):
                raise ValueError(f"{path}: is also an input ({given}); write the output to another file")
        if not overwrite:
            raise ValueError(f"{path}: already exists (pass --overwrite / overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    try:  # the folder may exist but refuse new files (read-only, no permission, /sys)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise ValueError(f"{path}: cannot write in {path.parent} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _new_file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would give: the existing file's when it is replaced,
    else ``0o666`` less the umask (``mkstemp`` makes 0600 files, private whatever the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it; put it back at once
        os.umask(umask)
        return 0o666 & ~umask


def write_npz(path: PathLike, arrays: dict, *, overwrite: bool = False) -> Path:
    """Save ``arrays`` to ``path`` (``.npz``) atomically: write a temporary file in the same
    folder, then rename it over the target, so a crash never leaves a half-written output."""
    path = check_output(path, overwrite=overwrite, suffix=".npz")
    return atomic_write(path, lambda handle: np.savez(handle, **arrays), overwrite=overwrite)


def atomic_write(path: PathLike, write: Callable[[Any], None], *, overwrite: bool = False,
                 mode: str = "wb") -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then move it into place.

    The file gets the permissions a plain write would give (:func:`_new_file_mode`). Raises a
    one-line ``ValueError`` naming ``path`` when it exists and ``overwrite`` is false, when its
    folder does not exist, or when the write fails; no temporary file is left behind.
    """
    path = check_output(path, overwrite=overwrite)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise ValueError(f"{path}: cannot write there ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, mode) as handle:
            os.fchmod(handle.fileno(), _new_file_mode(path))
            write(handle)
        os.replace(tmp, path)
    except OSError as err:
        raise ValueError(f"{path}: cannot write ({err.strerror or first_line(err)})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
