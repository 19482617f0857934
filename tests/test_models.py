"""Saved models (zsadapt.models): every method with an inductive ``predict`` round-trips through one
``.safetensors`` file and predicts exactly what the fitted solver in memory predicts; the metadata
says what the issue asks; every damaged or foreign file is a one-line ValueError naming it; and
``zsadapt refine --save-model`` writes the file atomically and never over an existing one."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import zsadapt
from zsadapt.cli.main import main
from zsadapt.models import FORMAT_VERSION, has_predict, load_model, text_checksum

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, C, D = 160, 5, 16


def _methods_with_predict() -> list:
    """Methods whose solver class implements ``predict`` (decided from the registry, not a list)."""
    return [m for m in zsadapt.methods() if has_predict(zsadapt.make_solver(m))]


@pytest.fixture(scope="module")
def pool():
    return zsadapt.make_pool(n_images=N, n_classes=C, dim=D, seed=11)


@pytest.fixture(scope="module")
def new_images():
    """Images the models never saw: another draw of the same kind of pool, not unit-norm."""
    X = zsadapt.make_pool(n_images=30, n_classes=C, dim=D, seed=12).image_features
    return X * np.linspace(0.5, 2.0, len(X), dtype=np.float32)[:, None]


@pytest.fixture(scope="module")
def saved(pool, tmp_path_factory):
    """A zlap model file fitted on ``pool`` (the default for the damaged-file tests)."""
    result = zsadapt.refine(pool.image_features, pool.text_features, "zlap")
    return result.save(tmp_path_factory.mktemp("models") / "zlap.safetensors",
                       classnames=[f"class {c}" for c in range(C)])


def test_zlap_round_trip_with_classes_no_image_links_to(tmp_path):
    """zlap stores Z compactly where most classes link to no image (20 images, 400 classes): the
    file holds only the linked classes' columns and predicts as the fitted solver does."""
    rng = np.random.default_rng(7)
    T = rng.standard_normal((400, 8)).astype(np.float32)
    X = rng.standard_normal((20, 8)).astype(np.float32)
    new = T[:30] + 0.05 * rng.standard_normal((30, 8)).astype(np.float32)  # near lone classes too
    result = zsadapt.refine(X, T, "zlap", robust=False)
    solver = result.fitted.solver
    assert solver.dual_columns_ is not None and solver.dual_.shape[1] < 100
    expected = solver.predict(torch.nn.functional.normalize(torch.as_tensor(new), dim=1)).probs.numpy()
    model = load_model(result.save(tmp_path / "zlap.safetensors"))
    np.testing.assert_allclose(model.predict_proba(new), expected, rtol=0, atol=1e-6)


def test_every_method_has_predict():
    # The round trip below covers every registered method with predict; the registry decides which.
    assert "zlap" in _methods_with_predict() and "zeroshot" in _methods_with_predict()


@pytest.mark.parametrize("method", _methods_with_predict())
def test_round_trip_predicts_as_the_fitted_solver(method, pool, new_images, tmp_path):
    result = zsadapt.refine(pool.image_features, pool.text_features, method, seed=3)
    path = result.save(tmp_path / f"{method}.safetensors")
    assert path == tmp_path / f"{method}.safetensors" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    model = load_model(path)

    unit = torch.nn.functional.normalize(torch.as_tensor(new_images), dim=1)
    expected = result.fitted.solver.predict(unit).probs.float().numpy()  # (M, C), in memory

    probs = model.predict_proba(new_images)  # numpy in, numpy out
    assert isinstance(probs, np.ndarray) and probs.shape == (len(new_images), C)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    labels = model.predict(new_images)
    assert isinstance(labels, np.ndarray)
    np.testing.assert_array_equal(labels, expected.argmax(axis=1))

    X = torch.as_tensor(new_images, dtype=torch.float16)  # torch in, torch out; float16 upcast
    probs_t = model.predict_proba(X)
    assert isinstance(probs_t, torch.Tensor) and probs_t.device == X.device
    np.testing.assert_allclose(probs_t.numpy(), model.predict_proba(X.float().numpy()), atol=1e-6)
    labels_t = model.predict(X)
    assert isinstance(labels_t, torch.Tensor) and labels_t.dtype == torch.int64
    np.testing.assert_array_equal(labels_t.numpy(), probs_t.numpy().argmax(axis=1))
    assert model.metadata["method"] == method


