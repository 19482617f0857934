"""Inputs at the edges through ``zsadapt.refine`` (issue 13 item 14): a seed that is not an
integer, boolean feature arrays, k larger than the pool, and pools of two images. Each gets a
right answer or a one-line error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import zsadapt


@pytest.fixture(scope="module")
def pool():
    return zsadapt.make_pool(n_images=120, n_classes=5, dim=16, seed=11)


def one_line(kind, call):
    with pytest.raises(kind) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("seed, kind, fragment", [
    ("x", TypeError, "seed: expected an integer, got str 'x'"),
    (1.5, TypeError, "got float"),
    (True, TypeError, "got bool"),
    (-1, ValueError, "must lie in 0..2**63 - 1"),
])
@pytest.mark.parametrize("method", ["zlap", "gmm", "self_training"])
def test_a_bad_seed_is_a_one_line_error(pool, method, seed, kind, fragment):
    message = one_line(kind, lambda: zsadapt.refine(pool.image_features, pool.text_features, method, seed=seed))
    assert fragment in message


def test_numpy_and_torch_integer_seeds_are_accepted(pool):
    a = zsadapt.refine(pool.image_features, pool.text_features, "self_training", seed=np.int64(3))
    b = zsadapt.refine(pool.image_features, pool.text_features, "self_training", seed=3)
    np.testing.assert_array_equal(a.probs, b.probs)


@pytest.mark.parametrize("which", ["image", "text"])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_boolean_features_are_refused(pool, which, library):
    image, text = pool.image_features, pool.text_features
    if which == "image":
        image = image > 0
    else:
        text = text > 0
    if library == "torch":
        image, text = torch.as_tensor(image), torch.as_tensor(text)
    message = one_line(TypeError, lambda: zsadapt.refine(image, text, "zeroshot"))
    assert message == f"{which}_features: expected a numeric array, got a boolean one"


def loud_refine(*args, **kwargs):
    zsadapt.set_quiet(False)
    try:
        return zsadapt.refine(*args, **kwargs)
    finally:
        zsadapt.set_quiet(True)


def test_k_above_the_pool_is_reduced_with_a_note(pool, capsys):
    """transclip with k larger than the N - 1 other images uses N - 1 neighbours, says so on
    stderr and in info["reduced"], and gives what k = N - 1 gives."""
    X, T = pool.image_features[:6], pool.text_features
    big = loud_refine(X, T, "transclip", k=50)
    assert big.info["reduced"]["k"] == {"given": 50, "used": 5}
    assert "k = 50 is more than the 5 other images of the pool; using k = 5" in capsys.readouterr().err
    exact = zsadapt.refine(X, T, "transclip", k=5)
    np.testing.assert_array_equal(big.labels, exact.labels)
    np.testing.assert_allclose(big.probs, exact.probs, rtol=1e-6, atol=1e-7)
    assert "reduced" not in exact.info


def test_zlap_k_above_the_pool_links_every_image_with_a_note(pool, capsys):
    """zlap keeps its class neighbours when k exceeds the pool (tests/test_zlap.py checks the
    graph): the user is told, and the answer stays a proper one."""
    X, T = pool.image_features[:6], pool.text_features
    result = loud_refine(X, T, "zlap", k=50)
    assert "zlap: k = 50 is more than the 6 distinct images of the pool" in capsys.readouterr().err
    assert np.isfinite(result.probs).all()
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("method", ["gmm", "inmap", "transclip", "zlap", "em", "stata", "moon"])
def test_two_image_pools_keep_the_zero_shot_accuracy(method):
    """2-image pools of the built-in 30-class pool (20 draws): once 0% for gmm, inmap and
    transclip (zero-shot 50-60%); every method stays within 5 points of zero-shot on average."""
    base = zsadapt.make_pool(seed=0)
    rng = np.random.default_rng(0)
    ours, zero_shot = [], []
    for _ in range(20):
        rows = rng.choice(base.labels.size, 2, replace=False)
        images, truth = base.image_features[rows], base.labels[rows]
        zero_shot.append(zsadapt.refine(images, base.text_features, "zeroshot").accuracy(truth))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an iteration cap on two images is no news
            result = zsadapt.refine(images, base.text_features, method)
        assert np.isfinite(result.probs).all()
        ours.append(result.accuracy(truth))
    assert np.mean(zero_shot) > 25  # the check means something: zero-shot is right about half the time
    assert np.mean(ours) >= np.mean(zero_shot) - 5.0, (ours, zero_shot)


def test_classes_with_identical_embeddings_are_named_in_a_note(capsys):
    pool = zsadapt.make_pool(n_images=60, n_classes=6, dim=16, seed=0)
    T = pool.text_features.copy()
    T[3], T[5], T[4] = T[1], 2.0 * T[1], T[0]  # 5 equals 1 once normalised
    result = loud_refine(pool.image_features, T, "zeroshot")
    err = capsys.readouterr().err
    assert "classes with identical embeddings (0 = 4, 1 = 3, 1 = 5)" in err
    # Their probabilities are equal (up to rounding): no label can be right for more than one.
    np.testing.assert_allclose(result.probs[:, [3, 5]], result.probs[:, [1, 1]], rtol=1e-5)
    np.testing.assert_allclose(result.probs[:, 4], result.probs[:, 0], rtol=1e-5)
    loud_refine(pool.image_features, pool.text_features, "zeroshot")
    assert "identical" not in capsys.readouterr().err


def test_notes_about_the_inputs_come_once_however_many_methods_run(tmp_path):
    """Reading the pool and each method's validation would each say the text is square, or that
    classes share an embedding: ``compare`` says it once, naming the file."""
    from click.testing import CliRunner

    from zsadapt.cli.main import main

    pool = zsadapt.make_pool(n_images=80, n_classes=16, dim=16, seed=0)
    T = pool.text_features.copy()
    T[3] = T[1]
    np.savez(tmp_path / "pool.npz", image_features=pool.image_features, text_features=T, labels=pool.labels)
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "pool.npz"), "--methods", "zeroshot,gmm,zlap"])
    assert result.exit_code == 0, result.output
    for fragment in ("text_features is square (16 x 16)", "classes with identical embeddings (1 = 3)"):
        lines = [line for line in result.stderr.splitlines() if fragment in line]
        assert len(lines) == 1 and "pool.npz" in lines[0], result.stderr

