"""Fused linear + log-softmax: per-token log-probs (and entropy) straight from hidden states and the lm_head weight.

For long sequences the N x V logits are the memory peak of post-training (32k tokens x 151936 vocab = 19.5 GB per
fp32 copy). Nothing here ever holds them: the forward keeps O(N) statistics (log-sum-exp, entropy) and the backward
recomputes logits tile by tile (Triton) or chunk by chunk (torch), turning them straight into dH and dW.

Public API
    fused_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, bias=None,
                          impl=None, exact=True) -> logp  (or (logp, entropy))
    fused_linear_policy_loss(hidden, lm_head_weight, targets, estimator, *, advantages, ..., weight=None, ...)
                          -> (loss, metrics)

impl
    "triton"   fully fused Triton kernels (fastupg/kernels/_fused_linear_triton.py); CUDA, or CPU under
               TRITON_INTERPRET=1 (slow, for tests)
    "chunked"  cuBLAS GEMMs per chunk of rows: fp32 logits of one chunk, the logits kernel of
               fastupg.kernels.logits turns them into the gradient (input dtype), dH = g @ W written in place and
               dW += g^T @ H by addmm_ into the gradient; all vocabulary-sized buffers together stay within
               `chunk_bytes` (384 MiB by default)
    "torch"    the plain reference: materialises the N x V logits, autograd does the rest; float64-capable oracle
    None       chunked on CUDA and on CPU with TRITON_INTERPRET=1, torch on plain CPU. Picked by measurement on an
               H100 (benchmarks/RESULTS.md): at N=8192, D=1536, V=151936 bf16, chunked takes 32.8 ms fwd+bwd (2.06x
               the three bare GEMMs, 386 MiB beyond inputs and gradients), the triton impl 390 ms (its backward
               accumulates dH/dW with fp32 atomics from every tile: correct, but far from the GEMM roofline).

Gradient of one row (u = z / T the tempered logits, p = softmax(u), l = log p[y], H = -sum p log p):
    dL/dz_j = [ dL/dl * (onehot_j - p_j)  -  dL/dH * p_j * (log p_j + H) ] / T
so the backward needs only dL/dl and dL/dH per token (O(N)), which any estimator in fastupg.policy_loss provides,
GSPO included. Rows where both are exactly zero (masked, clipped, weight 0) are compacted away before the
vocabulary pass. `exact=False` also skips vocabulary tiles whose softmax entries are all below `filter_eps` and that
contain no target (Cut Cross-Entropy's gradient filtering): each skipped gradient entry is < eps * (|dL/dl| +
|dL/dH| * |log p + H|) / T, so the error of dH/dW is bounded by eps times the row gradient scale times the number of
skipped columns; the tests accept a relative error of 1e-2 for exact=False.

Precision (the same whatever the caller's autocast state: autocast is switched off inside, forward and backward):
the statistics (log-sum-exp, entropy) and the returned log-probs are float32 (float64 for float64 inputs,
torch/chunked impls); the logits are accumulated and kept in fp32 from the operands as passed (fp32 weights under
autocast give fp32 GEMMs; tl.dot; torch.mm(..., out_dtype=fp32) in the chunked impl), the same in forward and
backward. g is rounded to the input dtype before the two gradient GEMMs (tensor cores), which accumulate in fp32.
Across row groups, the chunked impl accumulates dW in the weight's dtype (one bf16 rounding per group of ~800 rows,
as Liger does per chunk: no fp32 weight-sized buffer; measured 7.7e-3 relative error at 32k tokens, within the bf16
tolerance); the triton impl accumulates in fp32.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

import dataclasses

from fastupg.estimator import Estimator, aggregation_weights, policy_loss, prepare_inputs, raise_failed_checks
from fastupg.kernels.logits import use_triton

IMPLS = ("triton", "chunked", "torch")
# Chunked impl: bytes of the vocabulary-sized buffers (fp32 logits chunk + gradient rows) live at any time; the
# issue-13 budget is 512 MiB beyond the inputs and gradients, O(N) statistics included. See benchmarks/RESULTS.md.
DEFAULT_CHUNK_BYTES = 384 * 2 ** 20
_CHUNK_FILTER_BLOCK = 4096  # chunked impl, exact=False: vocabulary columns per filtering block


@dataclass(frozen=True)
class FusedLinearOptions:
    """Everything the autograd Function needs besides tensors (a frozen config instead of a long argument list)."""
    impl: str
    temperature: float = 1.0
    return_entropy: bool = False
    exact: bool = True
    filter_eps: float | None = None   # None: 2^-12 for 16-bit inputs, 2^-20 for fp32 (only used when exact=False)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # chunked impl: bytes of its vocabulary-sized buffers, all of them
    block_n: int = 64
    block_v: int = 128
    block_d: int = 64

    def eps_for(self, dtype: torch.dtype) -> float:
        if self.filter_eps is not None:
            return self.filter_eps
        return 2.0 ** -12 if dtype in (torch.bfloat16, torch.float16) else 2.0 ** -20


def _no_autocast(device: torch.device):
    """The fused-linear loss has ONE precision whatever the caller's autocast state (issue 11): logits accumulated in
    fp32 (fp64 for fp64 inputs) from the stored operands, in the forward and in the backward alike. Under autocast a
    plain `h @ w.T` would give bf16 logits in one pass and fp32 in the other (0.16 nat log-prob errors, 20 % gradient
    errors for confident tokens), so every matmul here runs with autocast off, on the dtype the caller passed."""
    return torch.autocast(device_type=device.type, enabled=False)


def default_impl(device: torch.device) -> str:
    """chunked on CUDA (measured 12x faster than the triton impl on an H100) and under TRITON_INTERPRET=1, else torch."""
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
    lp = torch.log_softmax(z, dim=-1)
    logp = lp.gather(-1, tgt[:, None]).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1) if return_entropy else None
    return logp, ent


# -- chunked (torch matmul per row chunk) ---------------------------------------------------------------------------
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
    N, V = h.shape[0], w.shape[0]
    sdt = _stat_dtype(h.dtype)
    logp = torch.empty(N, dtype=sdt, device=h.device)
    lse = torch.empty(N, dtype=sdt, device=h.device)
    ent = torch.empty(N, dtype=sdt, device=h.device) if o.return_entropy else None
    step = _rows_per_chunk(V, o.chunk_bytes)
    kernel = use_triton(h) and sdt == torch.float32
    for i in range(0, N, step):
        j = min(N, i + step)
        if kernel:
            # the logits kernel: ONE read of the chunk, no N x V temporaries (torch.logsumexp would add one)
            from fastupg.kernels.logits import token_logprobs
            z = _chunk_logits(h[i:j], w, b, 1.0, sdt)
            out = token_logprobs(z, tgt[i:j], o.temperature, return_entropy=o.return_entropy)
            lp, en = out if o.return_entropy else (out, None)
            logp[i:j] = lp
            lse[i:j] = z.gather(1, tgt[i:j, None]).squeeze(1) / o.temperature - lp  # lse = z_t / T - log p_t
            if ent is not None:
                ent[i:j] = en
            del z
            continue
        z = _chunk_logits(h[i:j], w, b, o.temperature, sdt)
        lse_c = torch.logsumexp(z, dim=-1)
        lse[i:j] = lse_c
        logp[i:j] = z.gather(1, tgt[i:j, None]).squeeze(1) - lse_c
        if ent is not None:
            z -= lse_c[:, None]              # log p, in place
            ent[i:j] = -(z.exp() * z).sum(-1)  # one temporary (p log p is fused by the sum's input)
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
        with _no_autocast(h.device):
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
        with _no_autocast(h.device):  # backward() may be called inside the caller's autocast region
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
    try:
        return _logprobs(hidden, weight, targets, temperature, return_entropy, bias, impl, exact, filter_eps,
                         chunk_bytes)
    except ValueError as e:
        _blame_inputs(e, hidden, weight, bias)
        raise


def _logprobs(hidden, weight, targets, temperature, return_entropy, bias, impl, exact, filter_eps, chunk_bytes):
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    tgt = targets.reshape(-1)
    if impl == "torch":
        with _no_autocast(h.device):  # autograd replays these ops in the same dtypes: fp32 backward too
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
        if ctx.grads is None:
            raise RuntimeError("fused_linear_policy_loss (one-pass path) hands its precomputed gradients out on the "
                               "first backward; for a second backward (retain_graph=True) pass one_pass=False")
        dH, dW, db = ctx.grads
        if bool(go == 1):
            # the usual case: give the buffers away (ctx forgets them) so that AccumulateGrad adopts them as .grad
            # instead of copying: a kept reference would cost a weight-sized copy (445 MiB at D = 1536, measured)
            ctx.grads = None
            return None, dH, dW, db, None, None, None
        sc = (lambda t: None if t is None else t * go.to(t.dtype))  # noqa: E731  (new tensors; buffers kept)
        return None, sc(dH), sc(dW), sc(db), None, None, None


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
    checks: list = []
    n_sub, n_grp = _one_pass_rows(V, h.element_size(), o.chunk_bytes)
    M = rows.numel()
    gbuf = torch.empty(min(n_grp, M), V, dtype=h.dtype, device=h.device) if M else None
    xs_all = dict(x, scale=scale.float())
    for g0 in range(0, M, n_grp):
        gn = min(n_grp, M - g0)
        gsel = slice(g0, g0 + gn) if dense else rows[g0:g0 + gn]
        h_g = h[gsel] if dense else h.index_select(0, gsel)
        g_g = gbuf[:gn]
        for s0 in range(0, gn, n_sub):
            sn = min(n_sub, gn - s0)
            sel = slice(g0 + s0, g0 + s0 + sn) if dense else rows[g0 + s0:g0 + s0 + sn]
            h_c, g_c = h_g[s0:s0 + sn], g_g[s0:s0 + sn]
            if kernel:
                # the fused loss kernel of fastupg.kernels.logits: ONE launch reads the fp32 logits twice and writes
                # their gradient (temperature applied inside) in the input dtype into the group's gradient rows
                from fastupg.kernels.logits import loss_and_grad_rows
                z = _chunk_logits(h_c, w, b, 1.0, sdt)
                # interpreter: its fp32 -> 16-bit casts are unreliable; write fp32 into z, convert with torch below
                into = g_c if (h.is_cuda or h.dtype == sdt) else z
                xs = {k: (v[sel] if isinstance(v, torch.Tensor) else v) for k, v in xs_all.items()}
                _, lp, en, _, _ = loss_and_grad_rows(z, tgt[sel], est, xs, temperature=o.temperature, grad_out=into,
                                                     checks=checks)
                logp[sel], ent[sel] = lp.to(sdt), en.to(sdt)
                if into is z:
                    g_c.copy_(z)
                del z
            else:
                g_c.copy_(_torch_chunk_grad(h_c, w, b, tgt[sel], sel, x, scale, est_tok, need_ent, logp, ent, o,
                                            h.dtype))
        # the two gradient GEMMs once per group: K = n_grp rows for dW's accumulation (its read-modify-write of the
        # weight-sized buffer is paid once per group, not once per fp32 chunk). Running them on a side stream to
        # overlap the next group's logits and loss kernel was measured slower on an H100 (1.14-2.13x the time of this
        # serial order; benchmarks/RESULTS.md), so they run in order.
        _group_gemms(g_g, h_g, w, gsel, dense, dH, dW, db, sdt, need_dh, need_dw, need_db)
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
    lse = torch.logsumexp(z, dim=-1)
    z -= lse[:, None]                                    # log p
    logp[sel] = z.gather(1, tgt_c[:, None]).squeeze(1)
    ent[sel] = -(z.exp() * z).sum(-1)
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


def fused_linear_policy_loss(hidden, lm_head_weight, targets, estimator: Estimator, *, advantages, old_logp=None,
                             mask=None, offline=None, seq_ids=None, weight=None, ref_logp=None, agg=None,
                             temperature=1.0, bias=None, impl=None, exact=True, filter_eps=None,
                             chunk_bytes=DEFAULT_CHUNK_BYTES, one_pass=None, token_weight=None):
    """The unified-estimator loss straight from hidden states and the lm_head weight: (loss, metrics).

    `lm_head_weight` is the (V, D) lm_head weight (second positional argument). Every keyword has the meaning it has
    in `fastupg.policy_loss` / `fused_policy_loss`: advantages, old_logp, mask, offline, seq_ids, weight (the
    per-token weight >= 0, HPT alpha/beta), ref_logp, agg (per-token tensors shaped like targets), plus temperature,
    bias, impl, exact (see `fused_linear_logprobs`). `token_weight=` is the deprecated old name of `weight=`.
    The `entropy` metric is the real mean entropy whatever Estimator.entropy_coef (as in fused_policy_loss).

    Two paths, same loss, metrics and gradients:
      * two-pass (every estimator, GSPO included; impl triton/torch, or one_pass=False): the vocabulary pass yields
        O(N) log-probs and entropies, `fastupg.policy_loss` runs on them, and its backward hands dL/dl and dL/dH per
        token to the recompute pass, which skips rows where both are exactly zero.
      * one-pass (impl='chunked', token-level estimators, grad enabled, exact; one_pass=None picks it there): each chunk's
        gradient is formed as soon as its logits exist, so backward only returns the stored dH/dW (3 GEMMs
        instead of 4). dH/dW then live from the forward to the backward: call backward before the next micro-batch's
        forward. exact=False (filtering) is not applied on this path (one_pass=None then takes the two-pass path).
    """
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a fastupg.Estimator, got {type(estimator).__name__}")
    if token_weight is not None:
        if weight is not None:
            raise TypeError("pass the per-token weight once: weight= (token_weight= is its deprecated old name)")
        warnings.warn("fused_linear_policy_loss(token_weight=...) is deprecated: pass weight= (the per-token weight, "
                      "as in fastupg.policy_loss and fused_policy_loss)", DeprecationWarning, stacklevel=2)
        weight = token_weight
    try:
        return _policy_loss(hidden, lm_head_weight, targets, estimator, advantages=advantages, old_logp=old_logp,
                            mask=mask, offline=offline, seq_ids=seq_ids, weight=weight, ref_logp=ref_logp, agg=agg,
                            temperature=temperature, bias=bias, impl=impl, exact=exact, filter_eps=filter_eps,
                            chunk_bytes=chunk_bytes, one_pass=one_pass)
    except ValueError as e:
        _blame_inputs(e, hidden, lm_head_weight, bias)
        raise


def _blame_inputs(e: ValueError, hidden, weight, bias):
    """Non-finite log-probs come from the inputs the caller passed: name them (not `logp`/`logits`, which the caller
    of a fused-linear function never passed). Runs only on the error path."""
    msg = str(e)
    if "non-finite" not in msg or not any(k in msg for k in ("logp", "logits", "entropy")):
        return
    if any(k in msg for k in ("old_logp", "ref_logp", "advantages", "weight contains")):
        return  # an O(N) argument the caller did pass: its own message already names it
    bad = [name for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias))
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{' and '.join(bad)} contain{'s' if len(bad) == 1 else ''} non-finite values (nan/inf)") \
            from e
    raise ValueError("the logits hidden @ weight.T are non-finite although hidden and weight are finite "
                     "(overflow in the input dtype? scale the inputs or pass fp32)") from e


def _policy_loss(hidden, lm_head_weight, targets, estimator, *, advantages, old_logp, mask, offline, seq_ids, weight,
                 ref_logp, agg, temperature, bias, impl, exact, filter_eps, chunk_bytes, one_pass):
    need_ent = estimator.entropy_coef != 0
    impl_ = default_impl(hidden.device) if impl is None and isinstance(hidden, torch.Tensor) else impl
    wants_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (hidden, lm_head_weight, bias))
    if one_pass is None:
        one_pass = impl_ == "chunked" and not estimator.sequence_level and wants_grad and bool(exact)
    if one_pass:
        if estimator.sequence_level:
            raise ValueError(f"one_pass=True needs a token-level estimator; {estimator.name!r} is sequence-level")
        if impl_ != "chunked":
            raise ValueError(f"one_pass=True is implemented for impl='chunked' only, got impl={impl_!r}")
        _validate(hidden, lm_head_weight, targets, bias, temperature, impl_)
        o = FusedLinearOptions(impl=impl_, temperature=float(temperature), return_entropy=True,
                               exact=bool(exact), filter_eps=filter_eps, chunk_bytes=chunk_bytes)
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, hidden.shape[-1]).detach()
        dev = hidden.device
        kw = dict(advantages=_flat(advantages, lead, dev), old_logp=_flat(old_logp, lead, dev),
                  mask=_flat(mask, lead, dev), offline=_flat(offline, lead, dev),
                  token_weight=_flat(weight, lead, dev), ref_logp=_flat(ref_logp, lead, dev),
                  seq_ids=_seq_ids(seq_ids, lead, hidden.device), agg=agg,
                  padded_len=lead[1] if len(lead) == 2 else None)
        need = (hidden.requires_grad, lm_head_weight.requires_grad, bias is not None and bias.requires_grad)
        with torch.no_grad(), _no_autocast(h.device):
            logp, ent, dH, dW, db = _one_pass_chunked(h, lm_head_weight.detach(),
                                                      None if bias is None else bias.detach(),
                                                      targets.reshape(-1), estimator, kw, float(temperature), need, o)
            loss, metrics = policy_loss(logp.reshape(lead), estimator, advantages=advantages, old_logp=old_logp,
                                        mask=mask, offline=offline, seq_ids=seq_ids, weight=weight,
                                        entropy=ent.reshape(lead), ref_logp=ref_logp, agg=agg)
        if dH is not None:
            dH = dH.reshape(hidden.shape)
        loss = _PrecomputedGrad.apply(loss, hidden, lm_head_weight, bias, dH, dW,
                                      None if db is None else db.to(bias.dtype))
        return loss, metrics
    logp, ent = fused_linear_logprobs(hidden, lm_head_weight, targets, temperature, return_entropy=True, bias=bias,
                                      impl=impl_, exact=exact, filter_eps=filter_eps, chunk_bytes=chunk_bytes)
    return policy_loss(logp, estimator, advantages=advantages, old_logp=old_logp, mask=mask, offline=offline,
                       seq_ids=seq_ids, weight=weight, entropy=ent if need_ent else ent.detach(), ref_logp=ref_logp,
                       agg=agg)


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
