"""Optimizers, learning-rate schedules and early stopping with the spec's semantics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


def make_optimizer(model: nn.Module, s) -> torch.optim.Optimizer:
    """`optimizer` sgd | adam | adamw with the spec's momentum/nesterov/betas/amsgrad/weight_decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.learning_rate, momentum=s.momentum, weight_decay=s.weight_decay,
                               nesterov=bool(s.nesterov and s.momentum > 0))
    cls = torch.optim.Adam if s.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=s.learning_rate, betas=(s.beta1, s.beta2), weight_decay=s.weight_decay,
               amsgrad=s.amsgrad)


def lr_factor(step: int, steps_per_epoch: int, s) -> float:
    """Multiplier of the base learning rate after `step` optimizer updates."""
    if s.lr_scheduler == "step":
        return s.step_lr_gamma ** ((step // max(steps_per_epoch, 1)) // s.step_lr_step_size)
    warmup = s.warmup_cosine_lr_warmup_epochs * steps_per_epoch
    total = max(s.number_of_epochs * steps_per_epoch, 1)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * s.warmup_cosine_lr_cycles * 2.0 * progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, s) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer update (warmup_cosine) — `step` decays every step_lr_step_size epochs."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, s))


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations without improvement, counting only after `delay` evaluations."""

    patience: int
    delay: int
    enabled: bool = True
    best: float = -math.inf
    evaluations: int = 0
    stale: int = 0
    history: list[float] = field(default_factory=list)

    def update(self, value: float) -> bool:
        """Record one evaluation; True when this is the best so far."""
        self.evaluations += 1
        self.history.append(value)
        improved = value > self.best
        if improved:
            self.best = value
            self.stale = 0
        elif self.evaluations > self.delay:
            self.stale += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.evaluations > self.delay and self.stale >= self.patience
