"""The README and the docs site: the README stays a short manual whose commands are the CI's, its
links resolve, and the MkDocs site builds with ``--strict`` (every nav entry and link resolves,
every docstring parses), with the CLI reference, the API reference and the parameter tables
generated from the code."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_click")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_commands_are_the_ci_ones():
    readme = README.read_text(encoding="utf-8")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("bash .ci/setup")]
    assert len(ci) == 1, ci
    assert ci[0] in readme, f"the README's test command is not .ci/run's: {ci[0]}"
    assert "bash .ci/setup && .venv/bin/zsadapt demo" in readme
    assert "pip install 'zsadapt[" not in readme  # not on an index: install from the checkout
    assert "pip install '.[clip,report]'" in readme


def test_readme_links_resolve():
    readme = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = [m for m in DOCS_PACKAGES if not _installed(m)]
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)}): pip install '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _text(path: Path) -> str:
    return re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8"))



@pytest.mark.slow
def test_site_builds_with_a_cli_reference_of_every_command(site):
    from zsadapt.cli.main import main

    page = _text(site / "reference" / "cli" / "index.html")
    for name, command in main.commands.items():
        assert f"zsadapt {name}" in page, f"CLI reference lacks `zsadapt {name}`"
        for param in command.params:
            long_names = [opt for opt in param.opts if opt.startswith("--")]
            if long_names and not getattr(param, "hidden", False):
                assert long_names[0] in page, f"CLI reference lacks zsadapt {name} {long_names[0]}"


@pytest.mark.slow
def test_site_has_an_api_page_per_module_from_the_docstrings(site):
    api = site / "reference" / "api"
    for module in ("zsadapt", "zsadapt.api", "zsadapt.solvers", "zsadapt.solvers.zlap", "zsadapt.graphs.knn",
                   "zsadapt.cli.main"):
        assert (api / module / "index.html").exists(), module
    page = _text(api / "zsadapt.api" / "index.html")
    # refine's numpydoc "Parameters" section, rendered as a table of its parameters
    section = page[page.index("refine"):]
    assert "Parameters:" in section and "Returns:" in section
    for name in ("image_features", "text_features", "method", "device", "seed"):
        assert name in section


@pytest.mark.slow
def test_every_method_page_is_built_and_in_the_navigation(site):
    from zsadapt.solvers import get_solver

    home = (site / "index.html").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs" / "methods").glob("*.md")):
        stem = "" if page.stem == "index" else f"{page.stem}/"
        assert f"methods/{stem}" in home, f"docs/methods/{page.name} is not in the navigation"
    for method in ("zlap", "gmm", "transclip", "em", "unem", "inmap", "self_training"):
        text = _text(site / "methods" / method / "index.html")
        for name in get_solver(method).params:
            assert f"--{name.replace('_', '-')}" in text, f"{method}'s page lacks parameter {name}"


@pytest.mark.slow
def test_a_benchmark_script_writes_its_results_page(tmp_path):
    """The wiring behind docs/results/: a script run writes its page, with the command that made it
    and the table it printed (redirected by ZSADAPT_RESULTS_DIR, so the committed pages stay)."""
    env = {k: v for k, v in os.environ.items() if k != "ZSADAPT_DATA"}
    env.update(ZSADAPT_RESULTS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "benchmarks/zlap_calibration.py"], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    page = (tmp_path / "zlap_calibration.md").read_text(encoding="utf-8")
    assert "```bash\npython benchmarks/zlap_calibration.py\n```" in page
    table = [line for line in done.stdout.splitlines() if line.startswith("| synthetic demo |")]
    assert len(table) == 1 and table[0] in page
