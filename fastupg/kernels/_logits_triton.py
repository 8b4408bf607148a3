"""The Triton implementation of the logits ops: the kernels, their launch configurations and host launchers.

* `_TokenLogprobs` (autograd Function of token_logprobs): `_logprobs_fwd` ONE streaming pass over the vocabulary per
  row (online log-sum-exp of z/T, target logit, entropy from the running sum of p*z), saving O(N); `_logprobs_bwd`
  ONE pass writing  dz_j = [ g_l (onehot_j - p_j) - g_H p_j (log p_j + H) ] / T.
* `_fused_triton` (fused_policy_loss, token-level estimators), no host sync:
    1. `_prep_kernel` (one program): aggregation weights s_t * coef * w_t, row flags, data checks (O(N));
    2. `_fused_kernel`: each row is split in vocabulary chunks, and the work comes in three parts: stats (a chunk's
       partial log-sum-exp into a small workspace), row (once per row: combine the partials; per-token loss,
       log-prob, entropy, ratio, KL and clip flags; the row's gradient coefficients) and gradient (a chunk's
       gradient, the chunk read again). Three launches by default (logits read twice); SPLIT["one_launch"] does all
       three in one launch in ticket order, the last stats program of a row doing its row part and each chunk read
       again from L2 soon after (logits read from HBM once; not yet measured on a GPU: see SPLIT);
    3. `_finalize_kernel` (one program): the loss (float64 sum) and every metric of `fastupg.policy_loss`.
* `loss_and_grad_rows`: the row-level building block; `RowInputs` its inputs converted once for a caller that
  sweeps the rows in chunks (the chunked fused-linear impl: one kernel launch per chunk, nothing else);
  `logprob_rows` / `logprob_grad_rows` token_logprobs' two kernels on rows, without its checks.
* `rescale_rows`: the saved gradient times the upstream gradient, on the device.

The per-token math follows `fastupg.estimator` exactly (docs/math.md §1):
    loss = sum_t scale_t * ell_t,    dL/dz_t = scale_t * [ d ell_t/d l_t * (onehot - p)/T + c_H p (log p + H)/T ].
All offsets into the logits are 64-bit (more than 2^31 elements: 32k tokens x 152k vocabulary). Argument and data
checks: _logits_checks.py; the public API and dispatch: logits.py.
"""
from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from fastupg.kernels.estimator import Estimator, aggregation_weights, raise_failed_checks
from fastupg.kernels import _logits_checks as C
from fastupg.kernels._logits_checks import (_SECOND_BACKWARD, _flatten, _mark_overwritten, _nonfinite_check,
                                            advantage_rule)

_REF = {"policy": 0, "old": 1, "one": 2}
_MASK = {"none": 0, "clip": 1, "cispo": 2}
_KL = {"k1": 1, "k2": 2, "k3": 3}
# finite "minus infinity" for the running max: keeps exp(m_old - m_new) free of inf - inf (constexpr: compiled kernels
# read no plain globals)
_NEG = tl.constexpr(-1.0e30)


# Launch configurations (vocabulary block, warps, pipeline stages) per kernel kind. Passes that reduce over the
# vocabulary run best with few warps per row and many rows per SM (no cross-warp reduction in the loop); the
# gradient pass is elementwise. Chosen by measurement: benchmarks/tune_logits.py, see benchmarks/RESULTS.md.
LAUNCH = {
    "stats": dict(block=1024, warps=1, stages=2),   # _logprobs_fwd: one reduction pass
    "grad": dict(block=4096, warps=8, stages=1),    # _logprobs_bwd: one elementwise pass
}  # (the fused-loss kernel's configuration is SPLIT, below)


# Few rows (the chunks of fastupg-chunked): one warp per row would leave most of the GPU idle; spread each row over
# 8 warps instead (the 8192-row sweep's runner-up).
FEW_ROWS, LAUNCH_FEW_ROWS = 4096, dict(block=4096, warps=8, stages=1)


def _launch(kind: str, V: int, block_v: int | None, rows: int | None = None) -> dict:
    """Kernel launch arguments for `rows` rows of V logits; block_v (tests) overrides every vocabulary block."""
    c = LAUNCH_FEW_ROWS if (rows is not None and rows < FEW_ROWS and kind != "grad") else LAUNCH[kind]
    cap = triton.next_power_of_2(V)
    return dict(BLOCK=min(block_v or c["block"], cap), num_warps=c["warps"], num_stages=c["stages"])


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


# ------------------------------------------------------------------------------------------------------------------
# fused-loss kernels: prep (aggregation weights + data checks), split-row loss+gradient, finalize (loss + metrics)
# ------------------------------------------------------------------------------------------------------------------
# agg mode codes of _prep_kernel (fastupg.estimator.AGGS)
_AGG = {"token-sum": 0, "token-mean": 1, "token-sum-norm": 2, "seq-mean-token-sum": 3,
        "seq-mean-token-mean": 4, "seq-mean-token-sum-norm": 5}
# bits of the error word the kernels write (values and messages: _logits_checks; tl.constexpr: compiled kernels read
# no plain globals)
E_MASK, E_W_NONFINITE, E_W_NEG = (tl.constexpr(C.E_MASK), tl.constexpr(C.E_W_NONFINITE),
                                   tl.constexpr(C.E_W_NEG))
E_NO_ONLINE, E_NO_OFFLINE, E_NO_OLD = (tl.constexpr(C.E_NO_ONLINE), tl.constexpr(C.E_NO_OFFLINE),
                                       tl.constexpr(C.E_NO_OLD))
E_LOGITS, E_ADV, E_OLD, E_REF, E_TARGET = (tl.constexpr(C.E_LOGITS), tl.constexpr(C.E_ADV), tl.constexpr(C.E_OLD),
                                           tl.constexpr(C.E_REF), tl.constexpr(C.E_TARGET))
# metrics in the order of the finalize kernel's output vector
METRIC_KEYS = ("loss/online", "loss/offline", "clip_ratio/low", "clip_ratio/high", "clip_ratio/dual", "ratio/mean",
               "entropy", "kl", "tokens/online", "tokens/offline")


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _agg_factor(MODE: tl.constexpr, c_seq, tot, ne, norm):
    """s_t / mask_t of fastupg.estimator._agg_weights_one for one group of tokens (see _AGG)."""
    if MODE == 0:
        f = tot * 0.0 + 1.0
    elif MODE == 1:
        f = 1.0 / tl.maximum(tot, 1.0)
    elif MODE == 2:
        f = tot * 0.0 + 1.0 / norm
    elif MODE == 3:
        f = 1.0 / tl.maximum(ne, 1.0)
    elif MODE == 5:
        f = 1.0 / (tl.maximum(ne, 1.0) * norm)
    else:
        f = 1.0 / (tl.maximum(c_seq, 1.0) * tl.maximum(ne, 1.0))
    return f


