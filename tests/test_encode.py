"""Encoding images and class names.

Two layers:

* ``zsadapt.encode.image_features`` / ``text_features`` with a tiny hand-written CLIP-like model
  (any object with ``encode_image`` / ``encode_text``): always run; checked against calling the
  model directly, including skipping corrupt files and resuming an interrupted run.
* open_clip end to end (``zsadapt encode`` -> ``zsadapt refine``) with a tiny, randomly initialised
  open_clip architecture registered through ``open_clip.add_model_config``, its state dict saved
  and loaded back through ``--pretrained PATH`` (no weights can be downloaded here). These skip,
  with the reason, where open_clip cannot be imported (see README, Troubleshooting).
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from zsadapt.cli.main import main
from zsadapt.encode import (
    image_features,
    labels_from_folders,
    list_images,
    load_templates,
    open_clip_module,
    read_lines,
    text_features,
)
from zsadapt.extras import MissingExtra, require

# ----------------------------------------------------------------------------- fixtures


def write_images(root, per_class=3):
    """An ImageFolder tree: red/ and blue/ PNGs of distinct sizes and shades, plus one corrupt file."""
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(20 + 3 * i, 24 + i, 3), dtype=np.uint8)
            pixels[..., channel] = 150 + 30 * i
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    (root / "blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


class TinyClip(torch.nn.Module):
    """A CLIP-shaped stand-in: linear image tower on 8x8 thumbnails, mean-of-embeddings text tower."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.image_proj = torch.nn.Parameter(torch.randn(3 * 8 * 8, dim, generator=gen))
        self.token_embedding = torch.nn.Parameter(torch.randn(50, dim, generator=gen))

    def encode_image(self, images):  # (B, 3, 8, 8) -> (B, dim)
        return images.flatten(1) @ self.image_proj

    def encode_text(self, tokens):  # (B, L) -> (B, dim)
        return self.token_embedding[tokens].mean(dim=1)


def tiny_preprocess(image):
    """PIL image -> (3, 8, 8) float tensor."""
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0).permute(2, 0, 1)


def tiny_tokenizer(texts):
    """Words -> ids in [1, 50), padded to 12 tokens."""
    ids = torch.zeros(len(texts), 12, dtype=torch.long)
    for row, text in enumerate(texts):
        words = [sum(map(ord, w)) % 49 + 1 for w in text.split()][:12]
        ids[row, :len(words)] = torch.tensor(words)
    return ids


def direct_features(model, paths):
    """The reference: preprocess and encode each image alone, normalise."""
    rows = []
    for path in paths:
        with Image.open(path) as image:
            x = tiny_preprocess(image.convert("RGB"))[None]
        rows.append(torch.nn.functional.normalize(model.encode_image(x), dim=-1)[0].detach().numpy())
    return np.stack(rows)


# ----------------------------------------------------------------------------- any model


def test_list_images_folder_and_list_file(tmp_path):
    root = write_images(tmp_path / "imgs")
    found = list_images(root)
    assert len(found) == 7 and found == sorted(found)
    listing = tmp_path / "list.txt"
    listing.write_text("# two images\nimgs/red/red_0.png\n\n" + str(root / "blue" / "blue_1.png") + "\n")
    assert list_images(listing) == [str(tmp_path / "imgs/red/red_0.png"), str(root / "blue" / "blue_1.png")]
    with pytest.raises(ValueError, match="no such folder or file"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path / "empty")


def test_image_features_match_direct_encoding_and_skip_corrupt(tmp_path):
    paths = list_images(write_images(tmp_path))
    model = TinyClip()
    out = image_features(model, tiny_preprocess, paths, batch_size=3, num_workers=2)
    good = [p for p in paths if not p.endswith("broken.png")]
    assert out.paths == good
    assert len(out.skipped) == 1 and out.skipped[0][0].endswith("broken.png")
    assert "UnidentifiedImageError" in out.skipped[0][1]
    assert out.features.shape == (6, 6) and out.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.features, direct_features(model, good), rtol=1e-5, atol=1e-6)
    single = image_features(model, tiny_preprocess, paths, batch_size=1, num_workers=0)
    np.testing.assert_allclose(single.features, out.features, rtol=1e-5, atol=1e-6)


