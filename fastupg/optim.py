"""Optimisation: AdamW, gradient clipping and the learning-rate schedule (warmup, then constant / cosine / linear
down to min_lr_ratio). TRL/transformers names; `fastupg.config.TrainConfig.optim` holds an `OptimConfig`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULERS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "constant"     # constant | cosine | linear (after warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0               # of max_steps; the larger of the two warmups wins
    min_lr_ratio: float = 0.0               # cosine/linear floor as a fraction of learning_rate
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0              # <= 0: no clipping (the norm is still measured and logged)


def schedule(o: OptimConfig, max_steps: int):
    """The LR multiplier per step (torch's LambdaLR convention)."""
    warm = max(o.warmup_steps, math.ceil(o.warmup_ratio * max_steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.lr_scheduler_type == "constant":
            return 1.0
        prog = min(1.0, (step - warm) / max(1, max_steps - warm))
        shape = 0.5 * (1 + math.cos(math.pi * prog)) if o.lr_scheduler_type == "cosine" else 1 - prog
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape
    return f


def lr_lambda(cfg):
    """The schedule of a TrainConfig (its optim settings and max_steps)."""
    return schedule(cfg.optim, cfg.max_steps)


def make_optimizer(model: torch.nn.Module, o: OptimConfig, max_steps: int):
    """(AdamW over the model's parameters, its LambdaLR schedule)."""
    opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                            eps=o.adam_epsilon, weight_decay=o.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule(o, max_steps))


def clip_and_step(model: torch.nn.Module, opt: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
    """Clip the gradient to max_grad_norm (<= 0: measure only), take the optimizer step; returns the norm."""
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    opt.step()
    return gn
