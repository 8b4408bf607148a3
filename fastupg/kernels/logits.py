"""Fused Triton kernels over logits: per-token log-probs (+ entropy) and the whole unified policy loss.

Two public ops, each an autograd Function (kernels and Function in one file, as Liger-Kernel does):

* `token_logprobs(logits, targets, temperature=1.0, return_entropy=False, inplace_backward=False)`
  log-prob layer. Forward: ONE streaming pass over the vocabulary per row (online log-sum-exp of z/T, target logit,
  entropy from the running sum of p*z), saving O(N). Backward: ONE pass writing
      dz_j = [ g_l (onehot_j - p_j) - g_H p_j (log p_j + H) ] / T.
* `fused_policy_loss(logits, targets, estimator, *, advantages, old_logp, mask, offline, seq_ids, weight, ref_logp,
  temperature, agg, inplace_backward)` -> (loss, metrics)
  fused-loss layer for token-level estimators: ONE launch computes log-prob, ratio, stabilization mask, per-token loss
  AND the logits gradient (pass 1: lse/target/entropy; per-token math in registers; pass 2: gradient); backward only
  scales the saved gradient. Sequence-level estimators (GSPO) go through `token_logprobs` + `fastupg.policy_loss`.

The per-token math follows `fastupg.estimator` exactly (docs/math.md §1); the aggregation weights s_t and per-token
weights are O(N) and computed in PyTorch before the launch, so the kernel sees one `scale` per token:
    loss = sum_t scale_t * ell_t,    dL/dz_t = scale_t * [ d ell_t/d l_t * (onehot - p)/T + c_H p (log p + H)/T ].

Dispatch: Triton runs when the logits are on a CUDA device or when TRITON_INTERPRET=1 (the CPU interpreter the tests
use); otherwise the plain-PyTorch reference of `fastupg.kernels.reference` runs (same results, N x V temporaries).
Targets must lie in [0, V) everywhere (replace ignored positions, e.g. -100, by 0 and mask them).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastupg.estimator import Estimator, aggregation_weights, prepare_inputs, raise_failed_checks
from fastupg.kernels import torch_reference as reference

_REF = {"policy": 0, "old": 1, "one": 2}
_MASK = {"none": 0, "clip": 1, "cispo": 2}
_KL = {"k1": 1, "k2": 2, "k3": 3}
_NEG = tl.constexpr(-1.0e30)  # (constexpr: compiled kernels read no plain globals) finite "minus infinity" for the running max: keeps exp(m_old - m_new) free of inf - inf


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch configurations (vocabulary block, warps, pipeline stages) per kernel kind. Passes that reduce over the
# vocabulary run best with few warps per row and many rows per SM (no cross-warp reduction in the loop); the
# gradient pass is elementwise. Chosen by measurement: benchmarks/tune_logits.py, see benchmarks/RESULTS.md.
LAUNCH = {
    "stats": dict(block=1024, warps=1, stages=2),   # _logprobs_fwd: one reduction pass
    "grad": dict(block=4096, warps=8, stages=1),    # _logprobs_bwd: one elementwise pass
    "fused": dict(block=1024, warps=1, stages=2, block_g=1024),  # _fused_loss_kernel: reduction + gradient pass
}


# Few rows (the chunks of fastupg-chunked): one warp per row would leave most of the GPU idle; spread each row over
# 8 warps instead (the 8192-row sweep's runner-up).
FEW_ROWS, LAUNCH_FEW_ROWS = 4096, dict(block=4096, warps=8, stages=1, block_g=4096)


def _launch(kind: str, V: int, block_v: int | None, rows: int | None = None) -> dict:
    """Kernel launch arguments for `rows` rows of V logits; block_v (tests) overrides every vocabulary block."""
    c = LAUNCH_FEW_ROWS if (rows is not None and rows < FEW_ROWS and kind != "grad") else LAUNCH[kind]
    cap = triton.next_power_of_2(V)
    out = dict(BLOCK=min(block_v or c["block"], cap), num_warps=c["warps"], num_stages=c["stages"])
    if kind == "fused":
        out["BLOCK_G"] = min(block_v or c["block_g"], cap)
    return out


# ------------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _row_stats(row_ptr, V: tl.constexpr, BLOCK: tl.constexpr, inv_t):
    """One streaming pass over a row of logits: (lse, E_p[z/T]) of softmax(z/T), in fp32."""
    m = tl.full((), _NEG, tl.float32)
    s = tl.zeros((), tl.float32)
    sx = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        s = s * alpha + tl.sum(e, 0)
        sx = sx * alpha + tl.sum(e * tl.where(e > 0, x, 0.0), 0)  # masked/-inf logits add 0, not 0 * -inf
        m = m_new
    lse = m + tl.log(s)
    return lse, sx / s


@triton.jit
def _write_grad(row_ptr, grad_ptr, V: tl.constexpr, BLOCK: tl.constexpr, inv_t, lse, H, target, c_l, c_h):
    """grad_j = c_l * (onehot_j - p_j) * inv_t + c_h * p_j * (log p_j + H) * inv_t  (c_h: the entropy coefficient)."""
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        logp = x - lse
        p = tl.exp(logp)
        g = -c_l * p + c_h * p * tl.where(p > 0, logp + H, 0.0)
        g = tl.where(offs == target, g + c_l, g) * inv_t
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _logprobs_fwd(logits_ptr, stride, targets_ptr, logp_ptr, lse_ptr, ent_ptr, tgt_logit_ptr, inv_t,
                  V: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    lse, ex = _row_stats(row_ptr, V, BLOCK, inv_t)
    t = tl.minimum(tl.maximum(tl.load(targets_ptr + row), 0), V - 1)  # out-of-range targets: error raised on host
    xt = tl.load(row_ptr + t).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, xt - lse)
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, lse - ex)
    tl.store(tgt_logit_ptr + row, xt)


@triton.jit
def _logprobs_bwd(logits_ptr, stride, grad_ptr, gstride, targets_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, inv_t,
                  V: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(targets_ptr + row)
    # dH/dz_j = -p_j (log p_j + H) / T, so a gradient g_H on the entropy enters with c_h = -g_H
    _write_grad(logits_ptr + row * stride, grad_ptr + row * gstride, V, BLOCK, inv_t, tl.load(lse_ptr + row),
                tl.load(ent_ptr + row), t, tl.load(g_logp_ptr + row), -tl.load(g_ent_ptr + row))


@triton.jit
def _pg_term(l, A, old, REF: tl.constexpr, MASK: tl.constexpr, eps_low, eps_high, DUAL: tl.constexpr, dual_c, gamma):
    """Per-token policy-gradient loss, its derivative d/dl, clip flags (low, high, dual) and the ratio."""
    zero = l * 0.0
    low = zero
    high = zero
    dual = zero
    ratio = zero
    if REF == 0:      # policy: rho = l
        loss = -A * l
        d = -A + zero
    elif REF == 2:    # one: rho = p or p / (p + gamma)
        p = tl.exp(l)
        if gamma > 0:
            loss = -A * p / (p + gamma)
            d = -A * gamma * p / ((p + gamma) * (p + gamma))
        else:
            loss = -A * p
            d = -A * p
    else:             # old: r = exp(l - old)
        r = tl.exp(l - old)
        ratio = r
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        if MASK == 0:
            loss = -A * r
            d = -A * r
        elif MASK == 2:   # cispo: -sg(clip(r)) * A * l
            rc = tl.minimum(tl.maximum(r, lo), hi)
            loss = -rc * A * l
            d = -rc * A
            low = tl.where(r < lo, 1.0, 0.0)
            high = tl.where(r > hi, 1.0, 0.0)
        else:             # clip: max(-A r, -A clip(r)), optional dual clip
            unc = -A * r
            clp = -A * tl.minimum(tl.maximum(r, lo), hi)
            loss = tl.maximum(unc, clp)
            d = tl.where(unc >= clp, -A * r, 0.0)
            low = tl.where((r < lo) & (A < 0), 1.0, 0.0)
            high = tl.where((r > hi) & (A > 0), 1.0, 0.0)
            if DUAL:
                cap = -dual_c * A
                capped = (A < 0) & (loss > cap)
                dual = tl.where(capped, 1.0, 0.0)
                loss = tl.where(capped, cap, loss)
                d = tl.where(capped, 0.0, d)
    return loss, d, low, high, dual, ratio


@triton.jit
def _fused_loss_kernel(logits_ptr, stride, grad_ptr, gstride, targets_ptr,
                       adv_ptr, old_ptr, off_ptr, scale_ptr, ref_ptr,
                       ell_ptr, logp_ptr, ent_ptr, flags_ptr, ratio_ptr, tgt_logit_ptr,
                       inv_t, eps_low, eps_high, dual_c, gamma, ent_coef, kl_coef,
                       V: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr,
                       ON_REF: tl.constexpr, ON_MASK: tl.constexpr, OFF_REF: tl.constexpr, OFF_MASK: tl.constexpr,
                       HAS_OLD: tl.constexpr, DUAL: tl.constexpr, KL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    grad_row = grad_ptr + row * gstride
    scale = tl.load(scale_ptr + row)
    if scale == 0:  # masked / zero-weight token: zero gradient row, no vocabulary pass over the logits
        for start in range(0, V, BLOCK_G):
            offs = start + tl.arange(0, BLOCK_G)
            tl.store(grad_row + offs, tl.zeros((BLOCK_G,), tl.float32).to(grad_ptr.dtype.element_ty), mask=offs < V)
        tl.store(ell_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        tl.store(ratio_ptr + row, 0.0)
        tl.store(flags_ptr + row * 3 + tl.arange(0, 4), tl.zeros((4,), tl.float32), mask=tl.arange(0, 4) < 3)
        tl.store(tgt_logit_ptr + row, 0.0)
    else:
        lse, ex = _row_stats(row_ptr, V, BLOCK, inv_t)
        H = lse - ex
        t = tl.minimum(tl.maximum(tl.load(targets_ptr + row), 0), V - 1)  # out of range: error raised on host
        xt = tl.load(row_ptr + t).to(tl.float32) * inv_t
        l = xt - lse
        A = tl.load(adv_ptr + row)
        if HAS_OLD:
            old = tl.load(old_ptr + row)
        else:
            old = l
        is_off = tl.load(off_ptr + row) != 0
        on_loss, on_d, on_lo, on_hi, on_du, on_r = _pg_term(l, A, old, ON_REF, ON_MASK, eps_low, eps_high, DUAL,
                                                            dual_c, gamma)
        off_loss, off_d, off_lo, off_hi, off_du, off_r = _pg_term(l, A, l, OFF_REF, OFF_MASK, eps_low, eps_high,
                                                                  DUAL, dual_c, gamma)
        ell = tl.where(is_off, off_loss, on_loss)
        d = tl.where(is_off, off_d, on_d)
        if KL != 0:
            rl = tl.load(ref_ptr + row)
            delta = rl - l
            if KL == 1:
                ell += kl_coef * (l - rl)
                d += kl_coef
            elif KL == 2:
                ell += kl_coef * 0.5 * delta * delta
                d += kl_coef * (l - rl)
            else:
                ell += kl_coef * (tl.exp(delta) - delta - 1.0)
                d += kl_coef * (1.0 - tl.exp(delta))
        ell -= ent_coef * H
        _write_grad(row_ptr, grad_row, V, BLOCK_G, inv_t, lse, H, t, scale * d, scale * ent_coef)
        tl.store(ell_ptr + row, ell)
        tl.store(logp_ptr + row, l)
        tl.store(ent_ptr + row, H)
        tl.store(ratio_ptr + row, tl.where(is_off, off_r, on_r))
        tl.store(flags_ptr + row * 3, tl.where(is_off, off_lo, on_lo))
        tl.store(flags_ptr + row * 3 + 1, tl.where(is_off, off_hi, on_hi))
        tl.store(flags_ptr + row * 3 + 2, tl.where(is_off, off_du, on_du))
        tl.store(tgt_logit_ptr + row, xt)


# ------------------------------------------------------------------------------------------------------------------
# argument checks (O(N); never an extra pass over N x V)
# ------------------------------------------------------------------------------------------------------------------
def _flatten(logits: torch.Tensor, targets: torch.Tensor, temperature: float, checks: list | None = None):
    """Argument checks and (N, V) / (N,) views. The targets-range check is a data check: appended to `checks` when
    given (run later with the other checks in one host sync; the kernels clamp the index meanwhile), else run now."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16,
                                                                    torch.float64):
        raise TypeError(f"logits must be a float32/bfloat16/float16 tensor, got {getattr(logits, 'dtype', logits)}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                      torch.uint8, torch.int8):
        raise TypeError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(logits.shape[:-1])} "
                         "(logits without the vocabulary dim)")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    V = logits.shape[-1]
    if targets.numel():
        now = checks is None
        checks = [] if now else checks
        checks.append((((targets < 0) | (targets >= V)).any(), lambda: (
            f"targets must lie in [0, {V}) (vocabulary size); got values in [{int(targets.min())}, "
            f"{int(targets.max())}] -- replace ignored positions by 0 and mask them")))
        if now:
            raise_failed_checks(checks)
    z = logits.reshape(-1, V)
    if z.stride(-1) != 1:
        z = z.contiguous()
    return z, targets.reshape(-1).to(torch.int64).contiguous()


