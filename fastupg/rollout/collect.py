"""The rows of one optimizer step: rollouts of the step's prompts through the engine, scored by the verifier, plus
the prompts' demonstrations; and the engine's side of an update (its weights follow the trainer's).

A row is one training sequence (prompt + completion, or prompt + demonstration). `collect_rows` fills what the
rollouts give (ids, offline flag, group, reward, the engine's log-probs); fastupg.routing adds the advantage and
the HPT weight of every row.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .base import SamplingConfig


@dataclass
class Rows:
    ids: list            # token ids per row (prompt + response)
    start: list          # index of the first response token
    offline: torch.Tensor    # bool per row: demonstration
    group: torch.Tensor      # local prompt index per row
    reward: torch.Tensor
    adv: torch.Tensor | None = None      # advantage per row (fastupg.routing)
    weight: torch.Tensor | None = None   # HPT alpha / beta per row, 1 outside HPT (fastupg.routing)
    # per row: the rollout engine's log-probs of its response tokens (vLLM), None for demonstrations;
    # None for the whole batch when no importance-sampling correction applies (HF engine)
    sampler_logp: list | None = None

    def select(self, idx: torch.Tensor) -> "Rows":
        ii = idx.tolist()
        slp = None if self.sampler_logp is None else [self.sampler_logp[i] for i in ii]
        return Rows([self.ids[i] for i in ii], [self.start[i] for i in ii], self.offline[idx], self.group[idx],
                    self.reward[idx], self.adv[idx], self.weight[idx], slp)


def collect_rows(engine, score, prompts, sampling: SamplingConfig | None, demonstrations: bool,
                 sampler_logprobs: bool) -> tuple[Rows, dict]:
    """Rows of the step: `sampling.n` scored rollouts per prompt (none when sampling is None) and, with
    `demonstrations`, each prompt's demonstration (reward 1: a correct solution). Returns (rows, generation stats).
    sampler_logprobs: keep the engine's log-probs of every sampled token (the importance-sampling correction)."""
    ids, start, off, grp, rew, gen_stats = [], [], [], [], [], {}
    slp = [] if sampler_logprobs else None
    if sampling is not None:
        groups = engine.generate([e.prompt_ids for e in prompts], sampling)
        engine.sleep()     # vLLM sleep mode: free the KV cache for the training step (HF: no-op)
        lens, trunc = [], []
        for g, (e, rolls) in enumerate(zip(prompts, groups)):
            scores = score([r.text for r in rolls], [e.answer] * len(rolls))
            for r, s in zip(rolls, scores):
                if not r.completion_ids:
                    continue
                ids.append(list(e.prompt_ids) + list(r.completion_ids))
                start.append(len(e.prompt_ids))
                off.append(False), grp.append(g), rew.append(float(s))
                if slp is not None:
                    if r.logprobs is None or len(r.logprobs) != len(r.completion_ids):
                        raise RuntimeError("vllm_importance_sampling_correction needs the engine's log-probs "
                                           "of every sampled token")
                    slp.append(r.logprobs)
                lens.append(len(r.completion_ids)), trunc.append(float(r.truncated))
        gen_stats = {"len_sum": float(sum(lens)), "trunc_sum": float(sum(trunc)), "n_gen": float(len(lens))}
    if demonstrations:
        for g, e in enumerate(prompts):
            ids.append(list(e.prompt_ids) + list(e.demo_ids))
            start.append(len(e.prompt_ids))
            off.append(True), grp.append(g), rew.append(1.0)  # the demonstration is a correct solution
            if slp is not None:
                slp.append(None)
    rows = Rows(ids, start, torch.tensor(off, dtype=torch.bool), torch.tensor(grp, dtype=torch.long),
                torch.tensor(rew, dtype=torch.float32), sampler_logp=slp)
    return rows, gen_stats


# -- the engine -----------------------------------------------------------------------------------------------
def make_vllm_engine(cfg, model_path: str, info, tokenizer=None):
    """One vllm.LLM per rank (external_launcher under torchrun), started from the same checkpoint as the trainer."""
    from fastupg.rollout.vllm import VLLMRolloutEngine
    # seed: the run's; the engine gives each tensor-parallel group one (its ranks must sample alike).
    # The platform picks the rest (on CPU: in-process, float32, no sleep mode).
    vcfg = dataclasses.replace(cfg.vllm, model=model_path, max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
                               colocate=info.distributed, seed=cfg.seed, extra=_vllm_context_overrides(cfg))
    return VLLMRolloutEngine(vcfg, tokenizer)


def _vllm_context_overrides(cfg) -> tuple:
    """vLLM gets the recipe's context overrides as the trainer does (else it refuses a max_model_len beyond the
    checkpoint's positions): `hf_overrides` as a picklable callable on the config it loads."""
    if cfg.rope_theta is None and cfg.max_position_embeddings is None:
        return ()
    import functools
    from fastupg.models.context import apply_context_overrides
    return (("hf_overrides", functools.partial(apply_context_overrides, rope_theta=cfg.rope_theta,
                                               max_position_embeddings=cfg.max_position_embeddings)),)


def push_weights(engine, model, rollout_engine: str) -> None:
    """After an update: the rollout engine gets the new weights. vLLM: in place, in vLLM's staged order (wake the
    weights, load them, then wake the KV cache; no-ops without sleep mode), one parameter gathered at a time (a
    collective: every rank runs it in step). The HF engine generates with the trainer's model itself (sharded or
    not): nothing to sync, no full state dict."""
    if rollout_engine == "vllm":
        from fastupg.rollout.vllm import iter_full_state
        engine.wake_up(tags=["weights"])
        engine.sync_weights(iter_full_state(model))
        engine.wake_up(tags=["kv_cache"])
