"""The embedded default task: multi-step integer arithmetic, its verifier, tokenizer and tiny model."""
from .arith import LEVELS, ArithConfig, generate_splits, make_problem, read_jsonl, write_jsonl, write_splits
from .verifier import arith_reward, last_boxed

__all__ = ["LEVELS", "ArithConfig", "generate_splits", "make_problem", "read_jsonl", "write_jsonl",
           "write_splits", "arith_reward", "last_boxed"]
