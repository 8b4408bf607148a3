"""Plain-PyTorch references of the logits kernels: the CPU fallback and the oracle of the tests.

They materialise N x V temporaries (log_softmax), so they are for small inputs and for checking.
Pass float64 logits to get a float64 oracle.
"""
from __future__ import annotations

import torch

from fastupg.estimator import Estimator, policy_loss


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       return_entropy: bool = False):
    from fastupg.kernels.logits import _flatten  # the same argument checks as the kernels
    _flatten(logits, targets, temperature)
    z = logits if logits.dtype == torch.float64 else logits.float()
    logq = torch.log_softmax(z / temperature, dim=-1)
    logp = logq.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not bool(torch.isfinite(logp.detach()).all()):
        raise ValueError("logits contain non-finite values (nan/inf) (or a target logit is -inf)")
    if not return_entropy:
        return logp
    p = logq.exp()
    ent = -(p * torch.where(p > 0, logq, torch.zeros_like(logq))).sum(-1)
    return logp, ent


def fused_policy_loss_ref(logits: torch.Tensor, targets: torch.Tensor, estimator: Estimator | str, *, advantages=None,
                          old_logp=None, mask=None, offline=None, seq_ids=None, weight=None, ref_logp=None,
                          temperature: float = 1.0, agg: str | None = None):
    """fused_policy_loss in plain PyTorch, with its semantics: preset names, the A = 1 rule of 'one' branches,
    0/1 masks only, and (token-level estimators) masked rows not read: they give zero loss and zero gradient
    whatever they hold."""
    from fastupg.kernels.logits import _flatten, resolve_estimator  # noqa: PLC0415
    estimator = resolve_estimator(estimator)
    _flatten(logits, targets, temperature)
    # (0/1 masks and the A = 1 rule of 'one' branches: policy_loss's prepare_inputs, shared by every path)
    if mask is not None and isinstance(mask, torch.Tensor) and mask.shape == targets.shape \
            and not estimator.sequence_level:
        logits = torch.where((mask != 0)[..., None], logits, torch.zeros((), dtype=logits.dtype))
    logp, ent = token_logprobs_ref(logits, targets, temperature, return_entropy=True)
    return policy_loss(logp, estimator, advantages=advantages, old_logp=old_logp, mask=mask, offline=offline,
                       seq_ids=seq_ids, weight=weight, entropy=ent if estimator.entropy_coef != 0 else ent.detach(),
                       ref_logp=ref_logp, agg=agg)