def _nonfinite_check(lse: torch.Tensor, tgt: torch.Tensor, rows: torch.Tensor | None = None):
    """(bad, message) for raise_failed_checks: a non-finite row of logits (or a -inf target logit)."""
    bad = ~(torch.isfinite(lse) & torch.isfinite(tgt))
    if rows is not None:
        bad = bad & rows
    return bad.any(), lambda: (f"logits contain non-finite values (nan/inf) in row {int(bad.nonzero()[0])} "
                               "(or the target logit is -inf)")


# ------------------------------------------------------------------------------------------------------------------
# log-prob layer
# ------------------------------------------------------------------------------------------------------------------
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, inplace_backward, block_v):
        checks = []
        z, t = _flatten(logits, targets, temperature, checks)
        N, V = z.shape
        f32 = dict(dtype=torch.float32, device=z.device)
        logp, lse, ent, tgt = (torch.empty(N, **f32) for _ in range(4))
        if N:
            _logprobs_fwd[(N,)](z, z.stride(0), t, logp, lse, ent, tgt, 1.0 / temperature, V=V,
                                **_launch("stats", V, block_v, N))
            checks.append(_nonfinite_check(lse, tgt))
        raise_failed_checks(checks)  # the one host sync of the forward
        ctx.save_for_backward(z, t, lse, ent)
        ctx.meta = (logits.shape, temperature, inplace_backward, block_v)
        shape = logits.shape[:-1]
        return logp.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        z, t, lse, ent = ctx.saved_tensors
        shape, temperature, inplace, block_v = ctx.meta
        N, V = z.shape
        g_logp = torch.zeros(N, device=z.device) if g_logp is None else g_logp.reshape(-1).float().contiguous()
        g_ent = torch.zeros(N, device=z.device) if g_ent is None else g_ent.reshape(-1).float().contiguous()
        grad = z if inplace else torch.empty_like(z)
        if N:
            _logprobs_bwd[(N,)](z, z.stride(0), grad, grad.stride(0), t, lse, ent, g_logp, g_ent, 1.0 / temperature,
                                V=V, **_launch("grad", V, block_v))
        return grad.view(shape), None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, inplace_backward: bool = False, block_v: int | None = None):
    """log softmax(logits / T)[targets] (float32, shape of targets), and the entropy of softmax(logits / T).

    inplace_backward=True writes the logits gradient into the logits buffer (the logits are destroyed; use it when
    nothing else needs them, as in a loss right after lm_head). block_v overrides the vocabulary block (tests).
    """
    if not use_triton(logits):
        return reference.token_logprobs_ref(logits, targets, temperature, return_entropy)
    logp, ent = _TokenLogprobs.apply(logits, targets, float(temperature), bool(inplace_backward), block_v)
    return (logp, ent) if return_entropy else logp


