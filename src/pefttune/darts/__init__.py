"""DARTS over per-layer PEFT placement: mixed layers, relaxations, bi-level search, derivation.

- :mod:`~pefttune.darts.relaxation`: softmax / Gumbel (GDAS) / Fair-DARTS weights;
- :mod:`~pefttune.darts.supernet`: every candidate in every layer, the ``exact`` and
  ``gated`` mixes, probability/entropy/none-share reports, the expected-parameter budget;
- :mod:`~pefttune.darts.architect`: alpha's first- and second-order steps in
  :func:`pefttune.training.fit`'s ``before_step`` hook;
- :mod:`~pefttune.darts.derive`: argmax / budgeted derivation of a discrete placement;
- :mod:`~pefttune.darts.convergence`: normalised entropy, top-2 margin, argmax stability
  (has the relaxation left uniform?), per epoch and over a whole alpha history.

The Ray trainable is :mod:`pefttune.trainables.darts`.
"""
from pefttune.darts.architect import (
    Architect,
    RecordingLoader,
    convergence_tracker,
    make_architect,
    search_architecture,
    search_hooks,
    task_loss,
)
from pefttune.darts.convergence import (
    CONVERGED_ENTROPY,
    ConvergenceTracker,
    convergence,
    convergence_table,
    history_convergence,
)
from pefttune.darts.derive import budgeted_choices, derivation_report, derive_placement, inherit_weights
from pefttune.darts.relaxation import NONE, Relaxation, entropy
from pefttune.darts.supernet import MIXES, Supernet, build_supernet, candidate_choices, hybrid_placement

__all__ = [
    "CONVERGED_ENTROPY",
    "ConvergenceTracker",
    "MIXES",
    "NONE",
    "Architect",
    "RecordingLoader",
    "Relaxation",
    "Supernet",
    "budgeted_choices",
    "build_supernet",
    "candidate_choices",
    "convergence",
    "convergence_table",
    "convergence_tracker",
    "derivation_report",
    "derive_placement",
    "entropy",
    "history_convergence",
    "hybrid_placement",
    "inherit_weights",
    "make_architect",
    "search_architecture",
    "search_hooks",
    "task_loss",
]
