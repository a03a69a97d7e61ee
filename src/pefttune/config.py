"""The experiment config: one YAML file, validated before Ray starts.

Every section is a pydantic model whose fields carry help text; unknown keys are
errors (typos fail early, with the closest valid key: ``train.epohcs: unknown key; did you
mean 'epochs'?``) and messages name the field, e.g.
``search.num_samples: Input should be greater than or equal to 1``.

Shipped examples live in ``pefttune/configs/`` (``embedded.yaml`` is the default study of
``pefttune run``; ``superb-ks-hubert-base.yaml`` is a GPU cluster example).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class DataConfig(_Section):
    source: Literal["synth", "manifest", "speech_commands", "fluent", "voxceleb1", "librispeech", "iemocap"] = Field(
        "synth", description="Where the data comes from: synthesized offline (synth), a manifest file, or a standard layout."
    )
    task: Literal["ks", "sid", "pr", "ic", "asr", "er", "custom"] = Field(
        "ks", description="Task: keyword spotting, speaker id, phoneme recognition, intent, ASR, emotion, custom."
    )
    path: str | None = Field(None, description="Manifest file or dataset root (not used for synth).")
    seed: int = Field(0, description="Seed of the synthesized corpus, and of the draw of data.max_utterances.")
    per_class: int | None = Field(None, ge=1, description="Synthesized clips per class and split size knob (synth only).")
    test_per_class: int | None = Field(
        None, ge=1, description="Synthesized KS test clips per class (default: 400 for the default corpus, sized for "
        "paired comparisons at a 0.01 margin; with per_class set, per_class // 4 like dev)."
    )
    test_speakers: int | None = Field(
        None, ge=1, description="Speakers of the synthesized KS or PR test split (default: 50 for KS, 30 for PR), "
        "disjoint from the train and dev speakers: the clusters a speaker-level interval resamples."
    )
    sentences: int | None = Field(
        None, ge=3, description="Sentences of the synthesized PR corpus (default 600; 70/15/15 train/dev/test)."
    )
    batch_size: int = Field(16, ge=1, description="Batch size for training and evaluation.")
    length_buckets: bool | None = Field(
        None, description="Training batches of similar length (shuffled pools of 50 batches, each sorted by length): "
        "less compute spent on padding. Default: on for CTC tasks (sentences vary in length), off for classification."
    )
    max_seconds: float | None = Field(None, gt=0, description="Crop clips longer than this many seconds (train only).")
    max_utterances: int | None = Field(
        None, ge=1, description="Use at most this many utterances of each split, drawn with data.seed; the train draw "
        "keeps at least one utterance of every label of a classification task (so it may hold a few more). For a "
        "smoke run on a large dataset: every trial evaluates the whole dev and test splits. None: all."
    )
    on_error: Literal["raise", "skip"] = Field("raise", description="Unreadable audio: raise an error, or skip and count.")

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source != "synth" and not self.path:
            raise ValueError(f"data.path: required for data.source={self.source!r}")
        if self.source == "synth" and self.task not in ("ks", "sid", "pr"):
            raise ValueError(f"data.task: synthesized corpora exist for ks, sid and pr, not {self.task!r}")
        if self.test_per_class is not None and (self.source != "synth" or self.task != "ks"):
            raise ValueError("data.test_per_class: applies to the synthesized ks corpus only")
        if self.sentences is not None and (self.source != "synth" or self.task != "pr"):
            raise ValueError("data.sentences: applies to the synthesized pr corpus only")
        if self.test_speakers is not None and (self.source != "synth" or self.task not in ("ks", "pr")):
            raise ValueError("data.test_speakers: applies to the synthesized ks and pr corpora only")
        return self


def task_kind_of(task: str) -> str:
    """The head a task needs: ``ctc`` for transcription tasks (pr, asr), else ``classification``."""
    return "ctc" if task in ("pr", "asr") else "classification"


class HeadSection(_Section):
    kind: Literal["linear", "mlp", "bilstm"] = Field("linear", description="Head on the weighted layer sum.")
    hidden: int = Field(128, ge=1, description="Width of the MLP / BiLSTM head.")
    norm: Literal["none", "batch"] | None = Field(
        None, description="The pooled features' normalisation before a classification head: 'batch' standardises "
        "them (a batch norm without affine parameters; at evaluation an affine map of the pooled features, so the "
        "same family of heads, better conditioned to train), 'none' feeds them as they are. Default: 'batch' for "
        "classification tasks, 'none' for CTC (no pooling).")

    def resolved_norm(self, task_kind: str) -> str:
        """``norm``, or its default for ``task_kind``."""
        return self.norm or ("batch" if task_kind == "classification" else "none")

    def describe(self, task_kind: str) -> str:
        """The head as one sentence (the report prints it)."""
        if task_kind != "classification":
            return (f"every configuration has the same head: a softmax-weighted sum of the hidden states, then per "
                    f"frame {'a BiLSTM and ' if self.kind == 'bilstm' else ''}a linear layer to the tokens (CTC)")
        norm = self.resolved_norm(task_kind)
        return ("every configuration has the same head: a softmax-weighted sum of the hidden states, mean-pooled "
                "over valid frames, " + ("standardised (`head.norm: batch`: a batch norm without affine parameters, "
                                         "its running statistics at evaluation), " if norm == "batch" else "")
                + ("then an MLP" if self.kind == "mlp" else "then a linear layer") + " to the classes")


class TrainSection(_Section):
    epochs: int = Field(4, ge=1, description="Epochs per trial (ASHA's max_t).")
    lr: float = Field(1e-3, gt=0, description="Learning rate of PEFT weights (AdamW): every trial's without "
                      "lr_grid; with it, the DARTS search's weights'.")
    lr_grid: list[float] | None = Field(
        None, description="The learning-rate protocol's grid (pefttune.tuning): every fixed configuration (uniform "
        "baselines, hybrid, the frozen and log-mel references, each DARTS-derived placement) trains every rate for "
        "lr_rung of its epochs with the first seed, keeps the rate with the best dev score and trains every seed at "
        "it; the discrete search draws each trial's rate from the grid. None: every trial at lr."
    )
    reference_lr_grid: list[float] | None = Field(
        None, description="The protocol's grid for the references (frozen, log-mel), which train the head alone: "
        "their rate is the head's, and a head alone on fixed features can take larger rates than PEFT weights. "
        "Chosen by the same rule as lr_grid's. Default: lr_grid."
    )
    lr_rung: float = Field(
        0.2, gt=0, lt=1, description="The protocol's rung: the share of a trial's epochs (rounded up) that every rate "
        "of lr_grid trains, on the trial's full schedule, before the best dev score picks the rate (successive halving "
        "with one rung); every seed then trains at it, the first one continuing its rung."
    )
    lr_range: None = Field(None, exclude=True, description="Removed: replaced by lr_grid (a value given here is "
                           "refused).")
    reference_lr_rung: float | None = Field(
        None, gt=0, lt=1, description="The references' rung: the share of their epochs every rate of "
        "reference_lr_grid trains before the choice. They are cheap, so a late rung (e.g. 0.9) compares their rates "
        "near the end of the schedule, where a short rung favours the smaller rate. Default: lr_rung."
    )
    reference_epochs: int | None = Field(
        None, ge=1, description="Epochs of the references (frozen, log-mel: the head alone, few parameters, cheap), "
        "so they train to convergence. Default: epochs."
    )
    head_lr: float | None = Field(None, gt=0, description="Learning rate of the head (default: lr).")
    method_lr: dict[str, float] = Field(
        default_factory=dict, description="Learning rate of one method's parameters, wherever it is placed "
        "(e.g. {bitfit: 0.02}: bias-only tuning usually wants a larger lr); other methods and the head keep lr."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of steps with linear warm-up.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0 = off).")
    seed: int = Field(0, description="Seed of the search: its trials, the fixed points' first replicate and the "
                      "DARTS search (the same for all, so comparisons are fair).")
    seeds: list[int] | None = Field(
        None,
        description="Replicate seeds (default: [seed]). Every fixed point (uniform baselines, hybrid, frozen "
        "reference), the top search.replicate_top searched placements and every DARTS-derived placement is "
        "trained once per seed; the first seed is the search's.",
    )
    bf16: bool = Field(False, description="bf16 autocast on GPU.")
    metric: Literal["accuracy", "macro_f1", "per", "wer", "cer"] | None = Field(
        None, description="Task metric (default: accuracy for classification, per/wer for CTC)."
    )
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on steps per epoch (smoke tests).")
    frozen_cache: Literal["disk", "memory", "off"] = Field(
        "disk",
        description="Cache the frozen part of the forward pass (front end + layers below the lowest adapted one) "
        "per utterance: on disk under the pefttune cache (shared by the trials of a node), in memory only, or off.",
    )
    frozen_cache_memory_gb: float = Field(2.0, gt=0, description="In-memory share of the frozen cache per trial (GiB).")
    frozen_cache_disk_gb: float = Field(
        20.0,
        gt=0,
        description="Cap on the frozen cache on disk (GiB), all keys and trials of a node together; past it, "
        "states stay in memory or are recomputed (same results).",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if value is not None:
            if not value:
                raise ValueError("give at least one seed, or leave it out")
            if len(set(value)) != len(value):
                raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @model_validator(mode="after")
    def _search_seed(self):
        if self.seeds is not None:
            if "seed" in self.model_fields_set and self.seed != self.seeds[0]:
                raise ValueError(f"seed: {self.seed} must be train.seeds[0] ({self.seeds[0]}), the search's "
                                 "seed, or be left out")
            self.seed = self.seeds[0]
        return self

    @property
    def replicate_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]

    @field_validator("method_lr")
    @classmethod
    def _method_lr(cls, value: dict) -> dict:
        bad = [f"{name}: {lr!r}" for name, lr in value.items() if not (isinstance(lr, (int, float)) and lr > 0)]
        if bad:
            raise ValueError(f"every learning rate must be > 0 ({'; '.join(bad)})")
        return {name: float(lr) for name, lr in value.items()}

    @field_validator("lr_range", mode="before")
    @classmethod
    def _renamed(cls, value):
        if value is None:  # what config copies of earlier versions hold: nothing to refuse
            return None
        raise ValueError("replaced by train.lr_grid, a list of rates (e.g. [0.003, 0.01, 0.03]): every fixed "
                         "configuration's rate is chosen from it on dev, and the search draws its own from it")

    @field_validator("lr_grid", "reference_lr_grid")
    @classmethod
    def _grid(cls, value):
        if value is None:
            return value
        bad = [rate for rate in value if not (isinstance(rate, (int, float)) and rate > 0)]
        if not value or bad:
            raise ValueError(f"must be a non-empty list of rates > 0 (got {value!r})")
        if len(set(value)) != len(value):
            raise ValueError(f"rates must be distinct, got {value}")
        return sorted(float(rate) for rate in value)

    @model_validator(mode="after")
    def _reference_grid_needs_the_protocol(self):
        for name in ("reference_lr_grid", "reference_lr_rung"):
            if getattr(self, name) is not None and self.lr_grid is None:
                raise ValueError(f"train.{name}: used by the learning-rate protocol, which train.lr_grid turns "
                                 f"on; set train.lr_grid too (or leave {name} out)")
        return self


class SearchSection(_Section):
    algorithm: Literal["tpe", "random", "grid", "nsga2"] = Field(
        "tpe", description="Optuna TPE (default; MOTPE when multi_objective), random, grid, or NSGA-II."
    )
    num_samples: int = Field(8, ge=0, description="Searched trials (on top of the fixed points below).")
    scheduler: Literal["asha", "none"] = Field("asha", description="ASHA early stopping or none.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA reduction factor.")
    max_concurrent: int = Field(2, ge=1, description="Trials running at once.")
    uniform_baselines: bool = Field(True, description="Add one uniform trial per candidate method.")
    hybrid: Any = Field(
        True,
        description="The hybrid fixed point: one trial with several methods merged inside every layer. true: the "
        "study's mix {sequential: {bottleneck: 10}, parallel: {bottleneck: 10}, lora: {rank: 2}}; a mapping of "
        "member method -> hyper-parameters (at least two members); auto: the study's mix with each member's size "
        "scaled so the hybrid's PEFT parameters come as close as possible to `budget` without going over (no "
        "budget: to the mean of the uniform baselines'); candidates: every candidate method at its first listed "
        "values; false: none.",
    )
    frozen_reference: bool = Field(
        True, description="Train the 'frozen' reference (no PEFT in any layer, head only) once per seed."
    )
    replicate_top: int = Field(
        2, ge=0, description="The best searched placements (by dev) trained again with every other seed of "
        "train.seeds."
    )
    multi_objective: bool = Field(False, description="Optimise task metric and trainable parameters (Pareto).")
    max_failures: int = Field(2, ge=0, description="Retries of a failed trial from its last checkpoint.")
    reuse_actors: bool = Field(True, description="Reuse Ray actors between trials (much less per-trial overhead).")
    budget_exempt_fixed: bool = Field(
        False, description="Train the fixed points (uniform baselines, hybrid) even when over the budget."
    )
    tpe_startup_trials: int = Field(5, ge=0, description="TPE: random trials (fixed points included) before TPE.")

    @field_validator("hybrid")
    @classmethod
    def _hybrid(cls, value: Any) -> Any:
        from pefttune.methods.hybrid import resolve_members

        if isinstance(value, bool) or value in ("auto", "candidates"):
            return value
        if isinstance(value, dict):
            resolve_members(value, "")  # errors name the member: "search.hybrid: lora.rank: must be >= 1"
            return value
        raise ValueError(f"expected true, false, auto, candidates or a mapping of member method -> "
                         f"hyper-parameters, got {value!r}")
    optuna_storage: str | None = Field(
        None, description="Optuna RDB URL (default: sqlite file optuna.db in the experiment dir)."
    )


class DartsSection(_Section):
    enabled: bool = Field(True, description="Run the DARTS arm in `pefttune run`.")
    mix: Literal["gated", "exact"] = Field(
        "gated", description="gated: one pass, each method's contribution scaled; exact: softmax-weighted layer outputs."
    )
    relaxation: Literal["softmax", "gumbel", "fair"] = Field("softmax", description="Relaxation of the choice.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature (gumbel: start temperature).")
    final_temperature: float = Field(0.1, gt=0, description="Gumbel: temperature at the end (exponential schedule).")
    hard: bool = Field(False, description="Gumbel: straight-through hard one-hot samples (GDAS).")
    order: Literal["first", "second"] = Field("first", description="First- or second-order (unrolled) approximation.")
    arch_lr: float = Field(3e-3, gt=0, description="Adam learning rate of the architecture weights alpha.")
    arch_weight_decay: float = Field(1e-3, ge=0, description="Weight decay of alpha.")
    arch_split: float = Field(0.5, gt=0, lt=1, description="Share of the training set held out for alpha updates.")
    warmup_epochs: int = Field(1, ge=0, description="Epochs of weight-only training before alpha updates.")
    arch_steps_per_weight_step: int = Field(
        1, ge=1, description="Architecture steps (each on the next arch batch) before every weight step; DARTS: 1. "
        "More lets alpha converge in a search with few weight steps, at one arch pass per step each."
    )
    arch_betas: tuple[float, float] = Field(
        (0.5, 0.999), description="Adam betas of alpha (DARTS: 0.5, 0.999). A first beta near 0.9 averages the "
        "arch-batch gradients over about 10 steps: steadier alpha when each batch's gradient is noisy."
    )
    arch_batch_size: int | None = Field(
        None, ge=1, description="Batch size of the architecture split's loader (default: data.batch_size); larger "
        "batches give alpha less noisy gradients."
    )
    converged_entropy: float = Field(
        0.7, gt=0, le=1, description="The relaxation counts as converged when its mean normalised entropy "
        "H/ln K over layers is at most this at the end of the search (1 = uniform, 0 = one-hot)."
    )
    budget_penalty: float = Field(0.0, ge=0, description="Weight of the expected-parameters-over-budget penalty.")
    fair_zero_one: float = Field(10.0, ge=0, description="Fair-DARTS: weight of the zero-one loss.")
    retrain: Literal["per-seed", "every-seed"] = Field(
        "per-seed", description="How DARTS enters the comparisons. 'per-seed': one search per seed of train.seeds, "
        "the placement derived with seed k retrained with seed k, all under one configuration id (DARTS as a "
        "method: its search's randomness is inside the seed level of every interval). 'every-seed': the searches "
        "of darts.seeds, each distinct derived placement retrained with every seed of train.seeds (a configuration "
        "per placement)."
    )
    seeds: list[int] | None = Field(
        None, description="Seeds of the DARTS searches, one search each. Default: train.seeds with retrain "
        "'per-seed' (another list is refused there), [train.seed] with 'every-seed'."
    )
    search_cpu: float | None = Field(
        None, gt=0, description="CPUs (and so threads) of each DARTS search trial; default resources.cpu. A lone "
        "search leaves the other trial slots idle, so 2 halves its time on the 2-core machine, but the thread "
        "count changes its numbers, and a relaxation calibrated at one thread count may not converge at another."
    )
    epochs: int | None = Field(None, ge=1, description="Search epochs (default: train.epochs).")
    variants: list[dict[str, Any]] = Field(
        default_factory=list,
        description="DARTS variants run as separate trials (each with every seed): mappings of darts fields "
        "overriding this section, e.g. [{}, {mix: exact}, {relaxation: gumbel, hard: true}]. Empty: one variant, "
        "this section's own settings.",
    )

    @field_validator("arch_betas")
    @classmethod
    def _betas(cls, value: tuple) -> tuple:
        if not all(0 <= b < 1 for b in value):
            raise ValueError("must be two numbers in [0, 1)")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: list) -> list:
        for index, variant in enumerate(value):
            if not isinstance(variant, dict):
                raise ValueError(f"[{index}]: expected a mapping of darts fields, got {variant!r}")
            fixed = sorted(set(variant) & {"enabled", "seeds", "variants"})
            if fixed:
                raise ValueError(f"[{index}]: {fixed} cannot vary between variants")
            try:
                DartsSection.model_validate(variant)
            except ValidationError as err:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
                )
                raise ValueError(f"[{index}]: {problems}") from None
        return value


class AnalysisSection(_Section):
    margin: float = Field(
        0.01, ge=0, description="Equivalence margin delta of the verdicts, in units of the metric: a difference "
        "whose interval lies within +delta counts as 'no better'."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence of every interval in the report.")
    bootstrap_draws: int = Field(2000, ge=200, description="Paired bootstrap draws per comparison.")
    max_seeds: int | None = Field(
        None, ge=2, description="More seeds where a finding is open: after train.seeds, while a finding's interval "
        "straddles its threshold, train one more seed of the configurations it compares (a DARTS search included for "
        "the DARTS finding), up to this many seeds in all. Every verdict is then decided on a group-sequential "
        "design (alpha spent over the looks), valid whatever the stopping time. None: the planned seeds only."
    )
    max_extra_minutes: float | None = Field(
        None, gt=0, description="Wall-time budget of the further seeds' rounds (with analysis.max_seeds)."
    )
    spending: Literal["obrien-fleming", "pocock"] = Field(
        "obrien-fleming", description="Alpha spending over the looks of analysis.max_seeds: O'Brien-Fleming spends "
        "little at the first looks, Pocock about evenly."
    )
    interval: Literal["seeds-speakers", "examples"] = Field(
        "seeds-speakers", description="The interval every verdict is decided on. 'seeds-speakers': Student-t over "
        "training seeds (paired where both sides share seeds) plus the variance of a cluster bootstrap over the test "
        "speakers (utterances when the manifest has no speaker column); it covers what other seeds and other speakers "
        "would change, and with one seed a verdict is inconclusive. 'examples': the paired bootstrap over test "
        "examples, an interval for the models as trained (always reported as a supporting number)."
    )
    logmel_reference: bool = Field(
        True, description="Add the 'log-mel' reference: the same head on log-mel filterbank features, no SSL "
        "encoder, once per seed (classification tasks)."
    )


class ResourcesSection(_Section):
    cpu: float = Field(1, gt=0, description="CPUs per trial.")
    gpu: float = Field(0, ge=0, description="GPUs per trial; fractions share a GPU between trials.")
    gpu_wait_s: float = Field(
        120, ge=0, description="Before a GPU trial starts, wait up to this long for the GPU's free memory to reach "
        "the trial's share (gpu x total), e.g. while a finished trial's memory is released."
    )


class MlflowSection(_Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, sqlite:////path/mlflow.db, databricks, ...). "
        "Default: a sqlite store in the study folder, sqlite:///<storage>/<name>/mlflow.db (current MLflow "
        "refuses a new ./mlruns file store)."
    )
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment name (default: `name`).")


class WandbSection(_Section):
    project: str | None = Field(None, min_length=1, description="W&B project (default: `name`).")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: runs written under `dir` only (sync later with `wandb sync`); online: "
        "sent to the W&B server."
    )
    dir: str | None = Field(None, description="Folder of the W&B run files (default: <storage>/<name>/wandb).")


def _enable(value: Any) -> Any:
    """``true`` -> the section with its defaults, ``false`` -> off; a string -> ``{uri: ...}`` (MLflow)."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


