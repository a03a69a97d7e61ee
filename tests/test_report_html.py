"""report.html opened in a real headless Chromium, and report.md's short lines.

The page is loaded from a file with a probe script put first in its head: it records console
errors, script errors and blocked requests, and once the page has loaded it checks every image
decoded, the verdict table comes first and a header click sorts its table; it writes what it
found into the DOM, which ``chromium --dump-dom`` prints.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import pytest

from pefttune.analysis.report import analyze
from test_analysis import classification_experiment

PROBE = """<script>
var probe = {errors: [], blocked: []};
var origError = console.error;
console.error = function () { probe.errors.push(Array.prototype.join.call(arguments, " "));
  origError.apply(console, arguments); };
window.addEventListener("error", function (ev) { probe.errors.push(String(ev.message || ev.type)); }, true);
document.addEventListener("securitypolicyviolation", function (ev) { probe.blocked.push(ev.blockedURI); });
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  probe.images = imgs.length;
  probe.decoded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var first = document.querySelector("table");
  probe.firstTable = first ? first.id : null;
  probe.verdictRows = first ? first.tBodies[0].rows.length : 0;
  probe.ready = document.querySelectorAll("table.sortable[data-sortable=ready]").length;
  probe.sortable = document.querySelectorAll("table.sortable").length;
  var table = Array.prototype.slice.call(document.querySelectorAll("table.sortable")).filter(function (t) {
    return Array.prototype.some.call(t.tHead.rows[0].cells, function (c) { return c.textContent === "params"; });
  })[0];
  var col = Array.prototype.map.call(table.tHead.rows[0].cells, function (c) { return c.textContent; })
    .indexOf("params");
  function values() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
    return parseFloat(r.cells[col].getAttribute("data-v")); }); }
  table.tHead.rows[0].cells[col].click();
  probe.ascending = values();
  probe.marked = table.tHead.rows[0].cells[col].getAttribute("data-sorted");
  table.tHead.rows[0].cells[col].click();
  probe.descending = values();
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    """The Chromium binary; the test is skipped without one outside CI and fails without one in CI."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (Debian package `chromium`)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it in CI)")
    return path


@pytest.fixture(scope="module")
def analysis(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-html")
    return analyze(classification_experiment(), out), out


def test_report_html_in_headless_chromium(analysis, tmp_path):
    binary = chromium()
    result, out = analysis
    page = (out / "report.html").read_text()
    assert result["files"]["report_html"] == str(out / "report.html")
    # nothing outside the file: no URL in any src or href, images as data URIs only
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert re.findall(r'<img [^>]*src="([^":]+):', page) == ["data"] * page.count("<img ")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    run = subprocess.run([binary, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
                          "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, f"the page's load handler did not run: {run.stderr[-2000:]}"
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["errors"] == [] and probe["blocked"] == []
    n_plots = sum(len(p) if isinstance(p, list) else int(p is not None) for p in result["files"]["plots"].values())
    assert probe["images"] == n_plots >= 5 and probe["decoded"] == n_plots
    assert probe["firstTable"] == "verdicts" and probe["verdictRows"] == 3
    assert probe["ready"] == probe["sortable"] >= 5
    assert probe["marked"] == "asc"  # the first click sorts ascending and marks the header
    assert probe["ascending"] == sorted(probe["ascending"]) and len(set(probe["ascending"])) > 1
    assert probe["descending"] == sorted(probe["ascending"], reverse=True)
    # the verdicts and rules are the findings' own, escaped
    for key, finding in result["findings"].items():
        assert f"<td>{key}</td>" in page and finding["verdict"] in page
        assert html.escape(finding["rule"]) in page
    assert "<h2>Provenance</h2>" in page and result["provenance"]["config_hash"] in page


def test_report_md_lines_are_short(analysis):
    result, out = analysis
    report = (out / "report.md").read_text()
    prose = [line for line in report.splitlines() if not line.startswith(("|", "#", "!["))]
    assert max(map(len, prose)) <= 120
    assert max(len(line) for line in report.splitlines() if line.startswith("|")) <= 200
    # the verdicts and the rules are still there, the rules as a list under the verdict table
    for key, finding in result["findings"].items():
        assert f"| {key} | {finding['claim']} | **{finding['verdict']}** |" in report
        assert " ".join(finding["rule"].split()) in " ".join(report.split())
    placements = re.findall(r"^\| uniform:\w+ \| uniform \| ([^|]+) \|", report, re.M)
    assert placements and all(re.fullmatch(r"L0-\d+: \S+", p) for p in placements), placements
