"""Fused linear + log-softmax: per-token log-probs (and entropy) straight from hidden states and the lm_head weight.

For long sequences the N x V logits are the memory peak of post-training (32k tokens x 151936 vocab = 19.5 GB per
fp32 copy). Nothing here ever holds them: the forward keeps O(N) statistics (log-sum-exp, entropy) and the backward
recomputes logits tile by tile (Triton) or chunk by chunk (torch), turning them straight into dH and dW.

Public API
    fused_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, bias=None,
                          impl=None, exact=True) -> logp  (or (logp, entropy))
    fused_linear_policy_loss(hidden, weight, targets, estimator, *, advantages, ..., token_weight=None, ...)
                          -> (loss, metrics)

impl
    "triton"   fully fused Triton kernels (fastupg/kernels/_fused_linear_triton.py); CUDA, or CPU under
               TRITON_INTERPRET=1 (slow, for tests)
    "chunked"  torch matmul per chunk of rows; the logits of one chunk (bounded by `chunk_bytes`, 2^30 by default)
               are the only vocabulary-sized buffer
    "torch"    the plain reference: materialises the N x V logits, autograd does the rest; float64-capable oracle
    None       chunked on CUDA and on CPU with TRITON_INTERPRET=1, torch on plain CPU. Picked by measurement on an
               H200 (benchmarks/RESULTS.md): at N=8192, D=1536, V=151936 bf16, chunked takes 34.7 ms fwd+bwd, the
               triton impl 303 ms (its backward accumulates dW with fp32 atomics from every row block: correct, but
               far from the GEMM roofline; kept for its O(tile) memory and as the base of future work).

Gradient of one row (u = z / T the tempered logits, p = softmax(u), l = log p[y], H = -sum p log p):
    dL/dz_j = [ dL/dl * (onehot_j - p_j)  -  dL/dH * p_j * (log p_j + H) ] / T
so the backward needs only dL/dl and dL/dH per token (O(N)), which any estimator in fastupg.policy_loss provides,
GSPO included. Rows where both are exactly zero (masked, clipped, weight 0) are compacted away before the
vocabulary pass. `exact=False` also skips vocabulary tiles whose softmax entries are all below `filter_eps` and that
contain no target (Cut Cross-Entropy's gradient filtering): each skipped gradient entry is < eps * (|dL/dl| +
|dL/dH| * |log p + H|) / T, so the error of dH/dW is bounded by eps times the row gradient scale times the number of
skipped columns; the tests accept a relative error of 1e-2 for exact=False.

Precision: the statistics (log-sum-exp, entropy) and the returned log-probs are float32 (float64 for float64
inputs, torch/chunked impls); the logits are accumulated and kept in fp32 (tl.dot; torch.mm(..., out_dtype=fp32) in
the chunked impl). g is rounded to the input dtype before the two gradient GEMMs (tensor cores). Gradients of bf16 inputs are accumulated in fp32 and returned in the
input dtype.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

import dataclasses

from fastupg.estimator import Estimator, aggregation_weights, policy_loss, prepare_inputs
from fastupg.kernels.logits import use_triton

IMPLS = ("triton", "chunked", "torch")
# Chunked impl: bytes of fp32 logits per chunk. Measured on an H200 (benchmarks/RESULTS.md, N=8192, D=1536,
# V=151936): 2^30 -> 34.7 ms fwd+bwd, 2.3 GiB peak; 2^27 -> 108 ms, 1.9 GiB (chunks of ~220 rows starve the GPU).
DEFAULT_CHUNK_BYTES = 2 ** 30
_CHUNK_FILTER_BLOCK = 4096  # chunked impl, exact=False: vocabulary columns per filtering block


@dataclass(frozen=True)
class FusedLinearOptions:
    """Everything the autograd Function needs besides tensors (a frozen config instead of a long argument list)."""
    impl: str
    temperature: float = 1.0
    return_entropy: bool = False
    exact: bool = True
    filter_eps: float | None = None   # None: 2^-12 for 16-bit inputs, 2^-20 for fp32 (only used when exact=False)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # chunked impl: bytes of fp32 logits per chunk (about 2 such buffers live)
    block_n: int = 64
    block_v: int = 128
    block_d: int = 64

    def eps_for(self, dtype: torch.dtype) -> float:
        if self.filter_eps is not None:
            return self.filter_eps
        return 2.0 ** -12 if dtype in (torch.bfloat16, torch.float16) else 2.0 ** -20


def default_impl(device: torch.device) -> str:
    """chunked on CUDA (measured 9x faster than the triton impl on an H200) and under TRITON_INTERPRET=1, else torch."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "chunked"
    return "torch"


