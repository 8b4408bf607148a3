"""Importance-sampling correction of the rollout engine / trainer mismatch.

vLLM samples with its own kernels (and, at scale, in bf16), so the probability it gave a sampled
token differs a little from the one the trainer recomputes for the same token: the rollouts are
slightly off-policy. Truncated importance sampling (TIS) reweights each token's loss by

    rho = pi_trainer(y) / pi_sampler(y)        per token, or per sequence (product over its tokens)

capped from above (``*_truncate``: min(rho, cap)) or with the tokens/sequences above the cap
dropped (``*_mask``: rho if rho <= cap else 0). This is TRL's ``vllm_importance_sampling_correction``
with ``vllm_importance_sampling_mode`` (same four mode names, same definitions: the sequence ratio is
exp of the SUM of the token log-ratios) and ``vllm_importance_sampling_clip_max`` as the cap, and
verl's ``rollout_is`` (token / sequence) with ``rollout_is_threshold``. Defaults differ from TRL 1.16
(sequence_mask, cap 3.0): fastupg uses token_truncate with cap 2, verl's threshold and TRL's cap
before 1.6. The weights carry no gradient: multiply each token's loss by them.

With the HF engine the sampler is the trainer's own model, the ratio is exactly 1 by construction
and the trainer skips this step.
"""
from __future__ import annotations

import torch

__all__ = ["IS_MODES", "is_correction", "is_correction_stats"]

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _log_ratio(trainer_logp, sampler_logp, mask, seq_ids, mode):
    """Masked log-ratio per token (token modes) or its sequence sum broadcast to the tokens."""
    if mode not in IS_MODES:
        raise ValueError(f"is_correction: mode must be one of {IS_MODES}, got {mode!r}")
    if trainer_logp.shape != sampler_logp.shape or trainer_logp.shape != mask.shape:
        raise ValueError(f"is_correction: shapes differ: trainer {tuple(trainer_logp.shape)}, "
                         f"sampler {tuple(sampler_logp.shape)}, mask {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    # where(), not multiply: a masked position may hold padding garbage (-inf) and 0 * inf is nan
    diff = torch.where(m, trainer_logp.detach().to(torch.float64) - sampler_logp.detach().to(torch.float64),
                       torch.zeros((), dtype=torch.float64, device=trainer_logp.device))
    if mode.startswith("token"):
        return diff, m
    if seq_ids is None:
        if diff.dim() != 2:
            raise ValueError("is_correction: sequence modes need [B, T] inputs or seq_ids")
        return diff.sum(dim=-1, keepdim=True).expand_as(diff), m
    if seq_ids.shape != diff.shape or diff.dim() != 1:
        raise ValueError("is_correction: seq_ids must be [N] like the packed log-probs")
    uniq, inv = torch.unique(seq_ids, return_inverse=True)
    per_seq = torch.zeros(len(uniq), dtype=diff.dtype, device=diff.device).index_add_(0, inv, diff)
    return per_seq[inv], m


def is_correction(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                  seq_ids: torch.Tensor | None = None, mode: str = "token_truncate",
                  cap: float = 2.0) -> torch.Tensor:
    """Per-token importance weights (float32, no gradient); masked tokens get 0.

    Shapes: [B, T] with `mask` [B, T] (rows are sequences), or packed [N] with `seq_ids` [N]
    naming each token's sequence (any integers). Computed in float64: a sequence ratio sums
    hundreds of small log-ratios.
    """
    if not cap > 0:
        raise ValueError(f"is_correction: cap must be > 0, got {cap}")
    log_ratio, m = _log_ratio(trainer_logp, sampler_logp, mask, seq_ids, mode)
    # clamp the exponent: a huge mismatch must give a huge (then capped/masked) ratio, never inf
    ratio = torch.exp(log_ratio.clamp(max=80.0))
    w = ratio.clamp(max=cap) if mode.endswith("truncate") else torch.where(ratio <= cap, ratio, torch.zeros_like(ratio))
    return (w * m).to(torch.float32)


@torch.no_grad()
def is_correction_stats(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                        seq_ids: torch.Tensor | None = None, mode: str = "token_truncate",
                        cap: float = 2.0) -> dict[str, float]:
    """Sums for logging, over the unmasked tokens (add them up over micro-batches and ranks):

    ``ratio_sum``: the weights after the cap (TRL logs their mean as
    sampling/importance_sampling_ratio/mean); ``clipped``: tokens whose ratio exceeded the cap
    (capped or dropped); ``tokens``: tokens counted; ``logp_diff_sum`` / ``logp_diff_max``:
    |trainer - sampler| log-prob (TRL's sampling/sampling_logp_difference/{mean,max}).
    """
    w = is_correction(trainer_logp, sampler_logp, mask, seq_ids, mode, cap).double()
    log_ratio, m = _log_ratio(trainer_logp, sampler_logp, mask, seq_ids, mode)
    d = (trainer_logp.detach().double() - sampler_logp.detach().double()).abs()[m]
    return {"ratio_sum": float(w[m].sum()), "clipped": float((torch.exp(log_ratio[m].clamp(max=80.0)) > cap).sum()),
            "tokens": float(m.sum()), "logp_diff_sum": float(d.sum()),
            "logp_diff_max": float(d.max()) if d.numel() else 0.0}
