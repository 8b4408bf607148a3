"""Log-prob layer: `token_logprobs(logits, targets)` -> log softmax(z / T)[y] (and entropy), differentiable.

Forward: ONE streaming pass over the vocabulary per row (online log-sum-exp of z/T in base 2, the target logit
by a scalar load, the entropy from a running sum of p * (z/T - max)); saves only O(N) floats (lse, entropy).
Backward: ONE pass per row writing

    d/dz_j = [ g_logp * (1[j = y] - p_j)  -  g_ent * p_j * (log p_j + H) ] / T

into a fresh gradient tensor, or into the logits buffer itself with inplace_backward=True (the logits are then
DESTROYED after backward: only use it when nothing else reads them, e.g. logits that exist only for this loss).

Dispatch: Triton on CUDA tensors or under TRITON_INTERPRET=1, else the PyTorch reference (`reference.py`).
Outputs are float32 (the reference keeps float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastupg.kernels._utils import (DEFAULT_LAUNCH, LN2, LOG2E, LaunchConfig, check_logits_targets,
                                    raise_nonfinite, use_triton)

# ---------------------------------------------------------------------------------------------------------
# Row building blocks shared with fused_loss.py. All math in float32, base 2: x = z * log2(e) / T.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _row_stats(row_ptr, c2, V: tl.constexpr, BLOCK: tl.constexpr, WITH_ENT: tl.constexpr):
    """Pass 1 over one row, x_j = z_j * c2 (c2 = log2(e) / T). Returns (lse2, h2):
    lse2 = log2 sum_j 2^{x_j} = m + log2 s with s = sum_j 2^{x_j - m} (online rescaled max m), and, if WITH_ENT,
    h2 = H / ln2 = log2 s - t / s with t = sum_j 2^{x_j - m} (x_j - m) (0 when not WITH_ENT)."""
    offs = tl.arange(0, BLOCK)
    # finite start: keeps exp2(m - m_new) finite even when a whole block is -inf (masked tail / -inf logits)
    m = tl.full([], -1.0e30, tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for i in range(0, tl.cdiv(V, BLOCK)):
        cols = i * BLOCK + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * c2
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(x - m_new)
        if WITH_ENT:
            # t = sum e * (x - m): shifted by the running max, so no cancellation against lse
            d = x - m_new
            t = alpha * (t + (m - m_new) * s) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    log2s = tl.log2(s)
    h2 = log2s - t / s
    return m + log2s, h2


@triton.jit
def _row_grad(row_ptr, grad_ptr, y, lse2, h2, a, b, c2, inv_t,
              V: tl.constexpr, BLOCK: tl.constexpr, WITH_ENT: tl.constexpr):
    """Pass 2: grad_j = [a * (1[j=y] - p_j) + b * p_j * (log p_j + H)] / T, stored in grad's dtype.
    (h2 = H / ln2.) Reads the row block by block and may write to the same address (in-place)."""
    offs = tl.arange(0, BLOCK)
    for i in range(0, tl.cdiv(V, BLOCK)):
        cols = i * BLOCK + offs
        valid = cols < V
        x = tl.load(row_ptr + cols, mask=valid, other=-float("inf")).to(tl.float32) * c2
        u = x - lse2                      # log2 p_j
        p = tl.exp2(u)
        g = a * (tl.where(cols == y, 1.0, 0.0) - p)
        if WITH_ENT:
            g += b * tl.where(p > 0, p * ((u + h2) * LN2_C), 0.0)
        tl.store(grad_ptr + cols, (g * inv_t).to(grad_ptr.dtype.element_ty), mask=valid)


LN2_C = tl.constexpr(LN2)


@triton.jit
def _zero_row(grad_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for i in range(0, tl.cdiv(V, BLOCK)):
        cols = i * BLOCK + offs
        tl.store(grad_ptr + cols, tl.zeros([BLOCK], tl.float32).to(grad_ptr.dtype.element_ty), mask=cols < V)


# ---------------------------------------------------------------------------------------------------------
# token_logprobs kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _logprobs_fwd_kernel(logits_ptr, stride_row, tgt_ptr, logp_ptr, ent_ptr, lse_ptr, c2,
                         V: tl.constexpr, BLOCK: tl.constexpr, WITH_ENT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row  # int64: N * V may exceed 2^31
    lse2, h2 = _row_stats(row_ptr, c2, V, BLOCK, WITH_ENT)
    y = tl.load(tgt_ptr + row)
    xy = tl.load(row_ptr + y).to(tl.float32) * c2
    tl.store(logp_ptr + row, (xy - lse2) * LN2_C)
    tl.store(lse_ptr + row, lse2)
    if WITH_ENT:
        tl.store(ent_ptr + row, h2 * LN2_C)


@triton.jit
def _logprobs_bwd_kernel(logits_ptr, stride_row, grad_ptr, stride_grow, tgt_ptr, lse_ptr, ent_ptr,
                         glogp_ptr, gent_ptr, c2, inv_t,
                         V: tl.constexpr, BLOCK: tl.constexpr, WITH_ENT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grow_ptr = grad_ptr + row * stride_grow
    y = tl.load(tgt_ptr + row)
    lse2 = tl.load(lse_ptr + row)
    a = tl.load(glogp_ptr + row)
    if WITH_ENT:
        h2 = tl.load(ent_ptr + row) / LN2_C
        b = -tl.load(gent_ptr + row)
    else:
        h2 = 0.0
        b = 0.0
    _row_grad(row_ptr, grow_ptr, y, lse2, h2, a, b, c2, inv_t, V, BLOCK, WITH_ENT)


def logprobs_forward_rows(logits2d, targets1d, temperature: float, with_entropy: bool,
                          launch: LaunchConfig = DEFAULT_LAUNCH):
    """Raw forward launch on validated 2-D inputs: returns float32 (logp, entropy or None, lse2)."""
    N, V = logits2d.shape
    dev = logits2d.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if with_entropy else lse  # dummy ptr if unused
    if N:
        block, warps = launch.resolve(V)
        _logprobs_fwd_kernel[(N,)](logits2d, logits2d.stride(0), targets1d, logp, ent, lse,
                                   LOG2E / temperature, V=V, BLOCK=block, WITH_ENT=with_entropy,
                                   num_warps=warps)
    return logp, (ent if with_entropy else None), lse


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, return_entropy, inplace_backward, launch):
        l2, t1, lead = check_logits_targets(logits, targets, temperature)
        if l2.dtype == torch.float64:
            raise TypeError("the Triton token_logprobs takes float32/bfloat16/float16 logits, got float64")
        logp, ent, lse = logprobs_forward_rows(l2, t1, temperature, return_entropy, launch)
        bad = ~torch.isfinite(logp) if ent is None else ~(torch.isfinite(logp) & torch.isfinite(ent))
        if bool(bad.any()):
            raise_nonfinite(bad)
        ctx.save_for_backward(l2, t1, lse, ent if ent is not None else lse)
        ctx.cfg = (temperature, return_entropy, inplace_backward, launch, tuple(logits.shape))
        ctx.mark_non_differentiable(lse)
        out_logp = logp.reshape(lead)
        if return_entropy:
            return out_logp, ent.reshape(lead)
        return (out_logp,)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        l2, t1, lse, ent = ctx.saved_tensors
        temperature, with_ent, inplace, launch, shape = ctx.cfg
        N, V = l2.shape
        grad = l2 if inplace else torch.empty_like(l2, memory_format=torch.contiguous_format)
        if grad_logp is None:
            grad_logp = torch.zeros(N, dtype=torch.float32, device=l2.device)
        glogp = grad_logp.reshape(-1).to(torch.float32).contiguous()
        use_ent = with_ent and grad_ent is not None
        gent = grad_ent.reshape(-1).to(torch.float32).contiguous() if use_ent else glogp
        if N:
            block, warps = launch.resolve(V)
            _logprobs_bwd_kernel[(N,)](l2, l2.stride(0), grad, grad.stride(0), t1, lse, ent, glogp, gent,
                                       LOG2E / temperature, 1.0 / temperature, V=V, BLOCK=block,
                                       WITH_ENT=use_ent, num_warps=warps)
        return grad.reshape(shape), None, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, inplace_backward: bool = False,
                   launch: LaunchConfig = DEFAULT_LAUNCH):
    """log softmax(logits / temperature)[targets] (float32, shape logits.shape[:-1]); with return_entropy also
    the entropy H = -sum_j p_j log p_j of softmax(logits / T) per token (float32). Differentiable in logits.

    logits: (N, V) or (B, T, V), float32/bfloat16/float16, any V, contiguous in the last dimension (other
            strides free). targets: integer ids in [0, V) (out-of-range ids raise ValueError; there is no
            ignore_index: mask those tokens in the loss instead and give them any valid id, e.g. 0).
    inplace_backward: write the logits gradient into the logits buffer (saves N x V memory; logits destroyed).
    Non-finite logits raise ValueError (detected from the O(N) outputs, not by an extra N x V pass).
    """
    if not use_triton(logits) if isinstance(logits, torch.Tensor) else False:
        from fastupg.kernels.reference import token_logprobs_ref
        return token_logprobs_ref(logits, targets, temperature, return_entropy)
    out = _TokenLogprobs.apply(logits, targets, temperature, bool(return_entropy), bool(inplace_backward), launch)
    return out if return_entropy else out[0]
