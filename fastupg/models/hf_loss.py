"""Drop-in fused loss for Hugging Face causal LMs: the policy loss from the last hidden states and the lm_head weight,
without ever calling lm_head (so the B x T x V logits never exist).

    loss, metrics = causal_lm_policy_loss(model, input_ids, targets, estimator, advantages=A, old_logp=old, mask=m)
    old_logp = causal_lm_logprobs(model, input_ids, targets)          # under torch.no_grad() for old/ref log-probs

`targets[b, t]` is the token predicted at position t (for a plain causal batch: input_ids[b, t + 1]); positions that
predict nothing (the last one, padding, the prompt) need a valid id there (e.g. 0) and mask=False.

Tied embeddings work unchanged: `model.get_output_embeddings().weight` IS the input embedding then, and autograd sums
both gradients into it.

FSDP2 (`torch.distributed.fsdp.fully_shard`). Two things differ from a plain `model(...)` call:
  1. We call the decoder body and read the lm_head weight instead of calling the root module, so the root's
     pre/post-forward hooks (which unshard/reshard root-level parameters such as the embeddings) would not run.
     When `model` is an FSDPModule, the body AND the loss are therefore run inside a method registered with
     `torch.distributed.fsdp.register_fsdp_forward_method`, so the root's parameters are unsharded for exactly that
     call and FSDP's post-backward hooks reduce-scatter their gradients as usual.
  2. If the lm_head weight is still a DTensor there (lm_head wrapped as its own FSDP unit, whose forward we never
     call), it is gathered once per call with `weight.full_tensor()` INSIDE the autograd graph: the all-gather's
     backward is a reduce-scatter, so the gradient lands back on the shards.
The trainer computes every per-token log-prob through `causal_lm_logprobs` (sharded or not); the FSDP2 path is
tested on CPU with two gloo ranks against one process (tests/test_fsdp.py), the non-distributed path against
`model(...).logits` in tests/test_hf_loss.py.
"""
from __future__ import annotations

import torch

from fastupg.estimator import Estimator
from fastupg.kernels.fused_linear import DEFAULT_CHUNK_BYTES, fused_linear_logprobs, fused_linear_policy_loss

_UNSUPPORTED_CONFIG = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")
_FSDP_METHOD = "_fastupg_fused_forward"


def _decoder(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, "model", None)
    if body is None:
        raise TypeError(f"{type(model).__name__} exposes no decoder body (get_decoder() / .model): not a Hugging Face "
                        "causal LM")
    return body


def _check_model(model):
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (lm_head): not a causal LM")
    cfg = getattr(model, "config", None)
    for name in _UNSUPPORTED_CONFIG:
        v = getattr(cfg, name, None)
        if v not in (None, 1, 1.0):
            # these models transform the logits after lm_head; the fused path computes plain h @ W^T + b
            raise NotImplementedError(f"{type(model).__name__} uses config.{name}={v!r}, which the fused lm_head "
                                      "path does not apply; compute logits with model(...) instead")


def _head_params(model):
    head = model.get_output_embeddings()
    w, b = head.weight, getattr(head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(w, DTensor):
        w = w.full_tensor()  # all-gather in the graph: its backward reduce-scatters the gradient to the shards
    if b is not None and isinstance(b, DTensor):
        b = b.full_tensor()
    return w, b


def _hidden(model, input_ids, position_ids, attention_mask, model_kwargs):
    out = _decoder(model)(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False, **(model_kwargs or {}))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _call(model, fn):
    """Run fn() inside the root FSDP2 module's forward hooks when model is an FSDPModule, else directly."""
    try:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    except ImportError:  # pragma: no cover
        return fn()
    if not isinstance(model, FSDPModule):
        return fn()
    if not getattr(model, "_fastupg_registered", False):
        setattr(model, _FSDP_METHOD, lambda f: f())
        register_fsdp_forward_method(model, _FSDP_METHOD)
        model._fastupg_registered = True
    return getattr(model, _FSDP_METHOD)(fn)


def causal_lm_hidden_and_head(model, input_ids, *, position_ids=None, attention_mask=None, model_kwargs=None):
    """(last hidden states (B, T, D), lm_head weight (V, D), lm_head bias or None) -- the inputs of the fused ops."""
    _check_model(model)
    h = _hidden(model, input_ids, position_ids, attention_mask, model_kwargs)
    w, b = _head_params(model)
    return h, w, b


def causal_lm_policy_loss(model, input_ids, targets, estimator: Estimator, *, position_ids=None, attention_mask=None,
                          temperature=1.0, impl=None, exact=True, model_kwargs=None, **loss_kwargs):
    """(loss, metrics) of `estimator` for a Hugging Face causal LM, never materialising its logits.

    loss_kwargs are those of `fastupg.kernels.fused_linear.fused_linear_policy_loss` (advantages, old_logp, mask,
    offline, seq_ids, weight, ref_logp, agg), shaped like targets (B, T). model_kwargs go to the decoder body.
    """
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a fastupg.Estimator, got {type(estimator).__name__}")

    def run():
        h, w, b = causal_lm_hidden_and_head(model, input_ids, position_ids=position_ids,
                                            attention_mask=attention_mask, model_kwargs=model_kwargs)
        return fused_linear_policy_loss(h, w, targets, estimator, temperature=temperature, bias=b, impl=impl,
                                        exact=exact, **loss_kwargs)

    return _call(model, run)


def causal_lm_logprobs(model, input_ids, targets, *, position_ids=None, attention_mask=None, temperature=1.0,
                       return_entropy=False, impl=None, model_kwargs=None, select=None,
                       chunk_bytes=DEFAULT_CHUNK_BYTES):
    """Per-token log pi(targets) (B, T) (and entropy) at `temperature`, without the logits. Differentiable when grad
    is enabled; wrap in torch.no_grad() for behaviour (old) or reference log-probs.

    select: optional bool mask shaped like input_ids. Only the selected positions' hidden states go through the head
    (prompt tokens never do), and the result is flat, (select.sum(),), in row-major order of the selected positions.
    impl / chunk_bytes: those of fused_linear_logprobs ("chunked" keeps at most one chunk of logits alive).
    """
    if select is not None:
        if not isinstance(select, torch.Tensor) or select.dtype != torch.bool:
            raise TypeError("select must be a bool tensor shaped like input_ids")
        if select.shape != input_ids.shape:
            raise ValueError(f"select has shape {tuple(select.shape)}, input_ids {tuple(input_ids.shape)}")
        if targets.shape not in (input_ids.shape, (int(select.sum()),)):
            raise ValueError(f"targets must be shaped like input_ids {tuple(input_ids.shape)} or be the selected "
                             f"targets ({int(select.sum())},), got {tuple(targets.shape)}")

    def run():
        h, w, b = causal_lm_hidden_and_head(model, input_ids, position_ids=position_ids,
                                            attention_mask=attention_mask, model_kwargs=model_kwargs)
        tgt = targets
        if select is not None:
            h = h[select]
            tgt = targets[select] if targets.shape == select.shape else targets
        return fused_linear_logprobs(h, w, tgt, temperature, return_entropy=return_entropy, bias=b, impl=impl,
                                     chunk_bytes=chunk_bytes)

    return _call(model, run)


__all__ = ["causal_lm_policy_loss", "causal_lm_logprobs", "causal_lm_hidden_and_head"]