# ------------------------------------------------------------------------------------------------------------------
# fused-loss layer
# ------------------------------------------------------------------------------------------------------------------
def _codes(b, default_ref="policy"):
    if b is None:
        return _REF[default_ref], 0
    return _REF[b.ref], _MASK[b.mask]


def loss_and_grad_rows(logits2d: torch.Tensor, targets1d: torch.Tensor, estimator: Estimator, x: dict,
                       temperature: float, grad_out: torch.Tensor | None = None, block_v: int | None = None,
                       checks: list | None = None):
    """Row-level building block: per-token loss ell_t, log-prob, entropy, and grad = d(sum_t scale_t ell_t)/d logits.

    `x` is the dict of `fastupg.estimator.prepare_inputs` for these rows plus key `scale` (s_t * w_t, float32).
    grad is written into `grad_out` when given (it may be `logits2d` itself). Returns (ell, logp, entropy, grad, aux)
    with aux = (flags (M, 3): clip low/high/dual, ratio (M,)). The non-finite-logits check is appended to `checks`
    when given (see fastupg.estimator.raise_failed_checks), else run here.
    """
    if estimator.sequence_level:
        raise ValueError(f"estimator {estimator.name!r} is sequence-level: use token_logprobs + fastupg.policy_loss")
    z, t = logits2d, targets1d
    M, V = z.shape
    dev = z.device
    f32 = dict(dtype=torch.float32, device=dev)
    ell, logp, ent, ratio, tgt = (torch.empty(M, **f32) for _ in range(5))
    flags = torch.empty(M, 3, **f32)
    grad = torch.empty_like(z) if grad_out is None else grad_out
    on_ref, on_mask = _codes(estimator.online)
    off_ref, off_mask = _codes(estimator.offline)
    has_old = x["old"] is not None
    kl = _KL[estimator.kl_estimator] if estimator.kl_coef != 0 else 0
    scale = x["scale"].to(**f32).contiguous()
    f = lambda v: v.to(**f32).contiguous()  # noqa: E731
    if M:
        _fused_loss_kernel[(M,)](
            z, z.stride(0), grad, grad.stride(0), t,
            f(x["adv"]), f(x["old"]) if has_old else scale, x["offline"].to(torch.int8).contiguous(), scale,
            f(x["ref"]) if kl else scale,
            ell, logp, ent, flags, ratio, tgt,
            1.0 / temperature, float(estimator.eps_low), float(estimator.eps_high),
            float(estimator.dual_clip or 0.0), float(estimator.gamma), float(estimator.entropy_coef),
            float(estimator.kl_coef),
            V=V, ON_REF=on_ref, ON_MASK=on_mask, OFF_REF=off_ref, OFF_MASK=off_mask,
            HAS_OLD=has_old, DUAL=estimator.dual_clip is not None, KL=kl, **_launch("fused", V, block_v, M))
        check = _nonfinite_check(torch.where(scale != 0, logp, 0.0), tgt, rows=scale != 0)
        if checks is None:
            raise_failed_checks([check])
        else:
            checks.append(check)
    return ell, logp, ent, grad, (flags, ratio)


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, loss, grad):
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        if not (g.numel() == 1 and float(g) == 1.0):
            grad.mul_(g.to(grad.dtype))  # in place: the gradient buffer is ours (or the logits', by request)
        return grad.view(ctx.shape), None, None


