"""zsadapt: refine zero-shot CLIP predictions on the unlabeled pool they are made on.

Quick start::

    import zsadapt
    result = zsadapt.refine(image_features, text_features, method="zlap")
    result.labels, result.probs

See ``zsadapt.methods()`` for the registered methods and the README for the CLI.

``import zsadapt`` is cheap: the public names below are imported on first use (PEP 562), so that
``zsadapt --version`` and ``--help`` never load torch, scikit-learn or the solvers.
"""

from __future__ import annotations

import importlib

from ._version import __version__

#: Public name -> ``"module:attribute"`` (an attribute of that module) or ``"module"`` (a
#: submodule). Adding an export is one line here.
_EXPORTS = {
    "Anchored": "zsadapt.estimators:Anchored",
    "Auto": "zsadapt.estimators:Auto",
    "EM": "zsadapt.estimators:EM",
    "ESTIMATORS": "zsadapt.estimators:ESTIMATORS",
    "GMM": "zsadapt.estimators:GMM",
    "InMaP": "zsadapt.estimators:InMaP",
    "MOON": "zsadapt.estimators:MOON",
    "Pool": "zsadapt.pool:Pool",
    "PromptEnsemble": "zsadapt.prompts:PromptEnsemble",
    "Result": "zsadapt.result:Result",
    "SelfTraining": "zsadapt.estimators:SelfTraining",
    "StatA": "zsadapt.estimators:StatA",
    "Stream": "zsadapt.stream:Stream",
    "TransCLIP": "zsadapt.estimators:TransCLIP",
    "TransductiveClassifier": "zsadapt.estimators:TransductiveClassifier",
    "UNEM": "zsadapt.estimators:UNEM",
    "ZLaP": "zsadapt.estimators:ZLaP",
    "ZeroShot": "zsadapt.estimators:ZeroShot",
    "accuracy": "zsadapt.metrics:accuracy",
    "class_prototypes": "zsadapt.estimators:class_prototypes",
    "describe_methods": "zsadapt.api:describe_methods",
    "expected_calibration_error": "zsadapt.metrics:expected_calibration_error",
    "label": "zsadapt.labelling:label",
    "load_model": "zsadapt.models:load_model",
    "make_demo_pool": "zsadapt.synthetic:make_demo_pool",
    "make_pool": "zsadapt.synthetic:make_pool",
    "make_solver": "zsadapt.api:make_solver",
    "methods": "zsadapt.api:methods",
    "read_pool": "zsadapt.io:read_pool",
    "refine": "zsadapt.api:refine",
    "set_quiet": "zsadapt.messages:set_quiet",
    "set_threads": "zsadapt.threads:set_threads",
    "write_pool": "zsadapt.io:write_pool",
    "zeroshot_classifier": "zsadapt.prompts:zeroshot_classifier",
    "zeroshot_logits": "zsadapt.zeroshot:zeroshot_logits",
    "zeroshot_probs": "zsadapt.zeroshot:zeroshot_probs",
    # Submodules (those with optional extras import them on first use).
    "encode": "zsadapt.encode",
    "graphs": "zsadapt.graphs",
    "report": "zsadapt.report",
    "solvers": "zsadapt.solvers",
}

__all__ = ["__version__"] + sorted(name for name, target in _EXPORTS.items() if ":" in target)


def __getattr__(name: str):
    """Import a public name on first access and keep it as a module attribute."""
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'zsadapt' has no attribute {name!r}")
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attribute) if attribute else module
    globals()[name] = value
    return value


def __dir__() -> list:
    """The public names and the module's dunders (not its own imports)."""
    return sorted({name for name in globals() if name.startswith("__")} | set(_EXPORTS))
