"""Shared helpers for the foundation test suite: the (backbone, placement) test matrix,
fixed input batches, reference outputs and small utilities.

In the style of HF peft's tests: one matrix of cases (:data:`BACKBONES` x
:data:`METHOD_CASES`) run against shared checks, on tiny random backbones (4 layers,
hidden 64), with 0.5 s of audio and batches of 2.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch

from pefttune.backbones import TINY_BACKBONES, SpeechEncoder, build_tiny_model, load_backbone
from pefttune.heads import HeadConfig
from pefttune.methods import LayerMethod, get_method, method_names
from pefttune.model import PeftSpeechModel, build_model
from pefttune.placement import Placement

# The tiny models are small enough that thread hand-off costs more than it saves, and the
# machines running the suite are shared: one intra-op thread keeps every test fast.
torch.set_num_threads(1)

BACKBONES = tuple(TINY_BACKBONES)  # ("tiny-wav2vec2", "tiny-hubert", "tiny-wavlm")
FAMILY = dict(TINY_BACKBONES)
NUM_LAYERS = 4  # of every tiny backbone
SAMPLES = 8_000  # 0.5 s at 16 kHz
SHORT = 5_600  # valid samples of the padded second utterance
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"]


@dataclass(frozen=True)
class Case:
    """One placement of the matrix: ``layers`` is the per-layer list of ``Placement.from_dict``."""

    id: str
    layers: tuple

    def placement(self, num_layers: int = NUM_LAYERS) -> Placement:
        assert len(self.layers) == num_layers
        return Placement.from_dict({"num_layers": num_layers, "layers": list(self.layers)})

    @property
    def methods(self) -> set[str]:
        return {c.method for layer in self.placement().layers for c in layer}

    @property
    def identity_at_init(self) -> bool:
        return all(get_method(m).identity_at_init for m in self.methods)


def uniform(method, **kwargs) -> tuple:
    """Same entry in every layer. ``method`` may be a list (hybrid layer), then ``kwargs``
    maps method name -> its hyper-parameters."""
    if isinstance(method, str):
        entry = [{"method": method, **kwargs}]
    else:
        entry = [{"method": m, **kwargs.get(m, {})} for m in method]
    return tuple([entry] * NUM_LAYERS)


#: Every registered method with its defaults (the 9 of the study's table), run on every backbone.
DEFAULT_CASES: tuple[Case, ...] = tuple(Case(name, uniform(name)) for name in method_names())

#: Non-default hyper-parameters, hybrid layers and a non-uniform placement, each on the
#: backbones where it matters most (WavLM for everything touching the projections or
#: the attention, whose transformers forward bypasses the projection modules).
EXTRA_CASES: tuple[tuple[Case, tuple[str, ...]], ...] = (
    (Case("houlsby-b8-tanh", uniform("houlsby", bottleneck=8, activation="tanh")), ("tiny-wav2vec2",)),
    (Case("parallel-ffn-s4", uniform("parallel", bottleneck=16, scale=4.0, source="ffn")), ("tiny-hubert",)),
    (Case("lora-r2-all", uniform("lora", rank=2, alpha=4.0, targets=ALL_LINEAR)), ("tiny-wavlm",)),
    (Case("ia3-q-ffn1", uniform("ia3", targets=["q_proj", "intermediate_dense"])), ("tiny-wavlm",)),
    (Case("prefix-p3", uniform("prefix", length=3, init_std=0.2)), ("tiny-wavlm",)),
    (Case("houlsby+lora", uniform(["houlsby", "lora"], lora={"rank": 4})), ("tiny-hubert", "tiny-wavlm")),
    # the study's "mix": sequential + parallel + LoRA in every layer
    (Case("mix", uniform(["sequential", "parallel", "lora"])), BACKBONES),
    (
        Case("bitfit+lora+ia3", uniform(["bitfit", "lora", "ia3"], ia3={"targets": ["k_proj", "output_dense"]})),
        ("tiny-wav2vec2", "tiny-wavlm"),
    ),
    (
        Case(
            "sparse",
            (
                [{"method": "lora", "rank": 4}],
                [],
                ["houlsby", "bitfit", "adapterbias"],
                [{"method": "prefix", "length": 2}, "ia3"],
            ),
        ),
        ("tiny-hubert", "tiny-wavlm"),
    ),
)
METHOD_CASES: tuple[Case, ...] = DEFAULT_CASES + tuple(case for case, _ in EXTRA_CASES)
assert sorted(method_names()) == sorted(c.id for c in DEFAULT_CASES)

MATRIX: list[tuple[str, Case]] = [(backbone, case) for backbone in BACKBONES for case in DEFAULT_CASES] + [
    (backbone, case) for case, backbones in EXTRA_CASES for backbone in backbones
]
MATRIX_IDS = [f"{backbone.removeprefix('tiny-')}-{case.id}" for backbone, case in MATRIX]


# -- inputs ---------------------------------------------------------------------------------


def audio_batch(seed: int = 0, garbage_padding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 8000) waveforms and their sample mask; the second utterance has 5600 valid samples."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(2, SAMPLES, generator=gen)
    mask = torch.ones(2, SAMPLES, dtype=torch.long)
    mask[1, SHORT:] = 0
    if garbage_padding:
        x[1, SHORT:] = 10.0 * torch.randn(SAMPLES - SHORT, generator=gen)
    else:
        x[1, SHORT:] = 0.0
    return x, mask


def head_config(task: str = "classification") -> HeadConfig:
    return HeadConfig(task, 3 if task == "classification" else 6)


@functools.lru_cache(maxsize=None)
def _bare_encoder(backbone: str) -> SpeechEncoder:
    return load_backbone(backbone)


def fresh_encoder(backbone: str) -> SpeechEncoder:
    """A new, placement-free copy of a built-in backbone (a deep copy: faster than a rebuild)."""
    return copy.deepcopy(_bare_encoder(backbone))


def make_model(backbone: str, case: Case | Placement, task: str = "classification") -> PeftSpeechModel:
    placement = case if isinstance(case, Placement) else case.placement()
    return build_model(fresh_encoder(backbone), placement, head_config(task))


def methods_of(model: PeftSpeechModel) -> list[LayerMethod]:
    return [m for layer in model.methods for m in layer]


def perturb(model: PeftSpeechModel, seed: int = 0, std: float = 0.05) -> None:
    """Move every PEFT parameter (and the head) off its init, reproducibly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for method in methods_of(model):
            method.perturb_(std)
        with torch.no_grad():
            for p in model.head.parameters():
                p.add_(torch.randn_like(p) * std)


