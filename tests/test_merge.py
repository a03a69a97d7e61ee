"""Merged exports: LoRA, IA3 and BitFit folded into a plain transformers model (pefttune.merge)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from pefttune.backbones import FAMILIES, build_tiny_model, load_backbone, shipped_dir, transformers_reference
from pefttune.heads import HeadConfig
from pefttune.merge import (
    HEAD_FILE,
    MERGED_FROM_FILE,
    check_mergeable,
    head_recipe,
    load_merged,
    merge_backbone,
    save_merged,
    unmergeable,
)
from pefttune.model import build_model
from pefttune.placement import Placement

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"]

#: Every mergeable method, alone and stacked on one projection in both wrapping orders.
MIXED = {"num_layers": 4, "layers": [
    [{"method": "lora", "rank": 3, "targets": ALL_LINEARS}, "ia3", "bitfit"],  # IA3 wraps LoRA on k, v, output_dense
    ["ia3", {"method": "lora", "rank": 2, "alpha": 5.0}],  # LoRA wraps IA3 on v_proj
    ["bitfit"],
    [],
]}


def _perturbed(backbone, placement: dict, head: HeadConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(backbone, Placement.from_dict(placement), head).eval()
    for layer in model.methods:
        for method in layer:
            method.perturb_(0.2)  # LoRA B off zero, IA3 off one, BitFit deltas off zero
    with torch.no_grad():
        for param in model.head.parameters():
            param.add_(torch.randn_like(param) * 0.5)
        for name, buffer in model.head.named_buffers():  # PooledNorm's statistics, as training leaves them
            if name.endswith("running_mean"):
                buffer.add_(torch.randn_like(buffer))
            elif name.endswith("running_var"):
                buffer.mul_(torch.rand_like(buffer) * 3 + 0.1)
    return model


def _padded_batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(3, 8000, generator=generator)
    mask = torch.ones(3, 8000, dtype=torch.long)
    for row, length in ((1, 5600), (2, 3200)):
        values[row, length:] = 0.0
        mask[row, length:] = 0
    return values, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_backbone_is_the_stock_model_with_the_adapted_hidden_states(family):
    model = _perturbed(f"tiny-{family}", MIXED, HeadConfig("classification", 3))
    merged = merge_backbone(model)
    stock = build_tiny_model(family)
    assert type(merged) is type(stock)
    assert list(merged.state_dict()) == list(stock.state_dict())  # the stock parameter names, no wrapper
    for layer in merged.encoder.layers:  # transformers' own attention, not pefttune's
        assert "forward" not in vars(layer.attention) and not hasattr(layer, "pefttune")
    values, mask = _padded_batch()
    with torch.no_grad():
        ours, _ = model.encoder(values, mask)
        theirs = merged(values, attention_mask=mask, output_hidden_states=True).hidden_states
        plain = stock.eval()(values, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(theirs) == len(ours) == 5
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.allclose(a, b, atol=1e-4), (family, index, float((a - b).abs().max()))
    assert (ours[-1] - plain[-1]).abs().max() > 0.1  # the methods changed the encoder: not a no-op merge
    # the frozen backbone itself is untouched by merging
    assert torch.equal(model.encoder.frozen_state_dict()["encoder.layers.0.attention.q_proj.weight"],
                       stock.state_dict()["encoder.layers.0.attention.q_proj.weight"])


def test_unmergeable_placements_are_refused_naming_every_layer_and_method():
    placement = Placement.from_dict({"num_layers": 5, "layers": [
        "lora",
        {"method": "hybrid", "sequential": {"bottleneck": 4}, "parallel": {"bottleneck": 4}, "lora": {"rank": 2}},
        "prefix",
        ["bitfit", "houlsby"],
        "adapterbias",
    ]})
    assert unmergeable(placement) == {1: ("sequential", "parallel"), 2: ("prefix",), 3: ("houlsby",),
                                      4: ("adapterbias",)}
    with pytest.raises(ValueError) as err:
        check_mergeable(placement, where="trial t1")
    message = str(err.value)
    for part in ("trial t1", "layer 1: sequential, parallel", "layer 2: prefix", "layer 3: houlsby",
                 "layer 4: adapterbias", "bitfit, ia3, lora"):
        assert part in message, part
    assert "layer 0" not in message
    check_mergeable(Placement.from_dict(MIXED))  # all mergeable: no error
    model = _perturbed("tiny-hubert", {"num_layers": 4, "layers": {"2": "parallel"}}, HeadConfig("classification", 2))
    with pytest.raises(ValueError, match="layer 2: parallel"):
        merge_backbone(model)


def test_transformers_reference_of_each_kind_of_backbone(tmp_path, monkeypatch):
    assert transformers_reference("facebook/hubert-base-ls960") == "facebook/hubert-base-ls960"
    assert transformers_reference("tiny-hubert-ssl") == str(shipped_dir("tiny-hubert-ssl").resolve())
    assert transformers_reference("tiny-hubert") == "tiny-hubert"  # built in memory: no directory
    build_tiny_model("hubert").save_pretrained(str(tmp_path / "local"))
    monkeypatch.chdir(tmp_path)
    assert transformers_reference("local") == str((tmp_path / "local").resolve())


# The child process: plain transformers + peft (pefttune never imported) on what the parent wrote.
CHILD = textwrap.dedent('''
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from peft import AutoPeftModel

    root = sys.argv[1]
    inputs = load_file(f"{root}/inputs.safetensors")
    input_values, attention_mask = inputs["values"], inputs["mask"]
    results = {}
    for name, recipe in json.load(open(f"{root}/recipes.json")).items():
        directory = f"{root}/{name}"
        exec(recipe)
        results[f"{name}.output"] = output.contiguous()
        results[f"{name}.frame_mask"] = frame_mask.to(torch.uint8).contiguous()
        for i, state in enumerate(hidden):
            results[f"{name}.hidden.{i}"] = state.contiguous()
        results[f"{name}.class"] = torch.tensor([ord(c) for c in type(model).__name__])
    adapter = AutoPeftModel.from_pretrained(f"{root}/peft_adapter").eval()
    with torch.no_grad():
        results["peft.last"] = adapter(input_values, attention_mask=attention_mask).last_hidden_state.contiguous()
    assert "pefttune" not in sys.modules, "the child imported pefttune"
    save_file(results, f"{root}/results.safetensors")
''')

HEADS = {
    "linear": HeadConfig("classification", 4),
    "linear-norm": HeadConfig("classification", 4, norm="batch"),
    "mlp": HeadConfig("classification", 3, kind="mlp", hidden=16),
    "ctc": HeadConfig("ctc", 6),
    "bilstm": HeadConfig("ctc", 5, kind="bilstm", hidden=8),
}


def test_merged_directories_and_the_peft_adapter_load_without_pefttune(tmp_path):
    """On the shipped self-supervised encoder: AutoModel loads each merged directory, the card's
    head recipe gives pefttune's outputs, and AutoPeftModel finds the adapter's base model."""
    from pefttune.predictor import export_peft_adapter

    assert json.loads((shipped_dir("tiny-hubert-ssl") / "config.json").read_text())["architectures"] == ["HubertModel"]
    values, mask = _padded_batch()
    save_file({"values": values, "mask": mask}, str(tmp_path / "inputs.safetensors"))
    models = {}
    for seed, (name, head) in enumerate(HEADS.items()):
        models[name] = _perturbed("tiny-hubert-ssl", MIXED, head, seed=seed)
        save_merged(models[name], tmp_path / name)
    (tmp_path / "recipes.json").write_text(json.dumps({name: head_recipe(head) for name, head in HEADS.items()}))
    lora = _perturbed("tiny-hubert-ssl", {"num_layers": 4, "layers": {"1": {"method": "lora", "rank": 2},
                                                                      "3": {"method": "lora", "rank": 4}}},
                      HeadConfig("classification", 2), seed=9)
    export_peft_adapter(lora, tmp_path / "peft_adapter")
    adapter_config = json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(shipped_dir("tiny-hubert-ssl").resolve())

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = load_file(str(tmp_path / "results.safetensors"))
    for name, model in models.items():
        assert "".join(map(chr, results[f"{name}.class"].tolist())) == "HubertModel"
        with torch.no_grad():
            states, frames = model.encoder(values, mask)
            output, _ = model(values, mask)
        for i, state in enumerate(states):
            assert torch.allclose(results[f"{name}.hidden.{i}"], state, atol=1e-4), (name, i)
        assert torch.equal(results[f"{name}.frame_mask"].bool(), frames)
        valid = frames[..., None] if output.dim() == 3 else torch.ones_like(output, dtype=torch.bool)
        assert torch.allclose(results[f"{name}.output"] * valid, output * valid, atol=1e-4), name
        # and pefttune loads the merged directory back as a model with the same outputs
        with torch.no_grad():
            again, _ = load_merged(tmp_path / name)(values, mask)
        assert torch.allclose(again * valid, output * valid, atol=1e-4), name
    with torch.no_grad():
        expected = lora.encoder(values, mask)[0][-1]
    assert torch.allclose(results["peft.last"], expected, atol=1e-4)


def test_merged_directory_records_its_source_and_refuses_changed_weights(tmp_path):
    model = _perturbed("tiny-hubert", MIXED, HeadConfig("classification", 3))
    out = save_merged(model, tmp_path / "merged")
    source = json.loads((out / MERGED_FROM_FILE).read_text())
    assert source["backbone"] == "tiny-hubert"
    assert source["backbone_hash"] == load_backbone("tiny-hubert").content_hash()
    assert Placement.from_dict(source["placement"]) == model.placement
    spec = json.loads((out / HEAD_FILE).read_text())
    assert spec["head"] == model.head_config.to_dict() and spec["num_states"] == 5
    assert sorted(os.listdir(out)) == ["config.json", "head.json", "head.safetensors", "merged_from.json",
                                       "model.safetensors"]
    tensors = load_file(str(out / "model.safetensors"))
    key = "encoder.layers.2.final_layer_norm.bias"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="recorded hash"):
        load_merged(out)
