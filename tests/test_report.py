"""The report (HTML / Markdown), its numbers, --min-confidence, and every command's --help."""

from __future__ import annotations

import base64
import re
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import zsadapt
from zsadapt import report
from zsadapt.cli.main import main
from zsadapt.solvers import Param

pytest.importorskip("matplotlib", reason="the report tests need zsadapt[report] (matplotlib)")


@pytest.fixture
def pool_file(small_pool, tmp_path):
    path = tmp_path / "pool.npz"
    zsadapt.write_pool(path, small_pool)
    return path


def test_reliability_bins_by_hand_and_against_metrics():
    # confidences 0.95 (right), 0.95 (wrong), 0.55 (right), 0.55 (right), 10 bins
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    stats = report.reliability_bins(probs, labels, n_bins=10)
    assert stats["count"].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert stats["accuracy"][9] == 0.5 and stats["accuracy"][5] == 1.0
    np.testing.assert_allclose(stats["confidence"][[5, 9]], [0.55, 0.95])
    assert stats["ece"] == pytest.approx(100 * (0.5 * 0.45 + 0.5 * 0.45))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 7)) * 3
    random_probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    random_labels = rng.integers(0, 7, 500)
    assert report.reliability_bins(random_probs, random_labels)["ece"] == pytest.approx(
        zsadapt.expected_calibration_error(random_probs, random_labels), abs=1e-9)


def test_per_class_accuracy_and_changes():
    labels = np.array([0, 0, 1, 1, 1, 3])
    before = np.array([0, 1, 1, 0, 0, 3])  # class 0: 50%, class 1: 33%, class 2 absent, class 3: 100%
    after = np.array([0, 0, 1, 1, 1, 0])  # class 0: 100%, class 1: 100%, class 3: 0%
    np.testing.assert_allclose(report.per_class_accuracy(before, labels, 4), [50, 100 / 3, np.nan, 100])
    make = lambda pred: zsadapt.Result(pred, np.eye(4)[pred], np.eye(4)[pred], "m")  # noqa: E731
    changes = report.class_changes(make(before), make(after), labels, ["a", "b", "c", "d"], top=5)
    assert [r["class"] for r in changes["gained"]] == ["b", "a"]
    assert [r["class"] for r in changes["lost"]] == ["d"]
    assert changes["gained"][0]["change"] == pytest.approx(200 / 3)
    assert np.isnan(changes["delta"][2])


