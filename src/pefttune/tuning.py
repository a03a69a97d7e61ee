"""The learning-rate protocol: how every configuration that a finding or a reference row uses gets its rate.

The rule, with ``train.lr_grid`` set (without it every trial trains at ``train.lr``):

1. For each fixed configuration (the uniform baselines, the hybrid, the references ``frozen``
   and ``log-mel``, each DARTS-derived configuration) one trial per rate of the grid, with the
   configuration's first seed (``train.seed``), trains the first ``ceil(train.lr_rung x epochs)``
   epochs of its full schedule and stops there (``stop_epoch`` in its trial config; it never
   scores test): one rung of successive halving.
2. The rate with the best dev score at the rung (``best_dev_<metric>``) is chosen, ties to the
   smaller rate; a rate whose trial failed, diverged or was over budget is left out (all of
   them: ``train.lr``, and the choice says why).
3. The configuration then trains with every seed of ``train.seeds`` at the chosen rate, as it
   would at ``train.lr``; its first seed continues the chosen rate's rung trial (``continues``
   in its trial config: the same config and seed, so the same numbers as training from the
   start, without the rung's epochs twice; its history starts after the rung, whose epochs are
   in the tuning's experiment), the other seeds train from the start.
4. The discrete search draws each searched trial's rate from the same grid (Optuna's
   categorical ``lr``): also chosen on dev with the first seed; its replicates keep that rate.

The rate is that of everything a configuration trains (``train.lr``: PEFT weights, and the head
unless ``train.head_lr`` is set); the references (``frozen``, ``log-mel``) train the head alone,
so theirs is the head's, drawn from ``train.reference_lr_grid`` (default: the same grid; a head
alone on fixed features takes larger rates than PEFT weights). They train
``train.reference_epochs`` epochs (few parameters, cheap), so that they converge; their rung is
``train.reference_lr_rung`` of their epochs (default: ``train.lr_rung``): they are cheap, so
their rates can be compared near the end of their schedule, where a short rung favours the
smaller rate (a larger one is still far from its decayed end).

Each tuning is one grid experiment (:mod:`pefttune.runtime.plan`: its trials stored in
``plan.json`` before Ray starts, so a killed one resumes); its choices are written next to it,
``lr_choices.json`` (:class:`LrChoices`). The tune-lr stage tunes the fixed configurations known
before the search (``<study>/tune-lr``), the DARTS arm its derived configurations before their
retrain (``<study>/tune-lr-darts``).

Example::

    from pefttune.tuning import LrProtocol, choose_rate

    protocol = LrProtocol(grid=(0.003, 0.01, 0.03), rung=0.2, reference_grid=(0.01, 0.03, 0.1), reference_rung=0.9)
    protocol.rung_epochs(5)                                  # 1
    protocol.grid_of("frozen")                               # (0.01, 0.03, 0.1)
    protocol.rung_epochs(40, "frozen")                       # 36
    choose_rate({0.003: 0.61, 0.01: 0.70, 0.03: 0.70})     # 0.01: the best dev, ties to the smaller rate
    print(protocol.rule(epochs=5, reference_epochs=30))
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Mapping

from pefttune.runtime.atomic_fs import ATOMIC_LOCAL
from pefttune.runtime.storage import read_storage_text, write_storage_text
from pefttune.schema import STOP_EPOCH, TrialKind, metric_key

if TYPE_CHECKING:
    import pandas as pd

    from pefttune.config import StudyConfig

#: The tune-lr stage's grid experiment (the fixed configurations), under the study folder.
TUNE_DIR = "tune-lr"
#: The DARTS-derived configurations' tuning, under the study folder (or a further-seeds round's).
DARTS_TUNE_DIR = "tune-lr-darts"
CHOICES_FILE = "lr_choices.json"
#: Kinds that train ``train.reference_epochs`` epochs.
REFERENCE_KINDS = (TrialKind.FROZEN, TrialKind.LOG_MEL)
#: The config fields a tuning's plan is derived from (with its configurations).
PLAN_INPUTS = ("train.seeds", "train.lr", "train.lr_grid", "train.reference_lr_grid", "train.lr_rung",
               "train.reference_lr_rung", "train.epochs", "train.reference_epochs")


@dataclass(frozen=True)
class LrProtocol:
    """The grid and the rung of the learning-rate protocol (module docstring)."""

    grid: tuple[float, ...]
    rung: float = 0.2  # share of a trial's epochs every rate trains before the choice
    reference_grid: tuple[float, ...] | None = None  # the references' (head alone); None: grid
    reference_rung: float | None = None  # the references' rung; None: rung

    @classmethod
    def of(cls, config: StudyConfig) -> "LrProtocol | None":
        """The protocol of ``config``; None without ``train.lr_grid`` (every trial at ``train.lr``)."""
        train = config.train
        return cls.from_fields(train.lr_grid, train.lr_rung, train.reference_lr_grid, train.reference_lr_rung)

    @classmethod
    def from_fields(cls, lr_grid, lr_rung, reference_lr_grid=None, reference_lr_rung=None) -> "LrProtocol | None":
        """The protocol of the ``train`` fields of those names (a config or a saved one's values);
        None without ``lr_grid``."""
        if not lr_grid:
            return None
        return cls(tuple(sorted(float(r) for r in lr_grid)), float(lr_rung),
                   tuple(sorted(float(r) for r in reference_lr_grid)) if reference_lr_grid else None,
                   None if reference_lr_rung is None else float(reference_lr_rung))

    def grid_of(self, kind: str) -> tuple[float, ...]:
        """The rates a configuration of ``kind`` chooses from: the references' grid for them."""
        return (self.reference_grid or self.grid) if kind in REFERENCE_KINDS else self.grid

    def rung_epochs(self, epochs: int, kind: str | None = None) -> int:
        """Epochs every rate trains before the choice: ``ceil(rung x epochs)``, at least 1 (a
        reference's: its own rung)."""
        rung = self.reference_rung if kind in REFERENCE_KINDS and self.reference_rung is not None else self.rung
        return min(epochs, max(1, math.ceil(rung * epochs - 1e-9)))

    def rule(self, epochs: int, reference_epochs: int | None = None) -> str:
        """The rule as one sentence (the report prints it)."""
        grid = ", ".join(f"{r:g}" for r in self.grid)
        refs = reference_epochs or epochs
        own = (f" (the references: {self.rung_epochs(refs, REFERENCE_KINDS[0])} of {refs})"
               if refs != epochs or self.reference_rung is not None else "")
        if self.reference_grid and self.reference_grid != self.grid:
            grid += "; the references, which train the head alone: [" + ", ".join(f"{r:g}" for r in self.reference_grid) + "]"
        return (f"each fixed configuration's learning rate is chosen on dev from the grid [{grid}] with its first "
                f"seed: every rate trains the first {self.rung_epochs(epochs)} of its {epochs} epochs{own} "
                "and the best dev score (ties: the smaller "
                "rate) is kept (successive halving, one rung); every seed then trains at that rate, the first one "
                "continuing its rung. The discrete search draws each trial's rate from the same grid; its replicates "
                "keep it")


def trial_epochs(config: StudyConfig, kind: str) -> int:
    """A trial's epochs: ``train.reference_epochs`` for the references, else ``train.epochs``."""
    if kind in REFERENCE_KINDS and config.train.reference_epochs:
        return int(config.train.reference_epochs)
    return int(config.train.epochs)


def choose_rate(scores: Mapping[float, float | None], mode: str = "max") -> float | None:
    """The rate with the best score (``mode``: ``max`` or ``min``), ties to the smaller rate;
    rates without a score (None or NaN: the trial failed) are left out; None when none has one."""
    scored = [(rate, s) for rate, s in scores.items() if s is not None and not math.isnan(float(s))]
    if not scored:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(scored, key=lambda item: (sign * float(item[1]), float(item[0])))[0]


@dataclass(frozen=True)
class LrChoice:
    """One configuration's chosen rate and the dev scores at the rung it was chosen on."""

    config_id: str
    lr: float
    scores: list[tuple[float, float | None]]  # (rate, dev score at the rung; None: failed or over budget)
    rung_epochs: int
    note: str = ""  # why the rate is train.lr (no rate of the grid trained)
    checkpoint: str = ""  # the chosen rate's rung checkpoint, which its seed's trial continues ("": none)
    seed: int | None = None  # the seed the rung trained with


@dataclass
class LrChoices:
    """The choices of one tuning (``lr_choices.json``), by configuration id."""

    choices: dict[str, LrChoice] = field(default_factory=dict)

    def lr(self, config_id: str, default: float) -> float:
        """The chosen rate of ``config_id``, else ``default`` (no tuning: ``train.lr``)."""
        choice = self.choices.get(config_id)
        return default if choice is None else choice.lr

    def continues(self, config_id: str, seed: int) -> str | None:
        """The rung checkpoint the trial of ``config_id`` with ``seed`` starts from (its trial config's
        ``continues``): the chosen rate's rung, for the seed it trained with; None for every other trial."""
        choice = self.choices.get(config_id)
        if choice is None or not choice.checkpoint or choice.seed is None or int(seed) != int(choice.seed):
            return None
        return choice.checkpoint

    def to_json(self) -> str:
        return json.dumps({"choices": [asdict(c) for c in self.choices.values()]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "LrChoices":
        out = {}
        for item in json.loads(text).get("choices", []):
            item["scores"] = [tuple(pair) for pair in item["scores"]]
            out[item["config_id"]] = LrChoice(**item)
        return cls(out)


def read_choices(path: str) -> LrChoices | None:
    """The choices stored in the tuning folder ``path``; None when it has none."""
    text = read_storage_text(f"{path}/{CHOICES_FILE}")
    return None if text is None else LrChoices.from_json(text)


def stored_choices(config: StudyConfig, folder: str = TUNE_DIR, required: bool = True) -> LrChoices | None:
    """The choices stored by a tuning of ``config``'s study (``<study>/<folder>``): none (empty)
    without ``train.lr_grid``; when missing, an error (``required``, the tune-lr stage did not
    finish) or None."""
    from pefttune.runtime.study_dir import study_dir

    if LrProtocol.of(config) is None:
        return LrChoices()
    path = f"{study_dir(config)}/{folder}"
    choices = read_choices(path)
    if choices is None and required:
        raise FileNotFoundError(f"{path}: no learning-rate choices; its tuning has not finished (run the study "
                                "with --resume)")
    return choices


def rung_trials(protocol: LrProtocol, candidates: list[dict]) -> list[dict]:
    """One trial config per candidate and rate: the candidate (a configuration's first-seed trial
    config, with ``epochs``) at that rate, stopped after its rung. A reference trains its head
    alone: the rate is its head's (``head_lr``), from the references' grid."""
    out = []
    for candidate in candidates:
        epochs, reference = int(candidate["epochs"]), candidate.get("kind") in REFERENCE_KINDS
        out += [{**candidate, "lr": rate, "head_lr": rate if reference else candidate.get("head_lr"),
                 STOP_EPOCH: protocol.rung_epochs(epochs, candidate.get("kind"))}
                for rate in protocol.grid_of(candidate.get("kind"))]
    return out


def choices_from_frame(frame: pd.DataFrame, protocol: LrProtocol, metric: str, mode: str,
                       default: float) -> LrChoices:
    """The choice of every configuration in a rung's results (one row per trial: ``config_id``,
    ``lr``, ``best_dev_<metric>``, ``status``, ``over_budget``, ``stop_epoch``; with ``epochs``
    and ``checkpoint``, the chosen rate's rung checkpoint when the rung stopped before the end)."""
    best = metric_key("dev", metric, best=True)
    out = {}
    for cid, group in frame.groupby("config_id", sort=True):
        scores, rows = {}, {}
        for _, row in group.iterrows():
            ok = row.get("status") == "TERMINATED" and not bool(row.get("over_budget"))
            value = row.get(best)
            scores[float(row["lr"])] = float(value) if ok and value is not None and not math.isnan(value) else None
            rows[float(row["lr"])] = row
        chosen = choose_rate(scores, mode)
        note = "" if chosen is not None else f"no rate of the grid trained (failed or over budget): train.lr {default:g}"
        winner = rows.get(chosen) if chosen is not None else None
        checkpoint = ""
        if winner is not None and int(winner[STOP_EPOCH]) < int(winner.get("epochs") or 0):
            checkpoint = str(winner.get("checkpoint") or "")
        seed = None if winner is None or winner.get("seed") is None else int(winner["seed"])
        out[str(cid)] = LrChoice(str(cid), float(default if chosen is None else chosen),
                                 sorted(scores.items()), int(group[STOP_EPOCH].max()), note, checkpoint, seed)
    return LrChoices(out)


def _checkpoint_uri(checkpoint) -> str:
    """A Ray checkpoint's location as ``tune.Checkpoint`` takes it back: a local path or a URI."""
    if checkpoint is None:
        return ""
    kind = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    local = kind in ("local", ATOMIC_LOCAL)  # pefttune's atomic local storage is a local folder
    return checkpoint.path if local else f"{kind}://{checkpoint.path}"


def tune_rates(config: StudyConfig, path: str, candidates: list[dict], trainable, *, resume: bool = False,
               verbose: int = 1, title: str = "tune-lr") -> LrChoices:
    """Run (or resume) the rung of ``candidates`` as the grid experiment ``path`` (Ray connected),
    write and return the choices. ``trainable``: the discrete trainable bound to its setup.

    No protocol (``train.lr_grid`` unset) or no candidate: nothing runs, no choice. A new tuning
    refuses a folder that holds one; a resume finishes it from its stored plan, refusing a
    config that would plan otherwise (:func:`pefttune.runtime.plan.check_plan`)."""
    from pefttune.metrics import metric_mode
    from pefttune.runtime.cluster import fit_environment, grid_tune_config
    from pefttune.runtime.console import Console, quiet_ray_loggers
    from pefttune.runtime.plan import GridPlan, check_plan, grid_tuner, plan_inputs, restore_grid
    from pefttune.runtime.tune_run import run_config
    from pefttune.runtime.study_dir import holds_run, results_frame

    protocol = LrProtocol.of(config)
    if protocol is None or not candidates:
        return LrChoices()
    plan = GridPlan(rung_trials(protocol, candidates), plan_inputs(config, PLAN_INPUTS))
    mode = metric_mode(config.metric)
    if resume and holds_run(path):
        check_plan(path, plan)
        tuner = restore_grid(path, trainable)
    else:
        if holds_run(path):
            raise FileExistsError(f"{path} already holds a learning-rate tuning; resume it (--resume)")
        console = Console(title, config.metric, mode, total=len(plan.trials), study_dir=path.rsplit("/", 1)[0])
        tuner = grid_tuner(trainable, path, plan, grid_tune_config(config.search.max_concurrent,
                                                                   config.search.reuse_actors),
                           run_config(config, path, verbose=verbose,
                                      callbacks=[console.callback()] if verbose == 1 else []))
    with fit_environment(), quiet_ray_loggers(verbose):
        results = tuner.fit()
    frame = results_frame(results)
    for key in ("config_id", "lr", "seed", STOP_EPOCH, "epochs"):  # from the trial configs (and of trials never reporting)
        frame[key] = [(r.config or {}).get(key) for r in results]
    frame["checkpoint"] = [_checkpoint_uri(r.checkpoint) for r in results]
    choices = choices_from_frame(frame, protocol, config.metric, mode, config.train.lr)
    write_storage_text(f"{path}/{CHOICES_FILE}", choices.to_json())
    if verbose:
        print(f"{title}: " + "; ".join(f"{c.config_id} {c.lr:g}" + (f" ({c.note})" if c.note else "")
                                      for c in choices.choices.values()), flush=True)
    return choices


# -- the report -------------------------------------------------------------------------------------


def protocol_lines(config: dict | None, trials: pd.DataFrame, metric: str) -> list[str]:
    """The report's lines on the protocol: the rule, and each tuned configuration's dev scores at
    the rung with its chosen rate. ``config``: the study's saved config (a dict); ``trials``: the
    trials table (:func:`pefttune.analysis.tables.trials_table`)."""
    import pandas as pd

    train = (config or {}).get("train") or {}
    if not train.get("lr_grid"):
        return [f"Learning rate: every trial at `train.lr` {train.get('lr', '?')} (no `train.lr_grid`: no tuning).",
                ""]
    protocol = LrProtocol.from_fields(train["lr_grid"], train.get("lr_rung", 0.2), train.get("reference_lr_grid"),
                                      train.get("reference_lr_rung"))
    rates = sorted(set(protocol.grid) | set(protocol.reference_grid or ()))  # the table's columns
    epochs = int(train.get("epochs", 1))
    lines = ["Learning rate (`train.lr_grid`, `pefttune.tuning`): "
             + protocol.rule(epochs, train.get("reference_epochs")) + ".", ""]
    column = f"config/{STOP_EPOCH}"
    if column not in trials or not trials[column].notna().any():
        return lines
    rungs = trials[trials[column].notna()]
    chosen = trials[(trials["outcome"] == "completed") & trials[column].isna()].groupby("config_id")["lr"].first()
    header = ["configuration", "rung epochs"] + [f"dev {metric} at {r:g}" for r in rates] + ["chosen lr"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cid, group in rungs.groupby("config_id", sort=True):
        by_rate = {float(r["lr"]): r for _, r in group.iterrows()}
        cells = []
        for rate in rates:  # "-": not in this configuration's grid, or its trial did not reach the rung
            row = by_rate.get(rate)
            score = None if row is None or row["outcome"] != "stopped_early" else row["best_dev_score"]
            cells.append("-" if score is None or pd.isna(score) else f"{float(score):.4f}")
        pick = chosen.get(cid)
        lines.append(f"| {cid} | {int(group[column].max())} | " + " | ".join(cells)
                     + f" | {'-' if pick is None or pd.isna(pick) else f'{float(pick):g}'} |")
    return lines + ["", "Dev scores of single first-seed trials stopped at the rung: no interval (they only "
                        "rank the rates; the configurations table has the intervals over seeds).", ""]
