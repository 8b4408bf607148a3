"""`fastupg train|eval|bench`.

    python -m fastupg train --config configs/demo.yaml learning_rate=3e-4 max_steps=20
    torchrun --nproc-per-node 8 -m fastupg train --config configs/hpt-paper.yaml model=Qwen/Qwen2.5-Math-1.5B ...
    python -m fastupg eval --model runs/demo/checkpoint-60 --data MATH-500.json --out results/
    python -m fastupg bench [logits|fused_linear|long_context] [extra args for the benchmark script]
    python -m fastupg data --config my-data.yaml train_file=train.parquet   # what training would keep, and why not
    python -m fastupg plan --config configs/qwen2.5-math-7b-hpt.yaml [--gpus 8 --gpu-gb 80] [key=value ...]

`train` parses and validates the whole configuration (unknown keys, wrong types, impossible
combinations), then `preflight` checks what needs the file system (model folder, data files, an
output_dir holding a previous run, the resume checkpoint, vLLM importable), all before anything is
loaded or launched; `--print-config` shows the result and exits. Every CLI error is one line on stderr
and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from fastupg.rollout.vllm import importable

REPO = Path(__file__).resolve().parent.parent
BENCHES = {"logits": "bench_logits.py", "fused_linear": "bench_fused_linear.py", "long_context": "bench_long_context.py"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (and exit 2), like every other CLI error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastupg", description="Unified policy-gradient estimator and HPT trainer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a YAML recipe plus key=value overrides")
    t.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml); required to train")
    t.add_argument("--print-config", action="store_true", help="print the validated configuration and exit")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (fastupg/config.py names); --key=value and --key value work too")
    d = sub.add_parser("data", help="dry run of the data: load, render and tokenize as `train` would, print "
                       "the columns found, the usable rows and the rows dropped per reason (exit 2: none usable)")
    d.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (fastupg/config.py names)")
    e = sub.add_parser("eval", help="held-out benchmark evaluation (fastupg.evaluate)", add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    pl = sub.add_parser("plan", help="per-GPU memory budget of a recipe (fastupg.plan); loads nothing",
                        add_help=False)
    pl.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="run a kernel benchmark script from benchmarks/")
    b.add_argument("which", nargs="?", default="logits", choices=sorted(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    return p


_TRAIN_OPTIONS = ("--config", "--print-config", "-h", "--help")


def _train_argv(argv: Sequence[str]) -> list[str]:
    """`--max_steps=5` and `--max_steps 5` mean `max_steps=5` (HF/TRL users type them that way)."""
    argv, out, i = list(argv), [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if not a.startswith("--") or name in _TRAIN_OPTIONS:
            out.append(a)
            if a == "--config" and i + 1 < len(argv):  # its value is the next word
                out.append(argv[i + 1])
                i += 1
        elif "=" in a:
            out.append(a[2:])
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{a[2:]}={argv[i + 1]}")
            i += 1
        else:
            out.append(a)               # a lone --flag: argparse names it
        i += 1
    return out


def parse_train(argv: Sequence[str]):
    """`train` arguments -> (validated TrainConfig, print_config flag). Raises ValueError/TypeError."""
    from fastupg.config import load_config
    args = parse_args(["train", *argv])
    return load_config(args.config, args.overrides), args.print_config


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Like build_parser().parse_args, but `eval`/`bench` hand everything after them to their own parser
    (argparse's REMAINDER does not capture leading --options), and `train` takes --key=value overrides."""
    argv = list(argv)
    if argv and argv[0] == "plan":
        args = build_parser().parse_args(["plan"])
        args.rest = argv[1:]
        return args
    if argv and argv[0] in ("eval", "bench"):
        args = build_parser().parse_args(argv[:1] + (argv[1:2] if argv[0] == "bench" and len(argv) > 1
                                                      and not argv[1].startswith("-") else []))
        args.rest = argv[1 + (args.command == "bench" and len(argv) > 1 and not argv[1].startswith("-")):]
        return args
    if argv and argv[0] == "train":
        argv = ["train", *_train_argv(argv[1:])]
    return build_parser().parse_args(argv)