def test_metadata_fields(pool, saved):
    model = load_model(saved)
    meta = model.metadata
    assert meta["format"] == "zsadapt-model" and meta["format_version"] == str(FORMAT_VERSION)
    assert meta["zsadapt_version"] == zsadapt.__version__
    assert meta["method"] == "zlap" and model.method == "zlap"
    assert meta["params"] == zsadapt.make_solver("zlap").config  # defaults, all of them
    assert meta["n_features"] == D == model.n_features_in_ and meta["n_classes"] == C == model.n_classes
    assert model.classnames == [f"class {c}" for c in range(C)]
    np.testing.assert_array_equal(model.classes_, np.arange(C))
    assert meta["text_sha256"] == text_checksum(pool.text_features)
    assert meta["text_sha256"] != text_checksum(pool.text_features[::-1].copy())
    assert "state" not in meta
    assert "zlap" in repr(model) and f"d={D}" in repr(model)


def test_estimator_save_keeps_string_classes(pool, new_images, tmp_path):
    names = np.array([f"n{c}" for c in range(C)])
    estimator = zsadapt.GMM(text_features=pool.text_features).fit(pool.image_features)
    estimator.classes_ = names  # as if fitted with string labels
    model = load_model(estimator.save(tmp_path / "gmm.safetensors"))
    np.testing.assert_array_equal(model.predict(new_images), estimator.predict(new_images))
    assert model.predict(new_images).dtype.kind == "U"
    with pytest.raises(TypeError, match="class labels are strings"):
        model.predict(torch.as_tensor(new_images))


def test_saving_a_weak_predict_warns(pool, tmp_path, monkeypatch):
    result = zsadapt.refine(pool.image_features, pool.text_features, "gmm")
    monkeypatch.setattr(type(result.fitted.solver), "inductive_below_initial", True)
    with pytest.warns(UserWarning, match="worse than the initial classifier"):
        result.save(tmp_path / "weak.safetensors")


def test_save_refuses_to_overwrite_and_bad_paths(pool, saved, tmp_path):
    result = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot")
    before = saved.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        result.save(saved)
    assert saved.read_bytes() == before
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        result.save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match="3 class names for a model of 5 classes"):
        result.save(tmp_path / "names.safetensors", classnames=["a", "b", "c"])
    result.save(saved, overwrite=True)
    assert load_model(saved).method == "zeroshot"


# --- damaged and foreign files: one line naming the file -------------------------------------------