class TrackingSection(_Section):
    mlflow: MlflowSection | None = Field(
        None, description="Log to MLflow: one run per trial (its config, its metrics per epoch, tags kind, "
        "config_id and seed) under one run of the study, which holds the report, the tables and the plots. "
        "true, a URI, or {uri, experiment}. Needs the `tracking` extra (pip install 'pefttune[tracking]')."
    )
    wandb: WandbSection | None = Field(
        None, description="Log to Weights & Biases (one run per trial): true or {project, mode, dir}; offline by "
        "default. Needs `pip install wandb`."
    )

    @field_validator("mlflow", mode="before")
    @classmethod
    def _mlflow(cls, value: Any) -> Any:
        value = _enable(value)
        return {"uri": value} if isinstance(value, str) else value

    @field_validator("wandb", mode="before")
    @classmethod
    def _wandb(cls, value: Any) -> Any:
        return _enable(value)


class StudyConfig(_Section):
    name: str = Field("pefttune", min_length=1, description="Experiment name (folder under storage).")
    backbone: str = Field("tiny-hubert-ssl", description="Built-in name, local model dir, or Hugging Face id.")
    data: DataConfig = Field(default_factory=DataConfig)
    head: HeadSection = Field(default_factory=HeadSection)
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "sequential": {"bottleneck": 32},
            "parallel": {"bottleneck": 32},
            "lora": {"rank": 8},
            "bitfit": {},
        },
        description="Candidate methods per layer, each with fixed values or lists of choices per hyper-parameter. "
        "'none' is always a candidate.",
    )
    budget: int | None = Field(None, ge=0, description="Max trainable PEFT parameters of a placement (None: no limit).")
    train: TrainSection = Field(default_factory=TrainSection)
    search: SearchSection = Field(default_factory=SearchSection)
    darts: DartsSection = Field(default_factory=DartsSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    analysis: AnalysisSection = Field(default_factory=AnalysisSection)
    storage: str = Field("./pefttune-results", description="Local dir or URI Ray accepts (s3://, gs://, ...).")
    storage_shared: bool = Field(
        False,
        description="The local storage path is a shared filesystem (e.g. NFS) mounted at the same path on every "
        "node; required for a local storage path on a multi-node cluster.",
    )
    tracking: TrackingSection | None = Field(
        None, description="Send the study to an experiment tracker (MLflow, W&B); off by default. A tracker that "
        "cannot be reached is warned about once and the study goes on without it."
    )
    ensemble_size: int = Field(5, ge=2, description="Members of the top-k ensembles.")
    tasks: list[str] | dict[str, dict[str, Any] | None] | None = Field(
        None,
        description="A suite: run the study once per task (`data.task`), same candidates and budget, into "
        "<storage>/<name>/<task>/, plus suite.md and the `suite` table. A list of tasks, or a mapping task -> "
        "overrides of this config for that task (e.g. `pr: {train: {epochs: 40}}`).",
    )

    @model_validator(mode="after")
    def _tasks(self):
        if self.tasks is None:
            return self
        names = list(self.tasks)
        if not names:
            raise ValueError("tasks: a suite needs at least one task")
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: a task is listed twice in {names}")
        task_configs(self)  # every task's config validated; errors name tasks.<task>
        return self

    @model_validator(mode="after")
    def _head_norm(self):
        if self.head.norm == "batch" and self.task_kind != "classification":
            raise ValueError(f"head.norm: 'batch' standardises pooled features, for classification tasks only; "
                             f"data.task {self.data.task!r} is a CTC task (leave head.norm out, or set 'none')")
        return self

    @model_validator(mode="after")
    def _tracking_store(self):
        mlflow = self.tracking.mlflow if self.tracking else None
        if mlflow is not None and mlflow.uri is None and "://" in self.storage:
            raise ValueError(f"tracking.mlflow.uri: required when storage is a URI ({self.storage}); the default "
                             "sqlite store lives in a local study folder")
        wandb = self.tracking.wandb if self.tracking else None
        if wandb is not None and wandb.dir is None and "://" in self.storage:
            raise ValueError(f"tracking.wandb.dir: required when storage is a URI ({self.storage})")
        return self

    @model_validator(mode="after")
    def _darts_seeds(self):
        seeds = self.darts.seeds
        if seeds is not None and not seeds:
            raise ValueError("darts.seeds: need at least one seed")
        if self.darts.retrain == "per-seed" and seeds is not None and list(seeds) != self.train.replicate_seeds:
            raise ValueError(f"darts.seeds: {list(seeds)}, but with darts.retrain 'per-seed' the searches run once per "
                             f"seed of train.seeds ({self.train.replicate_seeds}); leave darts.seeds out, or set "
                             "darts.retrain: every-seed")
        return self

    @model_validator(mode="after")
    def _max_seeds(self):
        max_seeds, planned = self.analysis.max_seeds, len(self.train.replicate_seeds)
        if max_seeds is not None:
            if planned < 2:
                raise ValueError(f"analysis.max_seeds: needs at least 2 planned seeds in train.seeds to start from, "
                                 f"got {planned}")
            if max_seeds < planned:
                raise ValueError(f"analysis.max_seeds: {max_seeds} is fewer than the {planned} seeds of train.seeds")
        elif self.analysis.max_extra_minutes is not None:
            raise ValueError("analysis.max_extra_minutes: only used with analysis.max_seeds")
        return self

    @property
    def darts_seeds(self) -> list[int]:
        """The seeds of the DARTS searches (see ``darts.retrain``)."""
        if self.darts.seeds is not None:
            return list(self.darts.seeds)
        return self.train.replicate_seeds if self.darts.retrain == "per-seed" else [self.train.seed]

    @model_validator(mode="after")
    def _method_lr_names(self):
        unknown = sorted(set(self.train.method_lr) - set(self.methods))
        if unknown:
            raise ValueError(f"train.method_lr: {unknown} not among the candidate methods {sorted(self.methods)}")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if "/" in value or value.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: dict) -> dict:
        from pefttune.methods import get_method

        if not value:
            raise ValueError("need at least one candidate method")
        for name, ranges in value.items():
            if name == "hybrid":  # a per-layer candidate merging several methods (pefttune.methods.hybrid)
                from pefttune.methods.hybrid import resolve_members

                resolve_members(ranges, "hybrid")
                continue
            try:
                spec = get_method(name)
            except ValueError as err:
                raise ValueError(str(err)) from None
            if not isinstance(ranges, dict):
                raise ValueError(f"{name}: expected a mapping of hyper-parameter -> value or list of values")
            for hp, choices in ranges.items():
                options = choices if isinstance(choices, list) and hp != "targets" else [choices]
                if hp == "targets" and isinstance(choices, list) and choices and isinstance(choices[0], list):
                    options = choices
                if not options:
                    raise ValueError(f"{name}.{hp}: empty list of choices")
                for option in options:
                    spec.resolve({hp: option}, f"{name}")
        return value

    def candidate_choices(self) -> dict[str, dict[str, list]]:
        """Per method, per hyper-parameter: the list of allowed values."""
        out = {}
        for name, ranges in self.methods.items():
            out[name] = {}
            for hp, choices in ranges.items():
                if hp == "targets":
                    is_list_of_lists = isinstance(choices, list) and choices and isinstance(choices[0], list)
                    out[name][hp] = choices if is_list_of_lists else [choices]
                else:
                    out[name][hp] = list(choices) if isinstance(choices, list) else [choices]
        return out

    def default_hparams(self, method: str) -> dict:
        """First choice of every listed hyper-parameter (used for fixed points)."""
        return {hp: values[0] for hp, values in self.candidate_choices()[method].items()}

    @property
    def task_kind(self) -> str:
        return task_kind_of(self.data.task)

    @property
    def metric(self) -> str:
        if self.train.metric:
            return self.train.metric
        return {"pr": "per", "asr": "wer"}.get(self.data.task, "accuracy")