# -- validation -----------------------------------------------------------------------------------------------------
def _validate(hidden, weight, targets, bias, temperature, impl):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, D) or (B, T, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, D) as an lm_head stores it, got shape {tuple(weight.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has D={hidden.shape[-1]} but weight is {tuple(weight.shape)} (expected (V, D))")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(hidden.shape[:-1])}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError("hidden, weight and targets must be on the same device")
    V = weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"targets must lie in [0, {V}) (use any valid id, e.g. 0, at masked positions; "
                         f"got range [{int(targets.min())}, {int(targets.max())}])")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (V,):
            raise ValueError(f"bias must be a ({V},) tensor, got {getattr(bias, 'shape', type(bias).__name__)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {list(IMPLS)} (or None for the per-device default)")
    if impl == "triton" and hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before triton is imported)")
    if impl == "triton" and hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"impl='triton' supports fp32/fp16/bf16 inputs, got {hidden.dtype}; use impl='torch'")


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- torch reference ------------------------------------------------------------------------------------------------
def _torch_logprobs(h, w, b, tgt, temperature, return_entropy):
    """Plain reference: materialises the logits; differentiable by autograd."""
    z = h @ w.t()
    if b is not None:
        z = z + b
    z = z.to(_stat_dtype(h.dtype)) / temperature
    lp = torch.log_softmax(z, dim=-1)
    logp = lp.gather(-1, tgt[:, None]).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1) if return_entropy else None
    return logp, ent


# -- chunked (torch matmul per row chunk) ---------------------------------------------------------------------------
def _rows_per_chunk(V: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * V))


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
    N, V = h.shape[0], w.shape[0]
    sdt = _stat_dtype(h.dtype)
    logp = torch.empty(N, dtype=sdt, device=h.device)
    lse = torch.empty(N, dtype=sdt, device=h.device)
    ent = torch.empty(N, dtype=sdt, device=h.device) if o.return_entropy else None
    step = _rows_per_chunk(V, o.chunk_bytes)
    for i in range(0, N, step):
        j = min(N, i + step)
        z = _chunk_logits(h[i:j], w, b, o.temperature, sdt)
        lse_c = torch.logsumexp(z, dim=-1)
        lse[i:j] = lse_c
        logp[i:j] = z.gather(1, tgt[i:j, None]).squeeze(1) - lse_c
        if ent is not None:
            z -= lse_c[:, None]              # log p, in place
            ent[i:j] = -(z.exp() * z).sum(-1)  # one temporary (p log p is fused by the sum's input)
        del z
    return logp, lse, ent


