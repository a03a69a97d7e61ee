"""More seeds where a finding is still open: the study's ``more-seeds`` stage.

After the planned seeds (``train.seeds``), while a finding's interval straddles its threshold,
one more seed is trained of exactly the configurations that finding compares, and the findings
are decided again; it stops when every finding is decided, when ``analysis.max_seeds`` seeds
are trained, or when ``analysis.max_extra_minutes`` are spent.

- finding 1 (DARTS vs the best uniform): the best uniform configuration, and DARTS itself: a
  search with the new seed, its placement retrained with that seed;
- findings 2 and 3 (ensembles of the uniform methods, their errors): every uniform method.

Deciding after each round with a fixed 95% interval would inflate the error rate (optional
stopping). With ``analysis.max_seeds`` set, every verdict is decided on the group-sequential
design of :mod:`pefttune.analysis.sequential` (alpha spent over the looks at
``len(train.seeds)``, ..., ``max_seeds`` seeds), so that its error rate holds whatever the
stopping time; this includes the first look, at the planned seeds.

A round with seed ``s`` lives in ``<study>/seeds-<s>/``: ``trainings/`` (a grid experiment
whose trial configs are stored as data in its ``plan.json``), and for finding 1 ``darts/`` and
``darts-retrain/``. ``seed_rounds.json`` in the study folder records each round (its seed,
the open findings, the configurations trained) and why the rounds stopped. A killed round is
resumed from its stored plan by ``--resume`` before anything is decided again.

Example::

    # experiment.yaml
    train: {seeds: [0, 1, 2]}
    analysis: {max_seeds: 6, max_extra_minutes: 60}
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from pefttune.analysis.findings import Decision, FindingKey
from pefttune.config import StudyConfig
from pefttune.runtime.storage import read_storage_text, write_storage_text
from pefttune.schema import TrialKind

ROUNDS_FILE = "seed_rounds.json"
TRAININGS_DIR = "trainings"


@dataclass
class Round:
    """One round of further seeds."""

    seed: int
    open_findings: list[str]
    config_ids: list[str]
    darts: bool
    started: float = 0.0
    seconds: float | None = None


@dataclass
class RoundsLog:
    """What ``seed_rounds.json`` holds."""

    rounds: list[Round] = field(default_factory=list)
    stopped: str = ""  # why no further round was run

    def to_json(self) -> str:
        return json.dumps({"rounds": [asdict(r) for r in self.rounds], "stopped": self.stopped}, indent=1)

    @classmethod
    def read(cls, path: str) -> "RoundsLog":
        text = read_storage_text(f"{path}/{ROUNDS_FILE}")
        if text is None:
            return cls()
        data = json.loads(text)
        return cls([Round(**r) for r in data.get("rounds", [])], data.get("stopped", ""))

    def write(self, path: str) -> None:
        write_storage_text(f"{path}/{ROUNDS_FILE}", self.to_json())


def open_findings(decision: Decision) -> list[str]:
    """Findings that more seeds may decide: inconclusive because an interval straddles its
    threshold (:attr:`~pefttune.analysis.findings.Finding.open`). Not open: not run, an
    unconverged relaxation (more retrains do not make it converge), and "nothing learned" once
    the gate is decided (every configuration's interval against the trivial reference lies below
    +delta); while the gate itself straddles +delta, every finding it holds back is open."""
    if not decision.learned:
        trivial = decision.references.vs_trivial if decision.references is not None else {}
        if not any(c.ci_low <= decision.margin < c.ci_high for c in trivial.values()):
            return []
    return [str(key) for key, finding in decision.findings.items() if finding.open]


def round_configs(decision: Decision, keys: list[str]) -> tuple[list[str], bool]:
    """The configurations the open findings compare (DARTS-derived ones excluded: they come from a
    new search), and whether a DARTS search is needed (an open finding compares a DARTS-derived one)."""
    kinds = {cid: c.kind for cid, c in decision.configs.items()}
    compared = {cid for key in keys for cid in decision.findings[FindingKey(key)].compares}
    darts = any(kinds.get(cid) == TrialKind.DARTS_DERIVED for cid in compared)
    return sorted(cid for cid in compared if kinds.get(cid) != TrialKind.DARTS_DERIVED), darts


def next_seed(config: StudyConfig, log: RoundsLog) -> int:
    used = set(config.train.replicate_seeds) | {r.seed for r in log.rounds}
    return max(used) + 1


def seeds_trained(config: StudyConfig, log: RoundsLog) -> int:
    return len(config.train.replicate_seeds) + len(log.rounds)


def round_path(study_path: str, seed: int) -> str:
    return f"{study_path}/seeds-{seed}"


def stop_reason(config: StudyConfig, log: RoundsLog, keys: list[str], started: float) -> str:
    """Why no further round runs now ("" when one should)."""
    limit = config.analysis.max_extra_minutes
    if not keys:
        return "every finding is decided (or cannot be decided by more seeds)"
    if seeds_trained(config, log) >= (config.analysis.max_seeds or 0):
        return f"analysis.max_seeds ({config.analysis.max_seeds}) reached with finding(s) {', '.join(keys)} open"
    if limit is not None and (time.time() - started) / 60 >= limit:
        return f"analysis.max_extra_minutes ({limit:g}) spent with finding(s) {', '.join(keys)} open"
    return ""


def run_round(config: StudyConfig, study_path: str, rnd: Round, resume: bool, verbose: int) -> None:
    """Train ``rnd``'s configurations with its seed (Ray connected); a resume finishes it."""
    import pandas as pd

    from pefttune.runtime.cluster import fit_environment, grid_tune_config
    from pefttune.runtime.console import quiet_ray_loggers
    from pefttune.runtime.study_dir import holds_run
    from pefttune.runtime.plan import GridPlan, check_plan, grid_tuner, restore_grid
    from pefttune.runtime.tune_run import run_config
    from pefttune.search.replicates import plan_replicates
    from pefttune.tuning import stored_choices
    from pefttune.trainables.discrete import train_fn
    from pefttune.trainables.trial import make_trainable
    from pefttune.trainables.setup import make_setup

    root = round_path(study_path, rnd.seed)
    path = f"{root}/{TRAININGS_DIR}"
    # the fixed points (uniform baselines) as the replicates plan them, with this round's seed only
    with_seed = config.model_copy(update={"train": config.train.model_copy(
        update={"seeds": [config.train.seed, rnd.seed]})})
    trials = [r.trial_config() for r in plan_replicates(with_seed, pd.DataFrame(), stored_choices(config))
              if r.config_id in rnd.config_ids and r.seed == rnd.seed]  # at the rates chosen in tune-lr
    plan = GridPlan(trials, {"seed": rnd.seed, "config_ids": rnd.config_ids})
    setup = make_setup(config, path)
    if trials:
        if resume and holds_run(path):
            check_plan(path, plan)
            tuner = restore_grid(path, make_trainable(train_fn, setup))
        else:
            tuner = grid_tuner(make_trainable(train_fn, setup), path, plan,
                               grid_tune_config(config.search.max_concurrent, config.search.reuse_actors),
                               run_config(config, path, verbose=verbose))
        with fit_environment(), quiet_ray_loggers(verbose):
            tuner.fit()
    if rnd.darts:
        _darts_round(config, root, rnd.seed, resume, verbose)


