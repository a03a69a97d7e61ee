"""`pefttune data`: synthesize corpora, make manifests from dataset layouts, validate.

    pefttune data synth --task ks --out DIR [--seed N] [--per-class N] ...
    pefttune data ensure --task ks [--seed N] [--per-class N]     (cached; prints the manifest)
    pefttune data prepare --layout speech_commands --root DIR --out DIR2
    pefttune data validate MANIFEST --task-kind classification
    pefttune data voices
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="Synthesize offline corpora, make manifests from real datasets, validate manifests.",
        description="Datasets: synthesized offline corpora (ks, sid, pr) and real dataset layouts.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    synth = sub.add_parser("synth", help="Generate a synthesized corpus into a folder.")
    synth.add_argument("--task", required=True, choices=["ks", "sid", "pr"])
    synth.add_argument("--out", required=True, type=Path, help="Output folder (new, empty, or an old corpus).")
    _size_arguments(synth)
    synth.set_defaults(func=_synth)

    ensure = sub.add_parser("ensure", help="Build (once) the cached corpus and print its manifest path.")
    ensure.add_argument("--task", required=True, choices=["ks", "sid", "pr"])
    ensure.add_argument("--cache", type=Path, default=None, help="Cache folder (default: $PEFTTUNE_CACHE or ~/.cache/pefttune).")
    _size_arguments(ensure)
    ensure.set_defaults(func=_ensure)

    from pefttune.data.layouts import LAYOUTS

    prepare = sub.add_parser("prepare", help="Write the manifest of a dataset in a standard layout.")
    prepare.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    prepare.add_argument("--root", required=True, type=Path, help="The dataset folder (only read).")
    prepare.add_argument("--out", required=True, type=Path, help="Folder for manifest.parquet/.csv (outside --root).")
    prepare.add_argument("--test-root", type=Path, default=None, help="speech_commands: the separate v0.01 test set.")
    prepare.add_argument("--target", choices=["chars", "phonemes"], default=None, help="librispeech transcripts.")
    prepare.add_argument("--test-session", type=int, default=None, help="iemocap: held-out session (1-5).")
    prepare.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                         help="Unreadable audio headers: raise, or keep the row with no duration.")
    prepare.set_defaults(func=_prepare)

    validate = sub.add_parser("validate", help="Check a manifest before training.")
    validate.add_argument("manifest", type=Path)
    validate.add_argument("--task-kind", choices=["classification", "ctc"], default="classification")
    validate.add_argument("--vocab", type=Path, default=None, help="CTC: vocabulary JSON to check tokens against.")
    validate.set_defaults(func=_validate)

    voices = sub.add_parser("voices", help="List eSpeak NG voices and variants.")
    voices.set_defaults(func=_voices)


def _size_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=None, help="ks: train clips per class; sid: utterances per speaker.")
    parser.add_argument("--eval-per-class", type=int, default=None, help="ks: dev clips per class.")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help="ks: test clips per class (default 400 for the default corpus, else --eval-per-class).")
    parser.add_argument("--speakers", type=int, default=None, help="Number of synthetic speakers.")
    parser.add_argument("--test-speakers", type=int, default=None,
                        help="ks, pr: speakers of the test split (default 50 for ks, 30 for pr).")
    parser.add_argument("--per-speaker", type=int, default=None, help="sid: utterances per speaker.")
    parser.add_argument("--sentences", type=int, default=None, help="pr: number of sentences.")


def _sizes(args) -> dict:
    from pefttune.demo.synth import DEFAULT_SIZES

    names = {"per_class": args.per_class, "eval_per_class": args.eval_per_class,
             "test_per_class": args.test_per_class, "speakers": args.speakers,
             "test_speakers": args.test_speakers,
             "per_speaker": args.per_speaker, "sentences": args.sentences}
    sizes = {k: v for k, v in names.items() if v is not None}
    allowed = set(DEFAULT_SIZES[args.task]) | ({"per_class"} if args.task == "sid" else set())
    extra = sorted(set(sizes) - allowed)
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise ValueError(f"{flags} do(es) not apply to --task {args.task}")
    return sizes


def _summary(manifest: Path) -> str:
    from pefttune.demo.synth import read_corpus_info

    info = read_corpus_info(manifest.parent)
    clips = ", ".join(f"{k} {v}" for k, v in sorted(info["clips"].items()))
    return f"{info['task']} corpus, seed {info['seed']}, {clips} clips, {info['hours'] * 60:.1f} min of audio"


def _synth(args) -> int:
    from pefttune.demo.synth import build_corpus

    start = time.perf_counter()
    manifest = build_corpus(args.task, args.out, seed=args.seed, **_sizes(args))
    print(f"{manifest}  ({_summary(manifest)}; {time.perf_counter() - start:.1f} s)")
    return 0


def _ensure(args) -> int:
    from pefttune.data.sources import synth_manifest

    manifest = synth_manifest(args.task, seed=args.seed, cache=args.cache, **_sizes(args))
    print(manifest)
    return 0


def _prepare(args) -> int:
    from pefttune.data.layouts import load_layout
    from pefttune.data.manifest import write_manifest

    root = args.root.expanduser().resolve()
    out = args.out.expanduser().resolve()
    if out == root or out.is_relative_to(root):
        raise ValueError(f"--out {out} lies inside the dataset folder {root}; pefttune never writes there")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.parquet").is_file():
        raise FileExistsError(f"--out {out} is not empty and holds no manifest; choose a new or empty folder")
    options = {"on_error": args.on_error}
    if args.test_root is not None:
        if args.layout != "speech_commands":
            raise ValueError("--test-root applies to --layout speech_commands only")
        options["test_root"] = args.test_root
    if args.target is not None:
        if args.layout != "librispeech":
            raise ValueError("--target applies to --layout librispeech only")
        options["target"] = args.target
    if args.test_session is not None:
        if args.layout != "iemocap":
            raise ValueError("--test-session applies to --layout iemocap only")
        options["test_session"] = args.test_session
    df = load_layout(args.layout, root, **options)
    manifest = write_manifest(df, out)
    counts = df["split"].value_counts()
    print(f"{manifest}  ({', '.join(f'{s} {int(counts.get(s, 0))}' for s in ('train', 'dev', 'test'))} rows)")
    return 0


def _validate(args) -> int:
    from pefttune.data.manifest import read_manifest, validate_manifest
    from pefttune.data.vocab import load_vocab

    df = read_manifest(args.manifest)
    vocab = load_vocab(args.vocab) if args.vocab is not None else None
    try:
        validate_manifest(df, args.task_kind, vocab=vocab)
    except (ValueError, FileNotFoundError) as err:  # the message names the manifest
        raise type(err)(f"{args.manifest}: {err}") from None
    counts = df["split"].value_counts()
    print(f"{args.manifest}: ok ({', '.join(f'{s} {int(counts.get(s, 0))}' for s in ('train', 'dev', 'test'))} rows)")
    return 0


def _voices(args) -> int:
    from pefttune.data import espeak

    print("voices:   " + " ".join(espeak.list_voices()))
    print("variants: " + " ".join(espeak.list_variants()))
    return 0
