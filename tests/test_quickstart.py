"""The own-data quickstart of docs/own-data.md, run exactly as the page writes it.

An outside dataset (four words by eight eSpeak voices, 22.05 kHz stereo WAV, a CSV manifest with
a speaker column: not the synthesized corpus) and a local Hugging Face-format model directory
(the shipped encoder saved with ``save_pretrained``) are made in a fresh folder; then the page's
commands run there: ``pefttune init`` with the smoke profile and the smoke ``pefttune run`` to its
report, each in its own process as a user types them, then ``export-model`` and ``predict`` (and
the full run's ``init``) through the CLI's entry point in this process. The console carries none
of the libraries' noise (with ``-v``, ``predict`` shows transformers' loading bars).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import make_own_data

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-data.md"
NOISE = ("Loading weights", "Token authentication", "A new study created", "Define-by-run function")


def doc_blocks() -> dict[str, list[str]]:
    """The page's tested blocks: marker ("every command" or "the init command") -> their commands."""
    text = DOC.read_text()
    blocks = {}
    for marker, body in re.findall(r"<!-- tests/test_quickstart.py runs (.*?) -->\s*```sh\n(.*?)```", text, re.S):
        blocks[marker] = [line.strip() for line in body.splitlines() if line.strip()]
    return blocks


def _pefttune(command: str, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "pefttune", command
    return subprocess.run([sys.executable, "-m", "pefttune", *words[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_page_holds_the_tested_commands():
    blocks = doc_blocks()
    smoke = blocks["every command of this block, in this order"]
    assert smoke[0].startswith("pefttune init ") and "--profile smoke" in smoke[0]
    assert smoke[1] == "pefttune run smoke.yaml"
    full = blocks["the init command of this block"]
    assert "--profile laptop" in full[0] and full[1] == "pefttune run study.yaml"


@pytest.fixture
def progress_bars():
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    yield
    transformers_logging.enable_progress_bar()


def _in_process(command: str, capfd) -> tuple[int, str, str]:
    """A page command run by the CLI's entry point in this process (cwd: the quickstart folder)."""
    from pefttune.cli import main as cli_main

    words = shlex.split(command)
    assert words[0] == "pefttune", command
    capfd.readouterr()
    code = cli_main(words[1:])
    out = capfd.readouterr()
    return code, out.out, out.err


def test_own_data_quickstart(tmp_path, progress_bars, capfd, monkeypatch):
    from pefttune.backbones import load_backbone
    from transformers.utils import logging as transformers_logging

    manifest = make_own_data(tmp_path)
    assert manifest == tmp_path / "data" / "manifest.csv"
    example = re.search(r"```csv\n(.*?)```", DOC.read_text(), re.S).group(1).splitlines()
    assert manifest.read_text().splitlines()[:len(example)] == example  # the page shows this manifest
    load_backbone("tiny-hubert-ssl").model.save_pretrained(str(tmp_path / "models" / "my-hubert"))
    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"}
    init_command, run_command, export_command, predict_command = doc_blocks()["every command of this block, in this order"]

    # init and run, each in its own process as a user types them
    init = _pefttune(init_command, tmp_path, env)
    assert init.returncode == 0, init.stderr[-3000:]
    assert "4 labels; 8 speakers" in init.stdout and "next: pefttune run smoke.yaml" in init.stdout
    config = (tmp_path / "smoke.yaml").read_text()
    assert "extends: profiles/smoke.yaml" in config and str(tmp_path / "models" / "my-hubert") in config
    run = _pefttune(run_command, tmp_path, env)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-3000:]
    for line in ("finding 1:", "finding 2:", "finding 3:", "report:"):
        assert line in run.stdout, run.stdout[-3000:]
    assert not [noise for noise in NOISE if noise in console], console[-3000:]
    report = (tmp_path / "pefttune-results" / "smoke" / "analysis" / "report.md").read_text()
    assert all(f"Finding {k}" in report for k in (1, 2, 3)) and "inconclusive" in report

    # the exported model predicts one of the four words for a test clip, with no loading bars
    monkeypatch.chdir(tmp_path)
    code, out, err = _in_process(export_command, capfd)
    assert code == 0 and (tmp_path / "my-model").is_dir() and "Loading weights" not in err, err
    code, out, err = _in_process(predict_command, capfd)
    assert code == 0 and "Loading weights" not in err, err
    path, label, probability = out.strip().split("\t")
    assert path == "data/clips/test/up-m2-0.wav" and label in ("up", "down", "left", "right") and 0 < float(probability) <= 1
    transformers_logging.enable_progress_bar()  # as in a fresh process: -v shows the bars
    code, _, err = _in_process(predict_command.replace("predict ", "predict -v ", 1), capfd)
    assert code == 0 and "Loading weights" in err

    # the full run's config: the init command of the page's next block
    code, out, err = _in_process(doc_blocks()["the init command of this block"][0], capfd)
    assert code == 0 and "next: pefttune run study.yaml" in out, err
    assert "extends: profiles/laptop.yaml" in (tmp_path / "study.yaml").read_text()
