"""Placements: parameter-count formulas (the study's numbers), forms, serialisation,
validation errors, application, and the `pefttune info` dry run."""
from __future__ import annotations

import json

import pytest
import yaml

from helpers import fresh_encoder, make_model
from pefttune.backbones import BackboneInfo
from pefttune.cli import main
from pefttune.methods import get_method, method_names
from pefttune.placement import MethodChoice, Placement, apply_placement

BASE = BackboneInfo("base", "hubert", 12, 768, 3072, 12)  # wav2vec 2.0 / HuBERT / WavLM base shape
TINY = BackboneInfo("tiny-hubert", "hubert", 4, 64, 128, 4)


# -- parameter counts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "hparams", "per_layer"),
    [
        # the study's numbers
        ("sequential", {"bottleneck": 32}, 49_952),
        ("parallel", {"bottleneck": 32}, 49_952),
        ("lora", {"rank": 8, "targets": ["q_proj", "v_proj"]}, 24_576),
        ("bitfit", {}, 8_448),
        # the README table
        ("houlsby", {"bottleneck": 32}, 99_904),
        ("prefix", {"length": 8}, 12_288),
        ("adapterbias", {}, 1_537),
        ("ia3", {}, 4_608),
        ("none", {}, 0),
        # other hyper-parameters
        ("sequential", {"bottleneck": 64}, 2 * 768 * 64 + 64 + 768),
        ("lora", {"rank": 4, "targets": ["intermediate_dense"]}, 4 * (768 + 3072)),
        ("lora", {"rank": 2, "targets": ["q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"]},
         2 * (4 * 2 * 768 + 2 * (768 + 3072))),
        # q_proj scales its output (D); both FFN linears are peft "feedforward" targets: input scaled (D)
        ("ia3", {"targets": ["q_proj", "intermediate_dense"]}, 768 + 768),
        ("prefix", {"length": 3}, 2 * 3 * 768),
    ],
)
def test_per_layer_counts_at_base_shape(method, hparams, per_layer):
    assert get_method(method).count(BASE, get_method(method).resolve(hparams, "test")) == per_layer
    uniform = Placement.uniform(method, 12, **hparams)
    assert uniform.trainable_parameters(BASE) == 12 * per_layer
    one_layer = Placement.from_dict({"num_layers": 12, "layers": {"5": {"method": method, **hparams}}})
    assert one_layer.trainable_parameters(BASE) == per_layer


def test_hybrid_counts_add_up():
    mix = Placement.uniform(["sequential", "parallel", "lora"], 12)  # the study's "mix"
    assert mix.trainable_parameters(BASE) == 12 * (49_952 + 49_952 + 24_576)
    hybrid = Placement.uniform(["houlsby", "lora"], 12, houlsby={"bottleneck": 16}, lora={"rank": 4})
    assert hybrid.trainable_parameters(BASE) == 12 * (2 * (2 * 768 * 16 + 16 + 768) + 4 * 4 * 768)
    sparse = Placement.from_dict({"num_layers": 12, "layers": {"0": "bitfit", "11": ["lora", "ia3"]}})
    assert sparse.trainable_parameters(BASE) == 8_448 + 24_576 + 4_608


# -- forms and serialisation ----------------------------------------------------------------------------


def test_from_dict_forms_are_equivalent():
    full = Placement.from_dict(
        {"num_layers": 4, "layers": [[{"method": "lora", "rank": 8}], [], [{"method": "houlsby"}, "lora"], []]}
    )
    bare = Placement.from_dict({"layers": ["lora", "none", ["houlsby", "lora"], None]})
    sparse = Placement.from_dict({"num_layers": 4, "layers": {"0": "lora", 2: ["houlsby", {"method": "lora"}]}})
    nested = Placement.from_dict(
        {"layers": [{"method": "lora", "hparams": {"rank": 8}}, [], ["houlsby", "lora", "none"], "none"]}
    )
    assert full == bare == sparse == nested
    assert full.layers[0] == (MethodChoice("lora", {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ("q_proj", "v_proj")}),)
    assert full.layer_methods() == ["lora", "none", "houlsby+lora", "none"]
    assert full.lowest_adapted_layer() == 0
    assert Placement.from_dict({"num_layers": 4, "layers": {"3": "bitfit"}}).lowest_adapted_layer() == 3
    assert Placement.uniform("none", 4).lowest_adapted_layer() is None
    assert Placement.uniform("none", 4).layer_methods() == ["none"] * 4


