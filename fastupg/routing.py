"""What each row and each token of a step weighs in the loss (docs/math.md §1.2-§1.4, §2):

- `advantages`: per row, from each branch's `advantage` choice (grpo, mixed, reinforce, rloo, one);
- `route_rows`: HPT's routing per prompt (alpha = f(P) on its rollouts, beta = g(P) on its demonstration; 1
  outside HPT), returning the rows with their advantage and weight;
- `token_weigher`: the aggregation weight s_t * row weight of every response token of a micro-batch, over the
  whole optimizer step (agg_scope=step: all ranks' kept rows) or over the micro-batch alone (agg_scope=microbatch).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from fastupg import advantages as adv_lib
from fastupg import distributed as D
from fastupg.data.packing import PackedBatch
from fastupg.estimator import aggregation_weights
from fastupg.hpt import route
from fastupg.rollout.collect import Rows


def advantages(est, reward, group, offline) -> torch.Tensor:
    """Per-row advantage from each branch's `advantage` choice (docs/math.md §1.2)."""
    A = torch.ones_like(reward)
    on = ~offline
    std = est.adv_std
    if est.online is not None and bool(on.any()):
        kind = est.online.advantage
        if kind == "grpo":
            A[on] = adv_lib.grpo(reward[on], group[on], std=std)
        elif kind == "mixed":
            A[on] = adv_lib.mixed(reward, group, std=std)[on]
        elif kind == "reinforce":
            A[on] = adv_lib.reinforce(reward[on])
        elif kind == "rloo":
            A[on] = adv_lib.rloo(reward[on], group[on])
        elif kind != "one":
            raise ValueError(f"advantage {kind!r} is not supported by the trainer (needs a value model)")
    if est.offline is not None and bool(offline.any()):
        kind = est.offline.advantage
        if kind == "mixed":
            A[offline] = adv_lib.mixed(reward, group, std=std)[offline]
        elif kind == "grpo":
            A[offline] = adv_lib.grpo(reward, group, std=std, stats_mask=on)[offline]
        elif kind == "reinforce":
            A[offline] = adv_lib.reinforce(reward[offline])
        elif kind != "one":
            raise ValueError(f"offline advantage {kind!r} is not supported by the trainer")
    return A


def hpt_weights(cfg, reward, group, offline, n_prompts: int):
    """(row weights, per-prompt P, per-prompt beta): HPT's alpha on rollouts and beta on the demonstration."""
    on = ~offline
    P = torch.zeros(n_prompts, dtype=reward.dtype).index_add_(0, group[on], reward[on])
    P = P / torch.zeros(n_prompts, dtype=reward.dtype).index_add_(0, group[on], torch.ones_like(reward[on])).clamp_min(1)
    if cfg.loss_type != "hpt":
        return torch.ones_like(reward), P, torch.full_like(P, float("nan"))
    alpha, beta = route(P, cfg.hpt)
    w = torch.where(offline, beta[group], alpha[group])
    return w, P, beta


def route_rows(est, cfg, rows: Rows, n_prompts: int) -> tuple[Rows, dict]:
    """The rows with their advantage and HPT weight; stats: per-prompt success rate P and SFT weight beta."""
    A = advantages(est, rows.reward, rows.group, rows.offline)
    weight, P, beta = hpt_weights(cfg, rows.reward, rows.group, rows.offline, n_prompts)
    return dataclasses.replace(rows, adv=A, weight=weight), {"P": P, "beta": beta}


def token_weights(est, cfg, rows: Rows, info: D.DistInfo) -> list[torch.Tensor]:
    """Aggregation weight s_t * HPT weight of every response token of every local row, with s_t computed
    over the GLOBAL batch (all ranks' kept rows), so that summing token-sum losses over micro-batches and
    ranks reproduces the estimator's aggregation of one big batch exactly."""
    mine = [(len(r) - s, bool(o)) for r, s, o in zip(rows.ids, rows.start, rows.offline.tolist())]
    everyone = D.all_gather_object(mine, info)
    lens = [n for part in everyone for n, _ in part]
    offs = [o for part in everyone for _, o in part]
    if not lens:
        return []
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    off = torch.repeat_interleave(torch.tensor(offs), torch.tensor(lens))
    s = aggregation_weights(est, torch.ones(len(seq)), off, seq, padded_len=cfg.max_completion_length)
    first = sum(len(p) for p in everyone[:info.rank])
    bounds = torch.tensor([0] + lens).cumsum(0)
    out = []
    for j in range(len(mine)):
        g = first + j
        out.append(s[bounds[g]:bounds[g + 1]] * float(rows.weight[j]))
    return out


def microbatch_token_weights(est, cfg, rows: Rows, mb: PackedBatch) -> torch.Tensor:
    """agg_scope='microbatch' (verl's dp_actor, the official HPT code): the aggregation weight s_t * HPT weight of
    the micro-batch's response tokens, with s_t computed over THIS micro-batch alone, divided by
    gradient_accumulation_steps (verl: `loss = loss / self.gradient_accumulation`); FSDP then averages over ranks."""
    ri = mb.row_index[mb.loss_mask].cpu()
    s = aggregation_weights(est, torch.ones(len(ri)), rows.offline[ri], ri, padded_len=cfg.max_completion_length)
    return s * rows.weight[ri].to(s.dtype) / cfg.gradient_accumulation_steps


def token_weigher(est, cfg, rows: Rows, info: D.DistInfo) -> Callable[[PackedBatch], torch.Tensor]:
    """micro-batch -> the weights of its response tokens, in the scope cfg.agg_scope names."""
    if cfg.agg_scope == "microbatch":
        return lambda mb: microbatch_token_weights(est, cfg, rows, mb)
    per_row = token_weights(est, cfg, rows, info)   # a collective: every rank calls it, in step
    return lambda mb: torch.cat([per_row[i] for i in mb.rows])
