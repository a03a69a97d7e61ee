"""The runtime layer that both search arms and the analysis share.

It sits beside :mod:`pefttune.search` (the discrete arm), :mod:`pefttune.darts` (the DARTS
arm) and :mod:`pefttune.analysis`, below all three, and imports none of them:

- :mod:`pefttune.runtime.storage`: files in experiment storage (local paths and URIs),
  atomic local writes, and per-trial markers (divergence, test seams);
- :mod:`pefttune.runtime.study_dir`: the experiment directory ``<storage>/<name>`` and its
  rules (never overwrite, resume only with the same config), and reading a Ray experiment's
  results into one row per trial;
- :mod:`pefttune.runtime.cluster`: the Ray connection (a private loopback instance, or
  joining a cluster), the cluster storage check, the driver environment while a Tuner runs,
  and a trial's device, threads and GPU-memory wait;
- :mod:`pefttune.runtime.tune_run`: the Ray run config of every Ray experiment of a study,
  with the tracking callbacks of :mod:`pefttune.runtime.tracking` (MLflow:
  :mod:`~pefttune.runtime.mlflow_trials`; W&B: :mod:`~pefttune.runtime.wandb_trials`);
- :mod:`pefttune.runtime.provenance`: what produced a result (versions, machine, config hash).
"""
