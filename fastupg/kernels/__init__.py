"""fastupg.kernels: fused Triton kernels for the unified policy loss. Depends on torch and triton only.

Log-prob layer (differentiable; any estimator, GSPO included, through fastupg.policy_loss):
    token_logprobs(logits, targets, temperature=1.0, return_entropy=False)
    fused_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, bias=None)
Fused-loss layer (one launch: log-probs, ratios, masks, per-token loss AND gradient):
    fused_policy_loss(logits, targets, estimator, *, advantages, ...)
    fused_linear_policy_loss(hidden, weight, targets, estimator, *, advantages, ...)

Triton runs on CUDA tensors or under TRITON_INTERPRET=1; plain-PyTorch references run otherwise.
"""
from fastupg.kernels.fused_linear import fused_linear_logprobs, fused_linear_policy_loss
from fastupg.kernels.logits import fused_policy_loss, loss_and_grad_rows, raise_deferred_checks, token_logprobs

__all__ = ["token_logprobs", "fused_policy_loss", "loss_and_grad_rows", "raise_deferred_checks", "fused_linear_logprobs",
           "fused_linear_policy_loss"]
