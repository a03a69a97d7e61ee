"""`pefttune info`: backbones, PEFT methods, and a placement's dry run."""
from __future__ import annotations

from pefttune.backbones import SHIPPED, TINY_BACKBONES, BackboneInfo, load_backbone


def register(sub) -> None:
    parser = sub.add_parser("info", help="List backbones and PEFT methods; dry-run a placement.")
    parser.add_argument("--backbone", default="tiny-hubert", help="Backbone name, local dir or HF id (default tiny-hubert).")
    parser.add_argument("--placement", help="Placement JSON/YAML file to check against the backbone.")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.methods import get_method, method_names
    from pefttune.placement import Placement

    encoder = load_backbone(args.backbone)
    info: BackboneInfo = encoder.info
    print(f"built-in backbones: {', '.join(list(TINY_BACKBONES) + list(SHIPPED))}")
    print(
        f"backbone {info.name}: {info.family}, {info.num_layers} layers, hidden {info.hidden_size}, "
        f"ffn {info.intermediate_size}, {info.num_heads} heads"
    )
    print("\nmethod        params/layer  hyper-parameters (defaults)")
    for name in method_names():
        spec = get_method(name)
        hp = spec.resolve({}, name)
        print(f"{name:<13} {spec.count(info, hp):>12,}  {', '.join(f'{k}={v}' for k, v in hp.items()) or '-'}")
        print(f"{'':<27}{spec.description}")
    if args.placement:
        placement = Placement.load(args.placement)
        placement.validate_for(info)
        print(f"\nplacement {args.placement}: {placement.short()}")
        for index, layer in enumerate(placement.layers):
            for choice in layer:
                print(f"  layer {index:>2}: {choice.short():<24} {choice.count(info):>10,} params")
        print(f"  total trainable PEFT parameters: {placement.trainable_parameters(info):,}")
    return 0
