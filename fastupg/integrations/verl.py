"""verl drop-in: fastupg estimators registered as verl policy losses (`verl.trainer.ppo.core_algos.register_policy_loss`).

    from fastupg.integrations.verl import register_fastupg_policy_losses
    register_fastupg_policy_losses()        # before verl builds its actor, e.g. at the top of your entry point
    # then: actor_rollout_ref.actor.policy_loss.loss_mode=fastupg_grpo  (or fastupg_cispo, fastupg_gspo, ...)

A registered loss has verl's policy-loss signature
    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights) -> (loss, metrics)
and verl's meaning for everything verl passes in:
  * the clip bounds are verl's actor config: clip_ratio_low / clip_ratio_high (fallback clip_ratio), and for the
    token-clip losses the dual clip clip_ratio_c (default 3.0), exactly as verl's 'vanilla' loss applies it;
    CISPO clamps the detached ratio to [1 - clip_ratio_low, 1 + clip_ratio_high] as verl's 'cispo' does;
  * the aggregation is verl's agg_loss for `loss_agg_mode` and `config.global_batch_info` (dp_size,
    batch_num_tokens, global_batch_size, loss_scale_factor), reproduced as per-token weights;
  * rollout_is_weights multiply the per-token policy loss (folded into the advantage: exact, the weights are >= 0);
  * metrics: actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower with verl's definitions.
What comes from the fastupg estimator is the per-token loss itself (reference, mask: fastupg.policy_loss). The
advantage estimator, KL and entropy terms stay verl's (algorithm.adv_estimator, use_kl_loss, entropy_coeff).
Known differences: verl clamps the log-ratio to [-20, 20] (GSPO: the log sequence ratio to <= 10) before exp;
fastupg does not (identical wherever those clamps are inactive). Demonstration (offline) tokens: verl's loss
signature carries no per-token offline flag, so HPT/LUFFY/SRFT are not registered here.

Importing this module needs verl (and what verl.trainer.ppo.core_algos imports: ray, tensordict, omegaconf,
codetiming; installed by `pip install -e .[dev]`).
"""
from __future__ import annotations

import dataclasses

import torch

from fastupg.estimator import Estimator, policy_loss

try:
    from verl.trainer.ppo import core_algos
except ImportError as e:  # pragma: no cover - exercised only without verl
    raise ImportError("fastupg.integrations.verl needs verl: pip install verl (and its core_algos imports: ray, "
                      "tensordict, omegaconf, codetiming)") from e

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
# on-policy presets with a token/sequence policy loss verl can call (offline branches need data verl doesn't pass)
VERL_PRESETS = ("ppo", "grpo", "dr_grpo", "dapo", "cispo", "gspo")


def verl_aggregation_weights(response_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
                             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """(B, T) weights s such that verl's agg_loss(loss_mat, response_mask, loss_agg_mode, ...) = sum(s * loss_mat)."""
    m = response_mask.to(torch.float64)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = m.sum()
        return m / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return m * dp_size
    seq_len = m.sum(-1, keepdim=True)
    nonempty = (seq_len > 0).to(m.dtype)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = nonempty.sum()
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        s = m * nonempty / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            s = s / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return s
    if loss_agg_mode == "seq-mean-token-mean":
        return m / (seq_len + 1e-8) * nonempty / global_batch_size * dp_size
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode!r}; allowed: {list(AGG_MODES)}")


def _bounds(config):
    clip = config.get("clip_ratio", 0.2)
    low = config.get("clip_ratio_low", None)
    high = config.get("clip_ratio_high", None)
    return float(clip if low is None else low), float(clip if high is None else high)


