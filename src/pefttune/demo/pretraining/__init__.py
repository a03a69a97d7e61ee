"""Self-supervised pretraining of tiny speech encoders on a synthesized corpus.

- :mod:`.corpus`: :class:`CorpusRecipe` / :func:`build_corpus` (eSpeak NG words and
  phrases, keyword-spotting words excluded);
- :mod:`.targets`: k-means targets of frames aligned with the encoder (log-mel:
  :mod:`pefttune.log_mel`, MFCC-39);
- :mod:`.train`: :class:`PretrainConfig` / :func:`pretrain` (HuBERT masked prediction or
  wav2vec 2.0 contrastive), writing a transformers model directory + ``provenance.json``
  + ``schedule.json`` (replayable with :func:`load_schedule`).

:data:`SHIPPED_SHA256` is the hash of the shipped ``tiny-hubert-ssl`` weights file.
"""
from pefttune.demo.pretraining.corpus import VOCABULARY, Corpus, CorpusRecipe, build_corpus, ks_words
from pefttune.demo.pretraining.targets import check_alignment, fit_kmeans
from pefttune.demo.pretraining.train import (
    OBJECTIVES,
    PROVENANCE_FILE,
    PretrainConfig,
    PretrainResult,
    command_line,
    file_sha256,
    load_schedule,
    pretrain,
    span_mask,
)

__all__ = [
    "VOCABULARY", "Corpus", "CorpusRecipe", "build_corpus", "ks_words",
    "check_alignment", "fit_kmeans",
    "SHIPPED_SHA256", "OBJECTIVES", "PROVENANCE_FILE", "PretrainConfig", "PretrainResult", "command_line",
    "file_sha256", "load_schedule", "pretrain", "span_mask",
]

#: sha256 of ``model.safetensors`` of each shipped backbone (see pefttune.backbones.SHIPPED).
SHIPPED_SHA256: dict[str, str] = {
    "tiny-hubert-ssl": "fe46a64722812f93d0a01cc1244dd6db076e2ba3e78576494a7fb18b130bc7a3",
}