def test_short_string():
    placement = Placement.from_dict(
        {"num_layers": 4, "layers": {"0": "lora", "2": [{"method": "sequential", "bottleneck": 16}, "lora"]}}
    )
    assert placement.short() == "L0:lora(r=8) L1:none L2:sequential(b=16)+lora(r=8) L3:none"
    assert str(placement) == placement.short()
    assert Placement.uniform("parallel", 1, scale=0.5).short() == "L0:parallel(b=32,s=0.5)"
    assert Placement.uniform(["houlsby", "bitfit", "prefix", "adapterbias", "ia3"], 1).short() == (
        "L0:houlsby(b=32)+bitfit+prefix(p=8)+adapterbias+ia3"
    )


ROUND_TRIP = [
    Placement.uniform("lora", 4, rank=2, targets=["q_proj", "output_dense"]),
    Placement.uniform(["sequential", "parallel", "lora"], 4, parallel={"scale": 4.0, "source": "ffn"}),
    Placement.from_dict({"num_layers": 4, "layers": {"1": ["houlsby", "bitfit"], "3": [{"method": "prefix", "length": 2}, "ia3"]}}),
    Placement.uniform("none", 4),
]


@pytest.mark.parametrize("placement", ROUND_TRIP, ids=lambda p: p.short())
def test_json_and_yaml_round_trip(placement, tmp_path):
    assert Placement.from_json(placement.to_json()) == placement
    assert Placement.from_dict(json.loads(json.dumps(placement.to_dict()))) == placement
    placement.save(tmp_path / "p.json")
    assert Placement.load(tmp_path / "p.json") == placement
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(placement.to_dict()))
    assert Placement.load(tmp_path / "p.yaml") == placement
    data = placement.to_dict()
    assert data["num_layers"] == 4 and len(data["layers"]) == 4
    # every hyper-parameter is written out (defaults included), as plain JSON types
    for layer, choices in zip(data["layers"], placement.layers):
        for entry, choice in zip(layer, choices):
            assert set(entry) == {"method", *get_method(choice.method).hparams}
    assert placement.trainable_parameters(TINY) == Placement.load(tmp_path / "p.yaml").trainable_parameters(TINY)


def test_yaml_hand_written(tmp_path):
    (tmp_path / "p.yml").write_text(
        "num_layers: 4\nlayers:\n  0: lora\n  2:\n    - method: sequential\n      bottleneck: 16\n    - lora\n"
    )
    assert Placement.load(tmp_path / "p.yml").short() == "L0:lora(r=8) L1:none L2:sequential(b=16)+lora(r=8) L3:none"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Placement.load(tmp_path / "missing.yaml")


# -- validation ---------------------------------------------------------------------------------------------