def _metrics(est: Estimator, loss, contrib, x, ent, flags, ratio):
    """The metrics of fastupg.policy_loss from the kernel's per-token outputs, as ONE (2, N) x (N, 7) product:
    every metric is a sum over on-policy or offline tokens (a dozen small reductions would cost more launches than
    the loss itself at N = 8k)."""
    m = x["mask"] & (x["scale"] != 0)  # rows the kernel skipped (weight 0) have no entropy/ratio
    off = x["offline"]
    rows = torch.stack([m & ~off, m & off]).double()                                       # (2, N)
    cols = torch.cat([contrib[:, None], flags, ratio[:, None], ent[:, None], torch.ones_like(ent)[:, None]], 1)
    R = rows @ cols.double()  # (2, 7); float64: exact counts, and no TF32 whatever the matmul precision setting
    n_on, n_off = R[0, 6], R[1, 6]
    per_on = R[0, 1:5] / n_on.clamp_min(1)            # clip low, high, dual, ratio sum -> fractions / mean
    uses_ratio = est.online is not None and est.online.ref != "policy"
    low, high, dual, rmean = per_on.float().unbind()
    return {
        "loss": loss.detach(),
        "loss/online": R[0, 0].float(),
        "loss/offline": R[1, 0].float(),
        "clip_ratio/low": low,
        "clip_ratio/high": high,
        "clip_ratio/dual": dual,
        "ratio/mean": rmean if uses_ratio else rmean.new_zeros(()),
        "entropy": ((R[0, 5] + R[1, 5]) / (n_on + n_off).clamp_min(1)).float(),
        "kl": rmean.new_zeros(()),
        "tokens/online": n_on.float(),
        "tokens/offline": n_off.float(),
    }


