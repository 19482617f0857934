"""Arrays in, arrays out: turn numpy / torch inputs into float32 torch tensors for the maths,
and turn results back into the caller's kind (numpy stays numpy; torch returns on the input's
device), as faiss' python wrappers do.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def resolve_device(device: Union[str, torch.device, None], like: Any) -> torch.device:
    """The device to compute on: ``device`` if given, else the device of ``like`` (CPU for numpy)."""
    if device is not None:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but CUDA is not available here")
        if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} was asked for, but there are {torch.cuda.device_count()} CUDA devices"
            )
        return resolved
    if isinstance(like, torch.Tensor):
        return like.device
    return torch.device("cpu")


def to_tensor(x: Any, name: str, device: torch.device, *, dtype=torch.float32) -> torch.Tensor:
    """``x`` as a ``dtype`` tensor on ``device``; float16/bfloat16 are upcast (float32 for the maths).

    Raises ``TypeError`` naming ``name`` when ``x`` is not numeric array-like; booleans are
    refused too (a mask passed by mistake would otherwise become 0/1 features).
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype == torch.bool:
            raise TypeError(f"{name}: expected a numeric array, got a boolean one")
    else:
        try:
            arr = np.asarray(x)
        except Exception as err:  # pragma: no cover - exotic objects
            raise TypeError(f"{name}: cannot be read as an array ({err})") from None
        if arr.dtype == np.bool_:
            raise TypeError(f"{name}: expected a numeric array, got a boolean one")
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise TypeError(f"{name}: complex values are not supported")
    out = t.to(device=device, dtype=dtype)
    if out.is_floating_point() and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
        # Finite in the input, infinite after the cast: say so instead of "contains inf".
        raise ValueError(f"{name}: values too large for {str(dtype).replace('torch.', '')}")
    return out


def like_input(t: torch.Tensor, reference: Any) -> ArrayLike:
    """``t`` in the kind of ``reference``: a numpy array, or a tensor on ``reference``'s device;
    contiguous either way (solvers may hand back views of row-padded product blocks,
    :mod:`zsadapt.graphs.blocks`, and a user's ``.view()`` or C extension expects plain rows)."""
    t = t.detach().contiguous()
    if isinstance(reference, torch.Tensor):
        return t.to(reference.device)
    return t.cpu().numpy()
