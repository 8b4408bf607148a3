"""Triton kernels over logits (DESIGN.md §2): the log-prob layer and the fused-loss layer.

    token_logprobs(logits, targets, temperature=1.0, return_entropy=False, inplace_backward=False)
    fused_policy_loss(logits, targets, estimator, *, advantages, ...) -> (loss, metrics)
    loss_and_grad_rows(logits2d, targets1d, estimator, x, temperature, grad_out=None) -> (ell, logp, entropy, grad)

Triton runs on CUDA tensors or under TRITON_INTERPRET=1; otherwise the PyTorch reference (`reference.py`).
"""
from fastupg.kernels._utils import LaunchConfig
from fastupg.kernels.logprobs import token_logprobs
from fastupg.kernels.reference import fused_policy_loss_ref, token_logprobs_ref

__all__ = ["token_logprobs", "token_logprobs_ref", "fused_policy_loss_ref", "LaunchConfig"]
try:  # fused layer (added in a later commit)
    from fastupg.kernels.fused_loss import fused_policy_loss, loss_and_grad_rows  # noqa: F401
    __all__ += ["fused_policy_loss", "loss_and_grad_rows"]
except ImportError:  # pragma: no cover
    pass
