"""Hugging Face ``generate`` behind the rollout protocol: the embedded default that runs anywhere.

The engine normally holds the very model object the trainer optimises, so the rollouts always
come from the current weights and :meth:`HFRolloutEngine.sync_weights` has nothing to do (it
copies only tensors that are not already the engine's own storage). ``sleep``/``wake_up`` are
no-ops: there is no separate inference copy to free.

Log-probs. ``Rollout.logprobs[t] = log_softmax(z_t / T)[y_t]`` with z_t the model's raw logits at
the step that sampled y_t, T the sampling temperature: exactly the ``l`` the estimator computes
in the trainer (docs/math.md §1), so the ratio r = exp(l - o) is 1 on the first update, up to
numerics. With top_p < 1 or top_k > 0 the tokens are drawn from the truncated distribution but
the log-probs stay those of the full softmax at temperature T, as in verl and TRL.

Completions include the stop token that ended them (its log-prob matters: the model learns to
stop); ``truncated`` is True when max_new_tokens ran out first.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch

from .base import Rollout, SamplingConfig, left_pad


class HFRolloutEngine:
    """Batched sampling with ``model.generate`` (left padding, KV cache).

    max_batch_size: most sequences (prompts x n) per ``generate`` call; bounds the memory of
    the KV cache. No logits are kept: the log-prob of each sampled token is read from one
    (sequences x vocab) slab per step. None: all at once.

    The model may be the trainer's FSDP2-sharded model: its shards are gathered once per call
    (fastupg.distributed.gathered), so no unsharded copy of the weights outlives the call.
    A seeded call is reproducible for a given max_batch_size; another chunking draws another
    (equally valid) random stream.
    """

    def __init__(self, model, tokenizer=None, device: str | torch.device | None = None,
                 max_batch_size: int | None = None, pad_token_id: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"HFRolloutEngine: max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.pad_token_id = _first_not_none(pad_token_id, getattr(tokenizer, "pad_token_id", None),
                                            model.config.pad_token_id)
        eos = _first_not_none(eos_token_id, getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id)
        if eos is None:
            raise ValueError("HFRolloutEngine: no eos_token_id (pass it, or a tokenizer/model config that has one)")
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_ids[0]

    # ------------------------------------------------------------------ protocol
    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig) -> list[list[Rollout]]:
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        prompts = [list(p) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if not all(isinstance(t, int) for t in p):
                raise TypeError(f"prompt {i} must be a list of int token ids")
        if not prompts:
            return []
        # repeat each prompt n times (rather than num_return_sequences) so chunks may split groups
        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        chunk = self.max_batch_size or len(flat)
        out: list[list[Rollout]] = [[] for _ in prompts]
        was_training = self.model.training
        rng = (torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
               if sampling.seed is not None else contextlib.nullcontext())
        from fastupg.distributed import gathered
        try:
            self.model.eval()
            with rng, torch.no_grad(), gathered(self.model):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for s in range(0, len(flat), chunk):
                    part = flat[s:s + chunk]
                    for (i, _), r in zip(part, self._generate_chunk([p for _, p in part], sampling)):
                        out[i].append(r)
        finally:
            self.model.train(was_training)
        return out

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the given tensors into the engine's model; tensors that already are the model's
        own (same storage: the engine shares the trainer's model) are skipped, so then it is free."""
        own = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, t in named_tensors:
                if name not in own:
                    raise ValueError(f"sync_weights: unknown parameter name {name!r}")
                dst = own[name]
                if dst.data_ptr() == t.data_ptr():
                    continue
                if dst.shape != t.shape:
                    raise ValueError(f"sync_weights: {name} has shape {tuple(t.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(t)

    def sleep(self) -> None:      # the model is the trainer's: nothing separate to free
        pass

    def wake_up(self, tags=None) -> None:   # (tags: vLLM's staged wake; nothing to wake here)
        pass

    # ------------------------------------------------------------------ internals
    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        from transformers import GenerationConfig

        ids, mask = left_pad(prompts, self.pad_token_id)
        width = ids.shape[1]
        stop = list(dict.fromkeys(self.eos_token_ids + tuple(sampling.stop_token_ids)))
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
        # the recorder sees the raw logits first; temperature / top-k / top-p are applied after it, by us
        rec = _SampledLogprobs(sampling.temperature)
        procs = [rec]
        if sampling.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            procs.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            procs.append(TopPLogitsWarper(sampling.top_p))
        gen_cfg = GenerationConfig(
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0,   # the warpers are in procs
            max_new_tokens=sampling.max_new_tokens, eos_token_id=stop, pad_token_id=self.pad_token_id,
            return_dict_in_generate=True, use_cache=True,
        )
        res = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=gen_cfg, logits_processor=LogitsProcessorList(procs))
        new = res.sequences[:, width:].cpu()                # [B, S]
        lp = rec.finish(res.sequences[:, width:], new.shape)
        is_stop = torch.isin(new, torch.tensor(stop))
        rollouts = []
        for r, p in enumerate(prompts):
            hits = is_stop[r].nonzero()
            end = int(hits[0]) + 1 if len(hits) else new.shape[1]
            comp = new[r, :end].tolist()
            text = self.tokenizer.decode(comp, skip_special_tokens=True) if self.tokenizer is not None else ""
            rollouts.append(Rollout(prompt_ids=list(p), completion_ids=comp, logprobs=lp[r, :end].tolist(),
                                    truncated=not len(hits), text=text))
        return rollouts


class _SampledLogprobs:
    """A logits processor that records log_softmax(z_t / T)[y_t] of the token sampled at each step from the raw
    logits z_t, keeping one (sequences x vocab) slab: step t's log-softmax is read when step t + 1 shows the
    sampled token (and by finish() for the last step). Replaces generate's output_logits, which kept all steps."""

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self.prev = None
        self.out: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.out.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1).cpu())
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor, shape) -> torch.Tensor:
        if self.prev is not None and len(self.out) < new_tokens.shape[1]:
            tok = new_tokens[:, len(self.out):len(self.out) + 1].to(self.prev.device)
            self.out.append(self.prev.gather(-1, tok).squeeze(-1).cpu())
        self.prev = None
        return torch.stack(self.out, dim=1) if self.out else torch.zeros(shape)


def _first_not_none(*xs):
    for x in xs:
        if x is not None:
            return x
    return None