def set_all(model: PeftSpeechModel, **attrs) -> None:
    for method in methods_of(model):
        for key, value in attrs.items():
            setattr(method, key, value)


# -- reference outputs --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def frozen_states(backbone: str, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Hidden states of the bare (no placement) pefttune encoder on ``audio_batch(seed)``."""
    encoder = load_backbone(backbone)
    x, mask = audio_batch(seed)
    with torch.no_grad():
        states, frames = encoder(x, mask)
    return tuple(states), frames


@functools.lru_cache(maxsize=None)
def transformers_states(backbone: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Hidden states from transformers' own forward of an *unpatched* copy of the backbone."""
    model = build_tiny_model(FAMILY[backbone]).eval()
    x, mask = audio_batch(seed)
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_hidden_states=True)
    return tuple(out.hidden_states)


def max_diff_valid(a: list[torch.Tensor], b: list[torch.Tensor], frames: torch.Tensor) -> float:
    """Largest |a - b| over all hidden states, on valid frames only."""
    assert len(a) == len(b), (len(a), len(b))
    return max((x - y)[frames].abs().max().item() for x, y in zip(a, b))


def encoder_states(encoder: SpeechEncoder, seed: int = 0, grad: bool = False):
    x, mask = audio_batch(seed)
    with torch.set_grad_enabled(grad):
        return encoder(x, mask)


def kill_driver_group(driver, temp_root: str) -> None:
    """SIGKILL a driver subprocess's process group (started with ``start_new_session=True``), as a
    crash would, then the Ray daemons it started (:func:`kill_ray_leftovers`)."""
    import os
    import signal

    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    kill_ray_leftovers(temp_root)


def kill_ray_leftovers(temp_root: str) -> None:
    """The processes whose command line names ``temp_root`` (a driver's private Ray temp folder)."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_root in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def run_until_killed(args: list[str], moment, log, env: dict | None = None, timeout: float = 300,
                     poll_s: float = 0.02, notes=()):
    """Start ``python -m pefttune ARGS`` (its own session and private TMPDIR, output appended to
    ``log``) and SIGKILL its process group (:func:`kill_driver_group`) once ``moment()`` returns
    something true, found through files on disk, never by sleeping; returns that value. The test
    fails, quoting the log's end (and the end of each existing file in ``notes``), when the run
    ends first or the moment never comes within ``timeout`` seconds."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    import pytest

    temp_root = tempfile.mkdtemp(prefix="pk-")  # Ray's temp folder of this driver: its leftovers are found by it
    env = {**(os.environ if env is None else env), "TMPDIR": temp_root}
    with open(log, "a") as out:
        driver = subprocess.Popen([sys.executable, "-m", "pefttune", *args], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            seen = moment()
            if seen:
                kill_driver_group(driver, temp_root)
                return seen
            if driver.poll() is not None:
                tails = [open(p).read()[-3000:] for p in (log, *notes) if os.path.isfile(p)]
                pytest.fail(f"the run ended (rc {driver.returncode}) before the moment to kill it:\n" + "\n".join(tails))
            time.sleep(poll_s)
        pytest.fail(f"the moment to kill never came; see {log}")
    finally:
        if driver.poll() is None:
            kill_driver_group(driver, temp_root)