@triton.jit
def _tok_tile(mask_ptr, off_ptr, idx, inb, HAS_MASK: tl.constexpr, HAS_OFF: tl.constexpr, OFF_DEFAULT: tl.constexpr):
    """(raw mask value, counted 0/1, offline 0/1) of a tile of tokens, fp32."""
    if HAS_MASK:
        m = tl.load(mask_ptr + idx, mask=inb, other=0).to(tl.float32)
    else:
        m = tl.where(inb, 1.0, 0.0)
    cnt = tl.where(inb & (m != 0), 1.0, 0.0)
    if HAS_OFF:
        o = tl.where(tl.load(off_ptr + idx, mask=inb, other=0) != 0, 1.0, 0.0)
    else:
        o = tl.where(inb, 1.0, 0.0) * OFF_DEFAULT
    return m, cnt, o


@triton.jit
def _seq_counts(mask_ptr, off_ptr, w_ptr, r, T, cols, bad, HAS_MASK: tl.constexpr, HAS_OFF: tl.constexpr,
                OFF_DEFAULT: tl.constexpr, HAS_W: tl.constexpr, HAS_ON_BRANCH: tl.constexpr,
                HAS_OFF_BRANCH: tl.constexpr, NEED_OLD: tl.constexpr, CHECK: tl.constexpr, BLOCK: tl.constexpr):
    """(online, offline) counted tokens of sequence r (tokens r*T .. r*T + T-1), and `bad` with the data-check bits
    E_MASK ... E_NO_OLD of its tokens OR-ed in when CHECK (the prep kernel's first pass; its second pass recounts)."""
    c_on = tl.zeros((), tl.float32)
    c_off = tl.zeros((), tl.float32)
    for c0 in range(0, T, BLOCK):
        inb = (c0 + cols) < T
        idx = r * T + c0 + cols
        m, cnt, o = _tok_tile(mask_ptr, off_ptr, idx, inb, HAS_MASK, HAS_OFF, OFF_DEFAULT)
        c_on += tl.sum(cnt * (1.0 - o), 0)
        c_off += tl.sum(cnt * o, 0)
        if CHECK:
            bad |= tl.where(inb & (m != 0) & (m != 1), E_MASK, 0)
            if HAS_W:
                w = tl.load(w_ptr + idx, mask=inb, other=0).to(tl.float32)
                bad |= tl.where((w != w) | (tl.abs(w) == float("inf")), E_W_NONFINITE, 0)
                bad |= tl.where(w < 0, E_W_NEG, 0)
            if HAS_OFF:
                if not HAS_ON_BRANCH:
                    bad |= tl.where((cnt * (1.0 - o)) != 0, E_NO_ONLINE, 0)
                if not HAS_OFF_BRANCH:
                    bad |= tl.where((cnt * o) != 0, E_NO_OFFLINE, 0)
            if NEED_OLD:
                bad |= tl.where((cnt * (1.0 - o)) != 0, E_NO_OLD, 0)
    return c_on, c_off, bad


@triton.jit
def _prep_kernel(mask_ptr, off_ptr, w_ptr, s_ptr, scale_ptr, info_ptr, cnt_ptr, err_ptr,
                 R, T, norm, coef_on, coef_off,
                 HAS_MASK: tl.constexpr, HAS_OFF: tl.constexpr, OFF_DEFAULT: tl.constexpr, HAS_W: tl.constexpr,
                 S_GIVEN: tl.constexpr, SPLIT: tl.constexpr, MODE: tl.constexpr, MODE_OFF: tl.constexpr,
                 HAS_ON_BRANCH: tl.constexpr, HAS_OFF_BRANCH: tl.constexpr, NEED_OLD: tl.constexpr,
                 BLOCK: tl.constexpr):
    """ONE program: the O(N) work before the vocabulary pass, for tokens laid out as R sequences of T.

    Writes per token scale_t = s_t * coef_branch * w_t (s_t: the aggregation weight of fastupg.estimator),
    info_t = counted | offline << 1, zeroes the counters of the main kernel's one-launch form (arrivals: cnt_ptr;
    the ticket: err_ptr[1]), and the data-check bits (E_MASK ... E_NO_OLD) into err_ptr[0]. Pass 1 counts tokens
    per sequence and branch, pass 2 writes.
    """
    cols = tl.arange(0, BLOCK)
    tot_on = tl.zeros((), tl.float32)
    tot_off = tl.zeros((), tl.float32)
    ne_on = tl.zeros((), tl.float32)
    ne_off = tl.zeros((), tl.float32)
    ne_all = tl.zeros((), tl.float32)
    bad = tl.zeros((BLOCK,), tl.int32)
    for r in range(0, R):
        c_on, c_off, bad = _seq_counts(mask_ptr, off_ptr, w_ptr, r, T, cols, bad, HAS_MASK, HAS_OFF, OFF_DEFAULT,
                                       HAS_W, HAS_ON_BRANCH, HAS_OFF_BRANCH, NEED_OLD, True, BLOCK)
        tot_on += c_on
        tot_off += c_off
        ne_on += tl.where(c_on > 0, 1.0, 0.0)
        ne_off += tl.where(c_off > 0, 1.0, 0.0)
        ne_all += tl.where(c_on + c_off > 0, 1.0, 0.0)
    tl.store(err_ptr, tl.reduce(bad, 0, _or))
    tl.store(err_ptr + 1, 0)
    for r in range(0, R):
        c_on = tl.zeros((), tl.float32)
        c_off = tl.zeros((), tl.float32)
        if not S_GIVEN:
            if MODE == 4 or MODE_OFF == 4:  # per-sequence counts again (one more pass over N bytes, no scratch)
                c_on, c_off, _ = _seq_counts(mask_ptr, off_ptr, w_ptr, r, T, cols, bad, HAS_MASK, HAS_OFF,
                                             OFF_DEFAULT, HAS_W, HAS_ON_BRANCH, HAS_OFF_BRANCH, NEED_OLD, False, BLOCK)
        for c0 in range(0, T, BLOCK):
            inb = (c0 + cols) < T
            idx = r * T + c0 + cols
            m, cnt, o = _tok_tile(mask_ptr, off_ptr, idx, inb, HAS_MASK, HAS_OFF, OFF_DEFAULT)
            if S_GIVEN:
                s = tl.load(s_ptr + idx, mask=inb, other=0).to(tl.float32)
            elif SPLIT:
                f_on = _agg_factor(MODE, c_on, tot_on, ne_on, norm)
                f_off = _agg_factor(MODE_OFF, c_off, tot_off, ne_off, norm)
                s = cnt * tl.where(o != 0, f_off, f_on)
            else:
                s = cnt * _agg_factor(MODE, c_on + c_off, tot_on + tot_off, ne_all, norm)
            sc = s * tl.where(o != 0, coef_off, coef_on)
            if HAS_W:
                sc = sc * tl.load(w_ptr + idx, mask=inb, other=0).to(tl.float32)
            tl.store(scale_ptr + idx, sc, mask=inb)
            tl.store(info_ptr + idx, (cnt + 2.0 * o).to(tl.int8), mask=inb)
            tl.store(cnt_ptr + idx, tl.zeros((BLOCK,), tl.int32), mask=inb)


