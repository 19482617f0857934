"""Reading feature files and writing results.

Pool files: ``.npz``, torch ``.pt`` (loaded with ``weights_only=True``) or ``.safetensors``,
holding ``image_features`` (N, d), ``text_features`` (C, d), and optionally ``labels`` (N,) and
``classnames`` (C,) (in ``.safetensors``: a JSON list in the metadata under ``classnames``).
Single arrays may also come as ``.npy``. Every problem is a one-line ``ValueError`` that names the
file. Outputs are written atomically and never over an existing file unless asked.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from .pool import Pool

PathLike = Union[str, os.PathLike]
POOL_SUFFIXES = (".npz", ".pt", ".pth", ".safetensors")
ARRAY_SUFFIXES = (".npy",) + POOL_SUFFIXES
POOL_KEYS = ("image_features", "text_features", "labels", "classnames")


def _suffix(path: Path, allowed: tuple) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(allowed)}"
        )
    return suffix


def _to_numpy(value: Any, where: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(f"{where}: holds a {type(value).__name__}, expected an array")


def read_arrays(path: PathLike) -> dict:
    """All named arrays of a feature file (``.npy`` gives one array under the key ``""``).

    Returns a dict of numpy arrays (class names as a list of str). Raises ``ValueError`` naming the
    file when it is missing, unreadable, or of an unsupported type.
    """
    path = Path(path)
    suffix = _suffix(path, ARRAY_SUFFIXES)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        if suffix in (".pt", ".pth"):
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                return {"": _to_numpy(obj, str(path))}
            return {str(k): _to_numpy(v, f"{path}: {k}") for k, v in obj.items()}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            arrays = {k: _to_numpy(handle.get_tensor(k), f"{path}: {k}") for k in handle.keys()}
            meta = handle.metadata() or {}
        if "classnames" in meta:
            arrays["classnames"] = json.loads(meta["classnames"])
        return arrays
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot be read as {suffix} ({_one_line(err)})") from None
    except Exception as err:  # any parser failure on a corrupt file is the same user error
        raise ValueError(f"{path}: cannot be read as {suffix} ({_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_array(path: PathLike, key: str) -> np.ndarray:
    """One array from a file: the only array it holds, or the one named ``key``."""
    arrays = read_arrays(path)
    if key in arrays:
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise ValueError(
        f"{path}: no array named {key!r} (found: {', '.join(sorted(arrays)) or 'nothing'})"
    )


def read_pool(
    path: Optional[PathLike] = None,
    *,
    image_features: Optional[PathLike] = None,
    text_features: Optional[PathLike] = None,
    labels: Optional[PathLike] = None,
) -> Pool:
    """Read and validate a pool: one pool file, or separate image and text feature files.

    Returns a validated :class:`Pool` (float32, L2-normalised, text as (C, d)).
    """
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
                f"(found: {', '.join(sorted(arrays)) or 'nothing'})"
            )
        extras = {k: v for k, v in arrays.items() if k not in POOL_KEYS}
        pool = Pool(
            arrays["image_features"],
            arrays["text_features"],
            arrays.get("labels"),
            arrays.get("classnames"),
            source=str(path),
            extras=extras,
        )
        if labels is not None:
            pool.labels = read_array(labels, "labels")
        return pool.validated()
    if image_features is None or text_features is None:
        raise ValueError("give a pool file, or both --image-features and --text-features")
    image = read_array(image_features, "image_features")
    text = read_array(text_features, "text_features")
    pool = Pool(image, text, source=f"{image_features} + {text_features}")
    if labels is not None:
        pool.labels = read_array(labels, "labels")
    try:
        return pool.validated()
    except ValueError as err:
        # Name the file each array came from rather than the pair.
        message = str(err).replace(f"{pool.source}: image_features", str(image_features))
        message = message.replace(f"{pool.source}: text_features", str(text_features))
        raise ValueError(message.replace(f"{pool.source}: labels", str(labels))) from None


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


def write_npz(path: PathLike, arrays: dict, *, overwrite: bool = False) -> Path:
    """Save ``arrays`` to ``path`` (``.npz``) atomically: write a temporary file in the same
    folder, then rename it over the target, so a crash never leaves a half-written output."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"{path}: output must be an .npz file")
    return atomic_write(path, lambda handle: np.savez(handle, **arrays), overwrite=overwrite)


def atomic_write(path: PathLike, write: Callable[[Any], None], *, overwrite: bool = False,
                 mode: str = "wb") -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then move it into place.

    Raises ``FileExistsError``-like ``ValueError`` when ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path}: already exists (pass --overwrite / overwrite=True to replace it)")
    if not path.parent.exists():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
