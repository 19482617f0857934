"""zsadapt: refine zero-shot CLIP predictions on the unlabeled pool they are made on.

Quick start::

    import zsadapt
    result = zsadapt.refine(image_features, text_features, method="zlap")
    result.labels, result.probs

See ``zsadapt.methods()`` for the registered methods and the README for the CLI.
"""

from ._version import __version__
from .api import describe_methods, make_solver, methods, refine
from .estimators import (
    EM, ESTIMATORS, GMM, UNEM, InMaP, SelfTraining, TransCLIP, TransductiveClassifier, ZeroShot, ZLaP,
    class_prototypes,
)
from .io import read_pool, write_pool
from .messages import set_quiet
from .metrics import accuracy, expected_calibration_error
from .pool import Pool
from .prompts import PromptEnsemble, zeroshot_classifier
from .result import Result
from .synthetic import make_pool
from .zeroshot import zeroshot_logits, zeroshot_probs

# Submodules with optional extras import them on first use: zsadapt.encode (open_clip), zsadapt.report
# (matplotlib).
from . import encode, report  # noqa: E402,F401  (after Result/Pool, which they use)

__all__ = [
    "EM",
    "UNEM",
    "ESTIMATORS",
    "GMM",
    "InMaP",
    "Pool",
    "PromptEnsemble",
    "Result",
    "SelfTraining",
    "TransCLIP",
    "TransductiveClassifier",
    "ZLaP",
    "ZeroShot",
    "__version__",
    "accuracy",
    "class_prototypes",
    "describe_methods",
    "expected_calibration_error",
    "make_pool",
    "make_solver",
    "methods",
    "read_pool",
    "refine",
    "set_quiet",
    "write_pool",
    "zeroshot_classifier",
    "zeroshot_logits",
    "zeroshot_probs",
]
