"""Exact verifier for the embedded arithmetic task (no sympy: it is called thousands of times a step)."""
from __future__ import annotations

import re

_BOX = "\\boxed{"
_INT = re.compile(r"[+-]?[0-9]+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None when absent or unclosed."""
    start = text.rfind(_BOX)
    if start < 0:
        return None
    i = start + len(_BOX)
    depth = 1
    # find the matching brace; str.find hops over plain text instead of stepping char by char
    while True:
        o, c = text.find("{", i), text.find("}", i)
        if c < 0:
            return None
        if 0 <= o < c:
            depth += 1
            i = o + 1
        else:
            depth -= 1
            if depth == 0:
                return text[start + len(_BOX):c]
            i = c + 1


def _as_int(s: str) -> int | None:
    s = s.replace(" ", "")
    return int(s) if _INT.fullmatch(s) else None


def arith_reward(response: str, gold: str) -> float:
    """1.0 when the last ``\\boxed{}`` of `response` holds the integer `gold`, else 0.0.

    Spaces are ignored on both sides; a leading ``+`` is accepted. Anything that is not a plain
    integer (fractions, words, nested boxes, ``1,000``) scores 0.0. Raises ValueError when `gold`
    itself is not an integer: that is a data bug, not a wrong answer.
    """
    g = _as_int(str(gold))
    if g is None:
        raise ValueError(f"arith_reward: gold answer must be an integer, got {gold!r}")
    content = last_boxed(response)
    if content is None:
        return 0.0
    v = _as_int(content)
    return 1.0 if v is not None and v == g else 0.0
