"""The public logits ops: per-token log-probs (+ entropy) and the whole unified policy loss, straight from logits.

* `token_logprobs(logits, targets, temperature=1.0, return_entropy=False, inplace_backward=False)`
  log-prob layer (differentiable; any estimator, GSPO included, through fastupg.policy_loss).
* `fused_policy_loss(logits, targets, estimator, *, advantages, old_logp, mask, offline, seq_ids, weight, ref_logp,
  temperature, agg, inplace_backward, check)` -> (loss, metrics)
  fused-loss layer: the loss AND its logits gradient in one pass over the logits (token-level estimators; sequence-
  level ones such as GSPO go through token_logprobs + fastupg.policy_loss). Backward hands the saved gradient out.
* `raise_deferred_checks()`, `loss_and_grad_rows(...)` (the row-level building block of the fused-linear ops).

This file is the API and the dispatch; the work is done elsewhere, one file per implementation:
    _logits_triton.py   the Triton kernels, their launch configurations (LAUNCH, SPLIT) and launchers: they run when
                        the logits are on a CUDA device or when TRITON_INTERPRET=1 (the CPU interpreter of the tests);
    torch_reference.py  the plain-PyTorch path otherwise (same results and semantics, N x V temporaries), which is
                        also the float64 oracle of the tests;
    _logits_checks.py   argument checks, in-place guards and the data checks (sync / deferred / off) of both.
"""
from __future__ import annotations

import os

import torch

from fastupg.kernels.estimator import Estimator, policy_loss
from fastupg.kernels import torch_reference as reference
from fastupg.kernels._logits_checks import (_USED_AFTER, CHECK_MODES, _check_logits_targets, _describer, _flatten,
                                            _mark_overwritten, _prepare_args, _refuse_leaf, _refuse_overwritten,
                                            _refuse_view, _submit_checks, advantage_rule, check_mask_values,
                                            effective_advantages, raise_deferred_checks, resolve_estimator)
from fastupg.kernels._logits_triton import (FEW_ROWS, LAUNCH, LAUNCH_FEW_ROWS, METRIC_KEYS, SPLIT,
                                            _fused_triton, _TokenLogprobs, loss_and_grad_rows, rescale_rows)

__all__ = ["token_logprobs", "fused_policy_loss", "raise_deferred_checks", "loss_and_grad_rows", "use_triton",
           # moved to _logits_checks.py / _logits_triton.py, still importable from here
           "CHECK_MODES", "resolve_estimator", "advantage_rule", "effective_advantages", "check_mask_values",
           "LAUNCH", "LAUNCH_FEW_ROWS", "FEW_ROWS", "SPLIT", "METRIC_KEYS"]


