"""Start-up stays light: ``import zsadapt``, ``zsadapt --version`` and every ``--help`` run without
importing torch (checked in a fresh interpreter through ``sys.modules``, not by timing), the lazy
exports are complete, and ``refine``'s solver options, read from the cache, match the registry."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

HEAVY = ("torch", "sklearn", "scipy")

PROBE = """
import json, sys
from zsadapt.cli.main import main
try:
    main({args!r})
except SystemExit:
    pass
print("@@" + json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr)
"""


def loaded_after(args, env=None) -> list:
    """Which of HEAVY a fresh interpreter holds after running ``zsadapt ARGS``."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args), heavy=HEAVY)],
                          capture_output=True, text=True, env=env, timeout=300)
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("@@")]
    assert line, done.stderr
    return json.loads(line[-1][2:])


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["compare", "--help"], ["demo", "--help"],
                                  ["tune", "--help"], ["encode", "images", "--help"], ["info", "--help"]])
def test_no_heavy_import(args):
    assert loaded_after(args) == []


def test_import_zsadapt_is_lazy():
    code = "import sys, zsadapt; print([m for m in %r if m in sys.modules])" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_lazy_exports_resolve_and_dir_is_complete():
    import zsadapt

    for name in zsadapt.__all__:
        assert getattr(zsadapt, name) is not None, name
    assert set(zsadapt.__all__) <= set(dir(zsadapt))
    assert {"encode", "report", "solvers"} <= set(dir(zsadapt))
    assert not {"annotations", "importlib"} & set(dir(zsadapt))  # the module's own imports are not API
    for estimator in zsadapt.ESTIMATORS.values():  # every method's estimator, the default's included
        assert getattr(zsadapt, estimator.__name__) is estimator
    from zsadapt import refine
    from zsadapt.api import refine as direct

    assert refine is direct
    with pytest.raises(AttributeError):
        zsadapt.no_such_name  # noqa: B018


def test_refine_help_reads_the_cached_solver_table(tmp_path):
    """The first ``refine --help`` builds the table (torch); the second reads it (no torch). A
    solver source edited in between (other work in this checkout) changes the key: retried."""
    import os

    from zsadapt.cli.options import _solver_sources_key

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    for _ in range(3):
        key = _solver_sources_key()
        loaded_after(["refine", "--help"], env)
        second = loaded_after(["refine", "--help"], env)
        if key == _solver_sources_key():
            break
    assert "torch" not in second


def test_solver_table_matches_registry(tmp_path, monkeypatch):
    """The options ``refine`` gets are one per registered parameter, with its help."""
    import zsadapt
    from zsadapt.cli import options

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    table = options.solver_table()
    assert table == json.loads(json.dumps(options.build_solver_table()))
    expected = {n for m in zsadapt.describe_methods() for n in m["params"]}
    assert {o.name for o in options.solver_parameter_options()} == expected
    cached = options.solver_table()  # now from the file
    assert cached == table


@pytest.mark.parametrize("method", ["zeroshot", "gmm"])
def test_labelling_with_a_saved_model_imports_no_sklearn(tmp_path, method):
    """A process that only labels (``zsadapt label``, each Ray actor or Spark worker) loads a saved
    model and predicts without importing scikit-learn or scipy.optimize (about 1.5 s of its start:
    solvers import them when they first need them)."""
    import zsadapt

    pool = zsadapt.make_pool(n_images=200, n_classes=5, dim=16, seed=0)
    path = zsadapt.refine(pool.image_features, pool.text_features, method).save(tmp_path / "m.safetensors")
    np_path = tmp_path / "x.npy"
    np.save(np_path, pool.image_features[:50])
    code = ("import sys, numpy as np\nfrom zsadapt.models import load_model\n"
            f"load_model({str(path)!r}).predict_proba(np.load({str(np_path)!r}))\n"
            "print([m for m in ('sklearn', 'scipy.optimize') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
