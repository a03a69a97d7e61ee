"""``report.html``: the report as one self-contained page, built from the same objects as report.md.

:func:`render` reads the typed :class:`~pefttune.analysis.findings.Decision` (verdict, rule and
intervals of each finding), the result dict of :func:`pefttune.analysis.report.analyze` (the
configurations, ensembles and provenance) and the trials table; it never reads report.md.  The
page opens with the verdicts (finding, verdict, headline interval, rule), then each finding's
intervals, the configurations with their placements drawn as a per-layer grid, the trials,
ensembles and pairwise statistics, the plots and the provenance.

Self-contained: the plots are embedded as base64 ``data:`` URIs, the style and the sorting
script are inline, and a Content-Security-Policy forbids every request (no network).  Every
string is escaped.  Click a column header to sort a table (again to reverse).

Example::

    from pefttune.analysis.report import analyze

    result = analyze("pefttune-results/embedded-ks")   # writes analysis/report.md and report.html
    print(result["files"]["report_html"])              # .../analysis/report.html
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from pefttune.analysis.findings import MODULES, Decision, Finding, Interval
from pefttune.analysis.intervals import percent
from pefttune.analysis.markdown import compact_placement, fmt, placement_runs
from pefttune.runtime.provenance import PACKAGES, Provenance

__all__ = ["render"]

#: Forbids every request: images only from data: URIs, style and script inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:3px 7px;
vertical-align:top;text-align:left}th{background:#f2f2f2}
table.sortable th{cursor:pointer;user-select:none}
th[data-sorted=asc]::after{content:" \\25B2"}th[data-sorted=desc]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
span.rule{font-size:.9em}.verdict{font-weight:bold;white-space:nowrap}
.grid{display:inline-flex;gap:2px;margin-right:6px;vertical-align:middle}
.grid span{width:12px;height:12px;border-radius:2px;display:inline-block}
.small{font-size:.85em;color:#555}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
code{background:#f4f4f4;padding:0 3px}
"""

