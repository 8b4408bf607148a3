"""Advantage estimates (the `advantage` component of a Branch), on per-sample tensors.

Samples are grouped by `group_ids` (one group = the rollouts, and for mixed estimators the demonstrations, of one
prompt). Groups whose rewards are all equal carry no signal and get advantage exactly 0.
`to_tokens` broadcasts per-sample values to the tokens of each sample.
"""
from __future__ import annotations

import torch


def _check(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, name: str = "rewards") -> None:
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point() or rewards.dim() != 1:
        raise TypeError(f"{name} must be a 1-D floating-point tensor")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"{name} contains non-finite values")
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor) or group_ids.shape != rewards.shape or group_ids.is_floating_point():
            raise ValueError(f"group_ids must be an integer tensor of shape {tuple(rewards.shape)}")


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor, stats_mask: torch.Tensor | None = None):
    """Per-sample (mean, std, count) of its group, over the samples selected by stats_mask (default: all)."""
    _check(rewards, group_ids)
    inv = torch.unique(group_ids, return_inverse=True)[1]
    g = int(inv.max()) + 1 if inv.numel() else 0
    w = torch.ones_like(rewards) if stats_mask is None else stats_mask.to(rewards.dtype)
    cnt = torch.zeros(g, dtype=rewards.dtype, device=rewards.device).index_add_(0, inv, w)
    tot = torch.zeros_like(cnt).index_add_(0, inv, w * rewards)
    mean = tot / cnt.clamp_min(1)
    dev = (rewards - mean[inv]) * w
    # unbiased std (torch.std default), as TRL and verl use; a group of one has std 0
    var = torch.zeros_like(cnt).index_add_(0, inv, dev * dev) / (cnt - 1).clamp_min(1)
    return mean[inv], var.sqrt()[inv], cnt[inv]


def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, std: bool = True, eps: float = 1e-6,
         stats_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(R - mean_g) / (std_g + eps); std=False gives Dr.GRPO's R - mean_g.

    stats_mask picks the samples the group statistics are taken over (GRPO: the on-policy rollouts only; pass None to
    use every sample, which is the `mixed` estimator of SRFT/LUFFY). Every sample gets an advantage.
    """
    mean, sd, _ = group_stats(rewards, group_ids, stats_mask)
    adv = rewards - mean
    if std:
        adv = adv / (sd + eps)
    # all-equal groups: exactly 0 (float noise in mean would otherwise leave ~1e-8 / eps = O(1) values)
    same = sd == 0
    return torch.where(same, torch.zeros_like(adv), adv)


def mixed(rewards: torch.Tensor, group_ids: torch.Tensor, std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """SRFT/LUFFY: GRPO statistics over on-policy AND demonstration samples of the group."""
    return grpo(rewards, group_ids, std=std, eps=eps, stats_mask=None)


def reinforce(rewards: torch.Tensor) -> torch.Tensor:
    """+1 for a correct sample, -1 otherwise, from a 0/1 reward."""
    _check(rewards)
    if not bool(((rewards == 0) | (rewards == 1)).all()):
        raise ValueError("reinforce advantages need 0/1 rewards")
    return 2 * rewards - 1


def rloo(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: R_i - mean of the other samples of the group (0 for a group of one)."""
    mean, _, cnt = group_stats(rewards, group_ids)
    adv = (rewards - mean) * cnt / (cnt - 1).clamp_min(1)
    return torch.where(cnt > 1, adv, torch.zeros_like(adv))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation on (B, T) token rewards and values; returns (advantages, returns).

    Tokens after the last masked one bootstrap with value 0 (the episode ended).
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError("gae needs rewards, values and mask of the same (B, T) shape")
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        nv = values[:, t + 1] * m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nv - values[:, t]
        nm = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        last = delta + gamma * lam * nm * last
        adv[:, t] = last * m[:, t]
    return adv, (adv + values) * m


def to_tokens(per_sample: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample values to tokens: seq_ids[t] indexes per_sample."""
    return per_sample[seq_ids]
