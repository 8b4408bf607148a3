"""The rollout protocol: what the trainer asks of a sampler, whatever engine sits behind it.

Hugging Face `generate` (fastupg.rollout.hf) is the embedded default that runs anywhere;
vLLM (fastupg.rollout.vllm) plugs in behind the same three methods on GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 8                      # rollouts per prompt (TRL: num_generations)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1: off
    max_new_tokens: int = 256       # TRL: max_completion_length
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingConfig.n must be >= 1, got {self.n}")
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch of prompts, each right-aligned behind pad tokens: what
    `generate` expects of a decoder-only model (the new tokens start at the same column for every row)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids, mask


@dataclass
class Rollout:
    """One sampled completion of one prompt."""
    prompt_ids: list[int]
    completion_ids: list[int]
    # log-probs of the sampled tokens under the sampling distribution (temperature applied),
    # one per completion token; None when the engine does not return them
    logprobs: list[float] | None = None
    truncated: bool = False         # hit max_new_tokens without an end-of-sequence token
    text: str = ""                  # decoded completion (filled by the engine when it has a tokenizer)
    extra: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig) -> list[list[Rollout]]:
        """Sample `sampling.n` completions for each prompt (token ids); returns one list per prompt."""
        ...

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's current weights (full, unsharded tensors, HF names) into the engine."""
        ...

    def sleep(self) -> None:
        """Free the engine's GPU memory while the trainer steps (no-op where it means nothing)."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Bring memory back: all of it (None), or in stages after an update: ["weights"], then
        sync_weights, then ["kv_cache"] (vLLM's tags)."""
        ...
