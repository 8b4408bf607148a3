"""Does one small gradient step of the trainer move the policy the way the advantages say?

    python scripts/check_rl_direction.py --config configs/grpo.yaml [key=value ...] [--lr 2e-3] [--batches 2]

Builds a `fastupg.trainer.Trainer` from the config, and for a few real batches (rollouts, verifier, routing,
packing, token weights: the trainer's own functions) takes the gradient of the step's loss (`StepLoss.run`),
moves the parameters by -lr * grad (plain SGD, first order), recomputes the log-probs of the same tokens and
restores the parameters. With a right sign and a right row/token alignment, the weighted log-probs of
positive-advantage tokens go up and those of negative-advantage tokens go down. Prints both sums per batch and
exits 1 when a batch goes the wrong way. (docs/reproduce.md uses it to tell an RL bug from an unstable learning rate.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastupg import distributed as D  # noqa: E402
from fastupg.config import load_config  # noqa: E402
from fastupg.data.packing import micro_batches  # noqa: E402
from fastupg.hpt import keep_rows  # noqa: E402
from fastupg.routing import token_weigher  # noqa: E402
from fastupg.trainer import Trainer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--lr", type=float, default=2e-3, help="SGD step (small: the check is first order)")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides + ["output_dir=/tmp/fastupg-check-rl-direction", "resume=false",
                                               "overwrite_output_dir=true", "eval_steps=0", "plot=false"])
    torch.manual_seed(cfg.seed)
    info = D.init()
    tr = Trainer(cfg, info)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    ok = True
    for b in range(a.batches):
        rows, _ = tr.build_rows(tr.next_prompts())
        kept = rows.select(keep_rows(rows.weight))
        mbs = micro_batches(kept, cfg.max_tokens_per_microbatch, token_weigher(tr.est, cfg, kept, info), info.device)
        _, before = tr.loss.run(mbs, len(mbs), None, grad=False)
        tr.model.zero_grad(set_to_none=True)
        tr.loss.run(mbs, len(mbs), None, grad=True)
        grads = [p.grad.clone() if p.grad is not None else None for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= a.lr * g
        _, after = tr.loss.run(mbs, len(mbs), None, grad=False)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p += a.lr * g
        d = torch.cat([x - y for x, y in zip(after, before)])
        A = torch.cat([m.adv for m in mbs])
        w = torch.cat([m.weight for m in mbs])
        up, down = float((w * d)[A > 0].sum()), float((w * d)[A < 0].sum())
        good = (up > 0 or not bool((A > 0).any())) and (down < 0 or not bool((A < 0).any()))
        ok &= bool(good)
        print(f"batch {b}: reward {float(rows.reward.mean()):.3f}  sum w*dlogp over A>0 tokens {up:+.3e}  "
              f"over A<0 tokens {down:+.3e}  {'ok' if good else 'WRONG DIRECTION'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