def _one_line_error(path, match):
    with pytest.raises(ValueError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert match in message, message
    return message


def _rewrite(source, target, *, metadata=None, tensors=None):
    """``source``'s tensors and metadata, changed, written to ``target`` with safetensors itself."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        meta = dict(handle.metadata())
        arrays = {k: handle.get_tensor(k) for k in handle.keys()}
    meta.update(metadata or {})
    arrays.update(tensors or {})
    save_file(arrays, str(target), metadata=meta)
    return target


def test_another_version(saved, tmp_path):
    newer = _rewrite(saved, tmp_path / "newer.safetensors",
                     metadata={"format_version": str(FORMAT_VERSION + 1), "zsadapt_version": "99.0"})
    _one_line_error(newer, f"model format version {FORMAT_VERSION + 1} (written by zsadapt 99.0)")


def test_no_format_version(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), framework="pt") as handle:
        meta = {k: v for k, v in handle.metadata().items() if k != "format_version"}
        arrays = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(arrays, str(tmp_path / "unversioned.safetensors"), metadata=meta)
    _one_line_error(tmp_path / "unversioned.safetensors", "no format_version")


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) - 100, 200, 5):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        _one_line_error(path, "truncated" if cut > 8 else "not a safetensors file")


def test_wrong_tensor_shapes(saved, tmp_path):
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as handle:
        name = next(k for k in handle.keys() if handle.get_tensor(k).ndim == 2)
        tensor = handle.get_tensor(name)
    wrong = _rewrite(saved, tmp_path / "shape.safetensors", tensors={name: tensor[:-1].clone()})
    _one_line_error(wrong, f"tensor {name} has shape")


def test_edited_metadata_that_no_longer_fits(saved, tmp_path):
    edited = _rewrite(saved, tmp_path / "dim.safetensors", metadata={"n_features": str(D + 1)})
    _one_line_error(edited, "does not predict")


def test_pickles_and_other_files_renamed(saved, tmp_path):
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"weights": np.ones(3)}))
    _one_line_error(pickled, "is a pickle")
    torch_file = tmp_path / "torch.safetensors"
    torch.save({"weights": torch.ones(3)}, torch_file)  # a zip archive
    _one_line_error(torch_file, "zip archive")
    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    _one_line_error(text, "not a safetensors file")
    pool_file = tmp_path / "pool.safetensors"  # a valid safetensors file, but a pool
    from safetensors.torch import save_file

    save_file({"image_features": torch.ones(2, 3)}, str(pool_file))
    _one_line_error(pool_file, "not a zsadapt model")
    _one_line_error(tmp_path / "missing.safetensors", "no such file")
    bad_json = _rewrite(saved, tmp_path / "json.safetensors", metadata={"state": "{not json"})
    _one_line_error(bad_json, "malformed zsadapt metadata")
    foreign = _rewrite(saved, tmp_path / "class.safetensors",
                       metadata={"state": json.dumps({"$dict": {"x": {"$object": "os:system", "fields": {}}}})})
    _one_line_error(foreign, "is not one of zsadapt's classes")


@pytest.mark.parametrize("method", ["zlap", "auto"])
def test_nan_in_any_stored_tensor(method, pool, saved, tmp_path):
    """A NaN in any of the fitted state's float tensors (not only where the load-time probe would
    see it: a pool row of zlap reaches only its neighbours) is one line, not NaN confidences."""
    from safetensors import safe_open

    source = saved if method == "zlap" else zsadapt.refine(pool.image_features, pool.text_features, method).save(
        tmp_path / f"{method}.safetensors")
    with safe_open(str(source), framework="pt") as handle:
        names = [k for k in handle.keys() if k.startswith("state") and handle.get_tensor(k).is_floating_point()]
        tensors = {k: handle.get_tensor(k) for k in names}
    assert names
    for i, name in enumerate(names):
        damaged = tensors[name].clone()
        damaged.view(-1)[-1] = float("nan")  # one value, the last
        _one_line_error(_rewrite(source, tmp_path / f"nan{i}.safetensors", tensors={name: damaged}), "NaN")


def test_class_names_and_labels_of_another_length(saved, tmp_path):
    for key, value, what in [("classnames", ["a"], "class names (1 entries"),
                             ("classnames", {"a": 1}, "class names (dict"),
                             ("classnames", [1] * C, "class names"),
                             ("classes", list(range(C + 1)), f"class labels ({C + 1} entries")]:
        edited = _rewrite(saved, tmp_path / f"{key}.safetensors", metadata={key: json.dumps(value)})
        _one_line_error(edited, what)


def _edited_state(saved, target, edit):
    """``saved`` with its fitted-state tree passed through ``edit(tree)``."""
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as handle:
        state = json.loads(handle.metadata()["state"])
    return _rewrite(saved, target, metadata={"state": json.dumps(edit(state))})


def _first_tensor_node(tree):
    """The first {"$torch": name, ...} node of a fitted-state tree."""
    if isinstance(tree, dict):
        if "$torch" in tree:
            return tree
        children = tree.values()
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    for child in children:
        found = _first_tensor_node(child)
        if found is not None:
            return found
    return None


def test_hand_edited_state_trees(saved, tmp_path):
    """A state tree edited by hand (or by another program) cannot make load_model run or return
    anything wrong: each damage is one line naming the file."""
    def missing_tensor(tree):
        _first_tensor_node(tree)["$torch"] = "state.no_such_tensor"
        return tree

    _one_line_error(_edited_state(saved, tmp_path / "missing.safetensors", missing_tensor),
                    "tensor state.no_such_tensor is missing")
    _one_line_error(_edited_state(saved, tmp_path / "entry.safetensors", lambda tree: {"$dict": {"x": {"$set": [1]}}}),
                    "unknown entry ['$set']")
    _one_line_error(_edited_state(saved, tmp_path / "function.safetensors",
                                  lambda tree: {"$dict": {"x": {"$object": "zsadapt:refine", "fields": {}}}}),
                    "is not a class")
    gone = {"$dict": {"x": {"$object": "zsadapt.solvers:NoSuchSolver", "fields": {}}}}
    _one_line_error(_edited_state(saved, tmp_path / "gone.safetensors", lambda tree: gone), "which this zsadapt")


# --- zsadapt refine --save-model -------------------------------------------------------------------


@pytest.fixture
def pool_file(pool, tmp_path):
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=pool.image_features, text_features=pool.text_features,
             labels=pool.labels, classnames=np.array([f"class {c}" for c in range(C)]))
    return path


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def test_refine_save_model(pool, pool_file, new_images, tmp_path):
    path = tmp_path / "model.safetensors"
    result = _cli("refine", pool_file, "--method", "transclip", "--save-model", path, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"saved the model to {path}" in result.stdout
    model = load_model(path)
    assert model.method == "transclip" and model.classnames == [f"class {c}" for c in range(C)]
    api = zsadapt.refine(pool.image_features, pool.text_features, "transclip")
    np.testing.assert_allclose(model.predict_proba(new_images),
                               load_model(api.save(tmp_path / "api.safetensors")).predict_proba(new_images),
                               atol=1e-6)

    before = (path.stat().st_mtime_ns, path.read_bytes())
    again = _cli("refine", pool_file, "--method", "zeroshot", "--save-model", path)
    assert again.exit_code == 1 and "already exists" in again.stderr and "Traceback" not in again.output
    assert again.stdout == ""
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before

    replaced = _cli("refine", pool_file, "--method", "zeroshot", "--save-model", path, "--overwrite",
                    "--json", "--quiet")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["model"] == str(path)
    assert load_model(path).method == "zeroshot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.safetensors", "model.safetensors", "pool.npz"]


def test_refine_save_model_errors_before_fitting(pool_file, tmp_path):
    wrong = _cli("refine", pool_file, "--save-model", tmp_path / "model.npz")
    assert wrong.exit_code == 1 and "must be a .safetensors file" in wrong.stderr
    missing = _cli("refine", pool_file, "--save-model", tmp_path / "no" / "model.safetensors")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    assert "Traceback" not in wrong.output + missing.output


def test_saving_the_default_warns_on_stderr_only(pool_file, tmp_path):
    """The default's predict fell below the initial classifier on FGVC Aircraft (0.78 point,
    benchmarks/fit_on_sample.py), so its flag is set and --save-model says so, in one stderr line."""
    path = tmp_path / "model.safetensors"
    result = _cli("refine", pool_file, "--save-model", path)
    assert result.exit_code == 0, result.output
    assert f"zsadapt: warning: {zsadapt.solvers.DEFAULT_METHOD}: its predict labelled new images worse" in result.stderr
    assert "warning" not in result.stdout and f"saved the model to {path}" in result.stdout
