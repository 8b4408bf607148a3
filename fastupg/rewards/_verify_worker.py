"""Worker process of the math verifier: JSON lines in ({"g": gold, "a": answer}), JSON lines out.

Started by fastupg.rewards.math (`python -m fastupg.rewards._verify_worker`); the parent kills
and replaces it when a check overruns its deadline, so math-verify's own signal-based timeouts
are switched off here (they only work in a main thread and would fight the parent's deadline).
"""
from __future__ import annotations

import json
import logging
import re
import sys
import warnings


def _parse(parse, s: str):
    # drop math-delimiting `$`, but keep an escaped `\$` (currency) whole: "12.50\$" stays itself
    s = re.sub(r"(?<!\\)\$+$", "", re.sub(r"^\$+", "", s.strip())).strip()
    s = s.replace("°", "^{\\circ}")  # math-verify cannot read the unicode degree sign
    # as a boxed expression first: the LaTeX extractor then takes the whole string as the answer
    got = parse("$\\boxed{" + s + "}$", parsing_timeout=None)
    if not got:
        got = parse(s, parsing_timeout=None)
    return got


def check(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    pg = _parse(parse, gold)
    pa = _parse(parse, answer)
    if not pg or not pa:
        return False
    return bool(verify(pg, pa, timeout_seconds=None))


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)
    import math_verify  # noqa: F401  (import cost paid before "ready")

    # warm sympy/latex2sympy so the first real check is not charged with lazy imports
    try:
        check("\\frac{1}{2}", "0.5")
    except Exception:
        pass
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            r = check(str(req["g"]), str(req["a"]))
        except Exception:
            r = False
        out.write(json.dumps({"r": bool(r)}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
