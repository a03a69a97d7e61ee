"""Profiles, and the starter config that `pefttune init` writes for your data and model.

A profile is a shipped config, ``configs/profiles/<name>.yaml``, holding every setting of a study
except the data and the model:

==========  ====================================================================================
profile     for
==========  ====================================================================================
``smoke``   minutes on a laptop CPU: the whole study, small, to see the report (numbers mean nothing)
``laptop``  CPU cores: the embedded study's settings, calibrated on a 2-core CPU
``gpu``     one GPU: four trials share it, SUPERB-style candidates for a base-size encoder
``cluster`` a Ray cluster of GPU nodes: 16 trials at once
==========  ====================================================================================

Each profile's header says where its settings come from (benchmarks/README.md) and its expected
wall time on the machine the benchmarks used. :func:`write_starter` checks the data (the checks
of ``pefttune data validate`` and the audio check of every file) and the backbone (a local
``save_pretrained`` directory with safetensors weights, a built-in name, or a Hugging Face id
that can be resolved), names every problem in one error and writes nothing then; otherwise it
writes a commented config that ``extends:`` the profile and sets the data, the model, the name,
the storage and a parameter budget sized to the model.

Example::

    from pefttune.profiles import Starter, write_starter

    written = write_starter(Starter(backbone="models/my-hubert", out="smoke.yaml", profile="smoke",
                                    manifest="data/manifest.csv"))
    print(written.next_command)      # pefttune run smoke.yaml
"""
from __future__ import annotations

import json
import os
import shlex
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from pefttune.config import CONFIG_DIR, StudyConfig, load_config

PROFILE_DIR = CONFIG_DIR / "profiles"
#: The profiles, in the order `pefttune init --help` lists them.
PROFILES = ("smoke", "laptop", "gpu", "cluster")
#: Classification tasks a manifest with a ``label`` column can be (``custom``: any other classes).
CLASSIFICATION_TASKS = ("custom", "ks", "sid", "ic", "er")
CTC_TASKS = ("pr", "asr")


@dataclass(frozen=True)
class Profile:
    """A shipped profile: its file, the first line of its header and its expected wall time."""

    name: str
    path: Path
    summary: str
    wall_time: str

    @property
    def extends(self) -> str:
        """What a config writes after ``extends:`` (resolved among the shipped configs)."""
        return f"profiles/{self.path.name}"


def profile(name: str) -> Profile:
    """The profile ``name`` (one of :data:`PROFILES`), its header read from its file."""
    if name not in PROFILES:
        raise ValueError(f"--profile: unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    path = PROFILE_DIR / f"{name}.yaml"
    header = []  # the comment lines before the first setting, without their "#"
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:])
    wall = []
    for index, line in enumerate(header):
        if line.strip().startswith("Expected wall time:"):
            wall = [line.strip()]
            for more in header[index + 1:]:  # its continuation lines are indented
                if not more.startswith("   "):
                    break
                wall.append(more.strip())
            break
    first = " ".join(line.strip() for line in header).split(". ")[0]
    summary = first.split(":", 1)[1].strip() if ":" in first else first
    return Profile(name, path, summary.rstrip(".") + ".", " ".join(wall).removeprefix("Expected wall time:").strip())


@dataclass
class Starter:
    """What `pefttune init` was asked for: the data (a manifest, or a dataset ``layout`` under
    ``root``), the backbone, the profile and the config file to write."""

    backbone: str
    out: str | Path
    profile: str = "smoke"
    manifest: str | Path | None = None
    layout: str | None = None
    root: str | Path | None = None
    task: str | None = None
    name: str | None = None
    storage: str = "./pefttune-results"
    force: bool = False


@dataclass
class DataSummary:
    """The checked data: the config's ``data`` section and what the comments say about it."""

    source: str
    path: str
    task: str
    manifest: Path
    counts: dict[str, int]
    labels: int | None = None
    speakers: int | None = None
    task_note: str = ""

    @property
    def task_kind(self) -> str:
        return "ctc" if self.task in CTC_TASKS else "classification"

    def describe(self) -> str:
        text = ", ".join(f"{split} {self.counts.get(split, 0)}" for split in ("train", "dev", "test")) + " clips"
        if self.labels is not None:
            text += f"; {self.labels} labels"
        if self.speakers is not None:
            text += f"; {self.speakers} speakers"
        return text


