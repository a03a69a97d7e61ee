"""Coverage of the default interval (seeds x speakers) by simulation, against the examples-only one.

Each replication trains n seeds of configurations A and B and tests them on new speakers:
the logit of a clip being right is ``mu_c + u_{c,s} + v_j + w_{c,j}`` with a per-configuration
seed effect u (sd 0.35), a speaker effect v shared by both configurations (sd 1.0) and a
configuration-specific speaker effect w (sd 0.25); 24 speakers with 25 clips each.  The target
is the difference of A and B across training randomness and speakers, E[p_A - p_B], computed
once by Monte Carlo.  Nominal confidence 0.95.
"""
from __future__ import annotations

import numpy as np
import pytest

from pefttune.analysis.intervals import paired_bootstrap, seeds_speakers_bootstrap
from pefttune.analysis.seeds_speakers import Clusters

SPEAKERS, CLIPS = 24, 25
MU = {"a": 1.2, "b": 1.0}
SD_SEED, SD_SPEAKER, SD_CONFIG_SPEAKER = 0.35, 1.0, 0.25
REPS, DRAWS = 400, 300


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def true_difference() -> float:
    rng = np.random.default_rng(123)
    n = 2_000_000
    v = rng.normal(0, SD_SPEAKER, n)
    pa = _sigmoid(MU["a"] + rng.normal(0, SD_SEED, n) + v + rng.normal(0, SD_CONFIG_SPEAKER, n))
    pb = _sigmoid(MU["b"] + rng.normal(0, SD_SEED, n) + v + rng.normal(0, SD_CONFIG_SPEAKER, n))
    return float(np.mean(pa - pb))


def simulate(rng: np.random.Generator, reps: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """(reps, seeds, clips) correctness of A and of B, speakers drawn anew in every replication."""
    v = rng.normal(0, SD_SPEAKER, (reps, 1, SPEAKERS))
    out = []
    for c in ("a", "b"):
        u = rng.normal(0, SD_SEED, (reps, seeds, 1))
        w = rng.normal(0, SD_CONFIG_SPEAKER, (reps, 1, SPEAKERS))
        p = np.repeat(_sigmoid(MU[c] + u + v + w), CLIPS, axis=2)  # clips of speaker j are j*CLIPS...
        out.append((rng.random(p.shape) < p).astype(float))
    return out[0], out[1]


@pytest.fixture(scope="module")
def truth() -> float:
    return true_difference()


@pytest.mark.parametrize("seeds", [3, 5, 10])
def test_seeds_speakers_interval_covers_and_examples_only_does_not(truth, seeds):
    rng = np.random.default_rng(seeds)
    a, b = simulate(rng, REPS, seeds)
    clusters = Clusters.from_speakers(np.repeat([f"spk{j}" for j in range(SPEAKERS)], CLIPS))
    assert clusters.count == SPEAKERS and clusters.n_speakers == SPEAKERS
    ids = list(range(seeds))
    hits = {"seeds x speakers": 0, "examples only": 0}
    widths = []
    for r in range(REPS):
        c = seeds_speakers_bootstrap(list(a[r]), list(b[r]), clusters=clusters, seeds_a=ids, seeds_b=ids,
                                     draws=DRAWS, seed=r)
        e = paired_bootstrap(list(a[r]), list(b[r]), draws=DRAWS, seed=r)
        hits["seeds x speakers"] += c.ci_low <= truth <= c.ci_high
        hits["examples only"] += e.ci_low <= truth <= e.ci_high
        widths.append(c.ci_high - c.ci_low)
        assert c.interval == "seeds x speakers" and c.spread.pairing == "paired" and c.spread.df == seeds - 1
    coverage = {k: v / REPS for k, v in hits.items()}
    print(f"seeds={seeds} truth={truth:.4f} coverage={coverage} median width={np.median(widths):.4f}")
    assert coverage["seeds x speakers"] >= 0.93, coverage
    assert coverage["examples only"] < 0.85, coverage


def test_clustering_by_speaker_matters_for_coverage(truth):
    """The same t seed level with clips as independent units (a speaker-blind second level)
    covers less than with speakers as clusters, in the same setting."""
    rng = np.random.default_rng(99)
    seeds = 10
    a, b = simulate(rng, REPS, seeds)
    speakers = Clusters.from_speakers(np.repeat(np.arange(SPEAKERS), CLIPS))
    clips = Clusters.utterances(SPEAKERS * CLIPS)
    ids = list(range(seeds))
    hits = {"speakers": 0, "clips": 0}
    for r in range(REPS):
        for name, clusters in (("speakers", speakers), ("clips", clips)):
            c = seeds_speakers_bootstrap(list(a[r]), list(b[r]), clusters=clusters, seeds_a=ids, seeds_b=ids,
                                         draws=DRAWS, seed=r)
            hits[name] += c.ci_low <= truth <= c.ci_high
    print(f"seeds={seeds} coverage speakers={hits['speakers'] / REPS} clips={hits['clips'] / REPS}")
    assert hits["speakers"] / REPS >= 0.93 and hits["clips"] < hits["speakers"]
