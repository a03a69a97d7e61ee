"""Speech data: offline synthesized corpora and loaders for SUPERB-style datasets.

Every dataset, synthesized or real, becomes a *manifest* (:mod:`.manifest`) that
:class:`.dataset.SpeechDataset` reads.

Modules (imported on demand; this package imports nothing, so the eSpeak worker
process starts fast):

- :mod:`.espeak` -- eSpeak NG via ctypes: ``synthesize``, ``synthesize_many`` /
  ``synthesize_stream`` (bit-exact, in a fresh process), ``phonemize``,
  ``list_voices``, ``list_variants``.
- :mod:`.synth` -- the synthesized ``ks`` / ``sid`` / ``pr`` corpora (``build_corpus``),
  ``KS_COMMANDS``, ``KS_UNKNOWN_WORDS`` and helpers for other corpora (``Speaker``,
  ``make_speakers``, ``make_sentences``, ``make_noise``, ``mix_at_snr``).
- :mod:`.cache` -- ``ensure_corpus(task, seed=0, **size)``: build once, reuse
  (``PEFTTUNE_CACHE`` or ``~/.cache/pefttune``).
- :mod:`.layouts` -- Speech Commands v1, Fluent Speech Commands, VoxCeleb1,
  LibriSpeech, IEMOCAP loaders.
- :mod:`.sources` -- ``manifest_for(source, task, path, ...)``: any source to a manifest path.
- :mod:`.manifest` -- ``read_manifest``, ``write_manifest``, ``validate_manifest``.
- :mod:`.vocab` -- ``LabelVocab`` and ``TokenVocab`` (CTC blank = 0), JSON persisted.
- :mod:`.audio` -- ``read_audio`` (16 kHz mono float32), ``write_flac``.
- :mod:`.dataset` -- ``SpeechDataset``, ``collate_batch``, ``LengthBucketSampler``,
  ``make_dataloader``.
"""