@triton.jit
def _nonfinite(v):
    return (v != v) | (tl.abs(v) == float("inf"))


@triton.jit
def _row_ptr(base_ptr, sb, st, TR, row):
    """Row `row` of a (B, TR, V) or (N, V) tensor of strides (sb, st, 1) (TR = 1, st = 0 for 2-D)."""
    b = row // TR
    return base_ptr + b * sb + (row - b * TR) * st


@triton.jit
def _stats_part(logits_ptr, sb, st, TR, tgt_ptr, ws_ptr, row, c, inv_t,
                V: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr, KEEP_IN_L2: tl.constexpr):
    """Chunk c of a counted row -> its partials (max, sum exp, sum exp * x) of x = z / T, in the row's workspace
    slots c * 4 + (0, 1, 2); the chunk holding the target also publishes the target's x (slot 3). KEEP_IN_L2: the
    read asks L2 to keep the chunk for the gradient part's read soon after (else to drop it first)."""
    offs = c * CHUNK + tl.arange(0, CHUNK)
    row_ptr = _row_ptr(logits_ptr, sb, st, TR, row)
    if KEEP_IN_L2:
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"), eviction_policy="evict_last")
    else:
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"), eviction_policy="evict_first")
    x = z.to(tl.float32) * inv_t
    mc = tl.maximum(tl.max(x, 0), _NEG)
    e = tl.exp(x - mc)
    wsr = ws_ptr + row * (K * 4 + 4)
    tl.store(wsr + c * 4, mc)
    tl.store(wsr + c * 4 + 1, tl.sum(e, 0))
    tl.store(wsr + c * 4 + 2, tl.sum(e * tl.where(e > 0, x, 0.0), 0))  # (-inf logits add 0)
    tgt = tl.minimum(tl.maximum(tl.load(tgt_ptr + row).to(tl.int64), 0), V - 1)
    if tgt // CHUNK == c:  # (read before anyone writes the gradient in place)
        tl.store(wsr + 3, tl.load(row_ptr + tgt).to(tl.float32) * inv_t)


@triton.jit
def _row_part(row, counted, is_off, tgt_ptr, adv_ptr, old_ptr, ref_ptr, scale_ptr, ws_ptr,
              ell_ptr, logp_ptr, ent_ptr, ratio_ptr, kl_ptr, flags_ptr,
              adv_scalar, eps_low, eps_high, dual_c, gamma, ent_coef, kl_coef,
              V: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, WRITE_GRAD: tl.constexpr,
              ON_REF: tl.constexpr, ON_MASK: tl.constexpr, OFF_REF: tl.constexpr, OFF_MASK: tl.constexpr,
              ON_A1: tl.constexpr, OFF_A1: tl.constexpr, HAS_ADV: tl.constexpr, HAS_OLD: tl.constexpr,
              DUAL: tl.constexpr, KL_EST: tl.constexpr, KL_ON: tl.constexpr):
    """Once per row: its K partials -> log-sum-exp, entropy, log-prob and every per-token term; writes the
    per-token outputs and flags (clip bits 0-2, data-check bits E_LOGITS ... E_TARGET), and for a counted row
    the gradient part's coefficients (lse, H, c_l = scale * d ell/d l, c_H = scale * ent_coef) in workspace slots
    K * 4 + (0, 1, 2, 3). A row that does not count gets zero outputs (its flags: the data checks)."""
    tgt_raw = tl.load(tgt_ptr + row).to(tl.int64)
    errs = tl.where((tgt_raw < 0) | (tgt_raw >= V), E_TARGET, 0)
    if HAS_ADV:
        A = tl.load(adv_ptr + row).to(tl.float32)
        errs |= tl.where(_nonfinite(A), E_ADV, 0)
    else:
        A = adv_scalar
    if HAS_OLD:
        old = tl.load(old_ptr + row).to(tl.float32)
        errs |= tl.where(_nonfinite(old), E_OLD, 0)
    if KL_EST != 0:
        rl = tl.load(ref_ptr + row).to(tl.float32)
        errs |= tl.where(_nonfinite(rl), E_REF, 0)
    if counted:
        wsr = ws_ptr + row * (K * 4 + 4)
        kk = tl.arange(0, KP)
        # (.cg: from L2, where the one-launch form's other programs published them; L1 is not coherent)
        pm = tl.load(wsr + kk * 4, mask=kk < K, other=_NEG, cache_modifier=".cg")
        ps = tl.load(wsr + kk * 4 + 1, mask=kk < K, other=0.0, cache_modifier=".cg")
        psx = tl.load(wsr + kk * 4 + 2, mask=kk < K, other=0.0, cache_modifier=".cg")
        xt = tl.load(wsr + 3, cache_modifier=".cg")
        M = tl.max(pm, 0)
        wk = tl.exp(pm - M)
        S = tl.sum(ps * wk, 0)
        lse = M + tl.log(S)
        H = lse - tl.sum(psx * wk, 0) / S
        l = xt - lse
        if ON_A1:
            A_on = A * 0.0 + 1.0
        else:
            A_on = A
        if OFF_A1:
            A_off = A * 0.0 + 1.0
        else:
            A_off = A
        if HAS_OLD:
            o_on = old
        else:
            o_on = l
        on_loss, on_d, on_lo, on_hi, on_du, on_r = _pg_term(l, A_on, o_on, ON_REF, ON_MASK, eps_low,
                                                            eps_high, DUAL, dual_c, gamma)
        off_loss, off_d, off_lo, off_hi, off_du, off_r = _pg_term(l, A_off, l, OFF_REF, OFF_MASK, eps_low,
                                                                  eps_high, DUAL, dual_c, gamma)
        ell = tl.where(is_off, off_loss, on_loss)
        d = tl.where(is_off, off_d, on_d)
        kl = l * 0.0
        if KL_EST != 0:
            delta = rl - l
            if KL_EST == 1:
                kl = l - rl
                dkl = l * 0.0 + 1.0
            elif KL_EST == 2:
                kl = 0.5 * delta * delta
                dkl = l - rl
            else:
                kl = tl.exp(delta) - delta - 1.0
                dkl = 1.0 - tl.exp(delta)
            if KL_ON:
                ell += kl_coef * kl
                d += kl_coef * dkl
        ell -= ent_coef * H
        if WRITE_GRAD:
            scale = tl.load(scale_ptr + row)
            tl.store(wsr + K * 4, lse)
            tl.store(wsr + K * 4 + 1, H)
            tl.store(wsr + K * 4 + 2, scale * d)
            tl.store(wsr + K * 4 + 3, scale * ent_coef)
        errs |= tl.where(_nonfinite(lse) | _nonfinite(xt), E_LOGITS, 0)
        bits = tl.where(is_off, off_lo, on_lo) + 2 * tl.where(is_off, off_hi, on_hi) + \
            4 * tl.where(is_off, off_du, on_du)
        tl.store(ell_ptr + row, ell)
        tl.store(logp_ptr + row, l)
        tl.store(ent_ptr + row, H)
        tl.store(ratio_ptr + row, tl.where(is_off, off_r, on_r))
        tl.store(kl_ptr + row, kl)
        tl.store(flags_ptr + row, bits.to(tl.int32) | errs)
    else:
        tl.store(ell_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        tl.store(ratio_ptr + row, 0.0)
        tl.store(kl_ptr + row, 0.0)
        tl.store(flags_ptr + row, errs)


@triton.jit
def _grad_part(logits_ptr, sb, st, TR, grad_ptr, gsb, gst, tgt_ptr, ws_ptr, row, c, counted, inv_t,
               V: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr, HAS_ENT: tl.constexpr):
    """Chunk c of a row's gradient from the coefficients _row_part published: the chunk read again, the gradient
    written (it may be the logits themselves: each element is read before it is written, by this program)."""
    offs = c * CHUNK + tl.arange(0, CHUNK)
    valid = offs < V
    grow = _row_ptr(grad_ptr, gsb, gst, TR, row)
    if counted:
        wsr = ws_ptr + row * (K * 4 + 4)
        lse = tl.load(wsr + K * 4, cache_modifier=".cg")
        H = tl.load(wsr + K * 4 + 1, cache_modifier=".cg")
        c_l = tl.load(wsr + K * 4 + 2, cache_modifier=".cg")
        tgt = tl.minimum(tl.maximum(tl.load(tgt_ptr + row).to(tl.int64), 0), V - 1)
        row_ptr = _row_ptr(logits_ptr, sb, st, TR, row)
        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32) * inv_t
        p = tl.exp(x - lse)
        g = -c_l * p
        if HAS_ENT:
            c_h = tl.load(wsr + K * 4 + 3, cache_modifier=".cg")
            g += c_h * p * tl.where(p > 0, x - lse + H, 0.0)
        g = tl.where(offs == tgt, g + c_l, g) * inv_t
        tl.store(grow + offs, g.to(grad_ptr.dtype.element_ty), mask=valid, eviction_policy="evict_first")
    else:
        tl.store(grow + offs, tl.zeros((CHUNK,), tl.float32).to(grad_ptr.dtype.element_ty), mask=valid)


