"""Speech data: loaders for SUPERB-style datasets and manifests of any source.

Every dataset, synthesized or real, becomes a *manifest* (:mod:`.manifest`) that
:class:`.dataset.SpeechDataset` reads.  The demo's synthesized corpora are built by
:mod:`pefttune.demo` and reached through the data source ``synth`` of :mod:`.sources`.

Modules (imported on demand; this package imports nothing, so the eSpeak worker
process starts fast):

- :mod:`.espeak` -- eSpeak NG via ctypes: ``phonemize`` (the LibriSpeech layout's phoneme
  targets), ``synthesize``, ``synthesize_many`` / ``synthesize_stream`` (bit-exact, in a fresh
  process; the demo's corpora), ``list_voices``, ``list_variants``.
- :mod:`.layouts` -- Speech Commands v1, Fluent Speech Commands, VoxCeleb1,
  LibriSpeech, IEMOCAP loaders; the Speech Commands label set (``KS_COMMANDS``...).
- :mod:`.sources` -- ``manifest_for(source, task, path, ...)``: any source to a manifest path
  (``synth``: the demo's corpus, built once and cached, ``PEFTTUNE_CACHE`` or ``~/.cache/pefttune``).
- :mod:`.manifest` -- ``read_manifest``, ``write_manifest``, ``validate_manifest``.
- :mod:`.vocab` -- ``LabelVocab`` and ``TokenVocab`` (CTC blank = 0), JSON persisted.
- :mod:`.audio` -- ``read_audio`` (16 kHz mono float32), ``write_flac``.
- :mod:`.dataset` -- ``SpeechDataset``, ``collate_batch``, ``LengthBucketSampler``,
  ``make_dataloader``.
"""