def verl_policy_loss(estimator: Estimator):
    """A verl policy-loss function whose per-token loss is `estimator`'s on-policy branch (see module docstring)."""
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a fastupg.Estimator, got {type(estimator).__name__}")
    if estimator.online is None or estimator.offline is not None:
        raise ValueError(f"estimator {estimator.name!r}: a verl policy loss sees on-policy tokens only (no offline "
                         "flag in its signature); use an estimator with online= and no offline= branch")
    branch = estimator.online

    def compute_policy_loss_fastupg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                    config=None, rollout_is_weights=None):
        if config is None:
            raise ValueError("config (verl's ActorConfig) is required: the clip bounds and batch info come from it")
        low, high = _bounds(config)
        ov = dict(eps_low=low, eps_high=high, agg="token-sum", offline_agg=None, agg_norm=None, kl_coef=0.0,
                  entropy_coef=0.0)
        dual_c = None
        if branch.mask == "clip" and branch.ref == "old":  # verl's 'vanilla' always dual-clips negative advantages
            dual_c = float(config.get("clip_ratio_c", 3.0))
            ov["dual_clip"] = dual_c
        est = dataclasses.replace(estimator, **ov)
        info = dict(config.get("global_batch_info", None) or {})
        s = verl_aggregation_weights(response_mask, loss_agg_mode, **info)
        A = advantages if rollout_is_weights is None else advantages * rollout_is_weights
        mask = response_mask.bool()
        loss, _ = policy_loss(log_prob, est, advantages=A.to(log_prob.dtype), old_logp=old_log_prob, mask=mask,
                              weight=s.to(log_prob.dtype), agg="token-sum")
        with torch.no_grad():
            metrics = _verl_metrics(branch, log_prob.detach(), old_log_prob, advantages, response_mask, low, high,
                                    dual_c)
        return loss, metrics

    compute_policy_loss_fastupg.__name__ = f"compute_policy_loss_fastupg_{estimator.name}"
    return compute_policy_loss_fastupg


def _verl_metrics(branch, logp, old, A, response_mask, low, high, dual_c):
    """verl's pg metrics for the matching verl loss (vanilla / gspo / cispo), on detached tensors."""
    from verl.utils.torch_functional import masked_mean
    m = response_mask
    d = logp - old
    if branch.ref == "seq":
        dseq = (d * m).sum(-1) / m.sum(-1).clamp(min=1)
        ratio = torch.exp(dseq).unsqueeze(-1).expand_as(logp)
    else:
        ratio = torch.exp(d.clamp(-20.0, 20.0))
    ppo_kl = masked_mean(-d.clamp(-20.0, 20.0) if branch.ref != "seq" else -d, m)
    lower = torch.tensor(0.0)
    if branch.mask == "cispo":
        clipfrac = masked_mean((ratio != ratio.clamp(1 - low, 1 + high)).float(), m)
    elif branch.mask == "clip":
        l1 = -A * ratio
        l2 = -A * ratio.clamp(1 - low, 1 + high)
        clipfrac = masked_mean((l2 > l1).float(), m)
        if dual_c is not None:
            lower = masked_mean(((torch.maximum(l1, l2) > -A * dual_c) & (A < 0)).float(), m)
    else:
        clipfrac = torch.tensor(0.0)
    return {"actor/pg_clipfrac": float(clipfrac), "actor/ppo_kl": float(ppo_kl), "actor/pg_clipfrac_lower": float(lower)}


def register_estimator(name: str, estimator: Estimator):
    """Register `estimator` under verl loss_mode `name`; returns the registered function."""
    fn = verl_policy_loss(estimator)
    core_algos.register_policy_loss(name)(fn)
    return fn


def register_fastupg_policy_losses(prefix: str = "fastupg_") -> list[str]:
    """Register every on-policy fastupg preset as verl loss_mode `<prefix><preset>`; returns the names."""
    names = []
    for p in VERL_PRESETS:
        register_estimator(prefix + p, Estimator.preset(p))
        names.append(prefix + p)
    return names


__all__ = ["register_fastupg_policy_losses", "register_estimator", "verl_policy_loss", "verl_aggregation_weights",
           "VERL_PRESETS"]

# Registered on import, so that `VERL_USE_EXTERNAL_MODULES=fastupg.integrations.verl` (verl imports the listed modules
# in every process it starts, Ray workers included) makes the fastupg_* loss modes available everywhere.
register_fastupg_policy_losses()