# N and lag are not specialised (triton compiles a value of 1 in as a constant): one compiled kernel whatever N
@triton.jit(do_not_specialize=["N", "lag"])
def _fused_kernel(logits_ptr, sb, st, TR, grad_ptr, gsb, gst,
                  tgt_ptr, adv_ptr, old_ptr, ref_ptr, scale_ptr, info_ptr,
                  ell_ptr, logp_ptr, ent_ptr, ratio_ptr, kl_ptr, flags_ptr,
                  ws_ptr, cnt_ptr, tick_ptr, N, lag,
                  inv_t, adv_scalar, eps_low, eps_high, dual_c, gamma, ent_coef, kl_coef,
                  V: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, PHASE: tl.constexpr,
                  WRITE_GRAD: tl.constexpr,
                  ON_REF: tl.constexpr, ON_MASK: tl.constexpr, OFF_REF: tl.constexpr, OFF_MASK: tl.constexpr,
                  ON_A1: tl.constexpr, OFF_A1: tl.constexpr, HAS_ADV: tl.constexpr, HAS_OLD: tl.constexpr,
                  DUAL: tl.constexpr, KL_EST: tl.constexpr, KL_ON: tl.constexpr, HAS_ENT: tl.constexpr):
    """Loss, log-prob, entropy, metrics inputs AND the logits gradient of every token. Each row is split in K
    vocabulary chunks of CHUNK logits; work item t is chunk t % K of row t // K. Three parts (module docstring):
    stats (a chunk's partial log-sum-exp), row (once per row: combine the partials, every per-token term and
    output), gradient (a chunk's gradient).

    PHASE 1 / 2 / 3, three launches (logits read twice): stats of item pid; row pid; gradient of item pid.
    PHASE 0, one launch (logits read from HBM once): program = ticket t taken from a counter, so every lower ticket
    is already running. It does the stats of item t; the last of a row's K stats programs to arrive at the row's
    counter does the row part and marks the row ready (counter K + 1); then the program does the gradient of item
    t - lag * K (same chunk, row `lag` rows back), once that row is ready: lag >= 1 means every stats program of
    that row holds a lower ticket and waits for nothing, so the wait always ends. Between the two reads of a chunk
    pass about lag rows' worth of other reads, so with a small lag the second read is served from L2 (the first
    asks L2 to keep the chunk). Runs under the CPU interpreter too (programs in ticket order: no wait ever spins).
    Rows with info & 1 == 0 (masked) are never read: zero gradient, zero outputs.
    """
    if PHASE == 0:
        t = tl.atomic_add(tick_ptr, 1, sem="relaxed", scope="gpu") + tl.zeros((), tl.int64)  # (orders work, not data)
    else:
        t = tl.program_id(0) + tl.zeros((), tl.int64)  # 64-bit offsets: N x V may exceed 2^31
    if PHASE == 2:  # one program per row
        row = t
        c = tl.zeros((), tl.int32)
    else:
        row = t // K
        c = (t % K).to(tl.int32)  # (32-bit offsets within a row: an int64 vector would hold twice the registers)
    if PHASE != 3:
        if row < N:
            info = tl.load(info_ptr + row).to(tl.int32)
            counted = (info & 1) != 0
            if PHASE == 0:
                do_row = (c == 0) & ((info & 1) == 0)  # a masked row's outputs: from its first chunk's program
            else:
                do_row = row >= 0  # (PHASE 2: every row; PHASE 1: never read)
            if PHASE != 2:
                if counted:
                    _stats_part(logits_ptr, sb, st, TR, tgt_ptr, ws_ptr, row, c, inv_t, V, CHUNK, K,
                                PHASE == 0 and WRITE_GRAD)
                    if PHASE == 0:
                        tl.debug_barrier()  # every thread's partial stores precede the (gpu-scope release) arrival
                        n = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu") + 1
                        do_row = n == K  # the last to arrive: every partial of the row is visible (acquire)
            if PHASE != 1:
                if do_row:
                    _row_part(row, counted, (info & 2) != 0, tgt_ptr, adv_ptr, old_ptr, ref_ptr, scale_ptr, ws_ptr,
                              ell_ptr, logp_ptr, ent_ptr, ratio_ptr, kl_ptr, flags_ptr,
                              adv_scalar, eps_low, eps_high, dual_c, gamma, ent_coef, kl_coef,
                              V, K, KP, WRITE_GRAD, ON_REF, ON_MASK, OFF_REF, OFF_MASK, ON_A1, OFF_A1, HAS_ADV,
                              HAS_OLD, DUAL, KL_EST, KL_ON)
                    if PHASE == 0:
                        if counted:
                            tl.debug_barrier()
                            tl.atomic_add(cnt_ptr + row, 1, sem="release", scope="gpu")  # the row is ready: K + 1
    if PHASE != 1:
        if PHASE != 2:
            if WRITE_GRAD:
                rb = row - lag
                if (rb >= 0) & (rb < N):
                    counted_b = (tl.load(info_ptr + rb).to(tl.int32) & 1) != 0
                    if PHASE == 0:
                        if counted_b:  # (a masked row never arrives: nothing to wait for)
                            n = tl.atomic_add(cnt_ptr + rb, 0, sem="acquire", scope="gpu")
                            while n <= K:
                                n = tl.atomic_add(cnt_ptr + rb, 0, sem="acquire", scope="gpu")
                    _grad_part(logits_ptr, sb, st, TR, grad_ptr, gsb, gst, tgt_ptr, ws_ptr, rb, c, counted_b, inv_t,
                               V, CHUNK, K, HAS_ENT)


