"""The plain-PyTorch implementation of the logits ops: the CPU fallback and the float64 oracle of the tests.

* `log_softmax_stats`: THE reference for the statistics of softmax(z / T) (log-prob of the target, log-sum-exp,
  entropy); token_logprobs_ref, the fused-linear "torch" impl and the PyTorch chunks of the "chunked" impl call it.
* `token_logprobs_ref`, `fused_policy_loss_ref`: the logits ops with the same semantics as the Triton kernels.
* `_TokenLogprobsInplaceRef`, `fused_policy_loss_grad_ref`: the eager path with inplace_backward=True honoured.

They materialise N x V temporaries, so they are for small inputs and for checking. Pass float64 logits to get a
float64 oracle. Argument checks: _logits_checks.py (the same as the kernels'); no import of logits.py (no cycle).
"""
from __future__ import annotations

import weakref

import torch

from fastupg.kernels.estimator import Estimator, policy_loss
from fastupg.kernels._logits_checks import _SECOND_BACKWARD, _flatten, _mark_overwritten, resolve_estimator


def log_softmax_stats(u: torch.Tensor, targets: torch.Tensor, return_entropy: bool = False, inplace: bool = False):
    """(log p[targets], log-sum-exp, entropy or None) of p = softmax(u) over the last dim, in u's dtype.

    u holds the logits already divided by the temperature, in the precision wanted (float64 for an oracle).
    Differentiable by autograd unless inplace=True: then u is overwritten with log p (callers without autograd that
    go on to use log p, e.g. to form the gradient, need no second vocabulary-sized buffer). -inf logits (p = 0) add
    0 to the entropy, not 0 * -inf.
    """
    lse = torch.logsumexp(u, dim=-1)
    logq = u.sub_(lse.unsqueeze(-1)) if inplace else u - lse.unsqueeze(-1)
    logp = logq.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp, lse, None
    p = logq.exp()
    # (vecdot: the product p log p is not materialised; two vocabulary-sized temporaries, p and the guarded log p)
    ent = -torch.linalg.vecdot(p, torch.where(p > 0, logq, torch.zeros((), dtype=logq.dtype, device=logq.device)))
    return logp, lse, ent


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       return_entropy: bool = False):
    _flatten(logits, targets, temperature)  # the same argument checks as the kernels
    z = logits if logits.dtype == torch.float64 else logits.float()
    logp, _, ent = log_softmax_stats(z / temperature, targets, return_entropy)
    if not bool(torch.isfinite(logp.detach()).all()):
        raise ValueError("logits contain non-finite values (nan/inf) (or a target logit is -inf)")
    return (logp, ent) if return_entropy else logp


def fused_policy_loss_ref(logits: torch.Tensor, targets: torch.Tensor, estimator: Estimator | str, *, advantages=None,
                          old_logp=None, mask=None, offline=None, seq_ids=None, weight=None, ref_logp=None,
                          temperature: float = 1.0, agg: str | None = None):
    """fused_policy_loss in plain PyTorch, with its semantics: preset names, the A = 1 rule of 'one' branches,
    0/1 masks only, and (token-level estimators) masked rows not read: they give zero loss and zero gradient
    whatever they hold."""
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


def fused_policy_loss_grad_ref(logits: torch.Tensor, targets: torch.Tensor, estimator: Estimator, *,
                               temperature: float = 1.0, agg: str | None = None, **kw):
    """(loss, metrics, d loss / d logits) of fused_policy_loss_ref, the gradient by autograd (eager in-place path)."""
    with torch.enable_grad():
        zl = logits.detach().requires_grad_()
        loss, met = fused_policy_loss_ref(zl, targets, estimator, temperature=temperature, agg=agg, **kw)
        (grad,) = torch.autograd.grad(loss, zl)
    return loss.detach(), met, grad


class _TokenLogprobsInplaceRef(torch.autograd.Function):
    """Plain-PyTorch token_logprobs with inplace_backward=True honoured as on the GPU: backward writes the gradient
    into the logits (version counter bumped)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        logp, ent = token_logprobs_ref(logits, targets, temperature, return_entropy=True)
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        ctx.logits_ref = weakref.ref(logits)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        if getattr(ctx, "overwritten", False):
            raise RuntimeError(_SECOND_BACKWARD)
        ctx.overwritten = True
        z, t = ctx.saved_tensors
        with torch.enable_grad():
            zl = z.detach().requires_grad_()
            lp, en = token_logprobs_ref(zl, t, ctx.temperature, return_entropy=True)
            (grad,) = torch.autograd.grad((lp * g_logp).sum() + (en * g_ent).sum(), zl)
        z.copy_(grad)  # (an in-place op: bumps the version counter)
        src = ctx.logits_ref()
        if src is not None:
            _mark_overwritten(src, "token_logprobs")
        return z, None, None
