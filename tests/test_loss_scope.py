"""Where the loss of one optimizer step is normalised, pinned against float64 hand computations:

- hpt-official (agg_scope: microbatch): as the official HPT code (verl's dp_actor), each micro-batch's RL
  sum / agg_norm plus SFT token mean on its own, divided by gradient_accumulation_steps;
- hpt-paper (agg_scope: step): one big batch, whatever the micro-batch split;
- the SFT stage (sft-then-grpo's first stage, plain sft): every demonstration token of the step counts exactly
  once, in a token mean over all of them (no micro-batch dropped during accumulation, no per-micro-batch mean),
  also when the last micro-batch is only partly filled.
"""
import copy
import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch

from fastupg import distributed as D
from fastupg import trainer as T
from fastupg.config import load_config

EMB = str(Path(tempfile.gettempdir()) / "fastupg-test-emb")
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(model_size="micro", embedded_dir=EMB, embedded_mix=(), embedded_n_train=0, max_completion_length=32,
             report_to=(), plot=False, progress_bar=False, save_steps=0, eval_steps=0, seed=5, max_grad_norm=0.0)


def recipe(name: str, tmp_path, **kw):
    return load_config(ROOT / "configs" / name, **{**SMALL, "output_dir": str(tmp_path / name), **kw})


def step_grad(tr):
    """One step's rows and micro-batches, and the gradient the trainer's loss pass leaves (no optimizer step)."""
    rows, _ = tr.build_rows(tr.next_prompts())
    kept = rows.select(T.keep_rows(rows.weight))
    mbs = T.micro_batches(kept, tr.cfg.max_tokens_per_microbatch, T.token_weigher(tr.est, tr.cfg, kept, tr.info))
    tr.model.zero_grad(set_to_none=True)
    tr.loss.run(mbs, len(mbs), None, grad=True)
    g = torch.cat([p.grad.reshape(-1) for p in tr.model.parameters()])
    return kept, [mb.packed for mb in mbs], g