@triton.jit
def _finalize_kernel(info_ptr, scale_ptr, ell_ptr, ent_ptr, ratio_ptr, kl_ptr, flags_ptr, out_ptr, loss_ptr, err_ptr,
                     N, USES_RATIO: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    """ONE program: loss = sum_t scale_t * ell_t (float64 accumulation) and every metric of fastupg.policy_loss,
    in the order of METRIC_KEYS, plus the OR of all data-check bits into err_ptr[0]."""
    z64 = tl.zeros((BLOCK,), tl.float64)
    l_on, l_off, n_on, n_off, lo, hi, du, rs, es, ks = z64, z64, z64, z64, z64, z64, z64, z64, z64, z64
    errs = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inb = idx < N
        info = tl.load(info_ptr + idx, mask=inb, other=0).to(tl.int32)
        cnt = (info & 1) != 0
        on = cnt & ((info & 2) == 0)
        off = cnt & ((info & 2) != 0)
        sc = tl.load(scale_ptr + idx, mask=inb, other=0.0)
        ell = tl.load(ell_ptr + idx, mask=inb, other=0.0)
        contrib = tl.where(cnt & (sc != 0), sc.to(tl.float64) * ell.to(tl.float64), 0.0)
        fl = tl.load(flags_ptr + idx, mask=inb, other=0)
        l_on += tl.where(on, contrib, 0.0)
        l_off += tl.where(off, contrib, 0.0)
        n_on += tl.where(on, 1.0, 0.0)
        n_off += tl.where(off, 1.0, 0.0)
        lo += tl.where(on & ((fl & 1) != 0), 1.0, 0.0)
        hi += tl.where(on & ((fl & 2) != 0), 1.0, 0.0)
        du += tl.where(on & ((fl & 4) != 0), 1.0, 0.0)
        rs += tl.where(on, tl.load(ratio_ptr + idx, mask=inb, other=0.0).to(tl.float64), 0.0)
        es += tl.where(cnt, tl.load(ent_ptr + idx, mask=inb, other=0.0).to(tl.float64), 0.0)
        ks += tl.where(cnt, tl.load(kl_ptr + idx, mask=inb, other=0.0).to(tl.float64), 0.0)
        errs |= fl & ~7
    L_on = tl.sum(l_on, 0)
    L_off = tl.sum(l_off, 0)
    Non = tl.sum(n_on, 0)
    Noff = tl.sum(n_off, 0)
    d_on = tl.maximum(Non, 1.0)
    d_all = tl.maximum(Non + Noff, 1.0)
    tl.store(loss_ptr, (L_on + L_off).to(tl.float32))
    tl.store(out_ptr + 0, L_on.to(tl.float32))
    tl.store(out_ptr + 1, L_off.to(tl.float32))
    tl.store(out_ptr + 2, (tl.sum(lo, 0) / d_on).to(tl.float32))
    tl.store(out_ptr + 3, (tl.sum(hi, 0) / d_on).to(tl.float32))
    tl.store(out_ptr + 4, (tl.sum(du, 0) / d_on).to(tl.float32))
    if USES_RATIO:
        tl.store(out_ptr + 5, (tl.sum(rs, 0) / d_on).to(tl.float32))
    else:
        tl.store(out_ptr + 5, 0.0)
    tl.store(out_ptr + 6, (tl.sum(es, 0) / d_all).to(tl.float32))
    if HAS_REF:
        tl.store(out_ptr + 7, (tl.sum(ks, 0) / d_all).to(tl.float32))
    else:
        tl.store(out_ptr + 7, 0.0)
    tl.store(out_ptr + 8, Non.to(tl.float32))
    tl.store(out_ptr + 9, Noff.to(tl.float32))
    tl.store(err_ptr, tl.load(err_ptr) | tl.reduce(errs, 0, _or))


@triton.jit
def _rescale_kernel(buf_ptr, sb, st, TR, N, g_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
    """buf *= g, row by row (rows may be strided), unless g == 1: then every program returns at once (no host sync
    is needed to find out that nothing is to do)."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        for row in range(tl.program_id(0), N, tl.num_programs(0)):
            r = row + tl.zeros((), tl.int64)  # 64-bit row offsets
            b = r // TR
            p = buf_ptr + b * sb + (r - b * TR) * st
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                v = tl.load(p + offs, mask=offs < V)
                tl.store(p + offs, (v.to(tl.float32) * g).to(buf_ptr.dtype.element_ty), mask=offs < V)


# ------------------------------------------------------------------------------------------------------------------
# launch geometry
# ------------------------------------------------------------------------------------------------------------------
# The fused kernel: vocabulary chunk per program, warps per program, and one launch (PHASE 0, logits read from HBM
# once) or three (PHASE 1 stats, 2 row, 3 gradient: logits read twice). Measured on an H100 (benchmarks/RESULTS.md,
# `bench_logits.py --tune`, 2026-11-25): two launches of 1024-logit chunks with one warp, 2.84 ms at 8k tokens, were
# the fastest; that two-launch form combined the row's K partials in every gradient program (K x 12 bytes read per
# program, about as many bytes as its chunk), which the row launch (PHASE 2) now does once per row; and the
# one-launch form of then (each chunk held in registers across a meeting of the row's co-resident programs,
# 3.6-6.0 ms) is replaced by the ticket-ordered one (PHASE 0, see _fused_kernel). Neither change is measured on a GPU
# yet: the default stays the separate launches, at the chunk and warps measured fastest. lag (one launch): rows
# between a chunk's two reads, >= 1 (bench_logits.py --tune sweeps forms and lags).
# FASTUPG_LOGITS_SPLIT="chunk,warps" overrides chunk/warps.
SPLIT = dict(chunk=1024, warps=1, one_launch=False, lag=32)
LAST_LAUNCH: dict = {}  # {"form": "one" | "three"}: the form the last _launch_rows ran (check_cuda.py reads it)


def _split_config(V: int, block_v: int | None) -> tuple[int, int]:
    env = os.environ.get("FASTUPG_LOGITS_SPLIT")
    chunk, warps = (int(v) for v in env.split(",")) if env else (SPLIT["chunk"], SPLIT["warps"])
    chunk = min(block_v or chunk, _pow2(V))
    return chunk, warps


def _pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


_N_SM: dict = {}


def _sm_count(dev: torch.device) -> int:
    if dev.index not in _N_SM:
        _N_SM[dev.index] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _N_SM[dev.index]


def _one_launch() -> bool:
    return bool(SPLIT["one_launch"])


# ------------------------------------------------------------------------------------------------------------------
# fused-loss layer
# ------------------------------------------------------------------------------------------------------------------
def _codes(b, default_ref="policy"):
    if b is None:
        return _REF[default_ref], 0
    return _REF[b.ref], _MASK[b.mask]


def _ws_numel(N: int, V: int, block_v: int | None) -> int:
    chunk, _ = _split_config(V, block_v)
    return max(N, 1) * ((-(-V // chunk)) * 4 + 4)


def _workspace(N: int, V: int, block_v: int | None, device) -> torch.Tensor:
    """The fused kernel's per-row scratch (4 floats per vocabulary chunk: its partials, the target's x in slot 3;
    then 4 for the row's gradient coefficients): reusable across launches of <= N rows on one stream (each launch
    writes what it reads before reading it)."""
    return torch.empty(_ws_numel(N, V, block_v), dtype=torch.float32, device=device)


def _launch_rows(z, sb, st, TR, grad, gsb, gst, tgt, N, V, est, *, adv, adv_scalar, old, ref, scale, info,
                 temperature, write_grad, a_one, block_v, arrivals=None, ticket=None, out=None, ws=None):
    """The main kernel over N rows: returns per-token (ell, logp, ent, ratio, kl, flags), written into `out` (six
    (N,) tensors, views allowed) when given; `ws` a _workspace of >= N rows when given (else allocated);
    `arrivals` (N,) and `ticket` (1,), zeroed int32, the one-launch form's counters when given (else allocated)."""
    dev = z.device
    chunk, warps = _split_config(V, block_v)
    K = -(-V // chunk)
    if out is None:
        tok = torch.empty(5, N, dtype=torch.float32, device=dev)
        out = (*tok.unbind(0), torch.empty(N, dtype=torch.int32, device=dev))
    ell, logp, ent, ratio, kl, flags = out
    ws = _workspace(N, V, block_v, dev) if ws is None else ws
    if N == 0:
        return ell, logp, ent, ratio, kl, flags
    on_ref, on_mask = _codes(est.online)
    off_ref, off_mask = _codes(est.offline)
    kl_est = _KL[est.kl_estimator] if ref is not None else 0
    meta = dict(V=V, CHUNK=chunk, K=K, KP=_pow2(K), WRITE_GRAD=write_grad,
                ON_REF=on_ref, ON_MASK=on_mask, OFF_REF=off_ref, OFF_MASK=off_mask, ON_A1=a_one[0], OFF_A1=a_one[1],
                HAS_ADV=adv is not None, HAS_OLD=old is not None, DUAL=est.dual_clip is not None, KL_EST=kl_est,
                KL_ON=est.kl_coef != 0, HAS_ENT=est.entropy_coef != 0, num_warps=warps)
    dummy = scale
    args = [z, sb, st, TR, grad if write_grad else z, gsb, gst, tgt,
            adv if adv is not None else dummy, old if old is not None else dummy, ref if ref is not None else dummy,
            scale, info, ell, logp, ent, ratio, kl, flags, ws]
    scal = [1.0 / temperature, float(adv_scalar), float(est.eps_low), float(est.eps_high),
            float(est.dual_clip or 0.0), float(est.gamma), float(est.entropy_coef), float(est.kl_coef)]
    if _one_launch():
        lag = int(SPLIT["lag"]) if write_grad else 0
        if write_grad and lag < 1:
            raise ValueError(f"SPLIT['lag'] must be >= 1 (got {lag}): with 0 a program could wait for itself")
        if arrivals is None or ticket is None:
            cnt = torch.zeros(N + 1, dtype=torch.int32, device=dev)
            arrivals, ticket = cnt[:N], cnt[N:]
        _fused_kernel[((N + lag) * K,)](*args, arrivals, ticket, N, lag, *scal, PHASE=0, **meta)
        LAST_LAUNCH["form"] = "one"
        return ell, logp, ent, ratio, kl, flags
    for phase, grid in ((1, N * K), (2, N), (3, N * K)):
        if phase < 3 or write_grad:
            _fused_kernel[(grid,)](*args, ws, ws, N, 0, *scal, PHASE=phase, **meta)  # (no counters: ws as dummy)
    LAST_LAUNCH["form"] = "three"
    return ell, logp, ent, ratio, kl, flags


def loss_and_grad_rows(logits2d: torch.Tensor, targets1d: torch.Tensor, estimator: Estimator, x: dict,
                       temperature: float, grad_out: torch.Tensor | None = None, block_v: int | None = None,
                       checks: list | None = None):
    """Row-level building block: per-token loss ell_t, log-prob, entropy, and grad = d(sum_t scale_t ell_t)/d logits.

    `x` is the dict of `fastupg.estimator.prepare_inputs` for these rows plus key `scale` (s_t * w_t, float32); its
    advantages are used as given (the A = 1 rule of 'one' branches is fastupg.estimator's business here; x["adv"]
    None means A = 1 everywhere).
    Rows with x["mask"] false (or, without a mask, scale 0) get a zero gradient and zero outputs.
    grad is written into `grad_out` when given (it may be `logits2d` itself). Returns (ell, logp, entropy, grad, aux)
    with aux = (flags (M, 3): clip low/high/dual, ratio (M,)). The non-finite-logits check is appended to `checks`
    when given (see fastupg.estimator.raise_failed_checks), else run here.
    """
    rows = RowInputs(estimator, x, targets1d, logits2d.device)
    z = logits2d if logits2d.stride(-1) == 1 else logits2d.contiguous()
    grad = torch.empty_like(z) if grad_out is None else grad_out
    rows.launch(z, 0, rows.M, grad, temperature, block_v=block_v)
    check = rows.nonfinite_check()
    if checks is None:
        raise_failed_checks([check])
    else:
        checks.append(check)
    flags3 = torch.stack([(rows.flags >> i) & 1 for i in range(3)], 1).float()
    return rows.ell, rows.logp, rows.ent, grad, (flags3, rows.ratio)


class RowInputs:
    """The per-token inputs of loss_and_grad_rows converted ONCE for M rows, and the (M,) outputs the fused kernel
    writes, so that a caller sweeping the rows in chunks (the chunked fused-linear impl) launches the kernel per
    chunk and nothing else: no per-chunk conversions, outputs, workspace or checks (one check at the end).

    x as in loss_and_grad_rows. `launch(z, r0, r1, grad, ...)`: logits z (r1 - r0, V) of rows [r0, r1) -> their
    gradient into grad, their outputs into self.ell/logp/ent/ratio/kl/flags[r0:r1].
    """

    def __init__(self, estimator: Estimator, x: dict, targets1d: torch.Tensor, device):
        if estimator.sequence_level:
            raise ValueError(f"estimator {estimator.name!r} is sequence-level: use token_logprobs + "
                             "fastupg.policy_loss")
        f = lambda v: None if v is None else v.to(device=device, dtype=torch.float32).contiguous()  # noqa: E731
        self.est = estimator
        self.tgt = targets1d.to(device=device, dtype=torch.int64).contiguous()
        self.M = M = self.tgt.numel()
        self.scale = f(x["scale"])
        counted = x["mask"].bool() if x.get("mask") is not None else self.scale != 0
        off = x.get("offline")
        info = counted.to(torch.int8) if off is None else counted.to(torch.int8) + 2 * off.to(torch.int8)
        self.info = info.to(device).contiguous()
        self.adv, self.old = f(x["adv"]), f(x["old"])
        self.ref = f(x.get("ref")) if estimator.kl_coef != 0 else None
        tok = torch.empty(5, M, dtype=torch.float32, device=device)
        self.ell, self.logp, self.ent, self.ratio, self.kl = tok.unbind(0)
        self.flags = torch.empty(M, dtype=torch.int32, device=device)
        self._ws = None
        self._counters = None  # the one-launch form's: M arrival counters, then a ticket counter per launch

    def launch(self, z: torch.Tensor, r0: int, r1: int, grad: torch.Tensor, temperature: float,
               block_v: int | None = None) -> None:
        n, V = z.shape
        if n != r1 - r0 or z.stride(-1) != 1 or grad.shape != z.shape or grad.stride(-1) != 1:
            raise ValueError(f"RowInputs.launch: logits {tuple(z.shape)} and grad {tuple(grad.shape)} must be "
                             f"unit-stride ({r1 - r0}, V) tensors for rows [{r0}, {r1})")
        if self._ws is None or self._ws.numel() < _ws_numel(n, V, block_v):
            self._ws = _workspace(n, V, block_v, z.device)  # (the first chunk is the largest: allocated once)
        s = slice(r0, r1)
        c = (lambda v: None if v is None else v[s])  # noqa: E731
        out = (self.ell[s], self.logp[s], self.ent[s], self.ratio[s], self.kl[s], self.flags[s])
        arrivals = ticket = None
        if _one_launch():
            if self._counters is None:  # zeroed once: the launches cover disjoint rows, and r0 names the ticket
                self._counters = torch.zeros(2 * self.M, dtype=torch.int32, device=z.device)
                self._next_row = 0
            if r0 < self._next_row:  # a row's counter already past K: its row part would never run again
                raise RuntimeError(f"RowInputs.launch: rows [{r0}, {r1}) were launched before (the one-launch "
                                   "form's counters serve each row once): make a new RowInputs")
            self._next_row = r1
            arrivals, ticket = self._counters[s], self._counters[self.M + r0:self.M + r0 + 1]
        _launch_rows(z, z.stride(0), 0, 1, grad, grad.stride(0), 0, self.tgt[s], n, V, self.est, adv=c(self.adv),
                     adv_scalar=1.0, old=c(self.old), ref=c(self.ref), scale=self.scale[s], info=self.info[s],
                     temperature=temperature, write_grad=True, a_one=(False, False), block_v=block_v, out=out,
                     ws=self._ws, arrivals=arrivals, ticket=ticket)

    def nonfinite_check(self):
        """(bad, message) for raise_failed_checks: a row that counts has non-finite logits (no host sync here)."""
        return ((self.flags & C.E_LOGITS) != 0).any(), \
            "logits contain non-finite values (nan/inf) (or the target logit is -inf)"


def logprob_rows(z: torch.Tensor, t: torch.Tensor, temperature: float, logp: torch.Tensor, lse: torch.Tensor,
                 ent: torch.Tensor, tgt_logit: torch.Tensor, block_v: int | None = None) -> None:
    """token_logprobs' forward kernel over the rows of z (n, V) into (n,) fp32 outputs (views allowed), without its
    argument and data checks or host sync: the caller validated the targets and checks lse / tgt_logit (see
    _nonfinite_check) once for all its chunks."""
    n, V = z.shape
    if n:
        _logprobs_fwd[(n,)](z, z.stride(0), t, logp, lse, ent, tgt_logit, 1.0 / temperature, V=V,
                            **_launch("stats", V, block_v, n))


def logprob_grad_rows(z: torch.Tensor, t: torch.Tensor, temperature: float, lse: torch.Tensor, ent: torch.Tensor,
                      g_logp: torch.Tensor, g_ent: torch.Tensor, grad: torch.Tensor,
                      block_v: int | None = None) -> None:
    """token_logprobs' backward kernel over the rows of z (n, V): grad = d(sum g_logp * logp + g_ent * H)/dz in
    grad's dtype, ONE pass (grad may be z itself). lse/ent as logprob_rows wrote them; (n,) fp32 inputs."""
    n, V = z.shape
    if n:
        _logprobs_bwd[(n,)](z, z.stride(0), grad, grad.stride(0), t, lse, ent, g_logp, g_ent, 1.0 / temperature,
                            V=V, **_launch("grad", V, block_v))


# ------------------------------------------------------------------------------------------------------------------
# log-prob layer: the autograd Function of token_logprobs on the Triton path
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
        # in place only where z is the caller's memory (a contiguous copy of odd-strided logits is ours to reuse)
        shares = z.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        ctx.logits_ref = weakref.ref(logits) if inplace_backward and shares else None
        ctx.meta = (logits.shape, temperature, inplace_backward, block_v)
        shape = logits.shape[:-1]
        return logp.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        shape, temperature, inplace, block_v = ctx.meta
        if inplace and getattr(ctx, "overwritten", False):
            raise RuntimeError(_SECOND_BACKWARD)
        z, t, lse, ent = ctx.saved_tensors
        N, V = z.shape
        g_logp = torch.zeros(N, device=z.device) if g_logp is None else g_logp.reshape(-1).float().contiguous()
        g_ent = torch.zeros(N, device=z.device) if g_ent is None else g_ent.reshape(-1).float().contiguous()
        grad = z if inplace else torch.empty_like(z)
        if N:
            _logprobs_bwd[(N,)](z, z.stride(0), grad, grad.stride(0), t, lse, ent, g_logp, g_ent, 1.0 / temperature,
                                V=V, **_launch("grad", V, block_v))
        if inplace:
            ctx.overwritten = True
            # the logits now hold their gradient: tell autograd (any other saved use of them, or a second backward
            # through this node, raises "modified by an inplace operation") and our own ops (they refuse them)
            torch.autograd.graph.increment_version(z)
            src = ctx.logits_ref() if ctx.logits_ref is not None else None
            if src is not None:
                _mark_overwritten(src, "token_logprobs")
        return grad.view(shape), None, None, None, None


# ------------------------------------------------------------------------------------------------------------------
# fused-loss layer: prep -> main -> finalize, and the upstream-gradient rescale
# ------------------------------------------------------------------------------------------------------------------
def rescale_rows(buf: torch.Tensor, g: torch.Tensor, geom) -> None:
    """buf *= g on the device, no host sync (the kernel returns at once when g == 1); geom as _fused_triton's."""
    N, V, sb, st, TR = geom
    if N == 0:
        return
    if buf.is_cuda:
        progs = min(N, 4 * _sm_count(buf.device))
    else:
        progs = min(N, 4)
    _rescale_kernel[(progs,)](buf, sb, st, TR, N, g.float().reshape(1), V=V,
                              BLOCK=min(4096, _pow2(V)), num_warps=8)


class _Result:
    __slots__ = ("loss", "grad", "geom", "metrics", "err")


def _fused_triton(logits, targets, est: Estimator, a: dict, temperature: float, agg, need_grad: bool,
                  inplace: bool, block_v) -> _Result:
    """prep kernel -> main kernel (three launches, or one) -> finalize kernel, no host sync."""
    dev = logits.device
    V = logits.shape[-1]
    z = logits if logits.stride(-1) == 1 else logits.contiguous()
    if z.dim() == 3:
        TR, sb, st = z.shape[1], z.stride(0), z.stride(1)
    else:
        TR, sb, st = 1, z.stride(0), 0
    N = targets.numel()
    if need_grad and inplace:
        grad, gsb, gst = z, sb, st
    elif need_grad:
        grad = torch.empty((N, V), dtype=z.dtype, device=dev)
        gsb, gst = V, 0
        if TR > 1:
            gsb, gst = TR * V, V
    else:
        grad, gsb, gst = z, sb, st
    f32 = dict(dtype=torch.float32, device=dev)
    scale = torch.empty(N, **f32)
    info = torch.empty(N, dtype=torch.int8, device=dev)
    cnt_err = torch.empty(N + 2, dtype=torch.int32, device=dev)  # arrival counters, data-check bits, ticket
    err = cnt_err[N:N + 1]
    out = torch.empty(11, **f32)
    mode = agg or est.agg
    two_d = targets.dim() == 2
    R, T = (targets.shape[0], targets.shape[1]) if two_d else (1, N)
    modes = [mode] if est.offline_agg is None else [mode, est.offline_agg]
    seq_modes = [m for m in modes if m.startswith("seq-mean")]
    s_given = None
    if seq_modes and (a["seq_ids"] is not None):  # arbitrary sequence ids: PyTorch (torch.unique) computes s_t
        m_bool = a["mask"].bool() if a["mask"] is not None else torch.ones(N, dtype=torch.bool, device=dev)
        off_bool = a["offline"].bool() if a["offline"] is not None else \
            torch.full((N,), est.online is None, dtype=torch.bool, device=dev)
        s_given = aggregation_weights(est, m_bool, off_bool, a["seq_ids"], agg, T if two_d else None).float()
    norm = est.agg_norm if est.agg_norm is not None else (T if two_d else 1.0)
    has_on, has_off = est.online is not None, est.offline is not None
    dummy = scale
    _prep_kernel[(1,)](
        a["mask"] if a["mask"] is not None else dummy, a["offline"] if a["offline"] is not None else dummy,
        a["weight"] if a["weight"] is not None else dummy, s_given if s_given is not None else dummy,
        scale, info, cnt_err, err, R, T, float(norm),
        float(est.online.coef) if has_on else 0.0, float(est.offline.coef) if has_off else 0.0,
        HAS_MASK=a["mask"] is not None, HAS_OFF=a["offline"] is not None, OFF_DEFAULT=int(not has_on),
        HAS_W=a["weight"] is not None, S_GIVEN=s_given is not None, SPLIT=est.offline_agg is not None,
        MODE=_AGG[mode], MODE_OFF=_AGG[est.offline_agg or mode], HAS_ON_BRANCH=has_on, HAS_OFF_BRANCH=has_off,
        NEED_OLD=has_on and est.online.needs_old and a["old"] is None, BLOCK=1024, num_warps=4)
    on1, off1, _ = advantage_rule(est)
    adv = a["adv"]
    ell, logp, ent, ratio, kl, flags = _launch_rows(
        z, sb, st, TR, grad, gsb, gst, a["targets"], N, V, est, adv=adv if isinstance(adv, torch.Tensor) else None,
        adv_scalar=adv if isinstance(adv, float) else 1.0, old=a["old"], ref=a["ref"], scale=scale, info=info,
        temperature=temperature, write_grad=need_grad, a_one=(on1, off1), block_v=block_v, arrivals=cnt_err[:N],
        ticket=cnt_err[N + 1:])
    loss = torch.empty((), **f32)
    _finalize_kernel[(1,)](info, scale, ell, ent, ratio, kl, flags, out, loss, err, N,
                           USES_RATIO=has_on and est.online.ref != "policy", HAS_REF=a["ref"] is not None,
                           BLOCK=1024, num_warps=4)
    res = _Result()
    res.loss, res.err = loss, err
    res.grad = grad if need_grad else None
    res.geom = (N, V, gsb, gst, TR) if need_grad else None
    res.metrics = {"loss": loss, **{k: out[i] for i, k in enumerate(METRIC_KEYS)}}
    return res
