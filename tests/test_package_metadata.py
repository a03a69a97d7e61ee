"""The package metadata: the license is an SPDX expression and setuptools builds it without a warning."""
from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"


def test_setuptools_writes_the_metadata_without_warnings(tmp_path, monkeypatch):
    import setuptools.build_meta as backend

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = backend.prepare_metadata_for_build_wheel(str(tmp_path))
    metadata = (tmp_path / name / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata
    setuptools_warnings = [w for w in caught if "setuptools" in type(w.message).__module__ or "Setuptools" in
                           type(w.message).__name__]
    assert not setuptools_warnings, [str(w.message)[:300] for w in setuptools_warnings]