def test_image_features_progress_is_zsadapts_line_on_stderr(tmp_path, monkeypatch, capfd):
    """The progress line is zsadapt's (images/s, throttled, silenced by set_quiet); it was a tqdm
    bar, which wrote a redraw per batch into logs and was not shown at all without tqdm."""
    from zsadapt import messages

    paths = list_images(write_images(tmp_path))
    monkeypatch.setattr(messages, "PROGRESS_DELAY", 0.0)
    messages.set_quiet(False)
    image_features(TinyClip(), tiny_preprocess, paths, batch_size=3, num_workers=0, progress=True)
    lines = capfd.readouterr().err.splitlines()
    assert lines and all(line.startswith("zsadapt: encode: images: ") for line in lines)
    assert lines[-1].startswith(f"zsadapt: encode: images: {len(paths)}/{len(paths)} (") and "images/s" in lines[-1]
    image_features(TinyClip(), tiny_preprocess, paths, batch_size=3, num_workers=0, progress=False)
    messages.set_quiet(True)
    image_features(TinyClip(), tiny_preprocess, paths, batch_size=3, num_workers=0, progress=True)
    messages.set_quiet(False)
    assert capfd.readouterr().err == ""


def test_image_features_all_unreadable(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    out = image_features(TinyClip(), tiny_preprocess, [bad, tmp_path / "missing.png"])
    assert out.features.shape[0] == 0 and len(out.skipped) == 2
    assert "FileNotFoundError" in out.skipped[1][1]


def test_resume_after_interruption(tmp_path):
    paths = list_images(write_images(tmp_path / "imgs"))
    model = TinyClip()
    reference = image_features(model, tiny_preprocess, paths, batch_size=2, num_workers=0)
    seen = []

    def interrupted(image):
        if len(seen) == 3:  # at red_0: batches 1-2 (three blue images, the corrupt one) are written
            raise KeyboardInterrupt
        seen.append(image.size)
        return tiny_preprocess(image)

    resume = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        image_features(model, interrupted, paths, batch_size=2, num_workers=0, resume_dir=resume)
    assert len(list(resume.glob("shard-*.npz"))) == 2  # nothing finished was lost

    calls = []

    def counting(image):
        calls.append(image.size)
        return tiny_preprocess(image)

    resumed = image_features(model, counting, paths, batch_size=2, num_workers=0, resume_dir=resume)
    assert len(calls) == len(paths) - 3 - 1  # only the images not done; the corrupt one is not retried
    assert resumed.paths == reference.paths and resumed.skipped == reference.skipped
    np.testing.assert_allclose(resumed.features, reference.features, rtol=1e-6, atol=1e-7)
    # a third call finds everything done
    again = image_features(model, counting, paths, batch_size=2, num_workers=0, resume_dir=resume)
    assert len(calls) == len(paths) - 4
    np.testing.assert_array_equal(again.features, resumed.features)
    other = TinyClip()
    with torch.no_grad():
        other.image_proj.mul_(2.0)
    with pytest.raises(ValueError, match="another model"):
        image_features(other, tiny_preprocess, paths, resume_dir=resume)


def test_text_features_per_template_and_mean():
    model = TinyClip()
    out = text_features(model, tiny_tokenizer, ["cat", "dog", "red car"], ["a photo of a {}.", "{} art"])
    assert out.per_template.shape == (3, 2, 6) and out.mean.shape == (3, 6)
    np.testing.assert_allclose(np.linalg.norm(out.per_template, axis=2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.mean, axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model.encode_text(tiny_tokenizer(["red car art"])), dim=-1)
    np.testing.assert_allclose(out.per_template[2, 1], direct[0].numpy(), rtol=1e-5)
    manual = out.per_template.mean(axis=1)
    np.testing.assert_allclose(out.mean, manual / np.linalg.norm(manual, axis=1, keepdims=True), rtol=1e-5)


def test_inputs_that_hold_nothing_to_encode(tmp_path):
    """A single image is its own list; list files, class-name files and arguments that hold no
    usable entry are one-line errors naming what is wrong."""
    root = write_images(tmp_path / "imgs")
    image = next(root.rglob("*.png"))
    assert list_images(image) == [str(image)]
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing but a comment\n\n")
    with pytest.raises(ValueError, match="comments.txt: lists no image paths"):
        list_images(comments)
    binary = tmp_path / "binary.lst"
    binary.write_bytes(b"\xff\xfe\x00\x80")
    with pytest.raises(ValueError, match="binary.lst: cannot be read as a list of image paths"):
        list_images(binary)
    with pytest.raises(ValueError, match="names.txt: no such file"):
        read_lines(tmp_path / "names.txt", "class names")
    with pytest.raises(ValueError, match="comments.txt: holds no class names"):
        read_lines(comments, "class names")
    with pytest.raises(ValueError, match="binary.lst: cannot be read as class names"):
        read_lines(binary, "class names")
    with pytest.raises(ValueError, match="no templates given"):
        load_templates([])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        image_features(None, None, [str(image)], batch_size=0)
    with pytest.raises(ValueError, match="no class names given"):
        text_features(None, None, [])


def test_cli_refuses_a_bad_template_file_before_loading_the_model(tmp_path, monkeypatch):
    """The templates are used after every image is encoded: a missing or empty template file is
    refused up front (the model, which takes a while to load, is never loaded)."""
    import zsadapt.encode

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(zsadapt.encode, "load_model", no_model)
    root = write_images(tmp_path / "imgs")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for templates, fragment in [(tmp_path / "missing.txt", "missing.txt: not a template set"), (empty, "empty.txt")]:
        for command in (["images", str(root), "--classnames", str(names), "--out", str(tmp_path / "o.npz")],
                        ["text", "--classnames", str(names), "--out", str(tmp_path / "t.npz")]):
            result = CliRunner().invoke(main, ["encode", *command, "--templates", str(templates)])
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            assert fragment in result.output and "the model was loaded" not in result.output


def test_load_templates(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\n# comment\nitap of a {}\n")
    assert load_templates(path) == ["a photo of a {}.", "itap of a {}"]
    assert load_templates([lambda c: f"a {c}!", "b {}"]) == ["a {}!", "b {}"]
    with pytest.raises(ValueError, match="has no"):
        load_templates(["no placeholder"])
    with pytest.raises(ValueError, match="not a template set"):
        load_templates("openai")


def test_labels_from_folders():
    labels = labels_from_folders(["x/red/a.png", "x/blue/b.png"], ["blue", "red"])
    np.testing.assert_array_equal(labels, [1, 0])
    with pytest.raises(ValueError, match="'green' is not one of the class names"):
        labels_from_folders(["x/green/a.png"], ["blue", "red"])


def test_missing_extra_names_the_install():
    with pytest.raises(MissingExtra, match=r"pip install 'zsadapt\[clip\]'"):
        require("zsadapt_no_such_module", "clip", "encoding")


# ----------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def open_clip():
    try:
        return open_clip_module()
    except MissingExtra as err:
        pytest.skip(f"{err}. In the project's venv (CPU torch 2.13.0) no PyPI torchvision imports, so "
                    "open_clip cannot; ZSADAPT_CLIP=1 bash .ci/setup installs a working pair (README, "
                    "Troubleshooting)")


TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_checkpoint(open_clip, tmp_path_factory):
    """(config path, checkpoint path): a random tiny ViT registered as ``zs-tiny-vit``."""
    folder = tmp_path_factory.mktemp("tiny")
    config = folder / "zs-tiny-vit.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("zs-tiny-vit", pretrained=None)
    checkpoint = folder / "zs-tiny-vit.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


def _encode_args(config, checkpoint):
    return ["--model", "zs-tiny-vit", "--model-config", str(config), "--pretrained", str(checkpoint),
            "--batch-size", "2"]


def test_load_model_reads_the_local_checkpoint(open_clip, tiny_checkpoint, tmp_path, monkeypatch):
    from zsadapt.encode import load_model

    config, checkpoint = tiny_checkpoint
    model, preprocess, tokenizer = load_model("zs-tiny-vit", str(checkpoint))
    saved = torch.load(checkpoint, weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name])
    assert tokenizer(["a cat"]).shape == (1, 16)
    with pytest.raises(ValueError, match="no such checkpoint file"):
        load_model("zs-tiny-vit", str(checkpoint) + ".missing")
    with pytest.raises(ValueError, match="pass --pretrained /path/to/checkpoint"):
        load_model("zs-tiny-vit", "openai")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_model("zs-no-such-model", None)
    wrong = checkpoint.parent / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="not a checkpoint of zs-tiny-vit"):
        load_model("zs-tiny-vit", str(wrong))
    # Files torch.load refuses or cannot parse: one line naming the file, nothing executed.
    pickled = checkpoint.parent / "pickled.pt"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    garbage = checkpoint.parent / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    payload = checkpoint.parent / "payload.pt"
    monkeypatch.chdir(tmp_path)
    torch.save({"state": _Payload()}, payload)
    for path in (pickled, garbage, payload):
        with pytest.raises(ValueError, match=f"{path}: not a checkpoint of zs-tiny-vit") as info:
            load_model("zs-tiny-vit", str(path))
        assert "\n" not in str(info.value)
    assert not (tmp_path / "ran").exists()
    bad_config = checkpoint.parent / "bad.json"
    bad_config.write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad_config}: not a readable model config"):
        load_model("zs-tiny-vit", str(checkpoint), model_config=str(bad_config))
    bad_config.write_text('{"embed_dim": 16}')
    with pytest.raises(ValueError, match=f"{bad_config}: not an open_clip model config .no vision_cfg, text_cfg"):
        load_model("zs-tiny-vit", str(checkpoint), model_config=str(bad_config))
    load_model("zs-tiny-vit", str(checkpoint), model_config=str(config))  # a bad config broke nothing


