"""One logit scale for every method: an encoder whose similarities are not CLIP's sets
``logit_scale`` (``--logit-scale``) once, whatever the method, and every zero-shot reference inside
the method (its pool analysis, ZLaP's confidence target, InMaP's pseudo-labels, self-training's
teacher and student, ``refine``'s calibration) is softmax(logit_scale x cosine).

Independent references: softmax(30 x cosine) computed here with numpy, and the pool analysis's
cache key (the scale it was computed at).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import zsadapt
from zsadapt.cli.main import main
from zsadapt.solvers import Problem, get_solver

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALE = 30.0
#: Methods whose default settings consult the pool analysis.
ANALYSED = ("anchored", "auto", "gmm", "inmap", "self_training", "transclip", "zlap")


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _fit(method, problem, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_solver(method)(**params).fit(problem)


def _reference(pool) -> np.ndarray:
    """softmax(30 x cosine) (N, C) in float64, from the raw arrays."""
    X = pool.image_features / np.linalg.norm(pool.image_features, axis=1, keepdims=True)
    T = pool.text_features / np.linalg.norm(pool.text_features, axis=1, keepdims=True)
    return _softmax(SCALE * X.astype(np.float64) @ T.astype(np.float64).T)


@pytest.mark.parametrize("method", zsadapt.methods())
def test_every_method_takes_the_scale_and_its_pool_analysis_uses_it(small_pool, method):
    problem = Problem(torch.as_tensor(small_pool.image_features), torch.as_tensor(small_pool.text_features))
    params = {"epochs": 3} if method == "self_training" else {}
    out = _fit(method, problem, logit_scale=SCALE, **params)
    assert torch.isfinite(out.probs).all()
    if method in ANALYSED:
        assert problem.analyses and all(key[0] == SCALE for key in problem.analyses)


def test_zlap_matches_the_confidence_of_zeroshot_at_the_scale(small_pool):
    problem = Problem(torch.as_tensor(small_pool.image_features), torch.as_tensor(small_pool.text_features))
    out = _fit("zlap", problem, logit_scale=SCALE)
    target = _reference(small_pool).max(axis=1).mean()
    assert float(out.probs.max(dim=1).values.double().mean()) == pytest.approx(target, rel=1e-4)
    at_100 = _fit("zlap", Problem(problem.image, problem.classifier))
    assert float(at_100.probs.max(dim=1).values.mean()) > target + 0.05  # the scale matters here


def test_inmap_pseudo_labels_are_zeroshot_at_the_scale(small_pool):
    problem = Problem(torch.as_tensor(small_pool.image_features), torch.as_tensor(small_pool.text_features))
    # No balancing, no hardening: the pseudo-labels are the zero-shot softmax itself.
    out = _fit("inmap", problem, logit_scale=SCALE, sinkhorn_iter=0, confidence=1.0, max_iter=0)
    assert out.info["tau_t"] == 1.0 / SCALE
    np.testing.assert_allclose(out.info["pseudo_label_counts"], _reference(small_pool).sum(axis=0), rtol=1e-4)
    explicit = _fit("inmap", Problem(problem.image, problem.classifier), tau_t=0.05, sinkhorn_iter=0,
                    confidence=1.0, max_iter=0)
    assert explicit.info["tau_t"] == 0.05  # a given tau_t wins


def test_self_training_student_starts_at_zeroshot_at_the_scale(small_pool):
    problem = Problem(torch.as_tensor(small_pool.image_features), torch.as_tensor(small_pool.text_features))
    out = _fit("self_training", problem, logit_scale=SCALE, lr=0.0, epochs=1, strategy="fpl")
    np.testing.assert_allclose(out.probs.numpy(), _reference(small_pool), rtol=1e-4, atol=1e-6)


def test_initial_logits_are_rescaled_from_clips_scale():
    logits = torch.tensor([[100.0, 50.0], [20.0, 40.0]])
    problem = Problem(torch.eye(2), torch.eye(2), initial_logits=logits)
    assert problem.logits() is logits
    assert torch.equal(problem.logits(SCALE), logits * (SCALE / 100.0))


def test_refine_leaves_zeroshot_at_the_scale_as_it_is_with_per_image_logits():
    from test_prompt_weighting import templated_pool

    X, T, _ = templated_pool()  # (C, P, d) text: AutoCLIP gives per-image logits
    given = zsadapt.refine(X, T, "zeroshot", weighting="autoclip", logit_scale=SCALE)
    own = zsadapt.refine(X, T, "zeroshot", weighting="autoclip", logit_scale=SCALE, calibrate=False)
    np.testing.assert_allclose(given.probs, own.probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["zlap", "inmap", "self_training"])
def test_cli_takes_the_scale_for_the_methods_that_refused_it(tmp_path, small_pool, method):
    np.savez(tmp_path / "pool.npz", image_features=small_pool.image_features,
             text_features=small_pool.text_features)
    extra = ["--epochs", "3"] if method == "self_training" else []
    result = CliRunner().invoke(main, ["refine", str(tmp_path / "pool.npz"), "--method", method,
                                       "--logit-scale", "30", "--out", str(tmp_path / "out.npz"), "--quiet",
                                       *extra])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as saved:
        assert '"logit_scale": 30.0' in str(saved["params"])


def test_the_initial_inmap_run_inherits_the_methods_scale(small_pool):
    from zsadapt.initial import initial_problem

    X, T = torch.as_tensor(small_pool.image_features), torch.as_tensor(small_pool.text_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inherited = initial_problem(X, T, initial="inmap", logit_scale=SCALE).classifier
        overridden = initial_problem(X, T, initial="inmap", initial_params={"logit_scale": 100.0},
                                     logit_scale=SCALE).classifier
        reference = get_solver("inmap")(logit_scale=SCALE)
        reference.fit(Problem(X, T))
    assert torch.equal(inherited, reference.proxies_)
    assert not torch.equal(overridden, inherited)  # initial_params name their own scale
    assert torch.equal(overridden, initial_problem(X, T, initial="inmap").classifier)


def test_compare_sets_the_scale_of_every_method(tmp_path, small_pool):
    import json

    np.savez(tmp_path / "pool.npz", image_features=small_pool.image_features,
             text_features=small_pool.text_features, labels=small_pool.labels)
    (tmp_path / "params.json").write_text('{"zlap": {"logit_scale": 50}}')
    methods = "zeroshot,zlap,inmap,auto"
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "pool.npz"), "--methods", methods, "--logit-scale",
                                       "30", "--params", str(tmp_path / "params.json"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.stdout)["rows"]}
    assert [rows[m]["params"]["logit_scale"] for m in methods.split(",")] == [30.0, 50.0, 30.0, 30.0]
    from zsadapt.metrics import expected_calibration_error

    reference = expected_calibration_error(_reference(small_pool), small_pool.labels)  # softmax(30 x cosine)'s
    assert rows["zeroshot"]["ece"] == pytest.approx(reference, abs=1e-3)
    bad = CliRunner().invoke(main, ["compare", str(tmp_path / "pool.npz"), "--methods", methods,
                                    "--logit-scale", "0", "--quiet"])
    assert bad.exit_code == 1 and bad.stdout == ""
    assert "logit_scale must be >= 1e-06" in bad.stderr and "Traceback" not in bad.output
