"""From images and class names to features: open_clip encoding (optional extra ``zsadapt[clip]``).

:func:`image_features` and :func:`text_features` work with any model that has CLIP's
``encode_image`` / ``encode_text`` methods (every open_clip model does), so a model the user
already holds can be passed as is; :func:`load_model` builds one from an open_clip name and a
pretrained tag or a local checkpoint file (offline use).

Image encoding is resumable: with ``resume_dir``, every finished batch is written there as one
small ``.npz`` shard (atomically), and a later call with the same folder encodes only the images
not yet done. Unreadable or corrupt images are skipped and reported, never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from .extras import require
from .io import atomic_write
from .messages import first_line, note, progress as progress_bar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEMPLATE_SETS = ("openai-imagenet", "simple")
PathLike = Union[str, os.PathLike]

if TYPE_CHECKING:  # torch is imported where it is used: ``zsadapt encode --help`` stays fast
    import torch


def open_clip_module():
    """``import open_clip``, or a one-line ``MissingExtra`` saying to install ``zsadapt[clip]``."""
    return require("open_clip", "clip", "encoding with open_clip")


@dataclass
class ImageEncoding:
    """Features of the images that could be read.

    Attributes
    ----------
    features : float32 array, shape (M, d)
        L2-normalised image embeddings, in the order of the input paths (skipped ones left out).
    paths : list of str, length M
        The image each row belongs to.
    skipped : list of (str, str)
        (path, reason) for every image that could not be read or preprocessed.
    """

    features: np.ndarray
    paths: list
    skipped: list = field(default_factory=list)


@dataclass
class TextEncoding:
    """Class text embeddings from prompt templates.

    Attributes
    ----------
    per_template : float32 array, shape (C, P, d)
        L2-normalised embedding of every (class, template) prompt.
    mean : float32 array, shape (C, d)
        The zero-shot classifier: the mean over templates of the unit prompt embeddings,
        re-normalised (Radford et al. 2021, prompt ensembling).
    classnames : list of str, length C
    templates : list of str, length P, ``{}`` standing for the class name
    """

    per_template: np.ndarray
    mean: np.ndarray
    classnames: list
    templates: list


# ----------------------------------------------------------------------------- inputs


def list_images(source: PathLike) -> list:
    """Image paths from a folder (recursively, sorted, by suffix) or a list file.

    A list file (any file that is not an image) holds one path per line; blank lines and lines
    starting with ``#`` are ignored, relative paths are relative to the list file's folder.
    Raises ``ValueError`` naming ``source`` when it is missing or lists nothing.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(str(p) for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return paths
    if not source.is_file():
        raise ValueError(f"{source}: no such folder or file")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [str(source)]
    try:
        lines = source.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{source}: cannot be read as a list of image paths ({err})") from None
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            paths.append(str(path if path.is_absolute() else source.parent / path))
    if not paths:
        raise ValueError(f"{source}: lists no image paths")
    return paths


def read_lines(path: PathLike, what: str) -> list:
    """Non-empty, stripped lines of a text file (class names, templates)."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read as {what} ({err})") from None
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: holds no {what}")
    return lines


def load_templates(spec: Union[str, PathLike, Sequence[Any]]) -> list:
    """Prompt templates as strings with ``{}`` for the class name.

    ``spec`` is ``"openai-imagenet"`` (open_clip's ``OPENAI_IMAGENET_TEMPLATES``, 80 prompts),
    ``"simple"`` (``SIMPLE_IMAGENET_TEMPLATES``, 7), a text file with one template per line, or
    a sequence of strings / callables (open_clip's lambdas).
    """
    if isinstance(spec, (str, os.PathLike)):
        if str(spec) in TEMPLATE_SETS:
            open_clip = open_clip_module()
            spec = (open_clip.OPENAI_IMAGENET_TEMPLATES if str(spec) == "openai-imagenet"
                    else open_clip.SIMPLE_IMAGENET_TEMPLATES)
        else:
            if not Path(spec).is_file():
                raise ValueError(f"{spec}: not a template set ({', '.join(TEMPLATE_SETS)}) nor a file")
            spec = read_lines(spec, "templates")
    templates = [t("{}") if callable(t) else str(t) for t in spec]
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise ValueError(f"template {missing[0]!r} has no {{}} where the class name goes")
    if not templates:
        raise ValueError("no templates given")
    return templates


# ----------------------------------------------------------------------------- model


def load_model(model_name: str = "ViT-B-32", pretrained: Optional[str] = "openai", *,
               device: Union[str, torch.device] = "cpu", model_config: Optional[PathLike] = None):
    """An open_clip model in eval mode, its inference preprocessing and its tokenizer.

    Parameters
    ----------
    model_name : str
        An open_clip architecture (``open_clip.list_models()``), e.g. ``"ViT-B-32"``.
    pretrained : str or None
        A pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``; downloaded on first use) or the
        path of a local checkpoint (``.pt``/``.bin``/``.safetensors``, a state dict) for offline
        use. ``None`` gives random weights.
    device : str or torch.device
    model_config : path, optional
        An open_clip model config JSON to register first (``open_clip.add_model_config``); its
        file stem becomes a model name.

    Returns
    -------
    (model, preprocess, tokenizer)

    A tag whose weights are not cached needs the download host; when it cannot be reached within
    a few seconds (offline), a one-line ``ValueError`` says so at once instead of after the
    downloader's minute of retries.
    """
    from .arrays import resolve_device

    device = resolve_device(device, None)  # "cuda" without a GPU is a device error, not a checkpoint one
    open_clip = open_clip_module()
    if model_config is not None:
        if not Path(model_config).is_file():
            raise ValueError(f"{model_config}: no such model config file")
        _check_model_config(model_config)
        open_clip.add_model_config(model_config)
    if model_name not in open_clip.list_models():
        raise ValueError(f"{model_name}: unknown open_clip model (see open_clip.list_models())")
    looks_like_file = pretrained is not None and (
        os.sep in str(pretrained) or Path(str(pretrained)).suffix in (".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_file and not Path(pretrained).is_file():
        raise ValueError(f"{pretrained}: no such checkpoint file")
    if pretrained and not looks_like_file and not open_clip.get_pretrained_cfg(model_name, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ValueError(
            f"{pretrained}: neither a checkpoint file nor a pretrained tag of {model_name} "
            f"(tags: {tags}); offline, pass --pretrained /path/to/checkpoint"
        )
    if pretrained and not looks_like_file:
        pretrained = _fetchable_weights(open_clip, model_name, pretrained)
    try:
        with _quiet_root_log():
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, device=device)
    except Exception as err:
        first = first_line(err)
        if looks_like_file:  # torch.load's refusal of a pickle that is not plain weights, a garbage file, ...
            raise ValueError(f"{pretrained}: not a checkpoint of {model_name} ({first})") from None
        if not isinstance(err, RuntimeError):
            raise
        raise ValueError(
            f"{model_name}/{pretrained}: cannot fetch the weights ({first}); offline, download the "
            f"checkpoint elsewhere and pass --pretrained /path/to/checkpoint (see README, Troubleshooting)"
        ) from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def _check_model_config(path: Union[str, Path]) -> None:
    """A one-line error naming ``path`` unless it is an open_clip model config (a JSON object with
    ``embed_dim``, ``vision_cfg`` and ``text_cfg``). Checked before open_clip sees it: open_clip
    keeps every config path it was given and re-reads them all on each new one, so one bad file
    would break every later model load of the process."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable model config ({first_line(err)})") from None
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(config, dict) or key not in config]
    if missing:
        raise ValueError(f"{path}: not an open_clip model config (no {', '.join(missing)})")