def _darts_round(config: StudyConfig, root: str, seed: int, resume: bool, verbose: int) -> None:
    """One DARTS search with ``seed`` and its placement retrained with that seed, under ``root``."""
    from pefttune.darts.run import SEARCH_DIR, run_darts_retrain, run_darts_search
    from pefttune.runtime.study_dir import holds_run

    one = config.model_copy(update={"darts": config.darts.model_copy(update={"seeds": [seed], "retrain": "per-seed"})})
    try:
        search = run_darts_search(one, resume and holds_run(f"{root}/{SEARCH_DIR}"), verbose=verbose, root=root)
    except RuntimeError as err:  # the round's search failed: finding 1 gets no further seed from it
        print(f"more seeds: the DARTS search with seed {seed} failed: {err}", flush=True)
        return
    run_darts_retrain(one, search, resume, verbose=verbose, root=root)


def more_seeds(config: StudyConfig, study_path: str, resume: bool, verbose: int, decide) -> RoundsLog:
    """Rounds of one more seed while a finding is open (Ray connected); ``decide()`` returns the
    findings of the study as it stands (a :class:`~pefttune.analysis.findings.Decision`)."""
    log = RoundsLog.read(study_path)
    started = time.time() - sum(r.seconds or 0.0 for r in log.rounds)
    if log.rounds and log.rounds[-1].seconds is None:  # killed mid-round: finish it first
        _finish(config, study_path, log, log.rounds[-1], True, verbose)
    while True:
        decided = decide()
        keys = open_findings(decided)
        reason = stop_reason(config, log, keys, started)
        if reason:
            log.stopped = reason
            log.write(study_path)
            print(f"more seeds: stopped: {reason}", flush=True)
            return log
        cids, darts = round_configs(decided, keys)
        rnd = Round(next_seed(config, log), keys, cids, darts, started=time.time())
        log.rounds.append(rnd)
        log.write(study_path)  # before any training: a kill from here on resumes this round
        print(f"more seeds: finding(s) {', '.join(keys)} open; seed {rnd.seed} of {', '.join(cids)}"
              + (" and a DARTS search" if darts else ""), flush=True)
        _finish(config, study_path, log, rnd, resume, verbose)


def _finish(config: StudyConfig, study_path: str, log: RoundsLog, rnd: Round, resume: bool, verbose: int) -> None:
    start = time.time()
    run_round(config, study_path, rnd, resume, verbose)
    rnd.seconds = time.time() - start
    log.write(study_path)
