"""Plain-PyTorch references of the logits kernels: the test oracle and the CPU fallback (N x V memory).

Computed in float32 (float64 stays float64, for the oracle); same signatures as the Triton versions.
"""
from __future__ import annotations

import torch

from fastupg.estimator import policy_loss
from fastupg.kernels._utils import check_logits_targets


def token_logprobs_ref(logits, targets, temperature: float = 1.0, return_entropy: bool = False, **_ignored):
    check_logits_targets(logits, targets, temperature)
    dt = torch.promote_types(logits.dtype, torch.float32)
    lsm = torch.log_softmax(logits.to(dt) / temperature, dim=-1)
    logp = lsm.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not bool(torch.isfinite(logp.detach()).all()):
        raise ValueError("logits contain non-finite values (nan/inf) or give the target zero probability")
    if not return_entropy:
        return logp
    ent = -(lsm.exp() * lsm).nan_to_num(0.0).sum(-1)
    return logp, ent


def fused_policy_loss_ref(logits, targets, estimator, *, advantages, old_logp=None, mask=None, offline=None,
                          seq_ids=None, weight=None, ref_logp=None, temperature: float = 1.0, agg=None,
                          inplace_backward: bool = False, **_ignored):
    """log_softmax(z / T).gather + fastupg.policy_loss (entropy always computed: it feeds the metric)."""
    logp, ent = token_logprobs_ref(logits, targets, temperature, return_entropy=True)
    if estimator.entropy_coef == 0:
        ent = ent.detach()
    return policy_loss(logp, estimator, advantages=advantages, old_logp=old_logp, mask=mask, offline=offline,
                       seq_ids=seq_ids, weight=weight, entropy=ent, ref_logp=ref_logp, agg=agg)
