"""How the report writes numbers and tables in Markdown: one format for every cell.

Example::

    >>> fmt(0.81234), fmt(12000), fmt(None), fmt_p(0.0004)
    ('0.8123', '12,000', '-', '0.0004')
    >>> print(md_table([{"a": 1, "b": 0.5}], ["a", "b"]))
    | a | b |
    |---|---|
    | 1 | 0.5000 |
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["fmt", "fmt_p", "md_table"]


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
