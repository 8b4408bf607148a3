"""A recipe's context overrides (rope_theta, max_position_embeddings) on a Hugging Face model config.

One function for both consumers: the trainer's `from_pretrained(config=...)` and vLLM's `hf_overrides`
(a callable that vLLM applies to the config it loads), so the two engines see the same context.
"""
from __future__ import annotations


def apply_context_overrides(config, rope_theta: float | None = None, max_position_embeddings: int | None = None):
    """Set the overrides in place on `config` and return it (None: keep the model's own)."""
    if max_position_embeddings is not None:
        config.max_position_embeddings = int(max_position_embeddings)
    if rope_theta is not None:
        rp = getattr(config, "rope_parameters", None)   # transformers 5: rope_theta lives in rope_parameters
        if isinstance(rp, dict):
            rp["rope_theta"] = float(rope_theta)
        else:
            config.rope_theta = float(rope_theta)
    return config
