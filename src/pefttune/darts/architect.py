"""Bi-level optimisation: alpha on a held-out split, weights on the rest, alternating.

The weights (PEFT + head) are trained by the one loop, :func:`pefttune.training.fit`; the
architecture step runs in its ``Hooks.before_step``, before each weight step (DARTS'
order: arch step, then weight step). :class:`Architect` owns alpha's Adam optimizer (DARTS'
betas (0.5, 0.999) by default; a larger first beta averages the noisy arch-batch gradients
over more steps) and an endless iterator over the *arch* split (a held-out part of the
training set, never dev or test).

- First order (default): alpha <- alpha - lr * grad_alpha L_arch(w, alpha).
- Second order (DARTS' unrolled step): with w' = w - xi grad_w L_weight(w, alpha) (xi = the
  weight optimizer's current lr per parameter group, a plain SGD virtual step),
  grad = grad_alpha L_arch(w', alpha) - (grad_alpha L_weight(w+, alpha)
  - grad_alpha L_weight(w-, alpha)) / (2 eps), w+- = w +- eps v, v = xi grad_w' L_arch(w', alpha),
  eps = 0.01 / ||v|| (with one lr exactly DARTS' xi-scaled difference with eps = 0.01 / ||dw||). ``L_weight`` uses the batch the following weight step
  trains on (see :class:`RecordingLoader`); all passes of one step share one Gumbel sample.

The arch loss adds, on alpha only: the budget penalty ``budget_penalty * relu(E - B) / B``
(E the expected PEFT parameters under the relaxation, B the experiment's budget) and the
Fair-DARTS zero-one loss. No alpha update before ``warmup_epochs`` are done.

``steps_per_weight_step`` (k, default 1 as in DARTS) runs k architecture steps, each on the
next arch batch, before every weight step: k times the alpha updates and arch data per
epoch, at k arch passes per weight step, so that the relaxation can leave uniform in a
search with few weight steps (see :mod:`pefttune.darts.convergence`). Second order: each of
the k steps unrolls around the same weights and weight batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

import torch

from pefttune.darts.convergence import CONVERGED_ENTROPY, ConvergenceTracker
from pefttune.darts.supernet import Supernet
from pefttune.training import (EpochResult, Hooks, TrainConfig, _steps_per_epoch, autocast, fit, frozen_step,
                               setup_optimizer, setup_scheduler, to_device)


class RecordingLoader:
    """Wraps a loader; ``current`` is the batch it yielded last (the next weight step's)."""

    def __init__(self, loader):
        self.loader = loader
        self.current: dict | None = None

    def __iter__(self):
        for batch in self.loader:
            self.current = batch
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def endless(loader: Iterable) -> Iterator:
    """Iterate ``loader`` again and again (a new pass, new shuffling, when it runs out)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("darts: the architecture split is empty (darts.arch_split too small?)")


def task_loss(supernet: Supernet, batch: dict, config: TrainConfig | None = None) -> torch.Tensor:
    """The task loss of the mixed model on ``batch`` (under the weight step's autocast)."""
    model = supernet.model
    device = supernet.alpha.device
    with autocast(config, device) if config is not None else contextlib.nullcontext():
        states, mask = frozen_step(model, batch, supernet.cache)
        out = model.forward_from(states, mask, layer_fn=supernet.layer_fn)
        return model.loss(out, mask, batch)


@dataclass
class Architect:
    """alpha's optimizer and step; ``before_step`` plugs into :class:`pefttune.training.Hooks`."""

    supernet: Supernet
    arch_loader: Iterable[dict]
    order: Literal["first", "second"] = "first"
    lr: float = 3e-3
    weight_decay: float = 1e-3
    warmup_epochs: int = 0
    total_epochs: int = 1
    steps_per_weight_step: int = 1
    betas: tuple[float, float] = (0.5, 0.999)  # DARTS' Adam betas for alpha
    budget: int | None = None
    budget_penalty: float = 0.0
    weight_optimizer: torch.optim.Optimizer | None = None  # second order: xi = its current lrs
    train_loader: RecordingLoader | None = None  # second order: the weight step's batch
    train_config: TrainConfig | None = None  # autocast (bf16 on GPU) as in the weight step
    device: torch.device | None = None
    optimizer: torch.optim.Optimizer = field(init=False)
    steps: int = field(default=0, init=False)
    last: dict = field(default_factory=dict, init=False)
    _sums: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        if self.order not in ("first", "second"):
            raise ValueError(f"darts.order: expected 'first' or 'second', got {self.order!r}")
        if self.order == "second" and (self.weight_optimizer is None or self.train_loader is None):
            raise ValueError("darts: the second-order step needs the weight optimizer and a RecordingLoader")
        if self.budget_penalty and self.budget is None:
            raise ValueError("darts.budget_penalty: needs the experiment's `budget`")
        if int(self.steps_per_weight_step) < 1:
            raise ValueError(f"darts.arch_steps_per_weight_step: must be >= 1, got {self.steps_per_weight_step!r}")
        self.device = self.device or self.supernet.alpha.device
        # DARTS: Adam, betas (0.5, 0.999), L2 weight decay on alpha
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"darts.arch_betas: expected two numbers in [0, 1), got {self.betas!r}")
        self.optimizer = torch.optim.Adam(
            [self.supernet.alpha], lr=self.lr, betas=betas, weight_decay=self.weight_decay
        )
        self._batches = endless(self.arch_loader)

    # -- the hook ---------------------------------------------------------------------------
    def before_step(self, step: int, epoch: int) -> None:
        if step == 0:
            self.supernet.relaxation.set_epoch(epoch, self.total_epochs)
            self._sums = {}
            # a fresh pass over the arch split each epoch: a resumed search draws the same batches
            self._batches = endless(self.arch_loader)
        if epoch <= self.warmup_epochs:
            return
        train_batch = None
        if self.order == "second":
            train_batch = to_device(self.train_loader.current, self.device)
        for _ in range(self.steps_per_weight_step):
            val_batch = to_device(next(self._batches), self.device)
            self.step(val_batch, train_batch)

    def epoch_metrics(self) -> dict:
        """Means of the arch-step losses over the epoch so far (empty during warm-up)."""
        n = self._sums.get("n", 0)
        return {f"arch_{k}": v / n for k, v in self._sums.items() if k != "n"} if n else {}

    # -- one architecture step ------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        alpha = self.supernet.alpha
        total = self.supernet.relaxation.regularizer(alpha)
        if self.budget_penalty:
            total = total + self.budget_penalty * self.supernet.budget_penalty(self.budget)
        return total

    def step(self, val_batch: dict, train_batch: dict | None = None) -> dict:
        """One update of alpha; returns the arch loss parts."""
        supernet = self.supernet
        was_training = supernet.model.training
        if not was_training:  # model.train() walks every module: not on every step
            supernet.model.train()
        with supernet.frozen_noise():
            if self.order == "first":
                loss = task_loss(supernet, val_batch, self.train_config)
                (grad,) = torch.autograd.grad(loss, [supernet.alpha])
            else:
                loss, grad = self._unrolled(val_batch, train_batch)
        penalty = self.penalty()
        if penalty.requires_grad:
            grad = grad + torch.autograd.grad(penalty, [supernet.alpha])[0]
        supernet.alpha.grad = grad
        self.optimizer.step()
        supernet.alpha.grad = None
        if not was_training:
            supernet.model.eval()
        self.steps += 1
        self.last = {"loss": float(loss.detach()), "penalty": float(penalty.detach())}
        for key, value in self.last.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._sums["n"] = self._sums.get("n", 0) + 1
        return self.last

    def _weights(self) -> list[tuple[torch.nn.Parameter, float]]:
        """(weight, xi) for every weight the weight optimizer trains."""
        return [(p, group["lr"]) for group in self.weight_optimizer.param_groups for p in group["params"]]

    def _unrolled(self, val_batch: dict, train_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        supernet = self.supernet
        alpha = supernet.alpha
        pairs = self._weights()
        weights = [p for p, _ in pairs]
        backup = [p.detach().clone() for p in weights]
        try:
            # virtual step w' = w - xi grad_w L_weight(w, alpha)
            grads = torch.autograd.grad(task_loss(supernet, train_batch, self.train_config), weights, allow_unused=True)
            with torch.no_grad():
                for (p, xi), g in zip(pairs, grads):
                    if g is not None:
                        p.sub_(xi * g)
            loss = task_loss(supernet, val_batch, self.train_config)
            grads = torch.autograd.grad(loss, [alpha, *weights], allow_unused=True)
            dalpha = grads[0]
            # v = xi * grad_w' L_arch (per group xi; with one lr this is DARTS' xi * dw)
            v = [torch.zeros_like(p) if g is None else xi * g for (p, xi), g in zip(pairs, grads[1:])]
            norm = torch.sqrt(sum((g * g).sum() for g in v)) if v else alpha.new_zeros(())
            if not float(norm) > 0:
                return loss, dalpha
            eps = 0.01 / norm  # a step of length 0.01 along v, as eps = 0.01 / ||dw|| does along dw
            # finite-difference Hessian-vector product around w (not w')
            with torch.no_grad():
                for p, b, g in zip(weights, backup, v):
                    p.copy_(b + eps * g)
            (plus,) = torch.autograd.grad(task_loss(supernet, train_batch, self.train_config), [alpha])
            with torch.no_grad():
                for p, b, g in zip(weights, backup, v):
                    p.copy_(b - eps * g)
            (minus,) = torch.autograd.grad(task_loss(supernet, train_batch, self.train_config), [alpha])
            return loss, dalpha - (plus - minus) / (2 * eps)
        finally:
            with torch.no_grad():
                for p, b in zip(weights, backup):
                    p.copy_(b)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state.get("steps", 0))


def convergence_tracker(supernet: Supernet, threshold: float = CONVERGED_ENTROPY, stable_epochs: int = 0) -> ConvergenceTracker:
    """A tracker whose previous argmax is the supernet's current one (fresh or restored alpha)."""
    with torch.no_grad():
        previous = supernet.probabilities().detach().cpu().numpy().argmax(-1)
    return ConvergenceTracker(threshold, previous=previous, stable_epochs=stable_epochs)


def search_hooks(supernet: Supernet, architect: Architect, tracker: ConvergenceTracker | None = None) -> Hooks:
    """Hooks that make :func:`pefttune.training.fit` a DARTS search.

    Each epoch reports the supernet's probabilities and entropies, the arch losses, and the
    convergence metrics of ``tracker`` (default: a fresh one at threshold 0.7, see
    :mod:`pefttune.darts.convergence`).
    """
    tracker = tracker or convergence_tracker(supernet)

    def epoch_metrics(epoch: int) -> dict:
        with torch.no_grad():
            probabilities = supernet.probabilities().detach().float().cpu().numpy()
        return {**supernet.metrics(), **tracker.update(probabilities), **architect.epoch_metrics(),
                "arch_steps": architect.steps}

    return Hooks(
        before_step=architect.before_step,
        layer_fn=supernet.weight_step_layer_fn,  # alpha moves only in the architect's step
        epoch_metrics=epoch_metrics,
        exclude_parameters=[supernet.alpha],
    )


def make_architect(
    supernet: Supernet,
    train_loader,
    arch_loader,
    train_config: TrainConfig,
    *,
    order: str = "first",
    lr: float = 3e-3,
    weight_decay: float = 1e-3,
    warmup_epochs: int = 0,
    steps_per_weight_step: int = 1,
    betas: tuple[float, float] = (0.5, 0.999),
    budget: int | None = None,
    budget_penalty: float = 0.0,
):
    """(weight optimizer, scheduler, recording train loader, architect) for one search.

    The weight optimizer and scheduler are the ones :func:`fit` would make (same groups,
    schedule), built here because the second-order step reads the current lrs.
    """
    recording = RecordingLoader(train_loader)
    exclude = Hooks(exclude_parameters=[supernet.alpha])
    optimizer = setup_optimizer(supernet.model, train_config, exclude)
    steps = train_config.epochs * _steps_per_epoch(train_loader, train_config)
    scheduler = setup_scheduler(optimizer, steps, train_config.warmup_ratio)
    architect = Architect(
        supernet,
        arch_loader,
        order=order,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        total_epochs=train_config.epochs,
        steps_per_weight_step=steps_per_weight_step,
        betas=betas,
        budget=budget,
        budget_penalty=budget_penalty,
        weight_optimizer=optimizer,
        train_loader=recording,
        train_config=train_config,
    )
    return optimizer, scheduler, recording, architect


def search_architecture(
    supernet: Supernet,
    train_loader,
    arch_loader,
    dev_loader,
    train_config: TrainConfig,
    *,
    order: str = "first",
    arch_lr: float = 3e-3,
    arch_weight_decay: float = 1e-3,
    warmup_epochs: int = 0,
    arch_steps_per_weight_step: int = 1,
    arch_betas: tuple[float, float] = (0.5, 0.999),
    budget: int | None = None,
    budget_penalty: float = 0.0,
    on_epoch=None,
) -> tuple[list[EpochResult], Architect]:
    """A whole DARTS search through :func:`fit`: weights on ``train_loader``, alpha on ``arch_loader``."""
    optimizer, scheduler, recording, architect = make_architect(
        supernet,
        train_loader,
        arch_loader,
        train_config,
        order=order,
        lr=arch_lr,
        weight_decay=arch_weight_decay,
        warmup_epochs=warmup_epochs,
        steps_per_weight_step=arch_steps_per_weight_step,
        betas=arch_betas,
        budget=budget,
        budget_penalty=budget_penalty,
    )
    results = fit(
        supernet.model,
        recording,
        dev_loader,
        train_config,
        optimizer=optimizer,
        scheduler=scheduler,
        hooks=search_hooks(supernet, architect),
        on_epoch=on_epoch,
    )
    return results, architect