def use_triton(t: torch.Tensor) -> bool:
    """Where the kernels run: CUDA tensors, or any tensor under TRITON_INTERPRET=1; the PyTorch path otherwise."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------------------------------
# log-prob layer
# ------------------------------------------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, inplace_backward: bool = False, block_v: int | None = None):
    """log softmax(logits / T)[targets] (float32, shape of targets), and the entropy of softmax(logits / T).

    inplace_backward=True writes the logits gradient into the logits buffer during backward (no second N x V buffer;
    the logits are destroyed: use it when nothing else needs them, as in a loss right after lm_head). The write is
    visible to autograd (version counter: any other saved use of the logits raises at its backward) and to fastupg
    (later token_logprobs / fused_policy_loss calls refuse the overwritten logits); a leaf that requires grad is
    refused. Honoured the same way on the plain-PyTorch path. block_v overrides the vocabulary block (tests).
    """
    _refuse_overwritten(logits)
    inplace = bool(inplace_backward) and torch.is_grad_enabled() and getattr(logits, "requires_grad", False)
    _refuse_leaf(logits, inplace)
    if not use_triton(logits):
        if inplace:
            _flatten(logits, targets, temperature)
            logp, ent = reference._TokenLogprobsInplaceRef.apply(logits, targets, float(temperature))
            return (logp, ent) if return_entropy else logp
        return reference.token_logprobs_ref(logits, targets, temperature, return_entropy)
    raise_deferred_checks(wait=False)
    logp, ent = _TokenLogprobs.apply(logits, targets, float(temperature), inplace, block_v)
    return (logp, ent) if return_entropy else logp


# ------------------------------------------------------------------------------------------------------------------
# fused-loss layer
# ------------------------------------------------------------------------------------------------------------------
def fused_policy_loss(logits: torch.Tensor, targets: torch.Tensor, estimator: Estimator | str, *, advantages=None,
                      old_logp=None, mask=None, offline=None, seq_ids=None, weight=None, ref_logp=None,
                      temperature: float = 1.0, agg: str | None = None, inplace_backward: bool = False,
                      check: str = "sync", block_v: int | None = None):
    """The unified policy loss straight from logits (N, V) or (B, T, V); returns (loss, metrics) like policy_loss.

    estimator: an Estimator or a preset name ("grpo"). Per-token arguments have the shape of `targets` (see
    `fastupg.policy_loss`); mask holds 0/1 (a fractional mask is refused: weights go in weight=); a branch whose
    advantage component is 'one' (SFT) uses A = 1 on its tokens, and advantages= may be omitted when no branch needs
    it. Masked rows (mask 0) are not read: whatever they hold (nan included) gives zero loss and zero gradient.
    The entropy bonus and the metrics use the entropy computed in the kernel.

    inplace_backward=True stores the gradient in the logits buffer during this call (no second N x V buffer). It is
    declared to autograd (mark_dirty): an earlier use of the logits that autograd saved raises at backward, a later
    differentiable use raises at backward, fastupg ops refuse the overwritten logits, and a leaf that requires grad is
    refused. check="sync" (default) raises bad data (targets out of range, nan advantages, ...) before returning, at
    the cost of one host sync; "deferred" queues the check without a sync and raises at a later fastupg call or at
    `raise_deferred_checks()`; "off" skips reading it. An all-masked batch gives a zero loss with a zero gradient.
    On the GPU: five launches (prep; stats, row and gradient, or one launch with SPLIT["one_launch"]; metrics), no
    host sync unless check="sync".
    """
    est = resolve_estimator(estimator)
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {list(CHECK_MODES)}, got {check!r}")
    _refuse_overwritten(logits)
    _check_logits_targets(logits, targets, temperature)
    kw = dict(advantages=advantages, old_logp=old_logp, mask=mask, offline=offline, seq_ids=seq_ids, weight=weight,
              ref_logp=ref_logp)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    inplace = bool(inplace_backward) and need_grad
    _refuse_leaf(logits, inplace)
    _refuse_view(logits, inplace)
    triton = use_triton(logits)
    if triton:
        raise_deferred_checks(wait=False)
    if est.sequence_level and (triton or inplace):
        return _through_token_logprobs(logits, targets, est, kw, temperature, agg, inplace, block_v)
    if not triton:
        return _fused_reference(logits, targets, est, kw, temperature, agg, inplace)
    a = _prepare_args(est, logits, targets, kw, agg)
    if inplace and logits.stride(-1) != 1:
        inplace = False  # the kernel works on a contiguous copy: the caller's logits are not written
    state = {}

    def run():
        res = _fused_triton(logits, targets, est, a, float(temperature), agg, need_grad, inplace, block_v)
        state["res"] = res
        return res.loss, res.grad, res.geom

    if need_grad:
        out = _FusedPolicyLoss.apply(logits, run, inplace)
        loss = out[0] if inplace else out
    else:
        run()
        loss = state["res"].loss
    res = state["res"]
    metrics = dict(res.metrics)
    metrics["loss"] = loss.detach()
    if inplace:
        _mark_overwritten(logits, "fused_policy_loss")
    _submit_checks(res.err, check, _describer(est, logits.shape[-1], targets))
    return loss, metrics


def _through_token_logprobs(logits, targets, est, kw, temperature, agg, inplace, block_v):
    """Sequence-level estimators (GSPO): token_logprobs + fastupg.policy_loss (its prepare_inputs applies the A = 1
    rule of 'one' branches), on the Triton path and, with inplace_backward=True, on the PyTorch path (without it the
    PyTorch path is fused_policy_loss_ref, the same computation)."""
    check_mask_values(kw["mask"])  # before token_logprobs may overwrite the logits (policy_loss would refuse it after)
    logp, ent = token_logprobs(logits, targets, temperature, return_entropy=True, inplace_backward=inplace,
                               block_v=block_v)
    return policy_loss(logp, est, entropy=ent, agg=agg, **kw)


def _fused_reference(logits, targets, est, kw, temperature, agg, inplace):
    """Plain-PyTorch path (no CUDA, no interpreter), with the same semantics; inplace_backward honoured: the
    gradient is computed with the loss and written into the logits, declared to autograd as on the GPU."""
    if not inplace:
        return reference.fused_policy_loss_ref(logits, targets, est, temperature=temperature, agg=agg, **kw)
    state = {}

    def run():
        loss, state["met"], grad = reference.fused_policy_loss_grad_ref(logits, targets, est,
                                                                        temperature=temperature, agg=agg, **kw)
        logits.copy_(grad)
        return loss, None, (targets.numel(), logits.shape[-1], None, None, None)

    loss, _ = _FusedPolicyLoss.apply(logits, run, True)
    _mark_overwritten(logits, "fused_policy_loss")
    met = state["met"]
    met["loss"] = loss.detach()
    return loss, met


class _FusedPolicyLoss(torch.autograd.Function):
    """Forward: the loss, with the logits gradient computed by the same kernel (into the logits' own storage when
    in place: declared to autograd with mark_dirty). Backward: hands the saved gradient out, times the upstream g."""

    @staticmethod
    def forward(ctx, logits, run, inplace):
        loss, grad, geom = run()
        ctx.set_materialize_grads(False)
        ctx.inplace, ctx.calls, ctx.g1, ctx.geom, ctx.shape = inplace, 0, None, geom, logits.shape
        if inplace:
            ctx.mark_dirty(logits)
            ctx.save_for_backward(logits)
            return loss, logits
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g, g_logits=None):
        if g_logits is not None:
            raise RuntimeError(_USED_AFTER)
        (grad,) = ctx.saved_tensors
        if g is None:
            return None, None, None
        g = g.detach().reshape(())
        if ctx.calls == 0:
            # first backward: g == 1 (loss.backward()) leaves the buffer as it is; otherwise it is scaled by g in
            # place, decided on the device (no host sync, no second N x V buffer), and g is remembered
            ctx.g1 = g.clone()
            _rescale(grad, g, ctx.geom)
        else:
            # retain_graph=True and a second backward: the buffer holds g1 * dL/dz; scale it by g / g1 out of place
            if float(ctx.g1) == 0.0:
                raise RuntimeError("fused_policy_loss: a second backward after a first one with upstream gradient 0 "
                                   "(the saved gradient was scaled to 0): call fused_policy_loss again")
            grad = grad * (g / ctx.g1).to(grad.dtype)
        ctx.calls += 1
        return (grad if ctx.inplace else grad.view(ctx.shape)), None, None


def _rescale(buf: torch.Tensor, g: torch.Tensor, geom) -> None:
    """The saved gradient times the upstream gradient g, in place (on the device, no host sync, on the Triton path)."""
    if use_triton(buf):
        rescale_rows(buf, g, geom)
    elif float(g) != 1.0:
        buf.mul_(g.to(buf.dtype))