def preflight(cfg, config_given: bool) -> None:
    """Every check that needs the file system or the environment, before anything is loaded or launched.
    Raises ValueError with one line naming the key."""
    from fastupg import checkpoint as ckpt
    from fastupg.config import check_data_path, check_model_path
    if not config_given:
        raise ValueError("no --config: name a recipe, e.g. --config configs/demo.yaml (key=value overrides "
                         "go on top of it; --print-config shows the defaults)")
    for i, sc in enumerate(cfg.stage_configs()):
        where = f"stages[{i}]." if cfg.stages else ""
        check_model_path(where + "model", sc.model)
        if sc.model != "embedded" and sc.train_file is None:
            raise ValueError(f"{where}model={sc.model!r} needs train_file= (prompts with answers and, for SFT/HPT, "
                             f"demonstrations); only model=embedded brings its own data")
        if sc.model != "embedded" and sc.eval_steps and sc.eval_file is None:
            raise ValueError(f"{where}eval_steps={sc.eval_steps} asks for held-out evaluation but eval_file is not "
                             f"set: give eval_file=..., or eval_steps=0")
        check_data_path(where + "train_file", sc.train_file)
        check_data_path(where + "eval_file", sc.eval_file)
        if sc.rollout_engine == "vllm" and not importable("vllm"):
            raise ValueError(f"{where}rollout_engine='vllm' but vLLM is not importable: pip install -e '.[vllm]' "
                             f"(on a CUDA machine), or use rollout_engine=hf")
    ckpt.check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite_output_dir)
    if not cfg.stages:
        from fastupg.optim import lr_lambda
        ckpt.check_resume(cfg, ckpt.resolve_resume(cfg.resume, cfg.output_dir), lr_lambda)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.command == "train":
        from fastupg.config import fit_model_positions, load_config
        try:
            cfg = fit_model_positions(load_config(args.config, args.overrides), local_only=True)  # (its config.json)
            if not args.print_config:
                preflight(cfg, config_given=args.config is not None)
        except (ValueError, TypeError) as e:
            print(f"fastupg train: invalid configuration: {e}", file=sys.stderr)
            return 2
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        from fastupg import distributed as D
        from fastupg.data.datasets import DataError
        from fastupg.trainer import train
        info = D.init()
        try:
            train(cfg, info)
        except DataError as e:  # raised before the model is loaded
            print(f"fastupg train: {_one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("[fastupg] interrupted", file=sys.stderr)
            return 130
        finally:
            D.shutdown()
        return 0
    if args.command == "data":
        from fastupg.config import load_config
        try:
            return data_dry_run(load_config(args.config, args.overrides))
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            print(f"fastupg data: {_one_line(e)}", file=sys.stderr)
            return 2
    if args.command == "eval":
        from fastupg.evaluate import add_eval_args, check_args, run_eval  # lazy: pulls in datasets / math-verify
        ep = add_eval_args(_Parser(prog="fastupg eval"))
        ns = ep.parse_args(args.rest)
        try:
            check_args(ns)               # before any model or data is loaded
            run_eval(ns)
        except ValueError as e:          # bad data or settings found while loading: still one line
            print(f"fastupg eval: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "plan":
        from fastupg.plan import main as plan_main
        return plan_main(args.rest)
    if args.command == "bench":
        script = REPO / "benchmarks" / BENCHES[args.which]
        if not script.is_file():
            print(f"fastupg bench: {script} is not there (benchmarks are optional)", file=sys.stderr)
            return 2
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.call([sys.executable, str(script), *args.rest], env=env)
    return 2


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split("\n"))


def data_dry_run(cfg, log=print) -> int:
    """`fastupg data`: each stage's train (and eval) data through the very function training uses
    (fastupg.loading.load_data), with the same tokenizer, printing what is kept and dropped. Returns 0;
    raises DataError (exit 2) when a column is missing or no row is usable."""
    from transformers import AutoTokenizer
    from fastupg import distributed as D
    from fastupg.loading import load_data, resolve_paths
    info, seen = D.DistInfo(), set()
    stages = cfg.stage_configs()
    for i, sc in enumerate(stages):
        est = sc.estimator()
        need_demo, need_answer = est.offline is not None, est.online is not None
        paths = resolve_paths(sc, info)  # builds the embedded task and model once, as `train` does
        key = (paths, need_demo, need_answer, sc.max_prompt_length, sc.max_completion_length, sc.system_prompt,
               tuple(sorted(sc.column_keys().items())), sc.eval_steps > 0)
        if key in seen:
            continue
        seen.add(key)
        if len(stages) > 1:
            log(f"[fastupg] stage {i + 1}/{len(stages)}: loss_type={sc.loss_type}")
        tokenizer = AutoTokenizer.from_pretrained(paths.model)
        embedded = cfg.model == "embedded"
        load_data(paths.train_file, tokenizer, sc, embedded, need_demo, need_answer, log)
        if paths.eval_file and sc.eval_steps:
            load_data(paths.eval_file, tokenizer, sc, embedded, False, log=log)
    return 0
