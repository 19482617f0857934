"""Prompt-ensemble weighting: mean, ZPE (test-only) and AutoCLIP on (C, P, d) text features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.prompts import autoclip_logits, template_logits, zpe_weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def templated_pool(n_per_class=60, n_classes=5, n_templates=4, dim=24, useless=None, seed=0):
    """Images around class directions; templates = class direction + template offset + noise.
    Template ``useless`` (if given) ignores the class: a random direction per class."""
    rng = np.random.default_rng(seed)
    means = _unit(rng.standard_normal((n_classes, dim)))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    images = _unit(means[labels] + 0.8 * rng.standard_normal((labels.size, dim)) / np.sqrt(dim))
    offsets = 0.6 * _unit(rng.standard_normal((n_templates, dim)))
    texts = means[:, None, :] + offsets[None] + 1.2 * rng.standard_normal((n_classes, n_templates, dim)) / np.sqrt(dim)
    if useless is not None:
        texts[:, useless] = _unit(rng.standard_normal((n_classes, dim))) + offsets[useless]
    return images.astype(np.float32), _unit(texts).astype(np.float32), labels


def test_mean_weighting_is_the_normalised_template_mean():
    X, T, _ = templated_pool()
    ens = zsadapt.zeroshot_classifier(T, X, weighting="mean")
    expected = _unit(T.mean(axis=1))
    assert np.allclose(ens.classifier, expected, atol=1e-6)
    assert ens.logits is None and np.allclose(ens.weights, 0.25)
    # refine with (C, P, d) and "mean" is refine with the mean classifier
    a = zsadapt.refine(X, T, "zeroshot")
    b = zsadapt.refine(X, expected, "zeroshot")
    assert np.array_equal(a.labels, b.labels)


def test_zpe_matches_a_direct_computation_and_downweights_a_useless_template():
    X, T, _ = templated_pool(useless=2, seed=1)
    Xt, Tt = torch.as_tensor(X), torch.as_tensor(T)
    logits = 100 * np.einsum("nd,cpd->ncp", X.astype(np.float64), T.astype(np.float64))  # (N, C, P)
    scores = (logits - logits.mean(axis=0, keepdims=True)).max(axis=1).mean(axis=0)  # (P,)
    direct = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    w = zpe_weights(Xt, Tt).numpy()
    assert np.allclose(w, direct, rtol=1e-3, atol=1e-6)
    assert w.argmin() == 2 and w[2] < 0.5 / T.shape[1]
    ens = zsadapt.zeroshot_classifier(T, X, weighting="zpe")
    assert np.allclose(ens.logits, logits.astype(np.float32) @ w, rtol=1e-4, atol=1e-3)
    zpe = zsadapt.refine(X, T, "zeroshot", weighting="zpe")
    assert np.array_equal(zpe.labels, np.asarray(ens.logits).argmax(1))


def test_autoclip_weights_meet_the_entropy_target():
    X, T, _ = templated_pool(n_templates=6, seed=2)
    ens = zsadapt.zeroshot_classifier(T, X, weighting="autoclip")
    w = np.asarray(ens.weights, dtype=np.float64)  # (N, P)
    assert w.shape == (X.shape[0], 6) and np.allclose(w.sum(1), 1, atol=1e-5)
    entropy = -(w * np.log2(w)).sum(1)
    assert np.allclose(entropy, 0.85 * math.log2(6), atol=1e-3)


def test_autoclip_step_is_the_gradient_of_logsumexp():
    """The per-image weights are softmax(t * grad) with grad = d lse_c(s) / d rho at rho = 0."""
    X, T, _ = templated_pool(n_per_class=4, n_templates=5, seed=3)
    Xt, Tt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(T, dtype=torch.float64)
    _, w = autoclip_logits(Xt, Tt)
    block = template_logits(Xt, Tt)  # (N, C, P)
    rho = torch.zeros(X.shape[0], 5, dtype=torch.float64, requires_grad=True)
    s = torch.einsum("np,ncp->nc", torch.softmax(rho, 1), block)
    (grad,) = torch.autograd.grad(torch.logsumexp(s, dim=1).sum(), rho)
    # softmax(t g) for some t > 0 per image: log w is affine in g with a positive slope
    log_w = torch.log(w)
    centred_w = log_w - log_w.mean(1, keepdim=True)
    centred_g = grad - grad.mean(1, keepdim=True)
    slope = (centred_w * centred_g).sum(1) / (centred_g * centred_g).sum(1)
    assert (slope > 0).all()
    assert torch.allclose(centred_w, slope[:, None] * centred_g, atol=1e-6)


def test_autoclip_logits_are_per_image_and_vectorised_in_chunks(monkeypatch):
    X, T, _ = templated_pool(seed=4)
    full = zsadapt.zeroshot_classifier(T, X, weighting="autoclip")
    import zsadapt.prompts as prompts

    monkeypatch.setattr(prompts, "_chunk", lambda c, p: 70)  # many small chunks: same answer
    chunked = zsadapt.zeroshot_classifier(T, X, weighting="autoclip")
    assert np.allclose(full.logits, chunked.logits, atol=1e-4)
    # zeroshot with autoclip predicts the argmax of the per-image logits
    res = zsadapt.refine(X, T, "zeroshot", weighting="autoclip")
    assert np.array_equal(res.labels, np.asarray(full.logits).argmax(1))
    # solvers that need class vectors get the mean ensemble; self_training starts from the logits
    st = zsadapt.refine(X, T, "self_training", weighting="autoclip", strategy="fpl", k=4, epochs=5)
    assert st.params["weighting"] == "autoclip" and st.probs.shape == (X.shape[0], 5)


def test_torch_in_torch_out_and_single_template():
    X, T, _ = templated_pool(n_templates=1)
    ens = zsadapt.zeroshot_classifier(torch.as_tensor(T), torch.as_tensor(X), weighting="autoclip")
    assert isinstance(ens.logits, torch.Tensor)
    assert torch.allclose(ens.weights, torch.ones_like(ens.weights))


@pytest.mark.parametrize("weighting", ["zpe", "autoclip"])
def test_weighting_needs_templates(weighting, small_pool):
    with pytest.raises(ValueError, match=r"needs per-template text features \(C, P, d\)"):
        zsadapt.refine(small_pool.image_features, small_pool.text_features, "zeroshot", weighting=weighting)


def test_bad_template_arrays_are_one_line_errors():
    X, T, _ = templated_pool()
    with pytest.raises(ValueError, match="weighting must be one of"):
        zsadapt.zeroshot_classifier(T, X, weighting="max")
    with pytest.raises(ValueError, match="does not match the image feature dimension"):
        zsadapt.refine(X, T[:, :, :10], "zeroshot")
    bad = T.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values .first in class 1"):
        zsadapt.refine(X, bad, "zeroshot")
    bad = T.copy()
    bad[0, 3] = 0
    with pytest.raises(ValueError, match="class 0, template 3 is all zeros"):
        zsadapt.refine(X, bad, "zeroshot")
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        zsadapt.refine(X, T[:1], "zeroshot")


def test_pool_file_with_templates_and_cli_weighting(tmp_path):
    from click.testing import CliRunner

    from zsadapt.cli.main import main

    X, T, labels = templated_pool(useless=1, seed=5)
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=X, text_features=T, labels=labels)
    pool = zsadapt.read_pool(path)
    assert pool.text_features.shape == (5, 24) and pool.text_templates.shape == (5, 4, 24)
    zsadapt.write_pool(tmp_path / "again.npz", pool)  # templates survive a round trip
    assert np.allclose(zsadapt.read_pool(tmp_path / "again.npz").text_templates, pool.text_templates)
    runner = CliRunner()
    out = tmp_path / "preds.npz"
    res = runner.invoke(main, ["refine", str(path), "-m", "zeroshot", "--weighting", "zpe", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    expected = zsadapt.refine(X, T, "zeroshot", weighting="zpe")
    assert np.array_equal(np.load(out)["labels"], expected.labels)
    # a (C, d) pool file refuses zpe with a one-line error
    flat = tmp_path / "flat.npz"
    np.savez(flat, image_features=X, text_features=T.mean(1))
    res = runner.invoke(main, ["refine", str(flat), "-m", "zeroshot", "--weighting", "zpe", "-q"])
    assert res.exit_code == 1 and "needs per-template text features" in res.output
    assert len(res.output.strip().splitlines()) == 1