INVALID = [
    # (id, placement dict, [fragments the message must contain])
    ("unknown-method", {"layers": ["lora", "lorra", "none", "none"]}, ["placement.layers[1].method", "lorra"]),
    ("unknown-method-in-hybrid", {"layers": [[], ["lora", {"method": "adaptr"}], [], []]},
     ["placement.layers[1][1].method", "adaptr"]),
    ("layer-out-of-range", {"num_layers": 4, "layers": {"4": "lora"}}, ["placement.layers", "layer 4", "out of range"]),
    ("negative-layer", {"num_layers": 4, "layers": {"-1": "lora"}}, ["placement.layers", "layer -1"]),
    ("layer-key-not-int", {"num_layers": 4, "layers": {"first": "lora"}}, ["placement.layers", "'first'"]),
    ("count-mismatch", {"num_layers": 3, "layers": ["lora"] * 4}, ["placement.layers", "4 entries", "num_layers is 3"]),
    ("num-layers-not-int", {"num_layers": "four", "layers": {"0": "lora"}}, ["placement.num_layers", "'four'"]),
    ("num-layers-str-int", {"num_layers": "4", "layers": {"0": "lora"}}, ["placement.num_layers"]),
    ("sparse-without-num-layers", {"layers": {"0": "lora"}}, ["placement.num_layers", "required"]),
    ("empty", {"layers": []}, ["placement.layers", "non-empty"]),
    ("no-layers", {"num_layers": 4}, ["'layers'"]),
    ("negative-rank", {"layers": [[], [], [{"method": "lora", "rank": -1}], []]}, ["placement.layers[2].lora.rank", ">= 1", "-1"]),
    ("zero-bottleneck", {"layers": [{"method": "houlsby", "bottleneck": 0}]}, ["placement.layers[0].houlsby.bottleneck", ">= 1"]),
    ("unknown-hparam", {"layers": [{"method": "lora", "rnk": 4}]}, ["placement.layers[0].lora", "'rnk'", "rank"]),
    ("hparam-on-bitfit", {"layers": ["none", {"method": "bitfit", "rank": 4}]}, ["placement.layers[1].bitfit", "'rank'"]),
    ("rank-wrong-type", {"layers": [{"method": "lora", "rank": "8"}]}, ["placement.layers[0].lora.rank", "integer"]),
    ("rank-float", {"layers": [{"method": "lora", "rank": 2.5}]}, ["placement.layers[0].lora.rank", "integer"]),
    ("rank-bool", {"layers": [{"method": "lora", "rank": True}]}, ["placement.layers[0].lora.rank", "integer"]),
    ("scale-wrong-type", {"layers": [{"method": "parallel", "scale": "big"}]}, ["placement.layers[0].parallel.scale", "number"]),
    ("activation-choice", {"layers": [{"method": "sequential", "activation": "swish"}]},
     ["placement.layers[0].sequential.activation", "swish"]),
    ("dropout-above-1", {"layers": [{"method": "lora", "dropout": 1.5}]}, ["placement.layers[0].lora.dropout", "<= 1"]),
    ("target-choice", {"layers": [{"method": "lora", "targets": ["q_proj", "x_proj"]}]},
     ["placement.layers[0].lora.targets", "x_proj"]),
    ("target-empty", {"layers": [{"method": "ia3", "targets": []}]}, ["placement.layers[0].ia3.targets", "non-empty"]),
    ("target-duplicate", {"layers": [{"method": "lora", "targets": ["q_proj", "q_proj"]}]},
     ["placement.layers[0].lora.targets", "duplicate"]),
    ("same-method-twice", {"layers": [[], ["lora", {"method": "lora", "rank": 4}], [], []]},
     ["placement.layers[1]", "'lora'", "twice"]),
    ("entry-without-method", {"layers": [{"rank": 4}]}, ["placement.layers[0]", "'method'"]),
    ("entry-wrong-type", {"layers": [42]}, ["placement.layers[0]", "42"]),
]


