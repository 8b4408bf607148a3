"""Model adapters: the fused loss for Hugging Face causal LMs (lm_head never called, logits never materialised)."""
from fastupg.models.hf_loss import causal_lm_hidden_and_head, causal_lm_logprobs, causal_lm_policy_loss

__all__ = ["causal_lm_policy_loss", "causal_lm_logprobs", "causal_lm_hidden_and_head"]
