"""Hybrid Post-Training (docs/math.md §2): per prompt, the verifier's success rate P over its n rollouts decides how
the RL loss on its rollouts and the SFT loss on its demonstration are mixed:

    loss = alpha(P) * L_RL(rollouts of q) + beta(P) * L_SFT(demonstration of q)

switch (the paper's):  alpha = 1[P > gate],  beta = 1[P <= gate]    (gate 0 for Qwen, 2/8 for LLaMA)
soft:                  alpha = f(P), beta = g(P)   (default f(P) = P, g(P) = 1 - P)

Rows whose weight is 0 are dropped before the forward pass (`keep_rows`): they cost no compute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastupg.advantages import group_stats

SOFT_FUNCTIONS: dict[str, tuple[Callable, Callable]] = {
    "linear": (lambda p: p, lambda p: 1 - p),
    # keeps some SFT signal on solved prompts and some RL on hard ones
    "sqrt": (lambda p: p.sqrt(), lambda p: (1 - p).sqrt()),
}


@dataclass(frozen=True)
class HPTConfig:
    mode: str = "switch"            # "switch" | "soft"
    gate: float = 0.0               # switch: RL when P > gate, SFT otherwise
    soft: str = "linear"            # soft: a name in SOFT_FUNCTIONS
    alpha: Callable | None = None   # soft: custom f(P) -> alpha (tensor in, tensor out); overrides `soft`
    beta: Callable | None = None    # soft: custom g(P) -> beta

    def __post_init__(self):
        if self.mode not in ("switch", "soft"):
            raise ValueError(f"HPTConfig.mode={self.mode!r} is not one of ['switch', 'soft']")
        if not (math.isfinite(self.gate) and 0 <= self.gate < 1):
            raise ValueError(f"HPTConfig.gate must be in [0, 1), got {self.gate}")
        if self.soft not in SOFT_FUNCTIONS:
            raise ValueError(f"HPTConfig.soft={self.soft!r} is not one of {sorted(SOFT_FUNCTIONS)}")
        if (self.alpha is None) != (self.beta is None):
            raise ValueError("HPTConfig.alpha and HPTConfig.beta must be given together")


def success_rate(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample P: the mean 0/1 reward of the sample's group (its prompt's n rollouts)."""
    mean, _, _ = group_stats(rewards, group_ids)
    return mean


def route(P: torch.Tensor, cfg: HPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) for success rates P (any shape): the weights of the RL and the SFT loss."""
    if not bool(((P >= 0) & (P <= 1)).all()):
        raise ValueError("success rates P must lie in [0, 1]")
    if cfg.mode == "switch":
        rl = P > cfg.gate
        return rl.to(P.dtype), (~rl).to(P.dtype)
    f, g = (cfg.alpha, cfg.beta) if cfg.alpha is not None else SOFT_FUNCTIONS[cfg.soft]
    alpha, beta = f(P), g(P)
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not isinstance(v, torch.Tensor) or v.shape != P.shape or not bool(torch.isfinite(v).all()) \
                or bool((v < 0).any()):
            raise ValueError(f"HPT soft {name}(P) must return finite non-negative tensors shaped like P")
    return alpha, beta


def keep_rows(weight: torch.Tensor) -> torch.Tensor:
    """Indices of rows whose weight is non-zero: only these enter the forward pass."""
    return torch.nonzero(weight != 0, as_tuple=False).flatten()
