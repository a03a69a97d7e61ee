"""The product speaks only of itself: no words about how it was made in its files.

Every text file of the source, its configs and assets, the tests, the benchmarks, the docs and
the top-level files is searched for the words of a development workflow (a numbered session or
issue, a ticket, "the issue's", a capitalised "Session"). Dated measurements ("measured
2026-12-07 on the 2-core CPU") are fine and are not matched.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEARCHED = ("src", "tests", "benchmarks", "docs", "README.md", "Makefile", "pyproject.toml", "cluster.yaml",
            "cluster-onprem.yaml")
BINARY = {".safetensors", ".png", ".parquet", ".pyc", ".flac", ".wav", ".db"}

#: name -> pattern of a workflow word.
PATTERNS = {
    "a numbered session": re.compile(r"\bsessions?\s*#?\d", re.IGNORECASE),
    "a numbered issue": re.compile(r"\bissues?\s*#?\s*\d", re.IGNORECASE),
    "an issue by number sign": re.compile(r"\bissues?\s*#", re.IGNORECASE),
    "a ticket": re.compile(r"\btickets?\b", re.IGNORECASE),
    "the issue's": re.compile(r"\bthe issue['\u2019]s\b", re.IGNORECASE),
    # capitalised "Session", except IEMOCAP's folder names (Session1 ... Session5, Session<n>)
    "Session": re.compile(r"\bSession\b(?![<{\d])"),
}

#: (file, the exact text of a line) -> why a match there is not a workflow word.
ALLOWED = {
    ("src/pefttune/demo/synth.py", '"horse", "fish", "flower", "lamp", "chair", "book", "clock", "bottle", "ticket",'):
        "a spoken word of the synthesized vocabulary",
    ("src/pefttune/demo/pretraining/corpus.py", "glove scarf hat ring necklace watch clock calendar ticket passport wallet "
     "purse"): "a word of the pretraining corpus",
    ("src/pefttune/assets/tiny-hubert-ssl/provenance.json", '"think truck ruby ticket"'):
        "a sentence of the pretraining corpus",
}


def _files():
    for name in SEARCHED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for file in candidates:
            if (not file.is_file() or file.suffix in BINARY or "__pycache__" in file.parts
                    or any(part.endswith(".egg-info") for part in file.parts)):  # pip's build output
                continue
            if file.resolve() == Path(__file__).resolve():  # this file names the patterns
                continue
            try:
                yield file, file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def find_workflow_words(files) -> list[str]:
    """``path:line: [patterns] text`` for every matching line outside :data:`ALLOWED`."""
    found = []
    for file, text in files:
        relative = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
        for number, line in enumerate(text.splitlines(), 1):
            names = [name for name, pattern in PATTERNS.items() if pattern.search(line)]
            if names and (relative, line.strip()) not in ALLOWED:
                found.append(f"{relative}:{number}: [{', '.join(names)}] {line.strip()[:160]}")
    return found


def test_the_product_has_no_workflow_words():
    files = list(_files())
    assert len(files) > 100  # src, tests and benchmarks were searched
    found = find_workflow_words(files)
    assert not found, "workflow words in the product:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    "Measured in Session 8 on the 2-core machine", "see issue 19", "as in issue #12", "issues 3-5",
    "the issue's rule", "one ticket per change", "sessions 2 and 3 disagreed",
])
def test_each_pattern_finds_its_word(tmp_path, line):
    file = tmp_path / "notes.md"
    file.write_text(f"first line\n{line}\n")
    assert len(find_workflow_words([(file, file.read_text())])) == 1


@pytest.mark.parametrize("line", [
    "measured 2026-12-07 on the 2-core CPU", "one private Ray instance per test session",
    'base = root / f"Session{session}"', "``Session<n>/dialog/EmoEvaluation/*.txt``", "the test_session fold",
])
def test_ordinary_words_pass(tmp_path, line):
    file = tmp_path / "notes.md"
    file.write_text(line + "\n")
    assert find_workflow_words([(file, file.read_text())]) == []