def task_configs(config: StudyConfig, tasks=None) -> dict[str, StudyConfig]:
    """One experiment config per task: ``data.task`` set, the task's overrides merged, stored
    under ``<storage>/<name>/<task>``. ``tasks`` defaults to ``config.tasks``."""
    tasks = config.tasks if tasks is None else tasks
    if not tasks:
        raise ValueError("tasks: a suite needs at least one task")
    overrides = {t: {} for t in tasks} if isinstance(tasks, (list, tuple)) else dict(tasks)
    base = config.model_dump(mode="json", exclude={"tasks"})
    out = {}
    for task, extra in overrides.items():
        data = _deep_merge(base, extra or {})
        data = _deep_merge(data, {"name": task, "storage": suite_path(config), "data": {"task": task}})
        try:
            out[task] = StudyConfig.model_validate(data)
        except ValidationError as err:  # every bad field, named inside the task: tasks.pr.train.epochs
            problems = "; ".join(
                f"tasks.{task}" + "".join(f".{p}" for p in e["loc"]) + ": "
                + (unknown_key_message(e["loc"]) if e["type"] == "extra_forbidden"
                   else e["msg"].removeprefix("Value error, "))
                for e in err.errors()
            )
            raise ValueError(problems) from None
    return out


def suite_path(config: StudyConfig) -> str:
    return f"{config.storage.rstrip('/')}/{config.name}"



