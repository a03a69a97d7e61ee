"""`pefttune init`: a starter config for your own data and model (:mod:`pefttune.profiles`).

    pefttune init --manifest data/manifest.csv --backbone models/my-hubert --profile smoke --out smoke.yaml
    pefttune init --layout speech_commands --root /data/sc --backbone facebook/hubert-base-ls960 \\
        --profile gpu --out study.yaml
"""
from __future__ import annotations

import textwrap


def register(sub) -> None:
    from pefttune.profiles import CLASSIFICATION_TASKS, CTC_TASKS, PROFILES

    parser = sub.add_parser(
        "init",
        help="Write a starter config for your data and model (checked first), from a profile.",
        description="Check a manifest (or a dataset in a standard layout) and a backbone, then write a commented "
        "config that extends a shipped profile: smoke (minutes on a laptop CPU, to see the report), laptop (CPU "
        "cores), gpu (one GPU), cluster (a Ray cluster of GPU nodes). Every problem is named and nothing is "
        "written while there is one; an existing file is replaced only with --force.",
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", help="Manifest file (.csv, .tsv, .parquet): path, split, label or transcript, "
                      "optional speaker.")
    from pefttune.data.layouts import LAYOUTS

    data.add_argument("--layout", choices=sorted(LAYOUTS), help="A dataset in a standard layout (with --root).")
    parser.add_argument("--root", help="The dataset folder of --layout (only read).")
    parser.add_argument("--backbone", required=True,
                        help="A local save_pretrained directory (config.json + model.safetensors), a built-in name, "
                        "or a Hugging Face id (needs network or the local cache).")
    parser.add_argument("--profile", required=True, choices=PROFILES, help="The settings to start from.")
    parser.add_argument("--out", required=True, help="The config file to write (.yaml).")
    parser.add_argument("--task", choices=[*CLASSIFICATION_TASKS, *CTC_TASKS],
                        help="data.task (default: custom for a 'label' column, the layout's task for --layout).")
    parser.add_argument("--name", help="Experiment name: results go to <storage>/<name>/ (default: --out's stem).")
    parser.add_argument("--storage", default="./pefttune-results", help="Where results go (default ./pefttune-results).")
    parser.add_argument("--force", action="store_true", help="Replace --out if it exists.")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.profiles import Starter, write_starter

    written = write_starter(Starter(
        backbone=args.backbone, out=args.out, profile=args.profile, manifest=args.manifest, layout=args.layout,
        root=args.root, task=args.task, name=args.name, storage=args.storage, force=args.force,
    ))
    print(f"wrote {written.path}: profile {written.profile.name}, {written.data.task} on {written.data.describe()}")
    print(textwrap.fill(f"expected wall time: {written.profile.wall_time}", 100, subsequent_indent="  "))
    print(f"next: {written.next_command}")
    return 0
