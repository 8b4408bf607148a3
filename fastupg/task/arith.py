"""The embedded reasoning task: multi-step integer arithmetic with worked solutions.

Each example is a dict

    {"prompt": "What is 3+5-2?", "solution": "3+5=8\\n8-2=6\\n\\boxed{6}", "answer": "6", "difficulty": 1}

The solution evaluates one operation per line (multiplications first, then left to right) and
ends with ``\\boxed{ANSWER}``; :func:`fastupg.task.verifier.arith_reward` scores a response
against ``answer``.

Difficulty levels (see docs/embedded_task.md for why this mix):

- 1 (easy): three one-digit operands, ``+``/``-``, every intermediate result one digit
  in 0..9 (1210 distinct problems). Every step is a one-token lookup in a 110-entry table seen
  many times in training, so a tiny model learns it in minutes and can then improve on it by
  RL alone.
- 2 (medium): three operands of one or two digits (at least one of two), ``+``/``-``: needs multi-digit
  carries; reachable with demonstrations, rarely by chance.
- 3 (hard): four operands of up to three digits (at least one of three) with ``*``: out of a tiny model's reach
  without demonstrations (and mostly with them, in a CPU-minutes budget).

Generation is deterministic from a seed. Train and held-out splits never share a prompt.
No spaces in the text: every character is one token for the embedded tokenizer, and short
sequences are what makes the CPU demo fast.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Level:
    n_operands: int
    min_digits: int
    max_digits: int
    ops: str            # operators to draw from, e.g. "+-" or "+-*"
    # every intermediate and final result must lie in this range (None: no limit); the easy
    # level keeps all results one non-negative digit so each step is a single-token lookup
    result_range: tuple[int, int] | None = None


LEVELS: dict[int, Level] = {
    1: Level(n_operands=2, min_digits=1, max_digits=1, ops="+-", result_range=(0, 9)),
    2: Level(n_operands=3, min_digits=1, max_digits=1, ops="+-", result_range=(0, 9)),
    3: Level(n_operands=4, min_digits=1, max_digits=1, ops="+-", result_range=(0, 9)),
    4: Level(n_operands=3, min_digits=1, max_digits=2, ops="+-"),
    5: Level(n_operands=4, min_digits=1, max_digits=3, ops="+-*"),
}


def level_name(difficulty: int) -> str:
    """A short description of a level, for plots and tables: "3 operands", "3 operands, 1-2 digits, +-"."""
    lv = LEVELS[difficulty]
    digits = "" if lv.max_digits == 1 else f", {lv.min_digits}-{lv.max_digits} digits"
    return f"{lv.n_operands} operands{digits}" + (f", {lv.ops}" if "*" in lv.ops else "")


def check_mix(mix, name: str) -> None:
    """A difficulty mix ((difficulty, weight), ...): at least one known level, every weight > 0."""
    if not mix:
        raise ValueError(f"{name} must name at least one difficulty")
    for d, w in mix:
        if d not in LEVELS:
            raise ValueError(f"{name}: unknown difficulty {d!r}; known: {sorted(LEVELS)}")
        if not w > 0:
            raise ValueError(f"{name}: weight of difficulty {d} must be > 0, got {w}")


@dataclass(frozen=True)
class ArithConfig:
    """How many problems of which difficulty; ``mix`` is ((difficulty, weight), ...)."""
    seed: int = 0
    n_train: int = 1500
    n_eval: int = 300
    # level 2 has only 1210 distinct problems: 0.6 * (1500 + 300) = 1080 of them are used
    mix: tuple[tuple[int, float], ...] = ((2, 0.6), (3, 0.4))

    def __post_init__(self):
        if self.n_train < 0 or self.n_eval < 0:
            raise ValueError(f"ArithConfig: n_train/n_eval must be >= 0, got {self.n_train}/{self.n_eval}")
        check_mix(self.mix, "ArithConfig.mix")


def _operand(rng: random.Random, level: Level, digits: int | None = None) -> int:
    digits = digits if digits is not None else rng.randint(level.min_digits, level.max_digits)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10 ** digits - 1)


def solve_steps(operands: Sequence[int], ops: Sequence[str]) -> tuple[list[str], int]:
    """Evaluate with the usual precedence (``*`` first, then left to right), one line per operation."""
    if len(ops) != len(operands) - 1:
        raise ValueError(f"need len(ops) == len(operands) - 1, got {len(ops)} and {len(operands)}")
    vals, ops = list(operands), list(ops)
    steps: list[str] = []
    for pass_ops in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] in pass_ops:
                a, b, op = vals[i], vals[i + 1], ops[i]
                r = a * b if op == "*" else a + b if op == "+" else a - b
                steps.append(f"{a}{op}{b}={r}")
                vals[i:i + 2] = [r]
                del ops[i]
            else:
                i += 1
    return steps, vals[0]


def make_problem(rng: random.Random, difficulty: int) -> dict:
    if difficulty not in LEVELS:
        raise ValueError(f"unknown difficulty {difficulty!r}; known: {sorted(LEVELS)}")
    level = LEVELS[difficulty]
    while True:     # rejection sampling; the one-digit levels keep about 1 draw in 3 per operation
        operands = [_operand(rng, level) for _ in range(level.n_operands)]
        # one operand always has the level's full width, so no level contains another's problems
        k = rng.randrange(level.n_operands)
        operands[k] = _operand(rng, level, digits=level.max_digits)
        ops = [rng.choice(level.ops) for _ in range(level.n_operands - 1)]
        steps, value = solve_steps(operands, ops)
        if level.result_range is None or all(
                level.result_range[0] <= int(st.rsplit("=", 1)[1]) <= level.result_range[1] for st in steps):
            break
    expr = str(operands[0]) + "".join(f"{o}{v}" for o, v in zip(ops, operands[1:]))
    return {
        "prompt": f"What is {expr}?",
        "solution": "\n".join(steps) + f"\n\\boxed{{{value}}}",
        "answer": str(value),
        "difficulty": difficulty,
    }


def _counts(n: int, mix: Sequence[tuple[int, float]]) -> dict[int, int]:
    """Split n over the mix by largest remainder, so the counts always sum to n."""
    total = sum(w for _, w in mix)
    raw = [(d, n * w / total) for d, w in mix]
    counts = {d: int(x) for d, x in raw}
    rest = n - sum(counts.values())
    for d, x in sorted(raw, key=lambda dx: dx[1] - int(dx[1]), reverse=True)[:rest]:
        counts[d] += 1
    return counts


def generate_splits(cfg: ArithConfig = ArithConfig()) -> tuple[list[dict], list[dict]]:
    """(train, held_out): deterministic from cfg.seed, no prompt in both, no duplicate prompt in either."""
    train_n, eval_n = _counts(cfg.n_train, cfg.mix), _counts(cfg.n_eval, cfg.mix)
    # one stream per difficulty, so changing one level's count leaves the others' problems alone;
    # held-out problems are drawn first, so they do not depend on n_train
    rngs = {d: random.Random(f"fastupg-arith-{cfg.seed}-{d}") for d, _ in cfg.mix}
    seen: set[str] = set()

    def draw(d: int, k: int) -> list[dict]:
        rows: list[dict] = []
        tries = 0
        while len(rows) < k:
            tries += 1
            if tries > 50 * k + 1000:
                raise ValueError(f"difficulty {d} has too few distinct problems for the requested count")
            ex = make_problem(rngs[d], d)
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                rows.append(ex)
        return rows

    held = [ex for d, _ in cfg.mix for ex in draw(d, eval_n[d])]
    train = [ex for d, _ in cfg.mix for ex in draw(d, train_n[d])]
    random.Random(f"fastupg-arith-shuffle-{cfg.seed}").shuffle(train)
    # held-out rows mixed too, so that its first N rows (the trainer's eval_samples) keep the mix
    random.Random(f"fastupg-arith-shuffle-held-{cfg.seed}").shuffle(held)
    return train, held


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_splits(out_dir: str | os.PathLike, cfg: ArithConfig = ArithConfig()) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl into out_dir; returns {"train": path, "eval": path}."""
    train, held = generate_splits(cfg)
    out = Path(out_dir)
    return {"train": write_jsonl(train, out / "train.jsonl"), "eval": write_jsonl(held, out / "eval.jsonl")}