@dataclass
class Written:
    """What :func:`write_starter` wrote, and what to run next."""

    path: Path
    profile: Profile
    data: DataSummary
    budget: int | None
    commands: list[str] = field(default_factory=list)

    @property
    def next_command(self) -> str:
        return self.commands[-1]


class StarterError(ValueError):
    """The data or the backbone cannot be used: every problem is listed, nothing was written."""


def _task(starter: Starter, columns) -> tuple[str, str]:
    """(data.task, what it means) from ``--task`` or the manifest's columns."""
    has_label, has_transcript = "label" in columns, "transcript" in columns
    task = starter.task
    if task is None and starter.layout is not None:
        from pefttune.data.layouts import LAYOUT_TASKS

        task = LAYOUT_TASKS[starter.layout]
    if task is None:
        if has_label and not has_transcript:
            task = "custom"
        elif has_transcript and not has_label:
            raise ValueError("data.task: the manifest has a 'transcript' column: pass --task pr (space-separated "
                             "phonemes) or --task asr (characters)")
        elif has_label and has_transcript:
            raise ValueError("data.task: the manifest has both 'label' and 'transcript' columns: pass --task "
                             f"({', '.join(CLASSIFICATION_TASKS)} for 'label'; pr or asr for 'transcript')")
        else:
            task = "custom"  # validate_manifest names the missing 'label' column
    if task in CTC_TASKS:
        unit = "characters" if task == "asr" else "space-separated phonemes"
        return task, f"CTC recognition of the 'transcript' column ({unit})"
    return task, "classification of the 'label' column"


def check_data(starter: Starter) -> DataSummary:
    """Read and check the data as `pefttune run` will: the manifest's columns, splits and labels
    (``pefttune data validate``), then every audio file's header. Raises with the problem."""
    from pefttune.data.check import check_audio
    from pefttune.data.manifest import read_manifest, validate_manifest

    if (starter.manifest is None) == (starter.layout is None):
        raise ValueError("data: give either --manifest FILE or --layout NAME --root DIR")
    if starter.layout is not None:
        from pefttune.data.sources import layout_manifest

        if starter.root is None:
            raise ValueError(f"data: --layout {starter.layout} needs --root DIR (the dataset folder)")
        source, path = starter.layout, str(Path(starter.root).expanduser().resolve())
        options = {"target": "phonemes" if starter.task == "pr" else "chars"} if starter.layout == "librispeech" else {}
        manifest = layout_manifest(starter.layout, path, **options)
    else:
        source, path = "manifest", str(Path(starter.manifest).expanduser().resolve())
        manifest = Path(path)
    frame = read_manifest(manifest)
    task, note = _task(starter, frame.columns)
    kind = "ctc" if task in CTC_TASKS else "classification"
    where = f"{path}" if source == "manifest" else f"{path} (manifest {manifest})"
    try:
        validate_manifest(frame, kind, unit="char" if task == "asr" else "phoneme")
        check_audio(frame)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"data.path: {where}: {err}") from None
    counts = {str(k): int(v) for k, v in frame["split"].value_counts().items()}
    labels = int(frame["label"].nunique()) if kind == "classification" else None
    speakers = int(frame["speaker"].nunique()) if "speaker" in frame.columns else None
    return DataSummary(source, path, task, Path(manifest), counts, labels, speakers, note)


def check_backbone(name: str):
    """The backbone's shape (:class:`~pefttune.backbones.BackboneInfo`), checked as `pefttune run`
    checks it: a local directory needs config.json and safetensors weights; a Hugging Face id
    must resolve (offline: from the local cache)."""
    from pefttune.backbones import backbone_info

    path = Path(name).expanduser()
    return backbone_info(str(path.resolve()) if path.exists() else name)


