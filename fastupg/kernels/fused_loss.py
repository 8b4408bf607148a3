"""Fused-loss layer: one launch computes log-probs, ratios, masks, per-token loss AND the logits gradient.

    fused_policy_loss(logits, targets, estimator, *, advantages, old_logp=None, mask=None, offline=None,
                      seq_ids=None, weight=None, ref_logp=None, temperature=1.0, agg=None,
                      inplace_backward=False) -> (loss, metrics)

    loss_and_grad_rows(logits2d, targets1d, estimator, x, temperature, grad_out=None)
        -> (ell, logp, entropy, grad)                                   [STABLE: used by fused_linear.py]
        logits2d (M, V) last-dim contiguous; targets1d (M,) int64 in [0, V);
        x = fastupg.estimator.prepare_inputs(...) dict restricted to these rows (keys adv, old, mask, offline,
            ref; old/ref may be None) plus x['scale'] = s_t * w_t (float32, (M,): aggregation weight times
            branch coef times caller weight; 0 on masked rows);
        ell (M,) float32: per-token loss ell_t (pg - c_H H + c_KL KL), 0 on masked rows;
        logp, entropy (M,) float32 (0 on masked rows);
        grad (M, V) in logits' dtype = d(sum_t scale_t * ell_t) / d logits2d, written into grad_out when given
            (grad_out may be logits2d itself: rows are read before they are overwritten).

Kernel per row (token): if masked, write a zero gradient row and nothing else (no logits read). Else pass 1
(online lse, target logit, entropy), then the estimator math in registers (branch codes are constexpr, the
per-token offline flag picks the branch), then pass 2 writes scale * d ell / d z; a token whose coefficient is
exactly 0 (e.g. clipped, no entropy bonus) gets a zero row without a second read. Backward only scales the
saved gradient by grad_output (in place). Sequence-level estimators (gspo) go through token_logprobs +
fastupg.policy_loss. An all-masked batch gives loss 0 with a zero gradient. With inplace_backward=True the
gradient is written into the logits buffer during the forward: the logits are destroyed after the call.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from fastupg.estimator import Estimator, _branch_pg, _kl, aggregation_weights, policy_loss, prepare_inputs
from fastupg.kernels._utils import (DEFAULT_LAUNCH, LOG2E, LaunchConfig, check_logits_targets, raise_nonfinite,
                                    use_triton)
from fastupg.kernels.logprobs import LN2_C, _row_grad, _row_stats, _zero_row, token_logprobs

_REF = {"policy": 0, "old": 1, "one": 2}
_MASK = {"none": 0, "clip": 1, "cispo": 2}
_KLK = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _pg(l, A, old, lo, hi, gamma, dual_c, REF: tl.constexpr, MASK: tl.constexpr, HAS_DUAL: tl.constexpr,
        SHAPE: tl.constexpr):
    """Per-token policy-gradient loss and its derivative d/dl (DESIGN.md §1.1 table)."""
    if REF == 0:  # policy: -A l
        pg = -A * l
        d = -A
    elif REF == 2:  # one: -A p, or LUFFY's -A p / (p + gamma)
        p = tl.exp(l)
        if SHAPE:
            q = p + gamma
            pg = -A * p / q
            d = -A * p * gamma / (q * q)
        else:
            pg = -A * p
            d = -A * p
    else:  # old: r = exp(l - old)
        r = tl.exp(l - old)
        if MASK == 0:
            pg = -A * r
            d = -A * r
        elif MASK == 2:  # cispo: -sg(clip(r)) A l
            rc = tl.minimum(tl.maximum(r, lo), hi)
            pg = -rc * A * l
            d = -rc * A
        else:  # clip: max(-A r, -A clip(r)); gradient -A r where the unclipped term is the max
            u = -A * r
            c = -A * tl.minimum(tl.maximum(r, lo), hi)
            pg = tl.maximum(u, c)
            d = tl.where(u >= c, u, 0.0)
            if HAS_DUAL:
                cap = -dual_c * A
                capped = (A < 0) & (pg > cap)
                pg = tl.where(capped, cap, pg)
                d = tl.where(capped, 0.0, d)
    return pg, d


@triton.jit
def _fused_rows_kernel(logits_ptr, stride_row, grad_ptr, stride_grow, tgt_ptr, adv_ptr, old_ptr, ref_ptr,
                       scale_ptr, flags_ptr, ell_ptr, logp_ptr, ent_ptr,
                       c2, inv_t, lo, hi, gamma, dual_c, ent_coef, kl_coef,
                       V: tl.constexpr, BLOCK: tl.constexpr,
                       ON_REF: tl.constexpr, ON_MASK: tl.constexpr, OFF_REF: tl.constexpr, OFF_MASK: tl.constexpr,
                       HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr, SHAPE: tl.constexpr,
                       ENT_TERM: tl.constexpr, KL_KIND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row  # int64 offsets: N * V may exceed 2^31
    grow_ptr = grad_ptr + row * stride_grow
    flags = tl.load(flags_ptr + row).to(tl.int32)
    if (flags & 1) != 0:
        lse2, h2 = _row_stats(row_ptr, c2, V, BLOCK, True)
        y = tl.load(tgt_ptr + row)
        l = (tl.load(row_ptr + y).to(tl.float32) * c2 - lse2) * LN2_C
        A = tl.load(adv_ptr + row)
        if HAS_OLD:
            old = tl.load(old_ptr + row)
        else:
            old = l
        pg_on, d_on = _pg(l, A, old, lo, hi, gamma, dual_c, ON_REF, ON_MASK, HAS_DUAL, SHAPE)
        pg_off, d_off = _pg(l, A, old, lo, hi, gamma, dual_c, OFF_REF, OFF_MASK, HAS_DUAL, SHAPE)
        off = (flags & 2) != 0
        ell = tl.where(off, pg_off, pg_on)
        d = tl.where(off, d_off, d_on)
        H = h2 * LN2_C
        if ENT_TERM:
            ell = ell - ent_coef * H
        if KL_KIND != 0:
            dl = tl.load(ref_ptr + row) - l  # ref - l
            if KL_KIND == 1:
                ell += kl_coef * (-dl)
                d += kl_coef
            elif KL_KIND == 2:
                ell += kl_coef * 0.5 * dl * dl
                d += kl_coef * (-dl)
            else:
                e = tl.exp(dl)
                ell += kl_coef * (e - dl - 1.0)
                d += kl_coef * (1.0 - e)
        tl.store(ell_ptr + row, ell)
        tl.store(logp_ptr + row, l)
        tl.store(ent_ptr + row, H)
        s = tl.load(scale_ptr + row)
        a = s * d
        need = a != 0.0
        b = 0.0
        if ENT_TERM:
            b = s * ent_coef
            need = need | (b != 0.0)
        if need:
            _row_grad(row_ptr, grow_ptr, y, lse2, h2, a, b, c2, inv_t, V, BLOCK, ENT_TERM)
        else:
            _zero_row(grow_ptr, V, BLOCK)
    else:
        tl.store(ell_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        _zero_row(grow_ptr, V, BLOCK)


def _codes(b):
    if b is None:
        return 0, 0
    if b.ref not in _REF:
        raise ValueError(f"branch ref={b.ref!r} is sequence-level: use token_logprobs + fastupg.policy_loss")
    return _REF[b.ref], _MASK[b.mask]


def loss_and_grad_rows(logits2d, targets1d, estimator: Estimator, x: dict, temperature: float, grad_out=None,
                       launch: LaunchConfig = DEFAULT_LAUNCH):
    """Row-level building block (signature in the module docstring; kept stable)."""
    if estimator.sequence_level:
        raise ValueError(f"estimator {estimator.name!r} is sequence-level (gspo): not a row-local loss")
    M, V = logits2d.shape
    dev = logits2d.device
    if logits2d.stride(-1) != 1:
        raise ValueError("logits2d must be contiguous in the last dimension")
    grad = grad_out if grad_out is not None else torch.empty((M, V), dtype=logits2d.dtype, device=dev)
    if tuple(grad.shape) != (M, V) or grad.stride(-1) != 1:
        raise ValueError(f"grad_out must be ({M}, {V}) with unit last stride, got {tuple(grad.shape)}")
    f32 = lambda t: t.to(device=dev, dtype=torch.float32).contiguous()  # noqa: E731
    adv = f32(x["adv"])
    old = f32(x["old"]) if x.get("old") is not None else None
    ref = f32(x["ref"]) if x.get("ref") is not None else None
    scale = f32(x["scale"])
    flags = (x["mask"].to(dev, torch.int8) | (x["offline"].to(dev, torch.int8) << 1)).contiguous()
    ell = torch.empty(M, dtype=torch.float32, device=dev)
    logp = torch.empty_like(ell)
    ent = torch.empty_like(ell)
    on_ref, on_mask = _codes(estimator.online)
    off_ref, off_mask = _codes(estimator.offline)
    kl_kind = _KLK[estimator.kl_estimator] if estimator.kl_coef != 0 else 0
    if kl_kind and ref is None:
        raise ValueError("ref_logp is required when Estimator.kl_coef != 0")
    if M:
        block, warps = launch.resolve(V)
        _fused_rows_kernel[(M,)](
            logits2d, logits2d.stride(0), grad, grad.stride(0), targets1d, adv,
            old if old is not None else adv, ref if ref is not None else adv, scale, flags, ell, logp, ent,
            LOG2E / temperature, 1.0 / temperature, 1.0 - estimator.eps_low, 1.0 + estimator.eps_high,
            float(estimator.gamma), float(estimator.dual_clip or 0.0), float(estimator.entropy_coef),
            float(estimator.kl_coef),
            V=V, BLOCK=block, ON_REF=on_ref, ON_MASK=on_mask, OFF_REF=off_ref, OFF_MASK=off_mask,
            HAS_OLD=old is not None, HAS_DUAL=estimator.dual_clip is not None, SHAPE=estimator.gamma != 0,
            ENT_TERM=estimator.entropy_coef != 0, KL_KIND=kl_kind, num_warps=warps)
    return ell, logp, ent, grad


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, l2, t1, estimator, x, temperature, inplace, launch):
        grad_out = l2 if inplace else None
        ell, logp, ent, grad = loss_and_grad_rows(l2, t1, estimator, x, temperature, grad_out, launch)
        m = x["mask"]
        bad = m & ~(torch.isfinite(logp) & torch.isfinite(ent))
        if bool(bad.any()):
            raise_nonfinite(bad)
        scale = x["scale"]
        contrib = torch.where(scale != 0, scale * ell, torch.zeros_like(ell))
        ctx.grad = grad
        ctx.shape = tuple(logits.shape)
        ctx.mark_non_differentiable(contrib, logp, ent)
        return contrib.sum(), contrib, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad = ctx.grad
        ctx.grad = None
        if grad_loss is None:
            grad_loss = torch.ones((), device=grad.device)
        if not bool(grad_loss == 1):  # one sync; saves a full N x V pass in the common case
            grad.mul_(grad_loss.to(grad.dtype))
        return grad.reshape(ctx.shape), None, None, None, None, None, None, None


def _metrics(est: Estimator, x: dict, contrib, logp, ent, loss):
    """Same keys and definitions as fastupg.policy_loss, from the N-sized kernel outputs (O(N))."""
    m, off = x["mask"], x["offline"]
    mf = m.to(torch.float32)
    A = x["adv"].to(torch.float32)
    old = x["old"].to(torch.float32) if x["old"] is not None else None
    low = torch.zeros_like(m)
    high, dual = low.clone(), low.clone()
    ratio_sum = logp.new_zeros(())
    for is_off in (False, True):
        b = est.branch(is_off)
        sel = (off == is_off) & m
        if b is None:
            continue
        safe_old = torch.where(sel, old, logp) if old is not None else logp
        _, lo_b, hi_b, du_b, r = _branch_pg(est, b, logp, A, safe_old, None, {})
        low |= lo_b & sel
        high |= hi_b & sel
        dual |= du_b & sel
        if r is not None:
            ratio_sum = ratio_sum + (r * sel).sum()
    n_on = (mf * (~off)).sum()
    n_off = (mf * off).sum()
    ratio_den = n_on if (est.online is not None and est.online.ref != "policy") else logp.new_zeros(())
    kl = logp.new_zeros(())
    if x["ref"] is not None:
        kl = (torch.where(m, _kl(logp, x["ref"].to(torch.float32), est.kl_estimator), 0.0)).sum() / mf.sum().clamp_min(1)
    return {
        "loss": loss.detach(),
        "loss/online": (contrib * (~off)).sum(),
        "loss/offline": (contrib * off).sum(),
        "clip_ratio/low": (low & m).sum() / n_on.clamp_min(1),
        "clip_ratio/high": (high & m).sum() / n_on.clamp_min(1),
        "clip_ratio/dual": (dual & m).sum() / n_on.clamp_min(1),
        "ratio/mean": ratio_sum / ratio_den.clamp_min(1),
        "entropy": (ent * mf).sum() / mf.sum().clamp_min(1),
        "kl": kl,
        "tokens/online": n_on,
        "tokens/offline": n_off,
    }


def fused_policy_loss(logits, targets, estimator: Estimator, *, advantages, old_logp=None, mask=None, offline=None,
                      seq_ids=None, weight=None, ref_logp=None, temperature: float = 1.0, agg=None,
                      inplace_backward: bool = False, launch: LaunchConfig = DEFAULT_LAUNCH):
    """Scalar loss of the unified estimator straight from logits (module docstring), and policy_loss's metrics.

    The entropy bonus uses the entropy computed in-kernel (no entropy= argument); the 'entropy' metric is always
    reported. Dispatch: Triton on CUDA or under TRITON_INTERPRET=1, else `reference.fused_policy_loss_ref`.
    """
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a fastupg.Estimator, got {type(estimator).__name__}")
    kw = dict(advantages=advantages, old_logp=old_logp, mask=mask, offline=offline, seq_ids=seq_ids,
              weight=weight, ref_logp=ref_logp)
    if not (isinstance(logits, torch.Tensor) and use_triton(logits)):
        from fastupg.kernels.reference import fused_policy_loss_ref
        return fused_policy_loss_ref(logits, targets, estimator, temperature=temperature, agg=agg, **kw)
    if estimator.sequence_level:
        logp, ent = token_logprobs(logits, targets, temperature, return_entropy=True,
                                   inplace_backward=inplace_backward, launch=launch)
        if estimator.entropy_coef == 0:
            ent = ent.detach()
        return policy_loss(logp, estimator, entropy=ent, agg=agg, **kw)
    l2, t1, lead = check_logits_targets(logits, targets, temperature)
    if l2.dtype == torch.float64:
        raise TypeError("the Triton fused_policy_loss takes float32/bfloat16/float16 logits, got float64")
    # entropy comes from the kernel: tell prepare_inputs not to ask for an entropy= tensor
    x = prepare_inputs(lead, dataclasses.replace(estimator, entropy_coef=0.0), device=logits.device, **kw)
    s = aggregation_weights(estimator, x["mask"], x["offline"], x["seq"], agg, x["padded_len"])
    x["scale"] = (s * x["weight"].to(s.dtype)).to(torch.float32)
    x = {k: (v.to(logits.device) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    loss, contrib, logp, ent = _FusedPolicyLoss.apply(logits, l2, t1, estimator, x, temperature,
                                                      bool(inplace_backward), launch)
    with torch.no_grad():
        metrics = _metrics(estimator, x, contrib, logp, ent, loss)
    return loss, metrics
