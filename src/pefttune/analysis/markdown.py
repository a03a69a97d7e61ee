"""How the report writes numbers and tables in Markdown: one format for every cell.

Example::

    >>> fmt(0.81234), fmt(12000), fmt(None), fmt_p(0.0004)
    ('0.8123', '12,000', '-', '0.0004')
    >>> print(md_table([{"a": 1, "b": 0.5}], ["a", "b"]))
    | a | b |
    |---|---|
    | 1 | 0.5000 |
    >>> compact_placement("L0:lora(r=8) L1:lora(r=8) L2:lora(r=8) L3:none")
    'L0-2: lora(r=8); L3: none'
    >>> print(wrap(" ".join(["- a long line"] * 3), width=20))
    - a long line - a
      long line - a long
      line
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

__all__ = ["WIDTH", "compact_placement", "fmt", "fmt_p", "md_table", "placement_runs", "wrap"]

#: The longest prose line :func:`wrap` writes (tables keep one row a line).
WIDTH = 100
_LAYER = re.compile(r"L(\d+):(\S+)")
# a word that would start a list, quote, heading or table when it begins a line
_BLOCK_START = re.compile(r"^([-+*>#|=]+|\d+[.)])$")


def fmt(value: Any, digits: int = 4) -> str:
    """A cell: ``-`` for None/NaN, yes/no, integers with thousands separators, floats with
    ``digits`` decimals (significant digits below 1e-3)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{float(value):.{digits}f}"
    return str(value)


def fmt_p(value: float | None) -> str:
    """A p-value: three significant digits below 0.001, three decimals above; ``-`` when none."""
    return "-" if value is None or math.isnan(value) else (f"{value:.3g}" if value < 0.001 else f"{value:.3f}")


def md_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub markdown table (``|`` in cells escaped)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [fmt(row.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def placement_runs(short: str | None) -> list[tuple[int, int, str]] | None:
    """``L0:a L1:a L2:b`` -> ``[(0, 1, "a"), (2, 2, "b")]``: runs of layers holding the same
    methods; None when ``short`` is not a per-layer placement."""
    words = short.split() if isinstance(short, str) else []  # a missing value (None, NA, NaN): none
    matches = [_LAYER.fullmatch(w) for w in words]
    if not words or not all(matches):
        return None
    runs: list[tuple[int, int, str]] = []
    for m in matches:
        layer, methods = int(m.group(1)), m.group(2)
        if runs and runs[-1][2] == methods and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer, methods)
        else:
            runs.append((layer, layer, methods))
    return runs


def compact_placement(short: str | None) -> str:
    """A placement's short form with runs of layers that hold the same methods written once
    (``L0-3: lora(r=8)``); anything else unchanged (``-`` when empty)."""
    runs = placement_runs(short)
    if runs is None:
        return short if isinstance(short, str) and short else "-"
    return "; ".join(f"L{a}: {m}" if a == b else f"L{a}-{b}: {m}" for a, b, m in runs)


def wrap(text: str, width: int = WIDTH) -> str:
    """Markdown with its prose lines (paragraphs and list items) wrapped at ``width``; headings,
    table rows, images and code blocks stay one a line.  A line break never puts a word that
    would start a list, quote or table at the head of a line, so the rendering is unchanged."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or len(line) <= width or line.lstrip().startswith(("|", "#", "![", "```")):
            out.append(line)
            continue
        indent = "  " if line.startswith("- ") else ""
        out.extend(_wrap_line(line, width, indent))
    return "\n".join(out)


def _wrap_line(line: str, width: int, indent: str) -> list[str]:
    lines, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > width and word and not _BLOCK_START.match(word):
            lines.append(current)
            current = indent + word
        else:
            current = f"{current} {word}" if current else word
    return lines + [current]