def fused_policy_loss(logits: torch.Tensor, targets: torch.Tensor, estimator: Estimator, *, advantages=None,
                      old_logp=None, mask=None, offline=None, seq_ids=None, weight=None, ref_logp=None,
                      temperature: float = 1.0, agg: str | None = None, inplace_backward: bool = False,
                      block_v: int | None = None):
    """The unified policy loss straight from logits (N, V) or (B, T, V); returns (loss, metrics) like policy_loss.

    Per-token arguments have the shape of `targets` (see `fastupg.policy_loss`). The entropy bonus uses the entropy
    computed in the kernel. inplace_backward=True stores the gradient in the logits buffer (logits destroyed).
    An all-masked batch gives a zero loss with a zero gradient.
    """
    if not use_triton(logits):
        return reference.fused_policy_loss_ref(
            logits, targets, estimator, advantages=advantages, old_logp=old_logp, mask=mask, offline=offline,
            seq_ids=seq_ids, weight=weight, ref_logp=ref_logp, temperature=temperature, agg=agg)
    checks = []
    z, t = _flatten(logits, targets, temperature, checks)
    if estimator.sequence_level:
        raise_failed_checks(checks)
        logp, ent = token_logprobs(logits, targets, temperature, return_entropy=True,
                                   inplace_backward=inplace_backward, block_v=block_v)
        from fastupg.estimator import policy_loss
        return policy_loss(logp, estimator, advantages=advantages, old_logp=old_logp, mask=mask, offline=offline,
                           seq_ids=seq_ids, weight=weight, entropy=ent, ref_logp=ref_logp, agg=agg)
    x = prepare_inputs(targets.shape, estimator, advantages=advantages, old_logp=old_logp, mask=mask, offline=offline,
                       seq_ids=seq_ids, weight=weight, entropy=None, ref_logp=ref_logp, device=z.device,
                       entropy_in_kernel=True, checks=checks)
    padded = targets.shape[1] if targets.dim() == 2 else None
    s = aggregation_weights(estimator, x["mask"], x["offline"], x["seq"], agg, padded, x["nseq"])
    x["scale"] = (s * x["weight"].double()).float()
    ell, logp, ent, grad, (flags, ratio) = loss_and_grad_rows(z, t, estimator, x, temperature,
                                                              grad_out=z if inplace_backward else None,
                                                              block_v=block_v, checks=checks)
    contrib = torch.where(x["scale"] != 0, x["scale"].double() * ell.double(), 0.0)
    loss = contrib.sum().to(torch.float32)
    out = _FusedPolicyLoss.apply(logits, loss, grad)
    with torch.no_grad():
        metrics = _metrics(estimator, loss, contrib, x, ent, flags, ratio)
        if x["ref"] is not None:
            d = x["ref"].float() - logp
            kl = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - d - 1}[estimator.kl_estimator]
            mf = x["mask"].float()
            metrics["kl"] = (kl * mf).sum() / mf.sum().clamp_min(1)
    # the one host sync, last: argument values and non-finite logits read back together, after everything above was
    # queued (so that the host work overlaps the kernel instead of waiting for it)
    raise_failed_checks(checks)
    return out, metrics