def _chunked_backward(h, w, b, rows, tgt, lse, ent, gl, gh, o: FusedLinearOptions, need_dh, need_dw, need_db):
    """dH, dW, db of the compacted rows `rows` (their tgt/lse/ent/gl/gh are already compacted)."""
    N, D = h.shape
    V = w.shape[0]
    sdt = _stat_dtype(h.dtype)
    inv_t = 1.0 / o.temperature
    dH = torch.zeros_like(h) if need_dh else None
    # dW accumulates across chunks: fp32 for 16-bit weights (the fp32 gradient buffer), in place otherwise
    dW = torch.zeros(w.shape, dtype=sdt if w.dtype in (torch.float16, torch.bfloat16) else w.dtype,
                     device=w.device) if need_dw else None
    db = torch.zeros(V, dtype=sdt, device=w.device) if need_db else None
    eps = o.eps_for(h.dtype)
    vblock = _CHUNK_FILTER_BLOCK
    step = _rows_per_chunk(V, o.chunk_bytes)
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
        if o.exact:
            blocks = [(0, V)]
        else:
            # keep a vocab block if p >= eps somewhere in it or a target falls in it (Cut Cross-Entropy filtering)
            keep = logp_max >= math.log(eps) if eps > 0 else torch.ones(V, dtype=torch.bool, device=h.device)
            keep[tg] = True
            nb = (V + vblock - 1) // vblock
            kb = torch.nn.functional.pad(keep, (0, nb * vblock - V)).view(nb, vblock).any(1).tolist()
            blocks = [(k * vblock, min(V, (k + 1) * vblock)) for k in range(nb) if kb[k]]
        g = z.to(h.dtype)
        del z
        dh_c = torch.zeros(r.numel(), D, dtype=sdt, device=h.device) if need_dh else None
        for v0, v1 in blocks:
            if need_dh:
                dh_c += (g[:, v0:v1] @ w[v0:v1]).to(sdt)
            if need_dw:
                dW[v0:v1] += (g[:, v0:v1].t() @ h_c).to(dW.dtype)
        if need_dh:
            dH.index_copy_(0, r, dh_c.to(h.dtype))
        del g
    return dH, (dW.to(w.dtype) if need_dw else None), db


# -- triton -----------------------------------------------------------------------------------------------------------
def _triton_forward(h, w, b, tgt, o: FusedLinearOptions):
    from fastupg.kernels._fused_linear_triton import _fwd_kernel
    N, D = h.shape
    V = w.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=h.device)
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    ent = torch.empty(N, dtype=torch.float32, device=h.device) if o.return_entropy else lse
    if N == 0:
        return logp, lse, (ent if o.return_entropy else None)
    grid = (triton_cdiv(N, o.block_n),)
    _fwd_kernel[grid](h, w, b if b is not None else h, tgt, logp, lse, ent,
                      N, V, D, h.stride(0), h.stride(1), w.stride(0), w.stride(1),
                      1.0 / o.temperature,
                      HAS_BIAS=b is not None, RETURN_ENT=o.return_entropy, IEEE=h.dtype == torch.float32, UPCAST=_interp_upcast(h),
                      BLOCK_N=o.block_n, BLOCK_V=o.block_v, BLOCK_D=o.block_d)
    return logp, lse, (ent if o.return_entropy else None)


def _interp_upcast(h) -> bool:
    # the Triton interpreter (CPU tests) computes wrong bf16/fp16 tl.dot products: upcast there, never on a GPU
    return h.device.type != "cuda" and h.dtype != torch.float32


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _triton_backward(h, w, b, rows, tgt, lse, ent, gl, gh, o: FusedLinearOptions, need_dh, need_dw, need_db):
    from fastupg.kernels._fused_linear_triton import _bwd_kernel
    N, D = h.shape
    V = w.shape[0]
    M = rows.numel()
    f32 = torch.float32
    dH = torch.zeros(N, D, dtype=f32, device=h.device) if need_dh else None
    dW = torch.zeros(V, D, dtype=f32, device=h.device) if need_dw else None
    db = torch.zeros(V, dtype=f32, device=h.device) if need_db else None
    if M > 0:
        has_gh = gh is not None
        grid = (triton_cdiv(M, o.block_n) * triton_cdiv(V, o.block_v),)
        dummy = lse
        _bwd_kernel[grid](h, w, b if b is not None else h, rows, tgt, lse, ent if has_gh else dummy,
                          gl.to(f32), gh.to(f32) if has_gh else dummy,
                          dH if need_dh else dummy, dW if need_dw else dummy, db if need_db else dummy,
                          M, V, D, h.stride(0), h.stride(1), w.stride(0), w.stride(1),
                          D if need_dh else 0, D if need_dw else 0,
                          1.0 / o.temperature, o.eps_for(h.dtype),
                          HAS_BIAS=need_db, HAS_GH=has_gh, FILTER=not o.exact, IEEE=h.dtype == f32, UPCAST=_interp_upcast(h),
                          NEED_DH=need_dh, NEED_DW=need_dw,
                          BLOCK_N=o.block_n, BLOCK_V=o.block_v, BLOCK_D=o.block_d)
    return (dH.to(h.dtype) if need_dh else None), (dW.to(w.dtype) if need_dw else None), db


