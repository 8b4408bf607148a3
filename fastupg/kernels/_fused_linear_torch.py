"""fused-linear impl "torch": the plain reference. Materialises the N x V logits; autograd does the rest (a
float64-capable oracle). The logits matmul runs with autocast off in forward and backward (one precision)."""
from __future__ import annotations

import torch

from fastupg.kernels._fused_linear_common import _no_autocast, _stat_dtype
from fastupg.kernels.torch_reference import log_softmax_stats


class _Logits(torch.autograd.Function):
    """h @ w.T (+ b) in the operands' dtype with autocast off in the forward AND the backward (autograd would replay
    MmBackward under the caller's autocast if backward() is called inside it)."""

    @staticmethod
    def forward(ctx, h, w, b):
        ctx.save_for_backward(h, w)
        ctx.has_b = b is not None
        with _no_autocast(h.device):
            z = h @ w.t()
            return z + b if b is not None else z

    @staticmethod
    def backward(ctx, gz):
        h, w = ctx.saved_tensors
        with _no_autocast(h.device):
            gz = gz.to(h.dtype)
            dh = gz @ w if ctx.needs_input_grad[0] else None
            dw = gz.t() @ h if ctx.needs_input_grad[1] else None
            db = gz.sum(0) if ctx.has_b and ctx.needs_input_grad[2] else None
        return dh, dw, db


def _torch_logprobs(h, w, b, tgt, temperature, return_entropy):
    """Plain reference: materialises the logits; differentiable by autograd."""
    z = _Logits.apply(h, w, b)
    z = z.to(_stat_dtype(h.dtype)) / temperature
    logp, _, ent = log_softmax_stats(z, tgt, return_entropy)  # the one log-softmax reference
    return logp, ent
