"""`pefttune backbone pretrain`: self-supervised pretraining of a tiny speech encoder."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("backbone", help="Pretrain a tiny self-supervised speech encoder.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    pre = actions.add_parser(
        "pretrain",
        help="HuBERT-style masked prediction (or wav2vec 2.0 contrastive) on a synthesized corpus.",
        description=(
            "Pretrain a tiny HuBERT (or wav2vec 2.0) encoder from scratch on synthesized English words "
            "and phrases (keyword-spotting words excluded). Writes a transformers model directory "
            "(config.json + model.safetensors) loadable with load_backbone(DIR), plus provenance.json. "
            "Give --minutes and/or --steps, or --replay-schedule."
        ),
    )
    pre.add_argument("--out", required=True, help="Output model directory.")
    pre.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out.")
    pre.add_argument("--objective", default="hubert", choices=("hubert", "wav2vec2"),
                     help="hubert: masked prediction of k-means log-mel clusters (default); "
                          "wav2vec2: contrastive with a quantizer.")
    pre.add_argument("--minutes", type=float,
                     help="Training time budget; the learning-rate schedule follows the time used.")
    pre.add_argument("--steps", type=int, help="Optimizer steps (exactly reproducible).")
    pre.add_argument("--replay-schedule", metavar="FILE",
                     help="Replay an earlier run step for step: its schedule.json (or model dir); "
                          "give the other options as in its recorded command.")
    pre.add_argument("--seed", type=int, default=0, help="Model / masking / batch-order seed (default 0).")
    group = pre.add_argument_group("corpus")
    group.add_argument("--utterances", type=int, default=4000, help="Synthesized clips (default 4000).")
    group.add_argument("--seconds", type=float, default=2.0, help="Clip length in seconds (default 2).")
    group.add_argument("--corpus-seed", type=int, default=0, help="Seed of the corpus recipe (default 0).")
    group.add_argument("--variants", default=None,
                       help="eSpeak voice variants: 'all' (every installed one) or a comma list ('none' = plain "
                            "voice); default: the 39 of CorpusRecipe.")
    group.add_argument("--noise-kinds", default="white,brown",
                       help="Background noise kinds, comma list of white,pink,brown,hum (default white,brown).")
    group.add_argument("--snr", default="5,40", help="SNR range in dB of the added noise, LOW,HIGH (default 5,40).")
    group.add_argument("--noise-prob", type=float, default=0.8, help="Fraction of clips with noise (default 0.8).")
    group.add_argument("--speed", default="1,1",
                       help="Speed perturbation factor range LOW,HIGH (resampling; default 1,1 = off).")
    group.add_argument("--reverb-prob", type=float, default=0.0,
                       help="Fraction of clips convolved with a synthetic room impulse response (default 0).")
    group.add_argument("--rt60", default="0.15,0.8", help="RT60 range in seconds of those responses (default 0.15,0.8).")
    group = pre.add_argument_group("model")
    group.add_argument("--hidden-size", type=int, default=128)
    group.add_argument("--layers", type=int, default=4)
    group.add_argument("--intermediate-size", type=int, default=256)
    group.add_argument("--heads", type=int, default=4)
    group = pre.add_argument_group("training")
    group.add_argument("--clusters", type=int, default=100, help="k-means clusters (hubert; default 100).")
    group.add_argument("--targets", default="logmel",
                       help="hubert iteration-1 codebooks, comma list of logmel,mfcc39 (one k-means each; the "
                            "loss averages them; default logmel).")
    group.add_argument("--mask-prob", type=float, default=0.08,
                       help="Probability that a frame starts a masked span (default 0.08).")
    group.add_argument("--mask-length", type=int, default=10, help="Frames per masked span (default 10).")
    group.add_argument("--unmasked-weight", type=float, default=0.0,
                       help="Weight of the cluster cross-entropy at unmasked frames, added to the masked one "
                            "(HuBERT's 1 - alpha; default 0: masked frames only).")
    group.add_argument("--iter2-at", type=float, default=None,
                       help="hubert iteration 2: at this fraction of the run, switch the targets to k-means of "
                            "a hidden state of the model being trained (default: off).")
    group.add_argument("--iter2-layer", type=int, default=2, help="Hidden state clustered by --iter2-at (default 2).")
    group.add_argument("--iter2-clusters", type=int, default=None, help="Clusters of iteration 2 (default --clusters).")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--lr", type=float, default=2e-3, help="Peak learning rate (default 2e-3).")
    group.add_argument("--warmup", type=float, default=0.08, help="Warmup fraction of the run (default 0.08) ...")
    group.add_argument("--warmup-steps", type=int, default=200, help="... and at least this many steps (default 200).")
    group.add_argument("--eval-utterances", type=int, default=64, help="Held-out clips for the masked loss.")
    group.add_argument("--threads", type=int, default=2, help="torch threads (default 2).")
    group.add_argument("--log-every", type=float, default=30.0, help="Seconds between progress lines.")
    group.add_argument("--stop-after", type=int, default=None,
                       help="Stop after this many steps of the given schedule (checks a prefix of a long run: "
                            "the weights must match its provenance's steps.state_sha256 entry).")
    pre.set_defaults(func=run_pretrain)


def run_pretrain(args) -> int:
    from pefttune.demo.pretraining import CorpusRecipe, PretrainConfig, pretrain
    from pefttune.demo.pretraining.corpus import all_variants
    from pefttune.demo.pretraining.train import command_line, load_schedule

    def pair(text: str, name: str) -> tuple[float, float]:
        try:
            low, high = (float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"--{name}: expected LOW,HIGH, got {text!r}") from None
        return low, high

    extra = {}
    if args.variants is not None:
        extra["variants"] = all_variants() if args.variants == "all" else tuple(
            "" if v == "none" else v for v in args.variants.split(","))
    recipe = CorpusRecipe(
        utterances=args.utterances, seconds=args.seconds, seed=args.corpus_seed,
        noise_kinds=tuple(args.noise_kinds.split(",")), snr_db=pair(args.snr, "snr"), noise_prob=args.noise_prob,
        speed=pair(args.speed, "speed"), reverb_prob=args.reverb_prob, rt60=pair(args.rt60, "rt60"), **extra,
    )
    config = PretrainConfig(
        objective=args.objective, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers,
        intermediate_size=args.intermediate_size, num_heads=args.heads, num_clusters=args.clusters,
        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, warmup_steps=args.warmup_steps, steps=args.steps,
        minutes=args.minutes, eval_utterances=args.eval_utterances, threads=args.threads,
        log_every_s=args.log_every, corpus=recipe, targets=tuple(args.targets.split(",")),
        mask_prob=args.mask_prob, mask_length=args.mask_length, iter2_at=args.iter2_at, iter2_layer=args.iter2_layer,
        iter2_clusters=args.iter2_clusters, stop_after=args.stop_after, unmasked_weight=args.unmasked_weight,
        schedule=load_schedule(args.replay_schedule) if args.replay_schedule else None,
    )
    command = command_line(config, args.out, args.replay_schedule) + (" --overwrite" if args.overwrite else "")
    result = pretrain(config, args.out, command=command, overwrite=args.overwrite,
                      log=lambda line: print(line, flush=True))
    final = result.provenance["final"]
    print(f"final train loss {final['train_loss']}, masked accuracy {final['train_masked_accuracy']}; "
          f"held-out loss {final['heldout_loss']}, masked accuracy {final['heldout_masked_accuracy']}")
    print(f"{result.provenance['steps']['completed']} steps; command: {result.provenance['command']}")
    return 0
