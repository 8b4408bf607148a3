"""`fastupg train|eval|bench`.

    python -m fastupg train --config configs/demo.yaml learning_rate=3e-4 max_steps=20
    torchrun --nproc-per-node 8 -m fastupg train --config configs/hpt-paper.yaml model=Qwen/Qwen2.5-Math-1.5B ...
    python -m fastupg eval --model runs/demo/checkpoint-60 --data MATH-500.json --out results/
    python -m fastupg bench [logits|fused_linear] [extra args for the benchmark script]

`train` parses and validates the whole configuration (unknown keys, wrong types, impossible
combinations) before anything is loaded or launched; `--print-config` shows the result and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
BENCHES = {"logits": "bench_logits.py", "fused_linear": "bench_fused_linear.py"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastupg", description="Unified policy-gradient estimator and HPT trainer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a YAML recipe plus key=value overrides")
    t.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    t.add_argument("--print-config", action="store_true", help="print the validated configuration and exit")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (fastupg/config.py names)")
    e = sub.add_parser("eval", help="held-out benchmark evaluation (fastupg.evaluate)", add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="run a kernel benchmark script from benchmarks/")
    b.add_argument("which", nargs="?", default="logits", choices=sorted(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def parse_train(argv: Sequence[str]):
    """`train` arguments -> (validated TrainConfig, print_config flag). Raises ValueError/TypeError."""
    from fastupg.config import load_config
    args = build_parser().parse_args(["train", *argv])
    return load_config(args.config, args.overrides), args.print_config


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Like build_parser().parse_args, but `eval`/`bench` hand everything after them to their own parser
    (argparse's REMAINDER does not capture leading --options)."""
    argv = list(argv)
    if argv and argv[0] in ("eval", "bench"):
        args = build_parser().parse_args(argv[:1] + (argv[1:2] if argv[0] == "bench" and len(argv) > 1
                                                      and not argv[1].startswith("-") else []))
        args.rest = argv[1 + (args.command == "bench" and len(argv) > 1 and not argv[1].startswith("-")):]
        return args
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.command == "train":
        from fastupg.config import fit_model_positions, load_config
        try:
            cfg = fit_model_positions(load_config(args.config, args.overrides), local_only=True)  # (its config.json)
        except (ValueError, TypeError) as e:
            print(f"fastupg train: invalid configuration: {e}", file=sys.stderr)
            return 2
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        from fastupg import distributed as D
        from fastupg.trainer import train
        info = D.init()
        try:
            train(cfg, info)
        except KeyboardInterrupt:
            print("[fastupg] interrupted", file=sys.stderr)
            return 130
        finally:
            D.shutdown()
        return 0
    if args.command == "eval":
        from fastupg.evaluate import add_eval_args, run_eval  # lazy: pulls in datasets / math-verify
        ep = add_eval_args(argparse.ArgumentParser(prog="fastupg eval"))
        run_eval(ep.parse_args(args.rest))
        return 0
    if args.command == "bench":
        script = REPO / "benchmarks" / BENCHES[args.which]
        if not script.is_file():
            print(f"fastupg bench: {script} is not there (benchmarks are optional)", file=sys.stderr)
            return 2
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.call([sys.executable, str(script), *args.rest], env=env)
    return 2
