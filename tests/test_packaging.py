"""The wheel: every package setup.cfg lists is inside with all its modules, the mapped folders
(solvers/, graphs/, cli/) land under zsadapt/, the console script is declared, and the installed
wheel imports and runs outside the repository."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ".venv*": both environments (.venv, and the 7 GB .venv-test); "site": a built docs site.
SKIP = shutil.ignore_patterns(".venv*", ".git", "build", "dist", "site", "*.egg-info", "__pycache__", "*.pyc",
                              ".pytest_cache", "tests", "notebooks", "benchmarks", ".whl", ".gl")

pytestmark = pytest.mark.slow


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def listed(config, section, key) -> list:
    return [line.strip() for line in config[section][key].strip().splitlines() if line.strip()]


def package_folders(config) -> dict:
    """Package name -> source folder, from ``packages`` and ``package_dir``."""
    mapping = dict(
        (name.strip(), folder.strip())
        for name, folder in (line.split("=") for line in listed(config, "options", "package_dir"))
    )
    return {pkg: ROOT / mapping.get(pkg, pkg.replace(".", "/")) for pkg in listed(config, "options", "packages")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a clean copy of the sources (the checkout stays untouched)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(work / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list((work / "dist").glob("zsadapt-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_setup_cfg_lists_every_package_folder():
    """Each mapped folder that holds Python code is a listed package with an ``__init__.py``
    (without one the editable finder turns zsadapt into a namespace package)."""
    folders = package_folders(setup_cfg())
    assert {"zsadapt", "zsadapt.solvers", "zsadapt.graphs", "zsadapt.cli"} <= set(folders)
    for pkg, folder in folders.items():
        assert (folder / "__init__.py").is_file(), f"{pkg}: {folder} has no __init__.py"
        for sub in folder.iterdir():
            if sub.is_dir() and any(sub.glob("*.py")):
                assert f"{pkg}.{sub.name}" in folders, f"{sub} holds modules but is not in setup.cfg"


def test_wheel_holds_every_package_and_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg, folder in package_folders(setup_cfg()).items():
        target = pkg.replace(".", "/")
        modules = sorted(p.name for p in folder.glob("*.py"))
        assert "__init__.py" in modules
        for module in modules:
            assert f"{target}/{module}" in names, f"{target}/{module} missing from {wheel.name}"
    # Nothing from outside the packages (tests, data, the venv) is shipped.
    strays = [n for n in names if not (n.startswith("zsadapt/") or n.split("/")[0].endswith(".dist-info"))]
    assert not strays, strays


def test_wheel_declares_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(info).decode())
    expected = listed(setup_cfg(), "options.entry_points", "console_scripts")
    assert expected == ["zsadapt = zsadapt.cli.main:main"]
    assert entry_points["console_scripts"]["zsadapt"] == "zsadapt.cli.main:main"


def test_installed_wheel_imports_and_runs_outside_the_repo(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import zsadapt, zsadapt.cli.main, zsadapt.graphs, zsadapt.solvers; "
        "print(zsadapt.__file__); print(','.join(zsadapt.methods()))"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, methods = proc.stdout.strip().splitlines()[-2:]
    if not where.startswith(str(target)):
        pytest.skip(f"the editable install shadows the wheel here (imported {where})")
    assert {"zeroshot", "zlap"} <= set(methods.split(","))
