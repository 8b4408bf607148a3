"""Packing variable-length rows into micro-batches under a token budget, with no padding at all.

A row is one training sequence (prompt + completion, or prompt + demonstration). Rows are placed
first-fit-decreasing into bins of at most `budget` tokens; each bin becomes ONE sequence of shape
(1, L) whose `position_ids` restart at 0 for every row. transformers (5.x) turns restarting
position ids into a block-diagonal causal mask for sdpa/eager (`masking_utils.find_packed_sequence_indices`,
applied when attention_mask is None and there is no KV cache) and into varlen cu_seqlens for
flash_attention_2, so no token attends across rows. tests/test_packing.py checks that packed and
one-row-at-a-time log-probs agree.

Each row drops its last token from the input (it predicts nothing) and its targets are the row
shifted by one; `loss_mask` is True where the target is a completion/demonstration token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor      # (1, L) long
    position_ids: torch.Tensor   # (1, L) long, restarting at 0 per row
    targets: torch.Tensor        # (L,) long: next token of the same row (0 where loss_mask is False)
    loss_mask: torch.Tensor      # (L,) bool: target is a response token
    row_index: torch.Tensor      # (L,) long: which input row each position belongs to
    rows: tuple[int, ...]        # the input rows in this micro-batch, in order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def row_length(ids: Sequence[int]) -> int:
    """Tokens a row occupies in a packed batch (its last token is never an input)."""
    return len(ids) - 1


def plan_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: lists of row indices, each list's total length <= budget.

    Deterministic (ties keep input order). Raises ValueError for a row longer than the budget.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > budget:
            raise ValueError(f"row {i} has {n} tokens, more than max_tokens_per_microbatch={budget}")
        for b, f in enumerate(free):
            if n <= f:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(budget - n)
    for b in bins:
        b.sort()
    return bins


def collate(rows: Sequence[Sequence[int]], response_start: Sequence[int], indices: Sequence[int],
            device=None) -> PackedBatch:
    """Concatenate rows[indices] into one packed sequence.

    response_start[i]: index in rows[i] of its first response token (= prompt length): the loss
    covers targets rows[i][response_start[i]:].
    """
    ids, pos, tgt, msk, rix = [], [], [], [], []
    for i in indices:
        r = list(rows[i])
        s = response_start[i]
        if not 1 <= s < len(r):
            raise ValueError(f"row {i}: response_start={s} must be in [1, {len(r) - 1}] (non-empty prompt and response)")
        n = len(r) - 1
        ids.extend(r[:-1])
        pos.extend(range(n))
        tgt.extend(r[1:])
        msk.extend(j + 1 >= s for j in range(n))
        rix.extend([i] * n)
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return PackedBatch(input_ids=t(ids, torch.long)[None], position_ids=t(pos, torch.long)[None],
                       targets=t(tgt, torch.long), loss_mask=t(msk, torch.bool), row_index=t(rix, torch.long),
                       rows=tuple(indices))


def pack(rows: Sequence[Sequence[int]], response_start: Sequence[int], budget: int, device=None) -> list[PackedBatch]:
    """All rows packed into micro-batches of at most `budget` tokens each."""
    bins = plan_bins([row_length(r) for r in rows], budget)
    return [collate(rows, response_start, b, device) for b in bins]


# -- the trainer's micro-batches: packed rows plus what the loss needs per response token ----------------------
@dataclass(frozen=True)
class MicroBatch:
    packed: PackedBatch
    adv: torch.Tensor            # per response token (loss_mask positions, in order): its row's advantage
    offline: torch.Tensor        # bool: a demonstration token
    weight: torch.Tensor         # aggregation weight s_t * HPT weight (fastupg.routing.token_weigher)
    seq_ids: torch.Tensor        # its row (index into the step's rows)
    sampler_logp: torch.Tensor | None = None   # the rollout engine's log-probs (NaN on demonstrations)


def micro_batches(rows, budget: int, weigh, device=None) -> list[MicroBatch]:
    """The step's rows (fastupg.rollout.collect.Rows, with advantages) packed under `budget` tokens; a row longer
    than the budget gets a micro-batch of its own. weigh(packed) -> the weights of its response tokens."""
    budget = max([budget] + [row_length(r) for r in rows.ids])
    out = []
    for mb in (pack(rows.ids, rows.start, budget, device=device) if rows.ids else []):
        ri = mb.row_index[mb.loss_mask].cpu()
        slp = None
        if rows.sampler_logp is not None:   # demonstrations: NaN, outside the correction's mask
            slp = torch.cat([torch.tensor(rows.sampler_logp[i], dtype=torch.float32) if rows.sampler_logp[i] is not None
                             else torch.full((len(rows.ids[i]) - rows.start[i],), float("nan")) for i in mb.rows])
            slp = slp.to(device)
        out.append(MicroBatch(mb, rows.adv[ri].to(device), rows.offline[ri].to(device), weigh(mb).to(device),
                              mb.row_index[mb.loss_mask], slp))
    return out
