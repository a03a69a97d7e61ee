"""The embedded demo's tooling, beside the core: what builds the demo's corpora and its encoder.

``pefttune run`` with no argument studies a keyword-spotting corpus synthesized offline and a
tiny HuBERT pretrained by pefttune itself (``tiny-hubert-ssl``, shipped in ``assets/``).  This
package makes both:

- :mod:`.synth` -- the synthesized ``ks`` / ``sid`` / ``pr`` corpora (eSpeak NG speakers over
  generated noise), byte for byte the same for the same task, seed and sizes;
- :mod:`.corpus_cache` -- a corpus built once into the pefttune cache and reused;
- :mod:`.pretraining` -- HuBERT-style masked prediction (or wav2vec 2.0) of a tiny encoder on
  synthesized words, with provenance (``pefttune backbone pretrain``).

The core does not import this package but through one door: the data source ``synth``
(:func:`pefttune.data.sources.synth_manifest`, :func:`~pefttune.data.sources.synth_corpus_dir`),
which imports :mod:`.corpus_cache` when called; the CLI offers the demo's own commands
(``pefttune data synth``, ``pefttune backbone pretrain``).  ``tests/test_layout.py`` holds every
other module to that.  The demo imports the core (the eSpeak NG binding, manifests, backbones),
never the arms, the analysis or the CLI::

    from pefttune.data.sources import synth_manifest
    manifest = synth_manifest("ks", seed=0)        # built on first use, then read from the cache
"""
