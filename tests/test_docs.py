"""The generated docs pages match the code they document, and say what the code says."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pefttune.analysis import tables
from pefttune.config import StudyConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_fresh():
    stale = _generator().stale_pages(DOCS)
    assert not stale, f"stale: {stale}; run python docs/generate.py"


def test_a_changed_field_makes_the_page_stale(tmp_path, monkeypatch):
    gen = _generator()
    for name, page in gen.PAGES.items():
        (tmp_path / name).write_text(page())
    assert gen.stale_pages(tmp_path) == []
    field = StudyConfig.model_fields["ensemble_size"]
    monkeypatch.setattr(field, "description", "Members of the ensembles (changed).")
    assert gen.stale_pages(tmp_path) == ["configuration.md"]
    assert gen.main(["--check"]) == 1


def _dotted_fields(model, prefix=""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            yield from _dotted_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_configuration_page_lists_every_field_with_its_default():
    page = (DOCS / "configuration.md").read_text()
    fields = list(_dotted_fields(StudyConfig))
    assert len(fields) > 60
    for name in fields:
        assert f"| `{name}` |" in page, name
    assert "| `search.num_samples` | int | `8` |" in page


@pytest.mark.parametrize("columns", [tables.TRIAL_COLUMNS, tables.TRIAL_TAIL, tables.HISTORY_COLUMNS,
                                     tables.ALPHA_COLUMNS, tables.PREDICTION_COLUMNS, tables.ENSEMBLE_COLUMNS,
                                     tables.COST_COLUMNS])
def test_tables_page_names_every_column(columns):
    page = (DOCS / "tables.md").read_text()
    missing = [c for c in columns if c not in page]
    assert not missing, missing


def test_every_table_has_a_section():
    page = (DOCS / "tables.md").read_text()
    for name in tables.TABLES:
        assert f"``{name}`` --" in page, name
