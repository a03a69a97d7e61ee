"""The pefttune cache folder: where corpora, dataset manifests, audio checks and frozen encoder
states are kept between runs.

Location, in order of precedence: the ``root`` argument, the ``PEFTTUNE_CACHE`` environment
variable, ``$XDG_CACHE_HOME/pefttune``, ``~/.cache/pefttune``::

    cache_root()               # ~/.cache/pefttune unless PEFTTUNE_CACHE is set
    cache_root() / "frozen"    # the frozen-state cache of the trials (pefttune.frozen_cache)

Only the standard library is imported here: every layer may import this module.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root(root: str | Path | None = None) -> Path:
    """The pefttune cache folder (not created here)."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("PEFTTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pefttune"
