"""More seeds where a finding is open: which findings are open, what a round trains, when it stops.

The rounds themselves run in tests/test_kill_matrix.py (killed mid-round and resumed); the
error rate of the group-sequential design under this stopping rule is simulated in
tests/test_sequential.py.
"""
from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from pefttune.analysis.findings import Config, Decision, Finding, FindingKey, Verdict, sequential_look
from pefttune.analysis.findings._base import hold_back
from pefttune.analysis.findings.references import References
from pefttune.analysis.intervals import Comparison
from pefttune.analysis.sequential import SequentialDesign
from pefttune.config import parse_config
from pefttune.more_seeds import Round, RoundsLog, next_seed, open_findings, round_configs, stop_reason

BASE = {"name": "m", "backbone": "tiny-hubert", "methods": {"lora": {"rank": 2}, "bitfit": {}},
        "data": {"source": "synth", "task": "ks"}}


def _cmp(low, high):
    return Comparison((low + high) / 2, low, high, 0.5, "t", 100, 3, 1)


def _finding(key: str, verdict: str, compares=(), beyond_seeds="") -> Finding:
    return Finding(FindingKey(key), f"claim {key}", Verdict(verdict), f"{verdict}: rule", compares=compares,
                   beyond_seeds=beyond_seeds)


UNIFORM = ("uniform:bitfit", "uniform:lora")


def _decided(v1="inconclusive", v2="reproduced", v3="inconclusive", converged=True, learned=True, trivial=(0.3, 0.5)):
    findings = {FindingKey("1"): _finding("1", v1, ("darts-derived", "uniform:lora"),
                                          "" if converged else "the DARTS relaxation did not converge"),
                FindingKey("2"): _finding("2", v2, UNIFORM), FindingKey("3"): _finding("3", v3, UNIFORM)}
    configs = {cid: Config(cid, kind, None, "", None) for cid, kind in (
        ("uniform:lora", "uniform"), ("uniform:bitfit", "uniform"), ("hybrid", "hybrid"),
        ("darts-derived", "darts-derived"))}
    return Decision(findings, learned, 0.01, 0.95, 500, "seeds-speakers", configs,
                    References({"uniform:lora": _cmp(*trivial)}))


def _held_back(decision: Decision, own: dict, trivial: tuple) -> Decision:
    """Every finding held back by the nothing-learned gate, with its own verdict ``own[key]``."""
    findings = {k: hold_back(replace(f, verdict=Verdict(own[str(k)])), 0.01) for k, f in decision.findings.items()}
    return replace(decision, findings=findings, learned=False, references=References({"uniform:lora": _cmp(*trivial)}))


def test_open_findings_are_the_inconclusive_ones_that_seeds_can_decide():
    assert open_findings(_decided()) == ["1", "3"]
    assert open_findings(_decided(converged=False)) == ["3"]  # more retrains do not make a relaxation converge
    assert open_findings(_decided(v1="not run", v3="not reproduced")) == []


def test_nothing_learned_is_open_only_while_its_own_gate_straddles_the_margin():
    own = {"1": "reproduced", "2": "inconclusive", "3": "not reproduced"}
    held = _held_back(_decided(), own, (-0.02, 0.04))  # straddles +0.01
    assert {str(f.verdict) for f in held.findings.values()} == {"inconclusive: nothing learned"}
    assert open_findings(held) == ["1", "2", "3"]
    assert open_findings(_held_back(_decided(), own, (-0.02, 0.005))) == []  # decidedly nothing learned
    assert open_findings(_held_back(_decided(converged=False), own, (-0.02, 0.04))) == ["2", "3"]


def test_a_round_trains_exactly_what_the_open_findings_compare():
    decided = _decided()
    assert round_configs(decided, ["1"]) == (["uniform:lora"], True)
    assert round_configs(decided, ["3"]) == (["uniform:bitfit", "uniform:lora"], False)
    assert round_configs(decided, ["1", "2"]) == (["uniform:bitfit", "uniform:lora"], True)


def test_rounds_stop_at_the_seed_and_time_budgets_and_take_fresh_seeds():
    config = parse_config({**BASE, "train": {"seeds": [0, 1, 2]}, "analysis": {"max_seeds": 5, "max_extra_minutes": 1}})
    log = RoundsLog()
    now = time.time()
    assert stop_reason(config, log, ["1"], now) == ""
    assert "every finding is decided" in stop_reason(config, log, [], now)
    assert "max_extra_minutes (1) spent" in stop_reason(config, log, ["1"], now - 61)
    log.rounds = [Round(3, ["1"], ["uniform:lora"], True, seconds=5.0), Round(4, ["1"], ["uniform:lora"], True)]
    assert next_seed(config, log) == 5
    assert "max_seeds (5) reached with finding(s) 1 open" in stop_reason(config, log, ["1"], now)


def test_the_rounds_log_survives_a_round_trip(tmp_path):
    log = RoundsLog([Round(3, ["2"], ["uniform:lora"], False, started=1.0, seconds=2.5)], "every finding is decided")
    log.write(str(tmp_path))
    again = RoundsLog.read(str(tmp_path))
    assert again == log and RoundsLog.read(str(tmp_path / "none")) == RoundsLog()


def test_max_seeds_is_checked_against_the_planned_seeds():
    with pytest.raises(ValueError, match="analysis.max_seeds: 2 is fewer than the 3 seeds"):
        parse_config({**BASE, "train": {"seeds": [0, 1, 2]}, "analysis": {"max_seeds": 2}})
    with pytest.raises(ValueError, match="analysis.max_seeds: needs at least 2 planned seeds"):
        parse_config({**BASE, "analysis": {"max_seeds": 4}})
    with pytest.raises(ValueError, match="analysis.max_extra_minutes: only used with analysis.max_seeds"):
        parse_config({**BASE, "analysis": {"max_extra_minutes": 4}})


def test_each_look_is_decided_at_the_level_the_design_spends_there():
    design = SequentialDesign(3, 6)
    configs = {"a": SimpleNamespace(kind="uniform", seeds=[0, 1, 2, 3]),
               "b": SimpleNamespace(kind="uniform", seeds=[0, 1, 2, 3, 4]),
               "d": SimpleNamespace(kind="darts-derived", seeds=[0])}
    look = sequential_look(design, configs)
    assert look.look == 4 and look.confidence == pytest.approx(design.confidence_at(4))
    assert look.confidence > 0.95  # a look spends only part of the 0.05
    first = sequential_look(design, {"a": SimpleNamespace(kind="uniform", seeds=[0, 1])})
    assert first.confidence == pytest.approx(design.confidence_at(3)) and first.n_max == 6  # fewer seeds than planned: the first look's level
