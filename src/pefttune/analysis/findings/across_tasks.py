"""The findings over the tasks of a suite: each task's verdict with its rule, and one verdict
over all tasks (the one every task reached; otherwise the tasks' verdicts are listed).

Each task's findings are read back from its study's ``summary.json`` (the dicts of
:meth:`~pefttune.analysis.findings.decision.Decision.summary`).

Example::

    >>> overall_verdict({"ks": "reproduced", "pr": "reproduced"})
    'reproduced'
    >>> overall_verdict({"ks": "reproduced", "pr": "inconclusive"})
    'differs by task: ks reproduced, pr inconclusive'
"""
from __future__ import annotations

from collections.abc import Mapping

from pefttune.analysis.findings._base import FindingKey
from pefttune.analysis.findings.decision import MODULES

__all__ = ["MISSING", "overall_verdict", "render"]

#: The verdict of a task whose study has no such finding (not finished).
MISSING = "missing"


def overall_verdict(verdicts: dict[str, str]) -> str:
    """Over all tasks: the verdict every task reached, else ``differs by task``."""
    values = set(verdicts.values())
    if not verdicts or MISSING in values:
        return "incomplete: " + ", ".join(f"{t} {v}" for t, v in verdicts.items())
    if len(values) == 1:
        return next(iter(values))
    return "differs by task: " + ", ".join(f"{t} {v}" for t, v in verdicts.items())


def render(summaries: Mapping[str, dict]) -> tuple[list[str], dict[str, str]]:
    """The suite's findings section from each task's ``summary.json``, and the verdict over all
    tasks of each finding (keyed "1", "2", "3")."""
    stored = {task: s.get("findings", {}) for task, s in summaries.items()}
    lines, overall = ["", "## Findings per task and over all tasks", ""], {}
    for key in FindingKey:
        found = {task: findings.get(key, {}) for task, findings in stored.items()}
        claim = next((f["claim"] for f in found.values() if f.get("claim")), "")
        overall[str(key)] = overall_verdict({task: f.get("verdict", MISSING) for task, f in found.items()})
        lines += [f"### Finding {key}: {claim}",
                  f"- over all tasks: **{overall[str(key)]}** (rule: the verdict every task reached; otherwise the "
                  "tasks' verdicts are listed)"]
        lines += [f"- {task}: **{f.get('verdict', MISSING)}**: {f.get('rule', 'no study')}{MODULES[key].suite_note(f)}"
                  for task, f in found.items()]
        lines.append("")
    return lines, overall