def test_confident_labels_numpy_and_torch():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]], dtype=np.float32)
    result = zsadapt.Result(probs.argmax(1), probs, probs, "m")
    assert result.confident_labels(0.6).tolist() == [0, 1, -1]
    assert result.confident_labels(0.0).tolist() == [0, 1, 0]
    assert result.labels.tolist() == [0, 1, 0]  # not modified in place
    as_torch = zsadapt.Result(torch.from_numpy(probs.argmax(1)), torch.from_numpy(probs), torch.from_numpy(probs), "m")
    out = as_torch.confident_labels(0.61)
    assert isinstance(out, torch.Tensor) and out.tolist() == [0, -1, -1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        result.confident_labels(1.5)


def test_method_rows_coverage_and_agreement(small_pool):
    results = [zsadapt.refine(small_pool.image_features, small_pool.text_features, m) for m in ("zeroshot", "zlap")]
    rows = report.method_rows(results, small_pool.labels, min_confidence=0.5)
    zs, zl = results
    confident = zl.probs.max(1) >= 0.5
    assert rows[1]["coverage"] == pytest.approx(100 * confident.mean())
    expected = zsadapt.accuracy(zl.labels[confident], small_pool.labels[confident])
    assert rows[1]["selective_accuracy"] == pytest.approx(expected)
    assert rows[1]["changed"] == pytest.approx(100 * np.mean(zl.labels != zs.labels))
    assert rows[1]["delta"] == pytest.approx(zsadapt.accuracy(zl.labels, small_pool.labels)
                                             - zsadapt.accuracy(zs.labels, small_pool.labels))
    assert rows[0]["ece"] == pytest.approx(zsadapt.expected_calibration_error(zs.probs, small_pool.labels))


def _images(text):
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def test_report_html_and_markdown(small_pool, tmp_path):
    results = {m: zsadapt.refine(small_pool.image_features, small_pool.text_features, m) for m in zsadapt.methods()}
    built = report.make_report(small_pool, results, min_confidence=0.7)
    html_path = built.save(tmp_path / "r.html")
    page = html_path.read_text()
    figures = _images(page)
    assert len(figures) == 3 and all(png.startswith(b"\x89PNG") for png in figures)
    for method, result in results.items():
        assert f"<td>{method}</td>" in page
        ece = zsadapt.expected_calibration_error(result.probs, small_pool.labels)
        assert f"<td>{ece:.2f}</td>" in page
    assert "coverage @ 0.7 %" in page and "Solver diagnostics" in page
    md = built.save(tmp_path / "r.md").read_text()
    assert md.startswith("# zsadapt report") and len(_images(md)) == 3 and "| zlap |" in md
    with pytest.raises(ValueError, match="already exists"):
        built.save(tmp_path / "r.md")
    with pytest.raises(ValueError, match="must end in"):
        built.save(tmp_path / "r.pdf")


def test_report_without_labels(small_pool):
    unlabelled = zsadapt.Pool(small_pool.image_features, small_pool.text_features, source="nolabels")
    results = [zsadapt.refine(unlabelled.image_features, unlabelled.text_features, m) for m in ("zeroshot", "zlap")]
    page = report.make_report(unlabelled, results).html()
    assert "Predicted class sizes" in page and "Reliability" not in page
    assert len(_images(page)) == 1  # the confidence histograms only


def test_refine_report_and_min_confidence_cli(pool_file, tmp_path):
    preds, page = tmp_path / "preds.npz", tmp_path / "report.html"
    runner = CliRunner()
    # zlap named: its probabilities on this pool fall on both sides of 0.6 (the default's, gmm's on
    # a pool it labels perfectly, are all above)
    result = runner.invoke(main, ["refine", str(pool_file), "--method", "zlap", "--out", str(preds),
                                  "--min-confidence", "0.6",
                                  "--report", str(page), "-q"])
    assert result.exit_code == 0, result.output
    assert "labelled at confidence >= 0.6" in result.stdout
    with np.load(preds) as data:
        labels, probs = data["labels"], data["probs"]
    low = probs.max(1) < 0.6
    assert low.any() and (labels[low] == -1).all() and (labels[~low] == probs[~low].argmax(1)).all()
    text = page.read_text()
    assert "<td>zeroshot</td>" in text and "<td>zlap</td>" in text and "coverage @ 0.6 %" in text
    again = runner.invoke(main, ["refine", str(pool_file), "--report", str(page)])
    assert again.exit_code == 1 and "already exists" in again.output
    md = tmp_path / "all.md"
    compared = runner.invoke(main, ["compare", str(pool_file), "--report", str(md), "-q"])
    assert compared.exit_code == 0, compared.output
    assert all(f"| {m} |" in md.read_text() for m in zsadapt.methods())


def test_report_says_how_to_install_matplotlib(pool_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    result = CliRunner().invoke(main, ["refine", str(pool_file), "--report", str(tmp_path / "r.html")])
    assert result.exit_code == 1
    assert "pip install 'zsadapt[report]'" in result.output and "Traceback" not in result.output


def test_parameter_sweep(small_pool):
    assert report.main_parameter("zlap") == "k"
    assert report.sweep_values(Param(5, int, "")) == [2, 5, 10]
    assert report.sweep_values(Param(0.9, float, "", maximum=0.999)) == [0.45, 0.9, 0.999]
    assert report.sweep_values(Param(0, int, "", minimum=0)) == [0, 1, 2]
    rows = report.parameter_sweep(small_pool, "zlap", values=[3, 8])
    for row in rows:
        direct = zsadapt.refine(small_pool.image_features, small_pool.text_features, "zlap", k=row["value"])
        assert row["accuracy"] == pytest.approx(zsadapt.accuracy(direct.labels, small_pool.labels))


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, prefix + (name,))
        yield prefix + (name,)


def test_every_command_help_shows_an_example():
    runner = CliRunner()
    for path in [()] + list(_commands(main)):
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, f"zsadapt {' '.join(path)} --help"
