#!/usr/bin/env python
"""Build the embedded task data, tokenizer and tiny model into a folder (once; cached).

    python scripts/make_tiny_model.py --out runs/embedded [--seed 0] [--size tiny]
        [--n-train 1500] [--n-eval 300] [--mix 2:0.5,3:0.5] [--base-steps -1]

--base-steps: the base pretraining (fastupg/task/base.py): -1 the size's recipe (tiny: 300 steps, a minute or
two on a CPU), 0 the random model.

Prints the folder; load with AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT/model).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastupg.task.arith import ArithConfig  # noqa: E402
from fastupg.task.tiny import SIZES, base_recipe, ensure_embedded  # noqa: E402


def parse_mix(s: str) -> tuple[tuple[int, float], ...]:
    try:
        return tuple((int(d), float(w)) for d, w in (x.split(":") for x in s.split(",")))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--mix must look like 2:0.5,3:0.5, got {s!r}") from e


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--n-train", type=int, default=ArithConfig.n_train)
    ap.add_argument("--n-eval", type=int, default=ArithConfig.n_eval)
    ap.add_argument("--mix", type=parse_mix, default=ArithConfig.mix)
    ap.add_argument("--base-steps", type=int, default=-1)
    a = ap.parse_args(argv)
    task = ArithConfig(seed=a.seed, n_train=a.n_train, n_eval=a.n_eval, mix=a.mix)
    print(ensure_embedded(a.out, seed=a.seed, size=a.size, task=task, base=base_recipe(a.size, a.base_steps),
                          log=print))


if __name__ == "__main__":
    main()