def default_budget(config: StudyConfig, info) -> tuple[int | None, str]:
    """The budget of a starter config: the PEFT parameters of the profile's largest uniform
    candidate (each hyper-parameter at its largest listed value, in every layer), rounded up to
    two significant digits (the rule the shipped SUPERB config follows: uniform Houlsby b=32 on
    HuBERT base, 1,198,848 -> 1,200,000), and a note on how it was made."""
    from pefttune.placement import Placement

    best, note = 0, ""
    for method, choices in config.candidate_choices().items():
        if method == "hybrid":
            continue
        hparams = {hp: max(values) if all(isinstance(v, (int, float)) for v in values) else values[0]
                   for hp, values in choices.items()}
        params = Placement.uniform(method, info.num_layers, **hparams).trainable_parameters(info)
        if params > best:
            sizes = ", ".join(f"{k}={v}" for k, v in hparams.items())
            best, note = params, f"{method}{f' {sizes}' if sizes else ''} in all {info.num_layers} layers: {params:,}"
    if best == 0:
        return None, "no budget: the backbone has no layer to adapt"
    unit = 10 ** max(len(str(best)) - 2, 0)
    return -(-best // unit) * unit, note


def _value(value) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def starter_text(starter: Starter, chosen: Profile, data: DataSummary, info, budget: int | None,
                 budget_note: str, commands: list[str]) -> str:
    """The commented YAML of a starter config."""
    name = starter.name or Path(starter.out).stem
    local = Path(starter.backbone).expanduser().exists()
    backbone = str(Path(starter.backbone).expanduser().resolve()) if local else starter.backbone
    where = "a local directory" if local else "built in" if "/" not in starter.backbone else "a Hugging Face id"
    lines = [
        f"# A pefttune study of your data and model, written by `pefttune init --profile {chosen.name}`.",
        f"# Run it:       {commands[-1]}",
        f"# Results go to {starter.storage.rstrip('/')}/{name}/ (the report: analysis/report.md).",
        "# Every setting not set below comes from the profile named by `extends:`; set one here to",
        "# override it (a `methods:` here replaces the profile's candidates).",
        "#",
        *textwrap.wrap(f"Profile {chosen.name}: {chosen.summary}", 98, initial_indent="# ", subsequent_indent="# "),
        *textwrap.wrap(f"Expected wall time: {chosen.wall_time}", 98, initial_indent="# ",
                       subsequent_indent="#   "),
        f"extends: {chosen.extends}",
        f"name: {_value(name)}",
        f"backbone: {_value(backbone)}  # {where}: {info.family}, {info.num_layers} layers, hidden {info.hidden_size}",
        "data:",
        f"  source: {data.source}",
        f"  path: {_value(data.path)}  # {data.describe()}",
        f"  task: {data.task}  # {data.task_note}",
    ]
    if budget is not None:
        lines.append(f"budget: {budget}  # max PEFT parameters of a placement: the profile's largest uniform candidate "
                     f"({budget_note}), rounded up")
    lines.append(f"storage: {_value(starter.storage)}  # a local folder, or a URI Ray accepts (s3://...)")
    return "\n".join(lines) + "\n"


def write_starter(starter: Starter) -> Written:
    """Check the data and the backbone, then write the starter config (see the module docstring).

    Raises:
        StarterError: every problem found (the output file exists without ``force``, the data,
            the backbone), one per line; nothing is written.
    """
    chosen = profile(starter.profile)
    out = Path(starter.out).expanduser()
    problems = []
    if out.exists() and not starter.force:
        problems.append(f"--out: {out} exists; pass --force to replace it, or choose another file")
    elif out.suffix not in (".yaml", ".yml"):
        problems.append(f"--out: {out} should end in .yaml")
    data = info = None
    try:
        data = check_data(starter)
    except (ValueError, FileNotFoundError) as err:
        problems.append(str(err))
    try:
        info = check_backbone(starter.backbone)
    except (ValueError, FileNotFoundError) as err:
        problems.append(str(err))
    if problems:
        raise StarterError("nothing written; fix these first:\n" + "\n".join(f"  {p}" for p in problems))
    budget, note = default_budget(load_config(chosen.path), info)
    commands = [f"pefttune run {shlex.quote(str(starter.out))}"]
    text = starter_text(starter, chosen, data, info, budget, note, commands)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".yaml", dir=out.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        load_config(tmp)  # the written config is valid as `pefttune run` reads it
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Written(out, chosen, data, budget, commands)