# -- autograd -------------------------------------------------------------------------------------------------------
class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, tgt, o: FusedLinearOptions):
        fwd = _triton_forward if o.impl == "triton" else _chunked_forward
        logp, lse, ent = fwd(h, w, b, tgt, o)
        ctx.save_for_backward(h, w, b, tgt, lse, ent)
        ctx.o = o
        if ent is None:
            return logp
        return logp, ent

    @staticmethod
    def backward(ctx, glogp, gent=None):
        h, w, b, tgt, lse, ent = ctx.saved_tensors
        o = ctx.o
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = b is not None and ctx.needs_input_grad[2]
        sdt = lse.dtype
        gl = glogp.to(sdt) if glogp is not None else torch.zeros_like(lse)
        gh = gent.to(sdt) if (o.return_entropy and gent is not None) else None
        # the free lunch of policy gradients: masked / clipped / zero-weight tokens have exactly zero gradient
        active = gl != 0
        if gh is not None:
            active |= gh != 0
        rows = active.nonzero().squeeze(1)
        c = (lambda t: None if t is None else t.index_select(0, rows))  # noqa: E731  (O(N) compaction)
        bwd = _triton_backward if o.impl == "triton" else _chunked_backward
        dH, dW, db = bwd(h, w, b, rows, c(tgt), c(lse), c(ent) if gh is not None else None, c(gl), c(gh), o,
                         need_dh, need_dw, need_db)
        if need_db:
            db = db.to(b.dtype)
        return dH, dW, db, None, None


def fused_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, bias=None, impl=None,
                          exact=True, *, filter_eps=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """log softmax((hidden @ weight.T + bias) / temperature)[targets] without materialising the logits.

    hidden (N, D) or (B, T, D); weight (V, D) as an lm_head stores it; targets integer, shape hidden.shape[:-1];
    bias (V,) or None. Differentiable w.r.t. hidden, weight and bias. Returns logp (float32; float64 for float64
    inputs), and the entropy of softmax(z / T) per token if return_entropy. See the module docstring for impl,
    exact, filter_eps and chunk_bytes.
    """
    impl = default_impl(hidden.device) if impl is None and isinstance(hidden, torch.Tensor) else impl
    _validate(hidden, weight, targets, bias, temperature, impl)
    if not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if filter_eps is not None and not (0 <= filter_eps < 1):
        raise ValueError(f"filter_eps must be in [0, 1), got {filter_eps!r}")
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    tgt = targets.reshape(-1)
    if impl == "torch":
        logp, ent = _torch_logprobs(h, weight, bias, tgt, float(temperature), return_entropy)
    else:
        if impl == "triton":  # kernels index with unit stride along D
            h = h if h.stride(-1) == 1 else h.contiguous()
            w = weight if weight.stride(-1) == 1 else weight.contiguous()
        else:
            w = weight
        o = FusedLinearOptions(impl=impl, temperature=float(temperature), return_entropy=bool(return_entropy),
                               exact=bool(exact), filter_eps=filter_eps, chunk_bytes=chunk_bytes)
        out = _FusedLinearLogprobs.apply(h, w, bias, tgt.contiguous(), o)
        logp, ent = (out if return_entropy else (out, None))
    logp = logp.reshape(lead)
    if return_entropy:
        return logp, ent.reshape(lead)
    return logp


# -- one pass (chunked impl, token-level estimators): the gradient is computed during the forward ------------------
def _grad_in_dtype(z, inv_t, db, dtype):
    """dL/d(logits) of a chunk from dL/du (u = z / T), in place; db += its column sums; returned in `dtype`."""
    if inv_t != 1.0:
        z *= inv_t
    if db is not None:
        db += z.sum(0)
    return z.to(dtype)


