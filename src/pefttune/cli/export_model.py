"""`pefttune export-model EXPERIMENT (--trial ID | --best | --ensemble MEMBERS) [--merged] --out DIR`."""
from __future__ import annotations

from pefttune.cli.common import add_verbose_argument


def register(sub) -> None:
    parser = sub.add_parser(
        "export-model",
        help="Write a self-contained model (or ensemble) directory from an experiment's trials.",
    )
    parser.add_argument("experiment", help="Experiment folder or URI (<storage>/<name>).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", help="One trial id.")
    which.add_argument("--best", action="store_true", help="The best trial on dev.")
    which.add_argument("--ensemble", metavar="MEMBERS", help="top-5 | top-K | per-method | id1,id2,...")
    parser.add_argument("--strategy", help="Ensemble strategy: vote|weighted|soft (CTC: frame_vote|posterior_avg|rover).")
    parser.add_argument("--merged", action="store_true",
                        help="Fold the PEFT weights into the backbone: a plain transformers model directory "
                             "(AutoModel.from_pretrained) with the head beside it. LoRA, IA3 and BitFit only.")
    parser.add_argument("--out", required=True, help="New directory to write (must not exist or be empty).")
    add_verbose_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.predictor import export_model

    out = export_model(args.experiment, args.out, trial=args.trial, best=args.best, ensemble=args.ensemble,
                       strategy=args.strategy, merged=args.merged)
    print(f"exported to {out} (load with pefttune.predictor.load_model or `pefttune predict {out} AUDIO...`)")
    if args.merged:
        print(f"  merged: transformers.AutoModel.from_pretrained({str(out)!r}) loads it without pefttune; "
              "README.md shows how to apply the head")
    return 0
