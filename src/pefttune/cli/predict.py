"""`pefttune predict DIR AUDIO... [--out predictions.csv]`."""
from __future__ import annotations

import csv
import sys

from pefttune.cli.common import add_verbose_argument


def register(sub) -> None:
    parser = sub.add_parser("predict", help="Classify or transcribe audio files with an exported model or ensemble.")
    parser.add_argument("model", help="Directory written by `pefttune export-model`.")
    parser.add_argument("audio", nargs="+", help="wav/flac files (any sample rate, mono or stereo).")
    parser.add_argument("--out", help="Write predictions to this CSV file (else print them).")
    parser.add_argument("--batch-size", type=int, default=8)
    add_verbose_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from pefttune.predictor import load_model

    predictor = load_model(args.model)
    if hasattr(predictor, "batch_size"):
        predictor.batch_size = args.batch_size
    predictions = predictor.predict(args.audio)
    rows = []
    for p in predictions:
        value = p.label if p.label is not None else p.transcript
        rows.append({"input": p.input, "prediction": value if p.error is None else "",
                     "probability": "" if p.probability is None else f"{p.probability:.4f}",
                     "error": p.error or ""})
    if args.out:
        out = Path(args.out)
        if out.exists():
            raise FileExistsError(f"--out {out} exists; choose another file")
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} predictions to {out}")
    else:
        for row in rows:
            print(f"{row['input']}\t{row['prediction'] or 'ERROR: ' + row['error']}\t{row['probability']}")
    failed = sum(1 for p in predictions if p.error)
    if failed:
        print(f"{failed} of {len(predictions)} inputs could not be read", file=sys.stderr)
    return 1 if failed == len(predictions) else 0
