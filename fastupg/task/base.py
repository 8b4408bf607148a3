"""The embedded base model's pretraining: a short SFT stage that gives the random tiny model PARTIAL competence.

The paper's regime starts from a base model that already solves some problems (Qwen2.5-Math): RL has signal on
those prompts, SFT is needed on the rest, and HPT's SFT share falls as the model learns. A random-init model has no
such base, so :func:`fastupg.task.tiny.ensure_embedded` can first train it with plain next-token cross-entropy on
worked solutions of the task family (:class:`BaseRecipe`: mostly 2- and 3-operand problems, a few 4-operand
ones), and saves the result as the embedded model. The base problems are
drawn from their own random streams and never include a held-out prompt. See docs/embedded_task.md for the
measured competence this gives per level (tiny, greedy: most 3-operand and a third of the 4-operand held-out
problems on the machine measured there; a 300-step training run's float results, and so the base, differ between
machines and library builds).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BaseRecipe:
    """What the base stage trains on and how; part of the embedded folder's spec (a changed recipe rebuilds)."""
    steps: int = 300                       # optimizer steps; 0 = no pretraining (the random model)
    batch_size: int = 32                   # demonstrations per step
    learning_rate: float = 3e-3
    warmup_steps: int = 20                 # linear warm-up, then linear decay to min_lr_ratio
    min_lr_ratio: float = 0.1              # 1.0: constant after warm-up
    mix: tuple[tuple[int, float], ...] = ((1, 0.3), (2, 0.55), (3, 0.15))  # (difficulty, weight) of base problems
    n_problems: int = 4000                 # distinct base problems (cycled through, reshuffled every epoch)
    seed: int = 0

    def __post_init__(self):
        for k in ("steps", "warmup_steps"):
            if getattr(self, k) < 0:
                raise ValueError(f"BaseRecipe.{k} must be >= 0, got {getattr(self, k)}")
        for k in ("batch_size", "n_problems"):
            if getattr(self, k) < 1:
                raise ValueError(f"BaseRecipe.{k} must be >= 1, got {getattr(self, k)}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"BaseRecipe.min_lr_ratio must be in (0, 1], got {self.min_lr_ratio}")
        if not self.learning_rate > 0:
            raise ValueError(f"BaseRecipe.learning_rate must be > 0, got {self.learning_rate}")
        from .arith import check_mix
        check_mix(self.mix, "BaseRecipe.mix")


def base_problems(recipe: BaseRecipe, exclude: set[str]) -> dict[int, list[dict]]:
    """Per difficulty of `recipe.mix`: its share of `recipe.n_problems` distinct problems (fewer where a level has
    fewer), none of whose prompts is in `exclude` (the held-out prompts); a share `recipe.ignore_parens` of the
    parenthesised ones get the left-to-right (wrong) solution."""
    from .arith import _counts, make_problem
    pools: dict[int, list[dict]] = {}
    for d, k in _counts(recipe.n_problems, recipe.mix).items():
        rng = random.Random(f"fastupg-arith-base-{recipe.seed}-{d}")
        seen: set[str] = set()
        rows: list[dict] = []
        tries = 0
        while len(rows) < k and tries < 50 * k + 1000:
            tries += 1
            ex = make_problem(rng, d)
            if ex["prompt"] not in exclude and ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                rows.append(ex)
        pools[d] = rows
    return pools


def pretrain(model, tokenizer, pools: dict[int, list[dict]], recipe: BaseRecipe,
             log: Callable[[str], None] | None = None) -> list[float]:
    """Train `model` in place: each row's level drawn by `recipe.mix`'s weights, its problem the next of that
    level's pool (reshuffled every pass); cross-entropy on solution + eos tokens after the chat-templated prompt,
    AdamW (0.9, 0.95), grad-norm clip 1.0, linear warm-up then linear decay to 10%. Deterministic for a given
    recipe (own torch RNG fork). Returns the losses."""
    import torch

    pools = {d: rows for d, rows in pools.items() if rows}
    if recipe.steps == 0 or not pools:
        return []

    def encode(e):
        p = tokenizer.apply_chat_template([{"role": "user", "content": e["prompt"]}], add_generation_prompt=True,
                                          tokenize=False)
        p = tokenizer(p, add_special_tokens=False)["input_ids"]
        c = tokenizer(e["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return p, c

    data = {d: [encode(e) for e in rows] for d, rows in pools.items()}
    levels = sorted(data)
    weights = [dict(recipe.mix)[d] for d in levels]
    order_rng = random.Random(f"fastupg-base-order-{recipe.seed}")
    order: dict[int, list[int]] = {d: [] for d in levels}
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    warm, total = recipe.warmup_steps, recipe.steps

    def lr_lambda(s):
        if s < warm:
            return (s + 1) / warm
        r = recipe.min_lr_ratio
        return r + (1.0 - r) * max(0.0, 1.0 - (s - warm) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    was = model.training
    model.train()
    losses: list[float] = []
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        for step in range(total):
            batch = []
            for d in order_rng.choices(levels, weights, k=recipe.batch_size):
                if not order[d]:
                    order[d] = list(range(len(data[d])))
                    order_rng.shuffle(order[d])
                batch.append(data[d][order[d].pop()])
            width = max(len(p) + len(c) for p, c in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            mask = torch.zeros(len(batch), width)
            for i, (p, c) in enumerate(batch):
                n = len(p) + len(c)
                ids[i, :n] = torch.tensor(p + c)
                att[i, :n] = 1
                mask[i, len(p):n] = 1.0
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            m = mask[:, 1:]
            loss = -(logp * m).sum() / m.sum()
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"base pretraining: non-finite loss at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log is not None and ((step + 1) % 50 == 0 or step + 1 == total):
                log(f"[fastupg] base pretraining step {step + 1}/{total}: loss {losses[-1]:.3f} "
                    f"({time.time() - t0:.0f}s)")
    model.train(was)
    return losses