class _Payload:
    """Unpickling it would create a file ``ran`` in the working folder: load_model must not."""

    def __reduce__(self):
        return (open, ("ran", "w"))


def test_encode_then_refine_end_to_end(open_clip, tiny_checkpoint, tmp_path):
    config, checkpoint = tiny_checkpoint
    root = write_images(tmp_path / "imgs")
    names = tmp_path / "names.txt"
    names.write_text("red\nblue\n")
    pool = tmp_path / "pool.npz"
    runner = CliRunner()
    result = runner.invoke(main, ["encode", "images", str(root), "--out", str(pool), "--classnames", str(names),
                                  "--templates", "simple", "--labels-from-folders",
                                  *_encode_args(config, checkpoint)])
    assert result.exit_code == 0, result.output
    assert "encoded 6 images and 2 classes, skipped 1" in result.stdout
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    assert not (tmp_path / "pool.npz.partial").exists()
    with np.load(pool) as data:
        assert data["image_features"].shape == (6, 16)
        np.testing.assert_allclose(np.linalg.norm(data["image_features"], axis=1), 1.0, rtol=1e-5)
        assert data["text_features"].shape == (2, 16)
        assert data["text_features_per_template"].shape == (2, len(open_clip.SIMPLE_IMAGENET_TEMPLATES), 16)
        assert list(data["classnames"]) == ["red", "blue"]
        assert [p.split("/")[-2] for p in data["paths"]] == ["blue"] * 3 + ["red"] * 3
        np.testing.assert_array_equal(data["labels"], [1, 1, 1, 0, 0, 0])
        assert data["skipped_paths"][0].endswith("broken.png")
        encoded = data["image_features"]
    # the same numbers as the Python API with the model loaded from the checkpoint
    from zsadapt.encode import load_model

    model, preprocess, _ = load_model("zs-tiny-vit", str(checkpoint))
    api = image_features(model, preprocess, list_images(root), num_workers=0)
    np.testing.assert_allclose(encoded, api.features, rtol=1e-4, atol=1e-5)

    preds = tmp_path / "preds.npz"
    refined = runner.invoke(main, ["refine", str(pool), "--method", "zlap", "--k", "2", "--out", str(preds), "-q"])
    assert refined.exit_code == 0, refined.output
    assert "zlap: 6 images, 2 classes, accuracy" in refined.stdout
    with np.load(preds) as data:
        assert data["labels"].shape == (6,) and data["probs"].shape == (6, 2)

    again = runner.invoke(main, ["encode", "images", str(root), "--out", str(pool), *_encode_args(config, checkpoint)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_cli_resumes_a_partial_run(open_clip, tiny_checkpoint, tmp_path):
    from zsadapt.encode import load_model

    config, checkpoint = tiny_checkpoint
    root = write_images(tmp_path / "imgs")
    paths = list_images(root)
    out = tmp_path / "pool.npz"
    model, preprocess, _ = load_model("zs-tiny-vit", str(checkpoint))
    full = image_features(model, preprocess, paths, num_workers=0)
    # a run stopped after its first 3 images left these shards behind
    image_features(model, preprocess, paths[:3], batch_size=2, num_workers=0, resume_dir=f"{out}.partial")
    result = CliRunner().invoke(main, ["encode", "images", str(root), "--out", str(out),
                                       *_encode_args(config, checkpoint)])
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stderr and "3 images done, 4 to go" in result.stderr
    with np.load(out) as data:
        assert list(data["paths"]) == full.paths
        np.testing.assert_allclose(data["image_features"], full.features, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "pool.npz.partial").exists()


def test_cli_encode_text(open_clip, tiny_checkpoint, tmp_path):
    config, checkpoint = tiny_checkpoint
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na drawing of a {}.\n")
    out = tmp_path / "text.npz"
    result = CliRunner().invoke(main, ["encode", "text", "--classnames", str(names), "--templates", str(templates),
                                       "--out", str(out), *_encode_args(config, checkpoint)])
    assert result.exit_code == 0, result.output
    assert "encoded 3 classes x 2 templates" in result.stdout
    with np.load(out) as data:
        assert data["text_features"].shape == (3, 16)
        assert data["text_features_per_template"].shape == (3, 2, 16)
        assert list(data["templates"]) == ["a photo of a {}.", "a drawing of a {}."]
    bad = CliRunner().invoke(main, ["encode", "text", "--classnames", str(names), "--out", str(tmp_path / "t.npz"),
                                    "--model", "zs-tiny-vit", "--pretrained", "openai"])
    assert bad.exit_code == 1 and "pass --pretrained /path/to/checkpoint" in bad.output


# ----------------------------------------------------------------------------- any encoder


def test_any_encoder_numpy_embeddings_sentence_style():
    """The README's "any encoder" path: embeddings from any model, as numpy, straight into refine.

    The encoder here is a fixed random projection of hashed bag-of-words counts (a stand-in for a
    sentence-embedding model); texts of three topics are classified against one description per
    topic, and the refined labels must beat chance by far and come back as numpy.
    """
    rng = np.random.default_rng(0)
    topics = {
        "sports": "match goal team player coach score league season win stadium",
        "cooking": "recipe oven flour sugar bake dish kitchen spice taste butter",
        "finance": "market stock bank interest loan price invest fund bond rate",
    }
    filler = "the a of and to in is it that on with for was as this".split()
    projection = rng.standard_normal((512, 48))

    def embed(texts):  # list of str -> (n, 48) float32
        counts = np.zeros((len(texts), 512))
        for row, text in enumerate(texts):
            for word in text.split():
                counts[row, sum(map(ord, word)) * 2654435761 % 512] += 1
        return (counts @ projection).astype(np.float32)

    docs, truth = [], []
    for label, words in enumerate(topics.values()):
        vocabulary = words.split()
        for _ in range(60):
            chosen = list(rng.choice(vocabulary, 3)) + list(rng.choice(filler, 4))
            docs.append(" ".join(rng.permutation(chosen)))
            truth.append(label)
    descriptions = [f"a text about {name}: {words}" for name, words in topics.items()]
    import zsadapt

    result = zsadapt.refine(embed(docs), embed(descriptions), method="zlap", k=5)
    assert isinstance(result.labels, np.ndarray) and result.probs.shape == (180, 3)
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert zsadapt.accuracy(result.labels, np.array(truth)) > 70.0  # chance is 33%


# ----------------------------------------------------------------------------- encode -> every refine option


def test_every_refine_option_reads_an_encoded_pool(open_clip, tiny_checkpoint, tmp_path):
    """A pool written by ``encode images --classnames`` keeps per-template text features, which
    ``refine`` uses: prompt weighting and the InMaP initial classifier work on it, and so does
    every method; so does ``--text-features`` from ``encode text``."""
    import zsadapt

    config, checkpoint = tiny_checkpoint
    root = write_images(tmp_path / "imgs", per_class=4)
    names = tmp_path / "names.txt"
    names.write_text("red\nblue\n")
    pool, text = tmp_path / "pool.npz", tmp_path / "text.npz"
    runner = CliRunner()
    for args in (["images", str(root), "--out", str(pool), "--classnames", str(names), "--labels-from-folders"],
                 ["text", "--classnames", str(names), "--out", str(text)]):
        done = runner.invoke(main, ["encode", *args, "--templates", "simple", "-q", *_encode_args(config, checkpoint)])
        assert done.exit_code == 0, done.output
    read = zsadapt.read_pool(pool)
    assert read.text_templates is not None and read.text_templates.shape[:2] == (2, 7)
    options = [["--weighting", w] for w in ("mean", "zpe", "autoclip")] + [["--initial", "inmap"]]
    options += [["--method", m] for m in zsadapt.methods()]
    for extra in options:
        result = runner.invoke(main, ["refine", str(pool), "--json", "-q", *extra])
        assert result.exit_code == 0, (extra, result.output)
        assert json.loads(result.stdout)["n_images"] == 8
    separate = runner.invoke(main, ["refine", "--image-features", str(pool), "--text-features", str(text),
                                    "--weighting", "zpe", "--json", "-q"])
    assert separate.exit_code == 0, separate.output
    assert json.loads(separate.stdout)["params"]["weighting"] == "zpe"


# ----------------------------------------------------------------------------- device and download checks


def test_missing_cuda_is_named_before_loading(open_clip, tiny_checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present here")
    config, checkpoint = tiny_checkpoint
    names = tmp_path / "names.txt"
    names.write_text("red\nblue\n")
    result = CliRunner().invoke(main, ["encode", "text", "--classnames", str(names), "--out", str(tmp_path / "t.npz"),
                                       *_encode_args(config, checkpoint), "--device", "cuda"])
    assert result.exit_code == 1
    assert "device 'cuda'" in result.stderr and "CUDA is not available" in result.stderr
    assert "checkpoint" not in result.stderr


def test_reachable_probe():
    import socket

    from zsadapt.encode import reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert reachable("127.0.0.1", server.getsockname()[1], timeout=2)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: the connection is refused
        assert not reachable("127.0.0.1", port, timeout=2)
    assert not reachable("host.invalid", 443, timeout=2)


def test_unreachable_hub_fails_before_any_download(open_clip, monkeypatch, tmp_path):
    """Offline, a pretrained tag that is not cached fails at the probe: open_clip's downloader
    (and its minute of retries) is never reached."""
    from zsadapt import encode

    probed = []
    monkeypatch.setattr(encode, "reachable", lambda host, port, timeout=3.0: probed.append(host) or False)
    monkeypatch.setattr(encode, "_cached_weights", lambda open_clip, cfg: None)

    def no_download(*args, **kwargs):
        raise AssertionError("open_clip was asked to download")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    with pytest.raises(ValueError, match=r"cannot be reached.*--pretrained /path/to/checkpoint") as err:
        encode.load_model("ViT-B-32", "openai")
    assert "\n" not in str(err.value) and probed
