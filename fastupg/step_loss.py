"""The loss of one optimizer step over its micro-batches: per-token log-probs (ONE place computes them, sharded or
not: fastupg/models/hf_loss.py), fastupg.policy_loss with the precomputed token weights, backward.

Every rank runs the same number of passes (FSDP's collectives): a rank with fewer micro-batches runs zero-gradient
passes. Summed metrics come back for fastupg.metrics.step_metrics.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from fastupg.data.packing import MicroBatch, PackedBatch, collate
from fastupg.estimator import policy_loss
from fastupg.rollout.correction import is_correction, is_correction_stats


def loss_impl(cfg) -> str:
    """fused-linear impl of the trainer's log-probs: "chunked" (never more than one chunk of logits, on every
    device), or the plain "torch" reference (N x V logits) when use_fused_loss is off."""
    return "chunked" if cfg.use_fused_loss else "torch"


def token_logps(model, mb: PackedBatch, temperature: float, impl: str = "chunked", chunk_bytes: int = 2 ** 30):
    """(logp, entropy) of the response tokens of a packed micro-batch, differentiable, float32.

    The decoder body gives hidden states; only the response positions (mb.loss_mask) go through the lm_head, by
    the fused-linear log-softmax: prompt tokens never reach the head and the N x V logits never exist. The same
    call serves an FSDP2-sharded model (hf_loss runs it inside the root's forward hooks).
    """
    from fastupg.models.hf_loss import causal_lm_logprobs
    logp, ent = causal_lm_logprobs(model, mb.input_ids, mb.targets[None], position_ids=mb.position_ids,
                                   temperature=temperature, return_entropy=True, impl=impl,
                                   select=mb.loss_mask[None], chunk_bytes=chunk_bytes)
    return logp.float(), ent.float()


class StepLoss:
    """Forward (+ backward) passes of the policy (and the frozen reference) over a step's micro-batches."""

    def __init__(self, cfg, est, model, ref_model, autocast, sharded: bool, world_size: int, eos_token_id: int,
                 device):
        self.cfg, self.model, self.ref_model, self.autocast = cfg, model, ref_model, autocast
        # the token weights carry the whole aggregation (offline_agg included): the call only sums (token-sum for
        # both branches; with the estimator's offline_agg left in, demonstration tokens would be averaged twice)
        self.est = dataclasses.replace(est, offline_agg=None)
        # agg_scope=step: the weights already normalise over the global batch and FSDP averages over ranks, so
        # undo its 1/world; agg_scope=microbatch: verl's average over ranks is what is wanted
        self.scale = world_size if sharded and cfg.agg_scope == "step" else 1
        self.eos, self.device = int(eos_token_id), device

    def logps(self, model, mb: PackedBatch):
        return token_logps(model, mb, self.cfg.temperature, loss_impl(self.cfg), self.cfg.loss_chunk_mb * 2 ** 20)

    def run(self, mbs: list[MicroBatch], n_passes: int, old: list | None, grad: bool):
        """All micro-batches (then zero-gradient passes up to n_passes); returns (summed metrics, per-mb logp).
        old: per-mb log-probs of pi_old (None: one update per batch, pi_old = pi_theta exactly)."""
        acc: dict[str, float] = {}
        logps = []
        for k in range(n_passes):
            if k >= len(mbs):
                self.dummy_pass(grad)
                logps.append(None)
                continue
            x = mbs[k]
            mb = x.packed
            with (contextlib.nullcontext() if grad else torch.no_grad()), self.autocast:
                logp, ent = self.logps(self.model, mb)
            logps.append(logp.detach())
            if not grad:
                continue
            ref = None
            if self.ref_model is not None:
                with torch.no_grad(), self.autocast:
                    ref = self.logps(self.ref_model, mb)[0]
            o = old[k] if old is not None else logp.detach()
            weight = x.weight.to(logp.dtype)
            if x.sampler_logp is not None:
                weight = weight * self.importance_weights(o, x, acc)
            loss, m = policy_loss(logp, self.est, advantages=x.adv, old_logp=o, offline=x.offline,
                                  seq_ids=x.seq_ids, weight=weight, entropy=ent, ref_logp=ref, agg="token-sum")
            (loss * self.scale if self.scale != 1 else loss).backward()
            n_on = float(m["tokens/online"])
            ntok = float(mb.loss_mask.sum())
            for key, v in (("loss", float(loss.detach())), ("clip_low", float(m["clip_ratio/low"]) * n_on),
                           ("clip_high", float(m["clip_ratio/high"]) * n_on), ("n_on", n_on),
                           ("ent", float(m["entropy"]) * ntok), ("kl", float(m["kl"]) * ntok), ("ntok", ntok),
                           ("packed", float(mb.num_tokens))):
                acc[key] = acc.get(key, 0.0) + v
        return acc, logps

    def dummy_pass(self, grad: bool):
        """A rank with fewer micro-batches still joins the collectives (FSDP all-gathers of the policy and the
        reference model, the gradient reduce-scatter) in the same order as a real pass: a zero-gradient pass."""
        mb = collate([[self.eos, self.eos]], [1], [0], device=self.device)
        with (contextlib.nullcontext() if grad else torch.no_grad()), self.autocast:
            logp, _ = self.logps(self.model, mb)
        if grad and self.ref_model is not None:
            with torch.no_grad(), self.autocast:
                self.logps(self.ref_model, mb)
        if grad:
            (logp.sum() * 0.0).backward()

    def importance_weights(self, old_logp: torch.Tensor, x: MicroBatch, acc: dict) -> torch.Tensor:
        """Truncated IS weight per token (fastupg.rollout.correction): pi_old (the trainer's log-probs
        before this update, as TRL's old_per_token_logps) over the engine's; 1 on demonstrations."""
        on = ~x.offline
        args = dict(seq_ids=x.seq_ids, mode=self.cfg.vllm_importance_sampling_mode,
                    cap=self.cfg.vllm_importance_sampling_clip_max)
        w = is_correction(old_logp, x.sampler_logp, on, **args)
        for key, v in is_correction_stats(old_logp, x.sampler_logp, on, **args).items():
            if key != "logp_diff_max":
                acc["is_" + key] = acc.get("is_" + key, 0.0) + v
        return torch.where(on, w.to(old_logp.dtype), torch.ones_like(old_logp))
