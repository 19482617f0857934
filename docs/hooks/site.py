"""MkDocs hook of the docs site (``hooks:`` in ``mkdocs.yml``): where griffe finds the sources,
and the pages that appear in the navigation without being named in it.

* ``setup.cfg`` maps the top-level folders ``solvers/``, ``graphs/`` and ``cli/`` into
  ``zsadapt.solvers``, ``zsadapt.graphs`` and ``zsadapt.cli`` (``package_dir``). griffe looks for a
  package as one folder tree, so each build links the sources into that tree in a temporary folder
  (``<tmp>/zsadapt/solvers/zlap.py -> solvers/zlap.py``) and hands it to mkdocstrings as its search
  path: the API reference is read from the code statically, nothing is imported.
* The API reference has a page per public module, generated here, so a new module is documented
  as soon as it exists.
* Every page in ``docs/methods/`` and ``docs/results/`` joins the "Methods" / "Results" sections
  (benchmark scripts write results pages; other pages are written alongside the code they
  describe), and a page named in ``extra.optional_pages`` leaves the navigation while it does not
  exist. Everything else named in ``nav`` must exist: the strict build fails otherwise.
* A page may hold two markers, filled from the solver registry at build time so they never drift
  from the code: ``<!-- methods -->`` (every registered method: name, summary, reference, its
  page) and ``<!-- parameters: NAME -->`` (method NAME's hyper-parameters: Python name, CLI
  option, default, meaning).
"""

from __future__ import annotations

import configparser
import re
import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
API_FOLDER = "reference/api"
MARKER = re.compile(r"^<!-- (methods|parameters: (\w+)) -->$", re.M)
_MIRRORS: list = []


def package_dirs() -> dict:
    """``{package: folder}`` from ``setup.cfg``'s ``[options] package_dir``."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    pairs = (line.split("=") for line in parser["options"]["package_dir"].strip().splitlines())
    return {package.strip(): folder.strip() for package, folder in pairs}


def mirror_sources() -> Path:
    """A temporary folder holding the installed package layout as links to the real files."""
    mirror = Path(tempfile.mkdtemp(prefix="zsadapt-docs-"))
    _MIRRORS.append(mirror)
    for package, folder in sorted(package_dirs().items()):  # parents before their subpackages
        target = mirror.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / folder).glob("*.py")):
            (target / source.name).symlink_to(source)
    return mirror


def public_modules(mirror: Path) -> list:
    """Dotted names of the package's modules, private ones (``_name``) left out, in file order."""
    names = []
    for path in sorted(mirror.rglob("*.py")):
        parts = path.relative_to(mirror).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return sorted(names)


def page_title(path: Path) -> str:
    """The page's first ``# heading``, or its file name."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def _section(nav: list, title: str):
    for entry in nav:
        if isinstance(entry, dict) and title in entry and isinstance(entry[title], list):
            return entry[title]
    return None


def _listed(nav) -> set:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_listed(value) for value in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_listed(value) for value in nav)) if nav else set()
    return set()


def _drop_missing(nav: list, optional: set, docs: Path) -> list:
    kept = []
    for entry in nav:
        if isinstance(entry, dict):
            (title, value), = entry.items()
            if isinstance(value, list):
                entry = {title: _drop_missing(value, optional, docs)}
            elif isinstance(value, str) and value in optional and not (docs / value).exists():
                continue
        kept.append(entry)
    return kept


@event_priority(100)  # before mkdocstrings reads its handler options
def on_config(config):
    mirror = mirror_sources()
    handler = config.plugins["mkdocstrings"].config["handlers"].setdefault("python", {})
    handler["paths"] = [str(mirror)]
    config["extra"]["api_modules"] = public_modules(mirror)
    docs = Path(config["docs_dir"])
    nav = _drop_missing(config["nav"], set(config["extra"].get("optional_pages", [])), docs)
    listed = _listed(nav)
    for title, folder in (("Methods", "methods"), ("Results", "results")):
        section = _section(nav, title)
        for path in sorted((docs / folder).glob("*.md")):
            uri = f"{folder}/{path.name}"
            if section is not None and uri not in listed:
                section.append({page_title(path): uri})
    api = _section(_section(nav, "Reference") or [], "Python API")
    if api is not None:
        api.extend({name: f"{API_FOLDER}/{name}.md"} for name in config["extra"]["api_modules"])
    config["nav"] = nav
    return config


def on_files(files, config):
    for name in config["extra"]["api_modules"]:
        content = f"# `{name}`\n\n::: {name}\n"
        files.append(File.generated(config, f"{API_FOLDER}/{name}.md", content=content))
    return files


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def methods_table(page_uri: str, docs: Path) -> str:
    """Markdown table of the registered methods, each linked to ``methods/<name>.md`` if it exists."""
    from zsadapt.api import describe_methods

    here = Path(page_uri).parent
    rows = ["| method | what | reference |", "|---|---|---|"]
    for method in describe_methods():
        name = f"`{method['name']}`"
        page = Path("methods") / f"{method['name']}.md"
        if (docs / page).exists():
            name = f"[{name}]({Path(*(['..'] * len(here.parts)), page).as_posix()})"
        rows.append(f"| {name} | {_cell(method['summary'])} | {_cell(method['reference'])} |")
    return "\n".join(rows)


def parameters_table(method: str) -> str:
    """Markdown table of ``method``'s hyper-parameters, from its ``Solver.params``."""
    from zsadapt.solvers import get_solver

    rows = ["| parameter | CLI option | default | meaning |", "|---|---|---|---|"]
    for name, spec in get_solver(method).params.items():
        default = "resolved by the method" if spec.default is None else f"`{spec.default!r}`"
        meaning = spec.help + (f" (one of {', '.join(map(str, spec.choices))})" if spec.choices else "")
        rows.append(f"| `{name}` | `--{name.replace('_', '-')}` | {_cell(default)} | {_cell(meaning)} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    docs = Path(config["docs_dir"])
    return MARKER.sub(lambda m: methods_table(page.file.src_uri, docs) if m.group(1) == "methods"
                      else parameters_table(m.group(2)), markdown)


def on_shutdown():
    for mirror in _MIRRORS:
        shutil.rmtree(mirror, ignore_errors=True)