def row_terms(model64, kept, i, temperature):
    """float64 log-probs and entropies of row i's response tokens: the plain full-logits path, one row alone."""
    ids = torch.tensor(kept.ids[i])[None]
    s = kept.start[i]
    z = model64(input_ids=ids).logits[0, s - 1:-1].double() / temperature
    lsm = torch.log_softmax(z, -1)
    return lsm.gather(-1, ids[0, s:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)


def hand_grad(tr, kept, loss_fn):
    """Gradient of loss_fn(terms) on a float64 copy of the model; terms[i] = (logp, entropy, A, offline, weight)."""
    m64 = copy.deepcopy(tr.model).double()
    terms = [(*row_terms(m64, kept, i, tr.cfg.temperature), float(kept.adv[i]), bool(kept.offline[i]),
              float(kept.weight[i])) for i in range(len(kept.ids))]
    loss_fn(terms).backward()
    return torch.cat([p.grad.reshape(-1) for p in m64.parameters()])


def close(a, b, rtol=2e-4):
    err = float((a.double() - b.double()).norm() / b.double().norm())
    assert err < rtol, err
    return err


def official_mb_loss(terms, c_h, norm, coef):
    """One micro-batch as mix_actor.py computes it (offline_loss_type=sft, loss_remove_token_mean, no clip):
    RL = sum over rollout tokens of (-A * ratio - c_H * H) / norm; SFT = coef * token mean of (-logp - c_H * H)."""
    on = [t for t in terms if not t[3]]
    off = [t for t in terms if t[3]]
    loss = torch.zeros((), dtype=torch.float64)
    for l, h, a, _, w in on:
        loss = loss + w * (-a * torch.exp(l - l.detach()) - c_h * h).sum() / norm
    if off:
        n = sum(len(t[0]) for t in off)
        loss = loss + coef * sum(w * (-l - c_h * h).sum() for l, h, _, _, w in off) / n
    return loss


# a fixed verifier: prompt 0 solved once (RL on its rollouts), every other prompt failed (SFT on its demonstration)
def _score_first_prompt_only(tr):
    seen = {"n": 0}

    def score(texts, golds):
        seen["n"] += 1
        return [1.0 if seen["n"] == 1 and i == 0 else 0.0 for i in range(len(texts))]
    tr.score = score


def _hpt_trainer(name, tmp_path, budget, **kw):
    cfg = recipe(name, tmp_path / f"b{budget}", num_generations=2, per_device_train_batch_size=4,
                 gradient_accumulation_steps=2, max_tokens_per_microbatch=budget, **kw)
    tr = T.Trainer(cfg, D.DistInfo())
    _score_first_prompt_only(tr)
    return tr


def test_hpt_official_sums_per_micro_batch_losses_over_accumulation_steps(tmp_path):
    tr = _hpt_trainer("hpt-official.yaml", tmp_path, budget=1)   # one row per micro-batch, or two of the shortest
    cfg = tr.cfg
    assert cfg.agg_scope == "microbatch" and cfg.gradient_accumulation_steps == 2
    kept, mbs, g = step_grad(tr)
    assert kept.offline.any() and (~kept.offline).any(), "needs RL rows and demonstrations"
    assert len(mbs) >= 3
    demo_mbs = {sum(len(kept.ids[i]) - kept.start[i] for i in mb.rows if kept.offline[i]) for mb in mbs} - {0}
    assert len(demo_mbs) >= 2, "demonstration tokens split unevenly over micro-batches"
    norm, coef, c_h = cfg.agg_norm, cfg.offline_coef, cfg.entropy_coef

    def official(terms):
        return sum(official_mb_loss([terms[i] for i in mb.rows], c_h, norm, coef) for mb in mbs) \
            / cfg.gradient_accumulation_steps
    close(g, hand_grad(tr, kept, official))

    def global_batch(terms):  # the same aggregation over the whole step (agg_scope: step)
        return official_mb_loss(terms, c_h, norm, coef)
    other = hand_grad(tr, kept, global_batch)
    assert float((g.double() - other).norm() / other.norm()) > 1e-2, "the two scopes must differ here"

    # and agg_scope=step on the same recipe gives the global formula, whatever the split
    tr2 = _hpt_trainer("hpt-official.yaml", tmp_path / "step", budget=1, agg_scope="step")
    kept2, _, g2 = step_grad(tr2)
    assert kept2.ids == kept.ids
    close(g2, other)


@pytest.mark.parametrize("budget", [4096, 1])
def test_hpt_paper_is_one_global_token_mean_whatever_the_split(tmp_path, budget):
    tr = _hpt_trainer("hpt-paper.yaml", tmp_path, budget)
    assert tr.cfg.agg_scope == "step"
    kept, mbs, g = step_grad(tr)
    assert (len(mbs) == 1) == (budget == 4096)
    assert kept.offline.any() and (~kept.offline).any()

    def paper(terms):  # GRPO at ratio 1 (one update per batch: no clip active) + SFT, one pooled token mean
        n = sum(len(t[0]) for t in terms)
        return sum(w * (-(a * torch.exp(l - l.detach())) if not off else -l).sum()
                   for l, _, a, off, w in terms) / n
    close(g, hand_grad(tr, kept, paper))


@pytest.mark.parametrize("recipe_name", ["sft-then-grpo.yaml", "sft.yaml"])
def test_sft_stage_counts_every_demonstration_token_once(tmp_path, recipe_name):
    """SFT->GRPO done right (arXiv 2604.23747 found the usual pipeline dropping micro-batches during gradient
    accumulation and mis-aggregating the loss): our SFT step's gradient with k micro-batches equals one big batch's
    and the float64 token mean over ALL demonstration tokens of the step, the last micro-batch partly filled."""
    cfg = recipe(recipe_name, tmp_path).stage_configs()[0]
    assert cfg.loss_type == "sft"
    grads = {}
    for budget in (4096, 50):
        c = dataclasses.replace(cfg, per_device_train_batch_size=5, gradient_accumulation_steps=2,
                                max_tokens_per_microbatch=budget, output_dir=str(tmp_path / f"b{budget}"))
        tr = T.Trainer(c, D.DistInfo())
        kept, mbs, grads[budget] = step_grad(tr)
        assert len(kept.ids) == 10 and bool(kept.offline.all())        # 5 x 2 accumulation steps: all demos
        covered = sorted(i for mb in mbs for i in mb.rows)
        assert covered == list(range(10))                               # each row in exactly one micro-batch
        n_demo = sum(len(r) - s for r, s in zip(kept.ids, kept.start))
        assert sum(int(mb.loss_mask.sum()) for mb in mbs) == n_demo   # every demonstration token once
        if budget == 50:   # the longest row sets the budget when it exceeds it (it gets a micro-batch of its own)
            effective = max(budget, max(len(r) - 1 for r in kept.ids))
            assert len(mbs) >= 3 and mbs[-1].num_tokens < effective
    hand = hand_grad(tr, kept, lambda terms: -sum(t[0].sum() for t in terms) / n_demo)
    close(grads[50], hand)
    close(grads[4096], hand)
    close(grads[50], grads[4096], rtol=1e-5)
