"""Fused linear + log-softmax: per-token log-probs (and entropy) straight from hidden states and the lm_head weight.

For long sequences the N x V logits are the memory peak of post-training (32k tokens x 151936 vocab = 19.5 GB per
fp32 copy). Nothing here ever holds them: the forward keeps O(N) statistics (log-sum-exp, entropy) and the backward
recomputes logits tile by tile (Triton) or chunk by chunk (torch), turning them straight into dH and dW.

Public API
    fused_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, bias=None,
                          impl=None, exact=True) -> logp  (or (logp, entropy))
    fused_linear_policy_loss(hidden, lm_head_weight, targets, estimator, *, advantages, ..., weight=None, ...)
                          -> (loss, metrics)

impl (one file each, behind the two public functions of this module, which own validation and autograd)
    "triton"   fully fused Triton kernels (fastupg/kernels/_fused_linear_triton.py); CUDA, or CPU under
               TRITON_INTERPRET=1 (slow, for tests). Forward: one pass over the vocabulary per row block (O(N)
               statistics). Backward without atomics: a dH pass (program per row block, loop over vocabulary
               tiles) and a dW/db pass (program per vocab block, loop over row tiles), both recomputing the
               logits tiles; fp32 sums in the fp32 gradient itself or in <= 48 MiB of per-program fp32 slabs
               (16-bit inputs), so nothing beyond O(N) statistics, that scratch and the gradients is held
    "chunked"  cuBLAS GEMMs per chunk of rows: fp32 logits of one chunk, the logits kernel of
               fastupg.kernels.logits turns them into the gradient (input dtype), dH = g @ W written in place and
               dW += g^T @ H by addmm_ into the gradient; all vocabulary-sized buffers together stay within
               `chunk_bytes` (384 MiB by default)
    "torch"    the plain reference: materialises the N x V logits, autograd does the rest; float64-capable oracle
    None       chunked on CUDA and on CPU with TRITON_INTERPRET=1, torch on plain CPU. Picked by measurement on an
               H100 (benchmarks/RESULTS.md): at N=8192, D=1536, V=151936 bf16, chunked takes 32.8 ms fwd+bwd (2.06x
               the three bare GEMMs, 386 MiB beyond inputs and gradients), the triton impl of then 390 ms (its
               backward accumulated dH/dW with fp32 atomics). The atomic-free triton impl of today is not yet
               measured on a GPU: the default stays chunked until it is.

Gradient of one row (u = z / T the tempered logits, p = softmax(u), l = log p[y], H = -sum p log p):
    dL/dz_j = [ dL/dl * (onehot_j - p_j)  -  dL/dH * p_j * (log p_j + H) ] / T
so the backward needs only dL/dl and dL/dH per token (O(N)), which any estimator in fastupg.policy_loss provides,
GSPO included. Rows where both are exactly zero (masked, clipped, weight 0) are compacted away before the
vocabulary pass. `exact=False` also skips vocabulary tiles that contain no target and hold negligible probability:
  chunked: tiles whose softmax entries are all below `filter_eps` (Cut Cross-Entropy's gradient filtering): each
           skipped gradient entry is < eps * (|dL/dl| + |dL/dH| * |log p + H|) / T, so the error of dH/dW is bounded
           by eps times the row gradient scale times the number of skipped columns;
  triton:  tiles where every row's softmax mass is below filter_eps / (number of vocabulary tiles), so each row loses
           less than filter_eps of mass whatever the distribution: its gradient changes by
           < eps * (|dL/dl| + |dL/dH| * (H + log(V / eps))) / T in L1 norm (see _fused_linear_triton.py).
The tests accept a relative error of 1e-2 for exact=False.

Precision (the same whatever the caller's autocast state: autocast is switched off inside, forward and backward):
the statistics (log-sum-exp, entropy) and the returned log-probs are float32 (float64 for float64 inputs,
torch/chunked impls); the logits are accumulated and kept in fp32 from the operands as passed (fp32 weights under
autocast give fp32 GEMMs; tl.dot; torch.mm(..., out_dtype=fp32) in the chunked impl), the same in forward and
backward. g is rounded to the input dtype before the two gradient GEMMs (tensor cores), which accumulate in fp32.
Across row groups, the chunked impl accumulates dW in the weight's dtype (one bf16 rounding per group of ~800 rows,
as Liger does per chunk: no fp32 weight-sized buffer; measured 7.7e-3 relative error at 32k tokens, within the bf16
tolerance); the triton impl accumulates dH and dW in fp32 (per-program slabs) and rounds each once.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from fastupg.kernels.estimator import Estimator, policy_loss
from fastupg.kernels._fused_linear_chunked import _chunked_backward, _chunked_forward, _one_pass_chunked
from fastupg.kernels._fused_linear_common import DEFAULT_CHUNK_BYTES, FusedLinearOptions, _no_autocast
from fastupg.kernels._fused_linear_torch import _torch_logprobs
from fastupg.kernels._fused_linear_triton import _triton_backward, _triton_forward

IMPLS = ("triton", "chunked", "torch")


def default_impl(device: torch.device) -> str:
    """chunked on CUDA (measured 12x faster than the atomic triton impl on an H100; the atomic-free one is not yet
    measured) and under TRITON_INTERPRET=1, else torch."""
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
    if targets.numel():
        lo, hi = torch.stack(torch.aminmax(targets)).tolist()  # (one host sync for both ends)
        if lo < 0 or hi >= V:
            raise ValueError(f"targets must lie in [0, {V}) (use any valid id, e.g. 0, at masked positions; "
                             f"got range [{lo}, {hi}])")
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


def fused_linear_policy_loss(hidden, lm_head_weight, targets, estimator: Estimator, *, advantages=None, old_logp=None,
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