@contextlib.contextmanager
def _quiet_root_log() -> Iterator[None]:
    """No root-logger lines while open_clip loads a model: it logs a failed download or load as
    ``ERROR:root:...`` before raising, which the caller turns into its own one-line error."""
    before = logging.root.manager.disable  # the level a caller may have disabled already
    logging.disable(max(before, logging.ERROR))
    try:
        yield
    finally:
        logging.disable(before)


def _download_host(cfg: dict) -> tuple:
    """(host, port) open_clip downloads a pretrained config's weights from: the Hugging Face hub
    (``HF_ENDPOINT``) when the config names a hub repo and huggingface_hub is installed, else its
    URL; an HTTPS proxy in the environment instead when one is set (that is what gets connected to)."""
    from urllib.parse import urlparse

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return parsed.hostname, parsed.port or 80
    try:
        import huggingface_hub  # noqa: F401
        use_hub = bool(cfg.get("hf_hub"))
    except ImportError:
        use_hub = False
    parsed = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co") if use_hub else cfg.get("url", ""))
    return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (name lookup
    included: it runs in a thread, since ``getaddrinfo`` has no timeout of its own)."""
    import socket
    from concurrent.futures import TimeoutError as FutureTimeout

    def connect() -> bool:
        with socket.create_connection((host, port), timeout=timeout):
            return True

    executor = ThreadPoolExecutor(1)
    try:
        return executor.submit(connect).result(timeout=timeout)
    except (OSError, FutureTimeout):
        return False
    finally:
        executor.shutdown(wait=False)  # a lookup still hanging is left to finish on its own


def _cached_weights(open_clip, cfg: dict) -> Optional[str]:
    """The local file of a pretrained config's weights when open_clip downloaded it before
    (Hugging Face cache or open_clip's URL cache), else ``None``."""
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, filename = os.path.split(cfg["hf_hub"])
            filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
            safe = getattr(open_clip.pretrained, "_get_safe_alternatives", lambda name: [])
            for candidate in [*safe(filename), filename]:
                found = try_to_load_from_cache(repo, candidate)
                if isinstance(found, str):
                    return found
    if cfg.get("url"):
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if local.is_file():
            return str(local)
    return None


def _fetchable_weights(open_clip, model_name: str, tag: str) -> str:
    """``tag`` when its weights can be downloaded (or the hub is told to stay offline), the cached
    file when the download host cannot be reached; a one-line ``ValueError`` when neither."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return tag
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    host, port = _download_host(cfg)
    if host is None or reachable(host, port):
        return tag
    cached = _cached_weights(open_clip, cfg)
    if cached is not None:
        note(f"{host} cannot be reached: using the cached weights {cached}")
        return cached
    raise ValueError(
        f"{model_name}/{tag}: cannot download the weights ({host}:{port} cannot be reached: offline?); "
        f"download the checkpoint elsewhere and pass --pretrained /path/to/checkpoint "
        f"(see README, Troubleshooting)"
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    import torch

    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _autocast(device: torch.device, amp: Optional[bool]):
    """float16 autocast on CUDA (``amp=None`` means: on CUDA only); a no-op context otherwise."""
    import torch

    use = device.type == "cuda" if amp is None else amp
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                          enabled=use)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's class, parameter names, shapes and sums: a resumed encoding
    refuses to mix features of two different models."""
    import torch

    digest = hashlib.sha1(type(model).__name__.encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}{tuple(param.shape)}{float(param.double().sum()):.6e}".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- images


def _load_image(path: str, preprocess: Callable) -> tuple:
    """(tensor, None) or (None, reason) for one image file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return preprocess(image.convert("RGB")), None
    except Exception as err:  # any decoder or preprocessing failure means: skip this file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, f"{type(err).__name__}: {reason}" if reason else type(err).__name__


class _Shards:
    """The resume folder: ``meta.json`` (model fingerprint) and one ``shard-NNNNNN.npz`` per
    finished batch with ``features``, ``paths``, ``skipped_paths`` and ``skipped_reasons``."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "meta.json"
        if meta.exists():
            found = json.loads(meta.read_text()).get("fingerprint")
            if found != fingerprint:
                raise ValueError(
                    f"{folder}: holds a partial encoding made with another model; delete the folder "
                    f"or encode with the same model to resume"
                )
        else:
            atomic_write(meta, lambda h: h.write(json.dumps({"fingerprint": fingerprint})), mode="w")
        self.count = len(list(folder.glob("shard-*.npz")))

    def load(self) -> tuple:
        """({path: feature row}, {path: reason}) of every shard written so far."""
        done, skipped = {}, {}
        for shard in sorted(self.folder.glob("shard-*.npz")):
            with np.load(shard, allow_pickle=False) as data:
                done.update(zip(data["paths"].tolist(), data["features"]))
                skipped.update(zip(data["skipped_paths"].tolist(), data["skipped_reasons"].tolist()))
        return done, skipped

    def write(self, features: np.ndarray, paths: list, skipped: list) -> None:
        arrays = {
            "features": features,
            "paths": np.asarray(paths, dtype=str),
            "skipped_paths": np.asarray([p for p, _ in skipped], dtype=str),
            "skipped_reasons": np.asarray([r for _, r in skipped], dtype=str),
        }
        atomic_write(self.folder / f"shard-{self.count:06d}.npz", lambda h: np.savez(h, **arrays))
        self.count += 1


def image_features(
    model: torch.nn.Module,
    preprocess: Callable,
    paths: Sequence[PathLike],
    *,
    batch_size: int = 64,
    device: Union[str, torch.device, None] = None,
    amp: Optional[bool] = None,
    num_workers: int = 4,
    resume_dir: Optional[PathLike] = None,
    progress: bool = False,
) -> ImageEncoding:
    """Encode image files with ``model.encode_image``.

    Parameters
    ----------
    model : torch.nn.Module with ``encode_image(images (B, 3, H, W)) -> (B, d)``
    preprocess : callable
        PIL image -> (3, H, W) tensor (open_clip's inference transform).
    paths : sequence of paths, length N
    batch_size : int
    device : str or torch.device, optional
        Where to run the model; ``None`` means where its parameters are. The model is moved.
    amp : bool, optional
        Mixed precision (float16 autocast); ``None`` means on CUDA only.
    num_workers : int
        Threads decoding and preprocessing images (0: in the calling thread).
    resume_dir : path, optional
        Folder that keeps each finished batch; a later call with the same folder (and model)
        skips what is in it. The caller removes it once the result is saved.
    progress : bool
        A progress line on stderr: images done, images/s and the time left
        (:func:`zsadapt.messages.progress`; silenced by :func:`zsadapt.set_quiet` too).

    Returns
    -------
    ImageEncoding
        ``features`` (M, d) float32 with unit rows, ``paths`` (M,), ``skipped`` [(path, reason)].
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = [str(p) for p in paths]
    device = torch.device(device) if device is not None else _model_device(model)
    model = model.to(device).eval()
    shards = _Shards(Path(resume_dir), model_fingerprint(model)) if resume_dir is not None else None
    done, skipped = shards.load() if shards is not None else ({}, {})
    todo = [p for p in dict.fromkeys(paths) if p not in done and p not in skipped]
    if shards is not None and (done or skipped):
        note(f"resuming from {resume_dir}: {len(done) + len(skipped)} images done, {len(todo)} to go")
    bar = progress_bar(len(todo), "encode: images", show=progress, eta=True, unit="images")
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            loaded = (pool.map(lambda p: _load_image(p, preprocess), batch) if pool is not None
                      else [_load_image(p, preprocess) for p in batch])
            tensors, kept, failed = [], [], []
            for path, (tensor, reason) in zip(batch, loaded):
                if tensor is None:
                    failed.append((path, reason))
                else:
                    tensors.append(tensor)
                    kept.append(path)
            features = _encode_images(model, tensors, device, amp)  # (b, d)
            if shards is not None:
                shards.write(features, kept, failed)
            done.update(zip(kept, features))
            skipped.update(failed)
            bar.update(min(start + batch_size, len(todo)))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        bar.close()
    kept_paths = [p for p in paths if p in done]
    rows = [done[p] for p in kept_paths]
    dim = rows[0].shape[0] if rows else 0
    features = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    return ImageEncoding(features, kept_paths, [(p, skipped[p]) for p in dict.fromkeys(paths) if p in skipped])


def _encode_images(model, tensors: list, device: torch.device, amp: Optional[bool]) -> np.ndarray:
    """Unit-norm float32 embeddings (b, d) of preprocessed images; (0, 0) for an empty batch."""
    import torch

    if not tensors:
        return np.zeros((0, 0), np.float32)
    with torch.inference_mode(), _autocast(device, amp):
        out = model.encode_image(torch.stack(tensors).to(device))
    out = torch.nn.functional.normalize(out.float(), dim=-1)
    return out.cpu().numpy()


# ----------------------------------------------------------------------------- text


def text_features(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Union[str, Sequence[Any]] = "openai-imagenet",
    *,
    batch_size: int = 256,
    device: Union[str, torch.device, None] = None,
    amp: Optional[bool] = None,
) -> TextEncoding:
    """Encode every (class, template) prompt with ``model.encode_text``.

    Parameters
    ----------
    model : torch.nn.Module with ``encode_text(tokens (B, L)) -> (B, d)``
    tokenizer : callable
        list of str -> (B, L) token tensor (``open_clip.get_tokenizer(name)``).
    classnames : sequence of str, length C
    templates : see :func:`load_templates`; P templates
    batch_size, device, amp : as in :func:`image_features`

    Returns
    -------
    TextEncoding
        ``per_template`` (C, P, d) and ``mean`` (C, d) with unit rows.
    """
    import torch

    classnames = [str(c) for c in classnames]
    if not classnames:
        raise ValueError("no class names given")
    templates = load_templates(templates)
    device = torch.device(device) if device is not None else _model_device(model)
    model = model.to(device).eval()
    prompts = [t.replace("{}", name) for name in classnames for t in templates]  # C * P, class-major
    chunks = []
    with torch.inference_mode(), _autocast(device, amp):
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            chunks.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
    per_template = torch.cat(chunks).reshape(len(classnames), len(templates), -1)  # (C, P, d)
    mean = torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)  # (C, d)
    return TextEncoding(per_template.cpu().numpy(), mean.cpu().numpy(), classnames, templates)


def labels_from_folders(paths: Sequence[str], classnames: Sequence[str]) -> np.ndarray:
    """Ground truth (N,) from an ImageFolder layout: each image's parent folder is its class name.

    Raises ``ValueError`` naming the first folder that is not a class name.
    """
    index = {name: i for i, name in enumerate(classnames)}
    labels = np.empty(len(paths), dtype=np.int64)
    for i, path in enumerate(paths):
        folder = Path(path).parent.name
        if folder not in index:
            raise ValueError(f"{path}: folder {folder!r} is not one of the class names")
        labels[i] = index[folder]
    return labels