#: Click a header to sort its table (numbers by ``data-v``); marks every table it set up.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var desc = th.getAttribute("data-sorted") === "asc";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("data-sorted"); });
      th.setAttribute("data-sorted", desc ? "desc" : "asc");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col], v = cell.getAttribute("data-v");
        return v !== null && v !== "" ? parseFloat(v) : cell.textContent.trim().toLowerCase();
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0)
          : (typeof x === "number" ? -1 : 1);
        return desc ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  table.setAttribute("data-sortable", "ready");
});
"""

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f")


def e(value: Any) -> str:
    """Escaped text of a cell (:func:`~pefttune.analysis.markdown.fmt` for numbers)."""
    return html.escape(fmt(value))


def inline(text: str) -> str:
    """Escaped prose with its ``code`` and **bold** spans kept (the findings' paragraphs use them)."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


class Col:
    """A table column: the row key, the header, and whether it holds numbers (sorted by value)."""

    def __init__(self, key: str, head: str, numeric: bool = False, cell=None):
        self.key, self.head, self.numeric, self.cell = key, head, numeric, cell

    def td(self, row: dict) -> str:
        value = row.get(self.key)
        body = self.cell(row) if self.cell is not None else e(value)
        if not self.numeric:
            return f"<td>{body}</td>"
        sort = "" if value is None or (isinstance(value, float) and value != value) else html.escape(str(value))
        return f'<td class="num" data-v="{sort}">{body}</td>'


def table(rows: Sequence[dict], cols: Sequence[Col], cls: str = "sortable", id_: str = "") -> str:
    head = "".join(f"<th>{html.escape(c.head)}</th>" for c in cols)
    body = "\n".join("<tr>" + "".join(c.td(r) for c in cols) + "</tr>" for r in rows)
    ident = f' id="{html.escape(id_)}"' if id_ else ""
    return f'<table class="{cls}"{ident}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


def placement_cell(short: str | None) -> str:
    """A placement as a per-layer grid (one coloured square a layer, its methods on hover) and its
    compact text (runs of equal layers written once)."""
    runs = placement_runs(short)
    if runs is None:
        return e(short)
    cells = []
    for a, b, methods in runs:
        color = PALETTE[sum(map(ord, methods.split("(")[0])) % len(PALETTE)]
        cells += [f'<span style="background:{color}" title="L{i}: {html.escape(methods)}"></span>'
                  for i in range(a, b + 1)]
    return f'<span class="grid">{"".join(cells)}</span>{html.escape(compact_placement(short))}'


def interval_text(iv: Interval | None) -> str:
    if iv is None:
        return "-"
    return f"{iv.name}: {iv.estimate:+.4f} {iv.text()} ({percent(iv.level)} {iv.covers})"


def _verdicts(decision: Decision) -> str:
    rows = [{"key": str(k), "claim": f.claim, "verdict": str(f.verdict), "interval": interval_text(f.interval),
             "rule": f.rule} for k, f in decision.findings.items()]
    cols = [Col("key", "#"),
            Col("claim", "finding", cell=lambda r: f'<a href="#finding-{r["key"]}">{e(r["claim"])}</a>'),
            Col("verdict", "verdict", cell=lambda r: f'<span class="verdict">{e(r["verdict"])}</span>'),
            Col("interval", "headline interval"),
            Col("rule", "rule", cell=lambda r: f'<span class="rule">{e(r["rule"])}</span>')]
    out = [table(rows, cols, "sortable verdicts", "verdicts")]
    if not decision.learned:
        out.append("<p><strong>Nothing learned</strong>: no configuration beats the trivial reference by more "
                   "than the margin, so no finding is judged.</p>")
    return "\n".join(out)


def _finding(finding: Finding) -> list[str]:
    module = MODULES[finding.key]
    out = [f'<h3 id="finding-{finding.key}">Finding {finding.key}: {html.escape(module.TITLE)} -- '
           f'{html.escape(str(finding.verdict))}</h3>']
    text = module.text(finding) if finding.evidence is not None else finding.reason
    out.append(f"<p>{inline(text)}</p>")
    out.append(f"<p><strong>Rule</strong>: {inline(finding.rule)}</p>")
    if finding.intervals:
        rows = [{"name": iv.name, "estimate": iv.estimate, "low": iv.low, "high": iv.high, "level": iv.level,
                 "covers": iv.covers, "supporting": iv.supporting.text() if iv.supporting else "-",
                 "caveat": iv.caveat or "-"} for iv in finding.intervals]
        out.append(table(rows, [Col("name", "interval"), Col("estimate", "estimate", True),
                                Col("low", "low", True), Col("high", "high", True),
                                Col("level", "level", True, lambda r: percent(r["level"])), Col("covers", "covers"),
                                Col("supporting", "supporting (examples only)"), Col("caveat", "caveat")]))
    need = finding.seeds_needed
    if need is not None and need.intervals and str(finding.verdict) == "inconclusive":
        n = f"{need.n} seeds per configuration" if need.n is not None else "no number of seeds alone"
        out.append(f'<p>Seeds to decide it: <strong>{html.escape(n)}</strong> '
                   f'<span class="small">({html.escape(need.assumption)})</span></p>')
    return out


def _configs(result: dict, metric: str) -> list[str]:
    rows = [{**r, "ci": r["note"] if r.get("note") else f"[{fmt(r['test_ci_low'])}, {fmt(r['test_ci_high'])}]"}
            for r in result.get("configs") or []]
    if not rows:
        return []
    cols = [Col("config_id", "configuration"), Col("kind", "kind"),
            Col("placement_short", "placement", cell=lambda r: placement_cell(r.get("placement_short"))),
            Col("trainable_params", "params", True), Col("seeds", "seeds"), Col("dev_mean", f"dev {metric}", True),
            Col("test_mean", f"test {metric} (mean ± std)", True,
                lambda r: f"{e(r['test_mean'])} ± {e(r['test_std'])}"), Col("ci", "test CI")]
    return ["<h2>Configurations</h2>", "<p>Mean over seeds with its t-interval over seeds; the squares are the "
            "layers, coloured by method (hover for its settings).</p>", table(rows, cols)]


def _trials(trials: pd.DataFrame, metric: str) -> list[str]:
    done = trials[trials["best_dev_score"].notna() & (trials["outcome"] == "completed")]
    if done.empty:
        return []
    rows = done.astype(object).where(done.notna(), None).to_dict("records")
    cols = [Col("trial_id", "trial"), Col("kind", "kind"), Col("method", "method"),
            Col("placement_short", "placement", cell=lambda r: placement_cell(r.get("placement_short"))),
            Col("trainable_params", "params", True), Col("best_dev_score", f"dev {metric}", True),
            Col("test_score", f"test {metric}", True)]
    return ["<h2>Completed trials</h2>", "<p>Single trials, one training seed each: no interval (the "
            "configurations above have the intervals over seeds).</p>", table(rows, cols)]


def _ensembles(result: dict, metric: str) -> list[str]:
    rows = [{**r, "gain_ci": "-" if r.get("gain_ci_low") is None else
             f"[{r['gain_ci_low']:+.4f}, {r['gain_ci_high']:+.4f}]"} for r in result.get("ensembles") or []]
    if not rows:
        return ["<h2>Ensembles</h2>", "<p>Not run: fewer than 2 usable trials with stored predictions.</p>"]
    conf = result.get("settings", {}).get("confidence", 0.95)
    cols = [Col("ensemble_id", "ensemble"), Col("n_members", "members", True), Col("dev_score", f"dev {metric}", True),
            Col("test_score", f"test {metric}", True), Col("delta_vs_best", "gain over best member", True),
            Col("gain_ci", f"gain {conf:.0%} CI (test examples)"), Col("mcnemar_p", "paired test p", True)]
    return ["<h2>Ensembles</h2>", table(rows, cols)]


def _pairwise(pairs: pd.DataFrame) -> list[str]:
    if pairs.empty:
        return []
    cols = [Col(c, c.replace("_", " "), c not in ("a", "b")) for c in pairs.columns]
    return ["<h2>Pairwise statistics between uniform methods (test)</h2>",
            "<p>The best trial of each method, one seed each: no interval (finding 3 has the intervals).</p>",
            table(pairs.to_dict("records"), cols)]


def _plots(result: dict) -> list[str]:
    out = ["<h2>Plots</h2>"]
    plots = result.get("files", {}).get("plots", {})
    for name, paths in plots.items():
        for path in paths if isinstance(paths, list) else [paths]:
            if path and Path(path).is_file():
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                out.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{html.escape(Path(path).name)}</figcaption></figure>")
    return out if len(out) > 1 else out + ["<p>No plots.</p>"]


def _provenance(result: dict) -> list[str]:
    if not result.get("provenance"):
        return []
    prov = Provenance.from_dict(result["provenance"])
    rows = [("pefttune", f"{prov.pefttune}, commit {prov.commit}"),
            ("config hash", f"{prov.config_hash} (SHA-256 of the resolved config)" if prov.config_hash else "no config"),
            ("Python", prov.python), *((name, getattr(prov, name)) for name in PACKAGES),
            ("CPU", f"{prov.cpu}, {prov.cpu_threads} threads"),
            ("GPU", "none" if not prov.gpu_count else f"{prov.gpu_count} x {prov.gpu}")]
    body = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    return ["<h2>Provenance</h2>", f'<table id="provenance">\n{body}\n</table>']


def render(result: dict, decision: Decision, trials: pd.DataFrame, pairs: pd.DataFrame, intervals: str = "") -> str:
    """The page: the verdicts first, then the findings, tables, plots and provenance.
    ``intervals``: the report's statement of what every interval covers (Markdown prose)."""
    metric = result.get("metric", "")
    better = "higher" if result.get("mode") == "max" else "lower"
    outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(result.get("outcomes", {}).items()))
    head = [f"<h1>pefttune report: {html.escape(str(result.get('name', '')))}</h1>",
            f'<p class="small">experiment <code>{html.escape(str(result.get("experiment", "")))}</code>; task '
            f"{e(result.get('task'))}; metric <strong>{e(metric)}</strong> ({better} is better); trials are "
            f"selected on dev, compared on test; {e(result.get('n_trials'))} trials ({html.escape(outcomes)})</p>",
            "<h2>Verdicts</h2>", _verdicts(decision)]
    if intervals:
        head.append(f'<p class="small">{inline(intervals.lstrip("- "))}</p>')
    body = head + ["<h2>Findings</h2>"]
    for finding in decision.findings.values():
        body += _finding(finding)
    body += _configs(result, metric) + _trials(trials, metric) + _ensembles(result, metric) + _pairwise(pairs)
    body += _plots(result) + _provenance(result)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>pefttune report: {html.escape(str(result.get('name', '')))}</title>",
        f"<style>{STYLE}</style></head><body>", *body, f"<script>{SCRIPT}</script>", "</body></html>", ""])