def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = unknown_key_message(item["loc"])
        lines.append(f"  {where}: {message}")
    return f"{source}: invalid experiment config\n" + "\n".join(lines)


def unknown_key_message(loc: tuple) -> str:
    """What to say about a key no section has, e.g. ``train.epohcs``: the closest valid key of its
    section, or the section's keys.

    Example::

        >>> unknown_key_message(("train", "epohcs"))
        "unknown key; did you mean 'epochs'?"
    """
    import difflib

    model: type[BaseModel] | None = StudyConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model is not None else None
        annotation = getattr(field, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is None:
        return "unknown key"
    keys = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    section = ".".join(str(p) for p in loc[:-1]) or "the config's top level"
    return f"unknown key; the keys of {section} are {', '.join(keys)}"


def parse_config(data: dict | None, source: str = "config") -> StudyConfig:
    try:
        return StudyConfig.model_validate(data or {})
    except ValidationError as err:
        raise ValueError(_format_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> StudyConfig:
    """Load and validate a YAML config (default: the embedded study).

    A config may start from another one: ``extends: embedded.yaml`` (a path relative to the
    config's folder, or a shipped config's name) loads that file first and merges this one
    over it, section by section; ``methods`` and ``tasks``, when given, replace the base's.
    """
    path = Path(path) if path else CONFIG_DIR / "embedded.yaml"
    data = _read_yaml(path, seen=())
    if overrides:
        data = _deep_merge(data, overrides)
    return parse_config(data, str(path))


def resolve_config(config: StudyConfig | str | Path | None, name: str | None = None) -> StudyConfig:
    """The config a run uses: ``config`` itself, or loaded from a path (None: the embedded
    study, see :func:`load_config`); ``name`` (``--name``) replaces its name, validated again.
    Every entry point (``run_study``, ``run_suite``, ``run_search``, ``run_darts``) starts here."""
    if not isinstance(config, StudyConfig):
        config = load_config(config)
    if name is not None:
        config = parse_config({**config.model_dump(mode="json"), "name": name}, source="--name")
    return config


REPLACED_ON_EXTEND = ("methods", "tasks")


def _read_yaml(path: Path, seen: tuple) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ValueError(f"{path}: extends: expected a config file name, got {base_name!r}")
    base_path = next((p for p in (path.parent / base_name, CONFIG_DIR / base_name) if p.exists()), None)
    if base_path is None:
        raise FileNotFoundError(f"{path}: extends: {base_name} is neither beside it nor a shipped config")
    if base_path.resolve() in (*seen, path.resolve()):
        raise ValueError(f"{path}: extends: {base_name} leads back to {path.name} (a cycle)")
    base = _read_yaml(base_path, (*seen, path.resolve()))
    for key in REPLACED_ON_EXTEND:
        if key in data:
            base.pop(key, None)
    return _deep_merge(base, data)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
