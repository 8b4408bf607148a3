"""fused-linear impl "chunked" (the default on CUDA): cuBLAS GEMMs per chunk of rows, never the N x V logits.

* `_chunked_forward`  fp32 logits per chunk -> log-probs, log-sum-exp, entropy (the log-prob kernel of
  fastupg.kernels.logits on CUDA / under the interpreter, PyTorch otherwise).
* `_chunked_backward` the two-pass backward (every estimator, GSPO included): recompute a chunk's logits, form the
  gradient from dL/dl and dL/dH (one kernel launch on the kernel path), two GEMMs (per group of chunks there).
* `_one_pass_chunked` forward AND gradient in one sweep (token-level estimators): 3 GEMMs instead of 4.
On the kernel path the work per chunk is the logits GEMM and the kernel launches, nothing else (no conversions, no
host syncs: data checks are read once per call; tests/kernels/test_host_work.py counts it). dW accumulates by addmm_
in the weight's dtype (no weight-sized fp32 buffer); all vocabulary-sized buffers together stay within
`chunk_bytes`. Measurements: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from fastupg.kernels.estimator import Estimator, aggregation_weights, policy_loss, prepare_inputs, raise_failed_checks
from fastupg.kernels._fused_linear_common import FusedLinearOptions, _stat_dtype
from fastupg.kernels.logits import use_triton
from fastupg.kernels.torch_reference import log_softmax_stats

_CHUNK_FILTER_BLOCK = 4096  # exact=False: vocabulary columns per filtering block


ONE_PASS_SUBCHUNKS = 3  # fp32 logits chunks per gradient group (one-pass path); see _one_pass_rows


def _one_pass_rows(V: int, esize: int, chunk_bytes: int, k: int | None = None) -> tuple[int, int]:
    """(rows per fp32 logits chunk, rows per gradient group) of the one-pass path within `chunk_bytes`.

    The group's gradient rows (input dtype) feed the two gradient GEMMs once per group, so dW += g^T H runs with
    K = group rows and pays its read-modify-write of the V x D gradient once per group; the fp32 logits are only
    needed for one chunk at a time. 4 n V + esize k n V <= chunk_bytes with k chunks per group (bf16, k = 3: n =
    chunk_bytes / 10 V; 265 fp32 rows and 795 gradient rows at 384 MiB, V = 151936).
    """
    k = ONE_PASS_SUBCHUNKS if k is None else k
    n = max(1, chunk_bytes // ((4 + esize * k) * V))
    return n, n * k


def _rows_per_chunk(V: int, chunk_bytes: int, bytes_per_logit: int = 4) -> int:
    return max(1, chunk_bytes // (bytes_per_logit * V))


def _matmul_f32(h_c, w, sdt):
    """h_c @ w.T with the product kept in fp32 (never rounded to bf16: for a confident token 1 - p is a difference
    of nearly equal numbers, and bf16-rounded logits would put ~30% errors into its gradient)."""
    if h_c.dtype == sdt:
        return h_c @ w.t()
    if h_c.is_cuda:
        try:
            return torch.mm(h_c, w.t(), out_dtype=sdt)  # bf16 tensor cores, fp32 output
        except (RuntimeError, TypeError):
            pass
    # fallback (CPU, old torch): upcast W one vocabulary block at a time (bounded: as many bytes as the chunk)
    n, D = h_c.shape
    V = w.shape[0]
    out = torch.empty(n, V, dtype=sdt, device=h_c.device)
    hf = h_c.to(sdt)
    vb = max(1, (4 * n * V) // (4 * D))
    for v0 in range(0, V, vb):
        out[:, v0:v0 + vb] = hf @ w[v0:v0 + vb].to(sdt).t()
    return out


def _chunk_logits(h_c, w, b, temperature, sdt):
    z = _matmul_f32(h_c, w, sdt)  # (n, V) fp32: the only vocabulary-sized buffer of the chunked impl
    if b is not None:
        z += b.to(sdt)
    if temperature != 1.0:
        z *= 1.0 / temperature
    return z


def _chunked_forward(h, w, b, tgt, o: FusedLinearOptions):
    """O(N) log-probs, log-sum-exps and entropies, one fp32 logits chunk at a time. Kernel path (CUDA / interpreter,
    16-bit or fp32 inputs): per chunk the logits GEMM and ONE launch of the log-prob kernel, which writes straight
    into the outputs; its finiteness check is read once at the end (a host sync per chunk would leave the GPU idle
    while the host catches up). The targets were range-checked by the caller (fused_linear._validate)."""
    N, V = h.shape[0], w.shape[0]
    sdt = _stat_dtype(h.dtype)
    logp = torch.empty(N, dtype=sdt, device=h.device)
    lse = torch.empty(N, dtype=sdt, device=h.device)
    ent = torch.empty(N, dtype=sdt, device=h.device) if o.return_entropy else None
    step = _rows_per_chunk(V, o.chunk_bytes)
    if use_triton(h) and sdt == torch.float32:
        from fastupg.kernels._logits_checks import _nonfinite_check
        from fastupg.kernels._logits_triton import logprob_rows
        tgt = tgt.to(torch.int64)  # (once, O(N): the kernel's index arithmetic in 64 bits whatever the int dtype)
        tgt_logit = torch.empty(N, dtype=sdt, device=h.device)  # z_t / T: the kernel's check input
        ent_out = ent if ent is not None else torch.empty(N, dtype=sdt, device=h.device)
        for i in range(0, N, step):
            j = min(N, i + step)
            z = _chunk_logits(h[i:j], w, b, 1.0, sdt)  # (the kernel applies 1/T)
            logprob_rows(z, tgt[i:j], o.temperature, logp[i:j], lse[i:j], ent_out[i:j], tgt_logit[i:j])
            del z
        raise_failed_checks([_nonfinite_check(lse, tgt_logit)])
        return logp, lse, ent
    for i in range(0, N, step):
        j = min(N, i + step)
        z = _chunk_logits(h[i:j], w, b, o.temperature, sdt)
        logp[i:j], lse[i:j], en = log_softmax_stats(z, tgt[i:j], ent is not None, inplace=True)  # z: log p
        if ent is not None:
            ent[i:j] = en
        del z
    return logp, lse, ent


def _new_dw(w, need_dw):
    """dW accumulates across chunks IN THE WEIGHT'S DTYPE by GEMM (addmm_: fp32 products and sum inside cuBLAS, one
    rounding to bf16 per chunk), as Liger does: an fp32 accumulator would be a weight-sized buffer (2.2 GB at
    V = 151936, D = 3584) beyond the gradient itself. fp32 weights (e.g. under autocast) accumulate in fp32."""
    return torch.zeros_like(w) if need_dw else None


def _chunked_backward(h, w, b, rows, tgt, lse, ent, gl, gh, o: FusedLinearOptions, need_dh, need_dw, need_db):
    """dH, dW, db of the compacted rows `rows` (their tgt/lse/ent/gl/gh are already compacted)."""
    N, D = h.shape
    V = w.shape[0]
    sdt = _stat_dtype(h.dtype)
    inv_t = 1.0 / o.temperature
    dH = torch.zeros_like(h) if need_dh else None
    dW = _new_dw(w, need_dw)
    db = torch.zeros(V, dtype=sdt, device=w.device) if need_db else None
    if o.exact and use_triton(h) and sdt == torch.float32:
        _kernel_backward(h, w, b, rows, tgt, lse, ent, gl, gh, o, dH, dW, db)
        return dH, dW, db
    eps = o.eps_for(h.dtype)
    vblock = _CHUNK_FILTER_BLOCK
    step = _rows_per_chunk(V, o.chunk_bytes, 4 + 4 + h.element_size())  # fp32 logits, one fp32 temporary, g
    for i in range(0, rows.numel(), step):
        r = rows[i:i + step]
        h_c = h.index_select(0, r)
        z = _chunk_logits(h_c, w, b, o.temperature, sdt)
        z -= lse[i:i + step, None]           # log p
        logp_max = None if o.exact else z.amax(0)
        # g = [gl*(onehot - p) - gh*p*(log p + H)] / T, built in place in the logits buffer
        if gh is not None:
            t = z + ent[i:i + step, None]    # log p + H   (second temporary)
            z.exp_()                          # p
            t.mul_(gh[i:i + step, None].to(sdt)).add_(gl[i:i + step, None].to(sdt))
            z.mul_(t).neg_()                 # -p * (gl + gh*(log p + H))
            del t
        else:
            z.exp_().mul_(-gl[i:i + step, None].to(sdt))
        tg = tgt[i:i + step]
        ar = torch.arange(r.numel(), device=h.device)
        z[ar, tg] += gl[i:i + step].to(sdt)
        if inv_t != 1.0:
            z *= inv_t
        if db is not None:
            db += z.sum(0)
        g = z.to(h.dtype)
        del z
        if o.exact:
            if need_dh:
                dH.index_copy_(0, r, g @ w)
            if need_dw:
                dW.addmm_(g.t(), h_c)
            del g
            continue
        # keep a vocab block if p >= eps somewhere in it or a target falls in it (Cut Cross-Entropy filtering)
        keep = logp_max >= math.log(eps) if eps > 0 else torch.ones(V, dtype=torch.bool, device=h.device)
        keep[tg] = True
        nb = (V + vblock - 1) // vblock
        kb = torch.nn.functional.pad(keep, (0, nb * vblock - V)).view(nb, vblock).any(1).tolist()
        blocks = [(k * vblock, min(V, (k + 1) * vblock)) for k in range(nb) if kb[k]]
        dh_c = torch.zeros(r.numel(), D, dtype=sdt, device=h.device) if need_dh else None
        for v0, v1 in blocks:
            if need_dh:
                dh_c += (g[:, v0:v1] @ w[v0:v1]).to(sdt)
            if need_dw:
                dW[v0:v1].addmm_(g[:, v0:v1].t(), h_c)
        if need_dh:
            dH.index_copy_(0, r, dh_c.to(h.dtype))
        del g
    return dH, dW, db


def _kernel_writes_rows(g_c, z, launch) -> None:
    """launch(into): a kernel that writes the gradient of the fp32 logits chunk z into `into`, wanted in g_c (the
    group's rows, input dtype). The interpreter's fp32 -> 16-bit casts are unreliable: there the kernel writes fp32
    into z itself (in place) and torch converts."""
    into = g_c if (z.is_cuda or g_c.dtype == z.dtype) else z
    launch(into)
    if into is z:
        g_c.copy_(z)


def _kernel_backward(h, w, b, rows, tgt, lse, ent, gl, gh, o: FusedLinearOptions, dH, dW, db):
    """The exact backward on the kernel path: per fp32 logits chunk, the logits GEMM and ONE launch of the log-prob
    gradient kernel writing g straight in the input dtype into the group's gradient rows (no fp32 temporaries);
    per group of chunks dH[rows] = g @ W and dW += g^T H_rows (_group_gemms, as on the one-pass path)."""
    M = rows.numel()
    if M == 0:
        return
    from fastupg.kernels._logits_triton import logprob_grad_rows
    V = w.shape[0]
    sdt = _stat_dtype(h.dtype)
    dense = M == h.shape[0]  # every row has a gradient: contiguous slices, dH written in place
    ent = lse if ent is None else ent  # (read with g_ent = 0: no entropy term)
    gh = torch.zeros_like(gl) if gh is None else gh
    gl, gh = gl.float().contiguous(), gh.float().contiguous()
    tgt = tgt.to(torch.int64)
    n_sub, n_grp = _one_pass_rows(V, h.element_size(), o.chunk_bytes)
    gbuf = torch.empty(min(n_grp, M), V, dtype=h.dtype, device=h.device)
    for g0 in range(0, M, n_grp):
        gn = min(n_grp, M - g0)
        gsel = slice(g0, g0 + gn) if dense else rows[g0:g0 + gn]
        h_g = h[gsel] if dense else h.index_select(0, gsel)
        for s0 in range(0, gn, n_sub):
            s1 = min(gn, s0 + n_sub)
            r = slice(g0 + s0, g0 + s1)
            z = _chunk_logits(h_g[s0:s1], w, b, 1.0, sdt)  # (the kernel applies 1/T)
            _kernel_writes_rows(gbuf[s0:s1], z, lambda into: logprob_grad_rows(
                z, tgt[r], o.temperature, lse[r], ent[r], gl[r], gh[r], into))
            del z
        _group_gemms(gbuf[:gn], h_g, w, gsel, dense, dH, dW, db, sdt, dH is not None, dW is not None,
                     db is not None)


def _token_estimator(est: Estimator) -> Estimator:
    """The same per-token loss ell_t with aggregation 'token-sum' and branch coefs 1 (they live in the weights)."""
    rep = lambda b: None if b is None else dataclasses.replace(b, coef=1.0)  # noqa: E731
    return dataclasses.replace(est, online=rep(est.online), offline=rep(est.offline), agg="token-sum",
                               offline_agg=None, agg_norm=None)


def _row_grads(est_tok, l, ent, sl, x, scale, need_ent):
    """dL/dl and dL/dH of rows sl: L restricted to them is sum_t scale_t * ell_t(l_t, H_t) (token-level only)."""
    with torch.enable_grad():
        lg = l.detach().to(torch.float64).requires_grad_()
        hg = ent.detach().to(torch.float64).requires_grad_() if need_ent else None
        c = (lambda k: None if x[k] is None else x[k][sl])  # noqa: E731
        loss, _ = policy_loss(lg, est_tok, advantages=c("adv").to(torch.float64), old_logp=c("old"), mask=c("mask"),
                              offline=c("offline"), weight=scale[sl], entropy=hg, ref_logp=c("ref"))
        ins = [lg] + ([hg] if need_ent else [])
        gr = torch.autograd.grad(loss, ins, allow_unused=True)
    gl = gr[0] if gr[0] is not None else torch.zeros_like(lg)
    gh = (gr[1] if gr[1] is not None else torch.zeros_like(hg)) if need_ent else None
    return gl, gh


def _one_pass_chunked(h, w, b, tgt, est, kw, temperature, need, o: FusedLinearOptions):
    """Forward AND gradient in one sweep over row chunks: 3 GEMMs (logits, g@W, g^T@H) instead of 4.

    Valid for token-level estimators, where L = sum_t s_t * ell_t(l_t, H_t) with s_t fixed by the mask alone, so each
    chunk's dL/dl and dL/dH are known as soon as its logits are. The value and metrics come from fastupg.policy_loss on
    the O(N) log-probs at the end, so they are those of the two-pass path exactly.

    Per chunk of n rows (CUDA / interpreter, 16-bit or fp32 inputs): the fp32 logits (4 n V bytes, cuBLAS with fp32
    output), the logits kernel reads them and writes the gradient straight in the input dtype into a reused buffer
    (2 n V bytes), then dH[rows] = g @ W (written in place) and dW += g^T @ H_rows (addmm_ into the gradient buffer).
    Rows of weight 0 (masked, HPT weight 0) are dropped before the vocabulary pass; host syncs: a few per call, none
    per chunk (the kernel's finiteness checks are collected and raised at the end).
    """
    N, D = h.shape
    V = w.shape[0]
    sdt = _stat_dtype(h.dtype)
    need_ent = est.entropy_coef != 0
    ent_ph = torch.zeros(N, device=h.device) if need_ent else None  # only for validation of entropy=
    x = prepare_inputs((N,), est, advantages=kw["advantages"], old_logp=kw["old_logp"], mask=kw["mask"],
                       offline=kw["offline"], seq_ids=kw["seq_ids"], weight=kw["token_weight"], entropy=ent_ph,
                       ref_logp=kw["ref_logp"], device=h.device)
    scale = aggregation_weights(est, x["mask"], x["offline"], x["seq"], kw["agg"], kw["padded_len"]) * x["weight"].to(
        torch.float64)
    est_tok = _token_estimator(est)
    need_dh, need_dw, need_db = need
    # the entropy is always computed: the `entropy` metric is the real one whatever entropy_coef (as fused_policy_loss)
    logp = torch.zeros(N, dtype=sdt, device=h.device)
    ent = torch.zeros(N, dtype=sdt, device=h.device)
    dH = torch.zeros_like(h) if need_dh else None
    dW = _new_dw(w, need_dw)
    db = torch.zeros(V, dtype=sdt, device=w.device) if need_db else None
    active = scale != 0
    rows = active.nonzero().squeeze(1)
    dense = rows.numel() == N  # the usual case: contiguous row slices, dH written in place
    idle = (~active & x["mask"]).nonzero().squeeze(1)
    if idle.numel():  # unmasked rows of weight 0: no gradient, but the metrics count their log-probs
        lp_i, _, en_i = _chunked_forward(h.index_select(0, idle), w, b, tgt.index_select(0, idle),
                                         dataclasses.replace(o, return_entropy=True))
        logp[idle], ent[idle] = lp_i, en_i
    kernel = use_triton(h) and sdt == torch.float32
    # rows of weight 0 skip the vocabulary pass; non-finite hidden states there must still raise, as on the other
    # paths (read once, O(N D); evaluated with the other checks in one host sync at the end)
    checks: list = [((~torch.isfinite(h)).any(), "hidden contains non-finite values (nan/inf)")]
    n_sub, n_grp = _one_pass_rows(V, h.element_size(), o.chunk_bytes)
    M = rows.numel()
    gbuf = torch.empty(min(n_grp, M), V, dtype=h.dtype, device=h.device) if M else None
    if kernel and M:
        # the per-token inputs of the active rows converted once (the kernel then is the only launch per chunk
        # besides the logits GEMM); outputs in active-row order
        from fastupg.kernels._logits_triton import RowInputs
        pick = (lambda v: v) if dense else (lambda v: v.index_select(0, rows))  # noqa: E731
        xa = {k: (pick(v) if isinstance(v, torch.Tensor) and v.shape == (N,) else v) for k, v in x.items()}
        xa["scale"] = pick(scale).float()
        fused = RowInputs(est, xa, pick(tgt), h.device)
    for g0 in range(0, M, n_grp):
        gn = min(n_grp, M - g0)
        gsel = slice(g0, g0 + gn) if dense else rows[g0:g0 + gn]
        h_g = h[gsel] if dense else h.index_select(0, gsel)
        g_g = gbuf[:gn]
        for s0 in range(0, gn, n_sub):
            sn = min(n_sub, gn - s0)
            h_c, g_c = h_g[s0:s0 + sn], g_g[s0:s0 + sn]
            if kernel:
                # the fused loss kernel of fastupg.kernels.logits: reads the fp32 logits twice and writes their
                # gradient (temperature applied inside) in the input dtype into the group's gradient rows
                z = _chunk_logits(h_c, w, b, 1.0, sdt)
                _kernel_writes_rows(g_c, z, lambda into: fused.launch(z, g0 + s0, g0 + s0 + sn, into, o.temperature))
                del z
            else:
                sel = slice(g0 + s0, g0 + s0 + sn) if dense else rows[g0 + s0:g0 + s0 + sn]
                g_c.copy_(_torch_chunk_grad(h_c, w, b, tgt[sel], sel, x, scale, est_tok, need_ent, logp, ent, o,
                                            h.dtype))
        # the two gradient GEMMs once per group: K = n_grp rows for dW's accumulation (its read-modify-write of the
        # weight-sized buffer is paid once per group, not once per fp32 chunk). Running them on a side stream to
        # overlap the next group's logits and loss kernel was measured slower on an H100 (1.14-2.13x the time of this
        # serial order; benchmarks/RESULTS.md), so they run in order.
        _group_gemms(g_g, h_g, w, gsel, dense, dH, dW, db, sdt, need_dh, need_dw, need_db)
    if kernel and M:
        checks.append(fused.nonfinite_check())
        if dense:
            logp.copy_(fused.logp)
            ent.copy_(fused.ent)
        else:
            logp[rows], ent[rows] = fused.logp.to(sdt), fused.ent.to(sdt)
    raise_failed_checks(checks)
    return logp, ent, dH, dW, db


def _group_gemms(g_g, h_g, w, gsel, dense, dH, dW, db, sdt, need_dh, need_dw, need_db):
    """dH[rows] = g @ W (in place), dW += g^T @ H_rows (addmm_ into the gradient), db += column sums of g."""
    if need_db:
        db += g_g.sum(0, dtype=sdt)
    if need_dh:
        if dense:
            torch.mm(g_g, w, out=dH[gsel])
        else:
            dH.index_copy_(0, gsel, g_g @ w)
    if need_dw:
        dW.addmm_(g_g.t(), h_g)


def _torch_chunk_grad(h_c, w, b, tgt_c, sel, x, scale, est_tok, need_ent, logp, ent, o, dtype):
    """PyTorch path of one chunk (fp64, or no Triton): fills logp/ent[sel], returns dL/dz in `dtype`."""
    sdt = _stat_dtype(h_c.dtype)
    z = _chunk_logits(h_c, w, b, o.temperature, sdt)  # u = z / T
    logp[sel], _, ent[sel] = log_softmax_stats(z, tgt_c, True, inplace=True)  # z now holds log p
    gl, gh = _row_grads(est_tok, logp[sel], ent[sel] if need_ent else None, sel, x, scale, need_ent)
    gl = gl.to(sdt)
    if gh is not None:
        t = z + ent[sel][:, None]
        z.exp_()
        t.mul_(gh[:, None].to(sdt)).add_(gl[:, None])
        z.mul_(t).neg_()
        del t
    else:
        z.exp_().mul_(-gl[:, None])
    z[torch.arange(z.shape[0], device=z.device), tgt_c] += gl
    if o.temperature != 1.0:
        z *= 1.0 / o.temperature                          # dL/dz = dL/du / T
    return z.to(dtype)