@pytest.mark.parametrize(("data", "fragments"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_placements_raise_value_error_naming_layer_and_field(data, fragments, tmp_path):
    with pytest.raises(ValueError) as err:
        Placement.from_dict(data)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    # the same from a file: the message also names the file
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        Placement.load(path)
    assert str(path) in str(err.value) and fragments[0] in str(err.value)


def test_wrong_num_layers_for_backbone():
    three = Placement.uniform("lora", 3)
    for check in (lambda: three.validate_for(TINY), lambda: three.trainable_parameters(TINY)):
        with pytest.raises(ValueError, match=r"placement\.num_layers: .*3 layers .*tiny-hubert has 4"):
            check()
    encoder = fresh_encoder("tiny-hubert")
    with pytest.raises(ValueError, match=r"placement\.num_layers"):
        apply_placement(encoder, three)
    assert not any(hasattr(layer, "pefttune") for layer in encoder.layers)  # nothing half-applied
    with pytest.raises(ValueError, match=r"num_layers: must be >= 1"):
        Placement.uniform("lora", 0)


def test_projection_methods_nest_in_one_layer_and_detach_in_any_order():
    """LoRA and IA3 both adapting v_proj share a layer: IA3 wraps LoRA's wrapper, both train,
    and detaching either one first leaves the other in place and the frozen projection inside."""
    import torch

    encoder = fresh_encoder("tiny-wavlm")
    frozen = encoder.layers[2].attention.v_proj
    placement = Placement.from_dict({"num_layers": 4, "layers": {"2": ["lora", "ia3"]}})
    lora, ia3 = apply_placement(encoder, placement)[2]
    outer = encoder.layers[2].attention.v_proj
    assert hasattr(outer, "ia3_l") and hasattr(outer.base_layer, "lora_A") and outer.base_layer.base_layer is frozen
    for method in (lora, ia3):
        method.perturb_(0.1)
    x = torch.randn(2, 5, frozen.in_features)
    out = outer(x)
    out.pow(2).sum().backward()
    v_params = [outer.ia3_l["default"], outer.base_layer.lora_A["default"].weight, outer.base_layer.lora_B["default"].weight]
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in v_params)
    assert not frozen.weight.requires_grad
    lora.detach()  # the inner one first: spliced out of the chain
    assert encoder.layers[2].attention.v_proj is outer and outer.base_layer is frozen
    ia3.detach()
    assert encoder.layers[2].attention.v_proj is frozen


def test_apply_placement_twice_is_refused():
    encoder = fresh_encoder("tiny-hubert")
    attached = apply_placement(encoder, Placement.uniform("lora", 4))
    assert [len(m) for m in attached] == [1, 1, 1, 1]
    assert all(list(layer.pefttune) == ["lora"] for layer in encoder.layers)
    with pytest.raises(ValueError, match="already holds a placement"):
        apply_placement(encoder, Placement.uniform("bitfit", 4))


def test_placement_attaches_the_right_modules_per_layer():
    placement = Placement.from_dict(
        {"num_layers": 4, "layers": {"0": "lora", "2": ["houlsby", "bitfit"], "3": [{"method": "prefix", "length": 2}]}}
    )
    model = make_model("tiny-wavlm", placement)
    assert [list(layer.pefttune) for layer in model.encoder.layers] == [["lora"], [], ["houlsby", "bitfit"], ["prefix"]]
    assert [[type(m).__name__ for m in layer] for layer in model.methods] == [
        ["LoRA"], [], ["SequentialAdapter", "BitFit"], ["Prefix"]
    ]
    layers = model.encoder.layers
    assert hasattr(layers[0].attention.q_proj, "lora_A") and hasattr(layers[0].attention.v_proj, "lora_A")
    assert not hasattr(layers[0].attention.k_proj, "lora_A") and not hasattr(layers[1].attention.q_proj, "lora_A")
    assert layers[3].attention.pefttune_prefix is not None
    assert getattr(layers[2].attention, "pefttune_prefix", None) is None


# -- the CLI dry run ------------------------------------------------------------------------------------------


def test_cli_info_placement(tmp_path, capsys):
    placement = Placement.from_dict(
        {"num_layers": 4, "layers": {"0": "lora", "2": [{"method": "sequential", "bottleneck": 16}, "lora"]}}
    )
    path = tmp_path / "placement.json"
    placement.save(path)
    assert main(["info", "--backbone", "tiny-wavlm", "--placement", str(path)]) == 0
    out = capsys.readouterr().out
    assert "backbone tiny-wavlm: wavlm, 4 layers, hidden 64, ffn 128, 4 heads" in out
    for name in method_names():
        assert f"\n{name:<13} " in out
    assert f"placement {path}: {placement.short()}" in out
    assert f"total trainable PEFT parameters: {placement.trainable_parameters(TINY):,}" in out
    assert placement.trainable_parameters(TINY) == 2 * (2 * 8 * (64 + 64)) + (2 * 64 * 16 + 16 + 64)
    assert "layer  2: sequential(b=16)" in out


def test_cli_info_rejects_bad_placement(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("layers:\n  - lora\n  - {method: lora, rank: -2}\n  - none\n  - none\n")
    assert main(["info", "--placement", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pefttune info: error:" in err and "placement.layers[1].lora.rank" in err
    path.write_text("layers: [lora, lora, lora]\n")  # 3 layers on a 4-layer backbone
    assert main(["info", "--placement", str(path)]) == 2
    assert "placement.num_layers" in capsys.readouterr().err


def test_uniform_hybrid_hyper_parameters():
    hybrid = Placement.uniform(["houlsby", "lora"], 2, lora={"rank": 4}, houlsby={"bottleneck": 8})
    assert hybrid.short() == "L0:houlsby(b=8)+lora(r=4) L1:houlsby(b=8)+lora(r=4)"
    # flat or misspelt keys for a hybrid would be silently dropped: refused instead
    for bad in ({"rank": 4}, {"lorra": {"rank": 4}}):
        with pytest.raises(ValueError, match="keyed by method name"):
            Placement.uniform(["houlsby", "lora"], 2, **bad)
    with pytest.raises(ValueError, match=r"placement\.layers\[0\]\[1\]\.lora\.rank"):
        Placement.uniform(["houlsby", "lora"], 2, lora={"rank": 0})
