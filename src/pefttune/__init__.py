"""pefttune: which PEFT method where in a frozen self-supervised speech encoder.

The public entry points are imported lazily (``import pefttune`` stays light):

- :func:`load_model` -- an exported model or ensemble as a predictor;
- :func:`load_backbone`, :class:`Placement`, :func:`build_model` -- the model pieces;
- :func:`load_config`, :func:`run_study` -- experiments (what `pefttune run` does).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "pefttune.predictor",
    "export_model": "pefttune.predictor",
    "load_backbone": "pefttune.backbones",
    "Placement": "pefttune.placement",
    "apply_placement": "pefttune.placement",
    "build_model": "pefttune.model",
    "load_model_dir": "pefttune.model",
    "HeadConfig": "pefttune.heads",
    "load_config": "pefttune.config",
    "run_study": "pefttune.study",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pefttune' has no attribute {name!r}")