def _accumulate(g, rows, h_c, w, dH, dW):
    """dH[rows] = g @ W and dW += g^T @ H_chunk (None: not needed)."""
    if dH is not None:
        dH.index_copy_(0, rows, (g @ w).to(dH.dtype))
    if dW is not None:
        dW += (g.t() @ h_c).to(dW.dtype)


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


class _PrecomputedGrad(torch.autograd.Function):
    """Returns the loss value; backward hands out gradients computed in the forward, scaled by grad_out."""

    @staticmethod
    def forward(ctx, loss, h, w, b, dH, dW, db):
        ctx.grads = (dH, dW, db)
        return loss.clone()

    @staticmethod
    def backward(ctx, go):
        dH, dW, db = ctx.grads  # kept (not consumed) so that backward(retain_graph=True) twice stays correct
        unit = bool(go == 1)    # the usual case: hand the buffers out as they are, no extra dW-sized copy
        sc = (lambda t: None if t is None else (t if unit else t * go.to(t.dtype)))  # noqa: E731
        return None, sc(dH), sc(dW), sc(db), None, None, None


def _kernel_chunk_grad(z, tgt_c, est, x, scale, sl, logp, ent):
    """Run `loss_and_grad_rows` on one chunk of (already temperature-scaled) fp32 logits, gradient written into z.

    Fills logp/ent of the chunk and returns the rows whose gradient is not exactly zero (weight 0, or a clipped
    token of a 'clip' branch with no entropy/KL term), so the GEMMs can skip the others.
    """
    from fastupg.kernels.logits import loss_and_grad_rows
    xs = {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    sc = scale[sl]
    xs["scale"] = sc.float()
    # the kernel skips weight-0 rows; the metrics (policy_loss on logp) still count them when unmasked, so their
    # log-probs come from PyTorch, before the kernel overwrites the chunk with its gradient (rare: the trainer drops them)
    idle = ((xs["scale"] == 0) & xs["mask"]).nonzero().squeeze(1)
    if idle.numel():
        zi = z.index_select(0, idle)
        lq = zi - torch.logsumexp(zi, -1, keepdim=True)
        lp_idle, en_idle = lq.gather(1, tgt_c[idle, None]).squeeze(1), -(lq.exp() * lq).sum(-1)
    _, lp, en, _, (flags, _) = loss_and_grad_rows(z, tgt_c, est, xs, temperature=1.0, grad_out=z)
    if idle.numel():
        lp[idle], en[idle] = lp_idle, en_idle
    logp[sl] = lp.to(logp.dtype)
    if ent is not None:
        ent[sl] = en.to(ent.dtype)
    act = xs["scale"] != 0
    if est.online is not None and est.online.mask == "clip" and est.entropy_coef == 0 and est.kl_coef == 0:
        act &= ~((flags.sum(1) > 0) & ~xs["offline"])
    return act


def _one_pass_chunked(h, w, b, tgt, est, kw, temperature, need, o: FusedLinearOptions):
    """Forward AND gradient in one sweep over row chunks: 3 GEMM-equivalents (logits, g@W, g^T@H) instead of 4.

    Valid for token-level estimators, where L = sum_t s_t * ell_t(l_t, H_t) with s_t fixed by the mask alone, so each
    chunk's dL/dl and dL/dH are known as soon as its logits are. The value and metrics come from fastupg.policy_loss on
    the O(N) log-probs at the end, so they are those of the two-pass path exactly.
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
    logp = torch.empty(N, dtype=sdt, device=h.device)
    ent = torch.empty(N, dtype=sdt, device=h.device) if need_ent else None
    dH = torch.zeros_like(h) if need_dh else None
    dW = torch.zeros(w.shape, dtype=sdt if w.dtype in (torch.float16, torch.bfloat16) else w.dtype,
                     device=w.device) if need_dw else None
    db = torch.zeros(V, dtype=sdt, device=w.device) if need_db else None
    inv_t = 1.0 / o.temperature
    step = _rows_per_chunk(V, o.chunk_bytes)
    for i in range(0, N, step):
        j = min(N, i + step)
        sl = slice(i, j)
        h_c = h[sl]
        z = _chunk_logits(h_c, w, b, o.temperature, sdt)
        if use_triton(z) and sdt == torch.float32:
            # the logits kernel of fastupg.kernels.logits: ONE launch reads the chunk twice and writes its gradient
            # in place (instead of ~6 elementwise passes in PyTorch); z is already z/T, hence temperature=1 here
            act = _kernel_chunk_grad(z, tgt[sl], est, x, scale, sl, logp, ent)
            r = act.nonzero().squeeze(1)
            if r.numel() == 0:
                continue
            if r.numel() < j - i:
                z = z.index_select(0, r)
                h_c = h_c.index_select(0, r)
            g = _grad_in_dtype(z, inv_t, db if need_db else None, h.dtype)
            del z  # (the fp32 chunk goes before the two GEMMs)
            _accumulate(g, r + i, h_c, w, dH if need_dh else None, dW if need_dw else None)
            continue
        lse = torch.logsumexp(z, dim=-1)
        z -= lse[:, None]                                    # log p
        logp[sl] = z.gather(1, tgt[sl, None]).squeeze(1)
        if need_ent:
            ent[sl] = -(z.exp() * z).sum(-1)
        gl, gh = _row_grads(est_tok, logp[sl], ent[sl] if need_ent else None, sl, x, scale, need_ent)
        act = gl != 0
        if gh is not None:
            act |= gh != 0
        r = act.nonzero().squeeze(1)                         # exactly-zero rows (masked/clipped/weight 0) skipped
        if r.numel() == 0:
            continue
        if r.numel() < j - i:
            z = z.index_select(0, r)
            h_c = h_c.index_select(0, r)
        gl_r, tg = gl[r].to(sdt), tgt[sl][r]
        if gh is not None:
            t = z + ent[sl][r, None]
            z.exp_()
            t.mul_(gh[r, None].to(sdt)).add_(gl_r[:, None])
            z.mul_(t).neg_()
            del t
        else:
            z.exp_().mul_(-gl_r[:, None])
        z[torch.arange(r.numel(), device=h.device), tg] += gl_r
        g = _grad_in_dtype(z, inv_t, db if need_db else None, h.dtype)
        del z
        _accumulate(g, r + i, h_c, w, dH if need_dh else None, dW if need_dw else None)
    return logp, ent, dH, (dW.to(w.dtype) if need_dw else None), db


def fused_linear_policy_loss(hidden, weight, targets, estimator: Estimator, *, advantages=None, old_logp=None, mask=None,
                             offline=None, seq_ids=None, token_weight=None, ref_logp=None, agg=None,
                             temperature=1.0, bias=None, impl=None, exact=True, filter_eps=None,
                             chunk_bytes=DEFAULT_CHUNK_BYTES, one_pass=None):
    """The unified-estimator loss straight from hidden states and the lm_head weight: (loss, metrics).

    `weight` is the lm_head weight (V, D); the per-token weight of `fastupg.policy_loss` (HPT alpha/beta) is called
    `token_weight` here. Every other keyword has the meaning it has in `fastupg.policy_loss` / `fused_policy_loss`:
    advantages, old_logp, mask, offline, seq_ids, ref_logp, agg (per-token tensors shaped like targets), plus
    temperature, bias, impl, exact (see `fused_linear_logprobs`).

    Two paths, same loss, metrics and gradients:
      * two-pass (every estimator, GSPO included; impl triton/torch, or one_pass=False): the vocabulary pass yields
        O(N) log-probs (+ entropy when Estimator.entropy_coef != 0), `fastupg.policy_loss` runs on them, and its
        backward hands dL/dl and dL/dH per token to the recompute pass, which skips rows where both are exactly zero.
      * one-pass (impl='chunked', token-level estimators, grad enabled, exact; one_pass=None picks it there): each chunk's
        gradient is formed as soon as its logits exist, so backward only returns the stored dH/dW (3 GEMM-equivalents
        instead of 4). dH/dW then live from the forward to the backward: call backward before the next micro-batch's
        forward. exact=False (filtering) is not applied on this path (one_pass=None then takes the two-pass path).
    """
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a fastupg.Estimator, got {type(estimator).__name__}")
    need_ent = estimator.entropy_coef != 0
    impl_ = default_impl(hidden.device) if impl is None and isinstance(hidden, torch.Tensor) else impl
    wants_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (hidden, weight, bias))
    if one_pass is None:
        one_pass = impl_ == "chunked" and not estimator.sequence_level and wants_grad and bool(exact)
    if one_pass:
        if estimator.sequence_level:
            raise ValueError(f"one_pass=True needs a token-level estimator; {estimator.name!r} is sequence-level")
        if impl_ != "chunked":
            raise ValueError(f"one_pass=True is implemented for impl='chunked' only, got impl={impl_!r}")
        _validate(hidden, weight, targets, bias, temperature, impl_)
        o = FusedLinearOptions(impl=impl_, temperature=float(temperature), return_entropy=need_ent,
                               exact=bool(exact), filter_eps=filter_eps, chunk_bytes=chunk_bytes)
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, hidden.shape[-1]).detach()
        dev = hidden.device
        kw = dict(advantages=_flat(advantages, lead, dev), old_logp=_flat(old_logp, lead, dev),
                  mask=_flat(mask, lead, dev), offline=_flat(offline, lead, dev),
                  token_weight=_flat(token_weight, lead, dev), ref_logp=_flat(ref_logp, lead, dev),
                  seq_ids=_seq_ids(seq_ids, lead, hidden.device), agg=agg,
                  padded_len=lead[1] if len(lead) == 2 else None)
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        with torch.no_grad():
            logp, ent, dH, dW, db = _one_pass_chunked(h, weight.detach(), None if bias is None else bias.detach(),
                                                      targets.reshape(-1), estimator, kw, float(temperature), need, o)
            loss, metrics = policy_loss(logp.reshape(lead), estimator, advantages=advantages, old_logp=old_logp,
                                        mask=mask, offline=offline, seq_ids=seq_ids, weight=token_weight,
                                        entropy=None if ent is None else ent.reshape(lead), ref_logp=ref_logp,
                                        agg=agg)
        if dH is not None:
            dH = dH.reshape(hidden.shape)
        loss = _PrecomputedGrad.apply(loss, hidden, weight, bias, dH, dW, None if db is None else db.to(bias.dtype))
        return loss, metrics
    out = fused_linear_logprobs(hidden, weight, targets, temperature, return_entropy=need_ent, bias=bias, impl=impl_,
                                exact=exact, filter_eps=filter_eps, chunk_bytes=chunk_bytes)
    logp, ent = out if need_ent else (out, None)
    return policy_loss(logp, estimator, advantages=advantages, old_logp=old_logp, mask=mask, offline=offline,
                       seq_ids=seq_ids, weight=token_weight, entropy=ent, ref_logp=ref_logp, agg=agg)


def _flat(t, lead, device=None):
    """(N,) view of a per-token tensor shaped like targets; a scalar advantage is broadcast; anything else is passed
    through unchanged so that prepare_inputs reports the bad shape/type with its own message."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.full(lead, float(t), device=device).reshape(-1)
    return None if t is None else (t.reshape(-1) if isinstance(t, torch.Tensor) and t.shape == lead else t)


def _seq_ids(seq_ids, lead, device):
    """1-D view of the sequence ids; a 2-D batch without seq_ids has one sequence per row (as in policy_loss)."""
    if seq_ids is None and len(lead) == 2:
        return torch.arange(lead[0], device=device)[:, None].expand(lead).reshape(-1)
    return _flat(seq_ids, lead, device)


__all__ = ["fused_linear_logprobs", "fused_linear_policy_loss", "FusedLinearOptions", "default_impl", "IMPLS"]
