"""Rule-based 0/1 verifier for math answers (docs/math.md §3).

    math_reward(response, gold, timeout_s=5.0) -> 1.0 | 0.0
    math_rewards(responses, golds, timeout_s=5.0, num_workers=None) -> list[float]

Pipeline for one (response, gold):

1. take the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) of the response, braces balanced; no box
   (or an unbalanced one) scores 0;
2. gold is a letter A-D (GPQA): compare with the boxed letter, or else the last "answer is (C)";
3. cheap normalised string match (``\\dfrac`` -> ``\\frac``, ``\\left(`` -> ``(``, ``\\text{}``,
   degrees, percent, thousands separators, ``$``, spaces ...): equal strings score 1 at once;
4. otherwise symbolic equivalence with math-verify, gold first:
   ``verify(parse(gold), parse(answer))``.

Step 4 runs in a persistent pool of worker *subprocesses* (``python -m
fastupg.rewards._verify_worker``) with a per-call deadline. math-verify's own timeout uses
``signal.alarm`` and works only in the main thread, so we switch it off (``parsing_timeout=None``,
``timeout_seconds=None``) and bound the call from outside: a worker that overruns is killed and
replaced and the answer scores 0. Plain ``subprocess`` pipes (not ``multiprocessing``) are used
so that the verifier also works from threads, from daemonic worker processes (which may not
start ``multiprocessing`` children) and after ``fork``: each process owns its own pool.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "VerifierConfig",
    "extract_last_boxed",
    "extract_choice_letter",
    "normalize_answer",
    "math_reward",
    "math_rewards",
    "shutdown_verifier_pool",
]


@dataclass(frozen=True)
class VerifierConfig:
    timeout_s: float = 5.0             # wall-clock bound of one symbolic check
    max_answer_chars: int = 2000       # longer extracted answers score 0 without a symbolic check
    num_workers: int | None = None     # subprocess pool size; None: min(8, cpu count)
    startup_timeout_s: float = 120.0   # a worker must import math-verify/sympy within this

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"VerifierConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_answer_chars < 1:
            raise ValueError(f"VerifierConfig.max_answer_chars must be >= 1, got {self.max_answer_chars}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"VerifierConfig.num_workers must be >= 1 or None, got {self.num_workers}")


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in `text`.

    Returns None when there is no box or the last box's braces never balance. Linear time:
    one ``rfind`` per command and one forward scan.
    """
    if not isinstance(text, str):
        raise TypeError(f"response must be str, got {type(text).__name__}")
    start = -1
    cmd_len = 0
    for cmd in _BOX_COMMANDS:
        i = text.rfind(cmd)
        # `\boxed` must not be the prefix of a longer command name (e.g. a user macro \boxedx)
        while i >= 0:
            j = i + len(cmd)
            if j >= len(text) or not text[j].isalpha():
                break
            i = text.rfind(cmd, 0, i)
        if i > start:
            start, cmd_len = i, len(cmd)
    if start < 0:
        return None
    i = start + cmd_len
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        # `\boxed 5` form: the argument runs to the next whitespace, `$` or end
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    j = i
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2  # `\{`, `\}` are literal braces (sets), `\\` a line break: skip the pair
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None  # unbalanced


_CHOICE_IN_BOX = re.compile(r"^\s*(?:\\text\{|\\textbf\{|\\mathrm\{)?\s*\(?\s*([A-Ja-j])(?![A-Za-z0-9])")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:\s]*\**\s*\(?\s*\$?\s*(?:\\text\{|\\textbf\{)?\(?([A-J])\)?\b", re.I)


def extract_choice_letter(response: str) -> str | None:
    """Multiple-choice letter of a response: the last box's letter, else the last 'answer is (C)'."""
    boxed = extract_last_boxed(response)
    if boxed is not None:
        m = _CHOICE_IN_BOX.match(boxed)
        if m:
            return m.group(1).upper()
    last = None
    for m in _ANSWER_IS.finditer(response):
        last = m
    return last.group(1).upper() if last else None


# --------------------------------------------------------------------------------------------
# cheap normalisation (conservative: two different answers must never normalise equal)
# --------------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|operatorname|mbox)\s*\{([^{}]*)\}")
_UNIT_WORDS = (
    "cm", "m", "km", "mm", "inches", "inch", "in", "feet", "foot", "ft", "yards", "yard", "miles", "mile",
    "units", "unit", "degrees", "degree", "meters", "meter", "seconds", "second", "sec", "minutes",
    "minute", "min", "hours", "hour", "days", "day", "dollars", "dollar", "cents", "cent", "kg", "g",
    "grams", "gram", "pounds", "pound", "lbs", "square", "sq", "cubic", "mph", "km/h", "m/s", "points",
)
_UNITS_RE = "|".join(re.escape(u) for u in sorted(_UNIT_WORDS, key=len, reverse=True))
_BARE_UNITS_RE = "|".join(re.escape(u) for u in sorted((u for u in _UNIT_WORDS if len(u) > 1), key=len, reverse=True))
# "5 \text{cm}", "5\,\mathrm{m}^2", "12 inches": a number followed by a unit word. A bare
# single-letter word is NOT a unit ("2 m" may be 2*m): single letters count only inside \text{}.
_UNIT_TAIL = re.compile(
    r"^(?P<num>[+-]?\d+(?:\.\d+)?)\s*(?:\\,|\\;|~|\s)*(?:"
    r"\\(?:text|mbox|mathrm)\{\s*(?:" + _UNITS_RE + r")(?:\s+(?:" + _UNITS_RE + r"))?\s*\}"
    r"|(?<=[\s,;~])(?:" + _BARE_UNITS_RE + r")(?:\s+(?:" + _BARE_UNITS_RE + r"))?"
    r")(?:\^\{?[23]\}?)?$"
)


def normalize_answer(s: str) -> str:
    """Cheap canonical form of an answer string, for the fast exact-match path."""
    s = s.strip()
    # the whole answer wrapped in $...$ or \( \) / \[ \]
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"^\\[\(\[]|\\[\)\]]$", "", s).strip()
    m = _UNIT_TAIL.match(s)
    if m:
        s = m.group("num")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)     # not \leftarrow
    s = re.sub(r"\\[!,;:]|~|\\ ", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "")
    for _ in range(3):  # nested \text{\textbf{..}}
        s2 = _TEXT_CMD.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    s = s.strip().rstrip(".").strip()
    if _THOUSANDS.match(s.replace(" ", "")):
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    # a plain number: canonical decimal form ("4.0" == "4", "0.50" == ".5")
    if re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)", s):
        try:
            from decimal import Decimal

            d = Decimal(s).normalize()
            s = format(d, "f")
        except Exception:
            pass
    return s


def _strip_gold(gold: str) -> str:
    """Gold answers sometimes come boxed (`\\boxed{204}`) or in `$...$`: keep the content."""
    g = gold.strip()
    if "\\boxed" in g or "\\fbox" in g:
        inner = extract_last_boxed(g)
        if inner is not None:
            g = inner
    return _sci_to_latex(g)


_SCI = re.compile(r"^\s*\$?\s*([+-]?\d+(?:\.\d+)?)\s*[eE]\s*([+-]?\d+)\s*\$?\s*$")


def _sci_to_latex(s: str) -> str:
    """`4.5e33` (Minerva golds) -> `4.5\\times10^{33}`: math-verify would read e as Euler's number."""
    m = _SCI.match(s)
    return f"{m.group(1)}\\times10^{{{m.group(2)}}}" if m else s


# "(C) 12", "\\textbf{(C) }12", "\\text{(C)}\\ 12": an AMC-style choice label before the value
_CHOICE_LABEL = re.compile(
    r"^\s*(?:\\text(?:bf)?\{\s*\(\s*[A-E]\s*\)\s*\}|\\text(?:bf)?\{\s*\(\s*[A-E]\s*\)\s*|\(\s*[A-E]\s*\))"
    r"(?P<close>\})?(?:\\[ ,;:!]|~|\s)*(?=\S)"
)


def _strip_choice_label(ans: str) -> str:
    m = _CHOICE_LABEL.match(ans)
    if not m:
        return ans
    rest = ans[m.end():]
    # `\\textbf{(C) 12}`: the label opened a \\text group that closes after the value
    if ans.lstrip().startswith("\\text") and m.group("close") is None and "}" not in m.group(0):
        if rest.endswith("}"):
            rest = rest[:-1]
    return rest.strip() or ans


_CHOICE_GOLD = re.compile(r"^\s*\(?\s*([A-J])\s*\)?\s*$")


def _choice_gold(gold: str) -> str | None:
    g = _TEXT_CMD.sub(r"\1", gold.strip().strip("$"))
    m = _CHOICE_GOLD.match(g)
    return m.group(1) if m else None


def _is_plain_text(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z '\-]+", s)) and len(s) >= 2


# --------------------------------------------------------------------------------------------
# subprocess pool for the symbolic check
# --------------------------------------------------------------------------------------------

class _Worker:
    """One `python -m fastupg.rewards._verify_worker` child speaking JSON lines."""

    def __init__(self, startup_timeout_s: float):
        env = dict(os.environ)
        # the child imports fastupg from wherever this package lives, installed or not
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "fastupg.rewards._verify_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, close_fds=True,
        )
        line = self._readline(startup_timeout_s)
        if line is None or json.loads(line).get("ready") is not True:
            self.kill()
            raise RuntimeError("math verifier worker failed to start (is math-verify installed?)")

    def _readline(self, timeout_s: float) -> bytes | None:
        out = self.proc.stdout
        ready, _, _ = select.select([out], [], [], timeout_s)
        if not ready:
            return None
        line = out.readline()
        return line or None

    def check(self, gold: str, answer: str, timeout_s: float) -> bool | None:
        """True/False, or None when the deadline passed (the worker is then dead)."""
        try:
            self.proc.stdin.write((json.dumps({"g": gold, "a": answer}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return None
        line = self._readline(timeout_s)
        if line is None:
            self.kill()
            return None
        try:
            return bool(json.loads(line)["r"])
        except (ValueError, KeyError):
            self.kill()
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    """Idle workers in a list; a caller borrows one, or starts one while below the size cap."""

    def __init__(self, size: int, startup_timeout_s: float):
        self.size = size
        self.startup_timeout_s = startup_timeout_s
        self.pid = os.getpid()
        self._idle: list[_Worker] = []
        self._count = 0
        self._cv = threading.Condition()

    def _borrow(self) -> _Worker:
        with self._cv:
            while True:
                while self._idle:
                    w = self._idle.pop()
                    if w.alive():
                        return w
                    self._count -= 1
                if self._count < self.size:
                    self._count += 1
                    break
                self._cv.wait()
        try:
            return _Worker(self.startup_timeout_s)
        except BaseException:
            with self._cv:
                self._count -= 1
                self._cv.notify()
            raise

    def _give_back(self, w: _Worker) -> None:
        with self._cv:
            if w.alive():
                self._idle.append(w)
            else:
                self._count -= 1
            self._cv.notify()

    def check(self, gold: str, answer: str, timeout_s: float) -> bool:
        w = self._borrow()
        try:
            r = w.check(gold, answer, timeout_s)
        finally:
            self._give_back(w)  # a killed worker is dropped; the next borrow starts a fresh one
        return bool(r)

    def close(self) -> None:
        with self._cv:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for w in idle:
            w.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool(cfg: VerifierConfig) -> _Pool:
    global _POOL
    size = cfg.num_workers or min(8, os.cpu_count() or 1)
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            # after fork the parent's pipes are not ours: start a pool of our own
            _POOL = _Pool(size, cfg.startup_timeout_s)
        elif size > _POOL.size:
            _POOL.size = size
        return _POOL


def shutdown_verifier_pool() -> None:
    """Kill the idle verifier workers of this process (they restart on the next call)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
        _POOL = None


atexit.register(shutdown_verifier_pool)


def _forget_pool_after_fork() -> None:
    # the parent's workers and locks are not ours (a lock held by another thread at fork time
    # would never be released here): start from nothing, a pool is made on first use
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def _fast_score(response: str, gold: str, cfg: VerifierConfig) -> tuple[float | None, str, str]:
    """(score, gold, answer): score is None when the symbolic check must decide."""
    if not isinstance(gold, str):
        raise TypeError(f"gold must be str, got {type(gold).__name__}")
    letter = _choice_gold(gold)
    if letter is not None:
        got = extract_choice_letter(response)
        return (1.0 if got == letter else 0.0), gold, ""
    answer = extract_last_boxed(response)
    if answer is None or not answer.strip():
        return 0.0, gold, ""
    if len(answer) > cfg.max_answer_chars:
        return 0.0, gold, answer
    g = _strip_gold(gold)
    if not g:
        raise ValueError("gold answer is empty")
    if not _CHOICE_LABEL.match(g):   # a gold that itself starts with "(A)" keeps the answer's label
        answer = _strip_choice_label(answer)
    answer = _sci_to_latex(answer)
    ng, na = normalize_answer(g), normalize_answer(answer)
    if ng == na:
        return 1.0, g, answer
    if _is_plain_text(ng) and _is_plain_text(na):
        # word answers ("Evelyn", "yes"): math-verify would read them as products of symbols
        return (1.0 if ng.lower() == na.lower() else 0.0), g, answer
    return None, g, answer


def _config(timeout_s: float, num_workers: int | None = None) -> VerifierConfig:
    return VerifierConfig(timeout_s=float(timeout_s), num_workers=num_workers)


def math_reward(response: str, gold: str, timeout_s: float = 5.0) -> float:
    """1.0 when the last boxed answer of `response` equals `gold`, else 0.0. Bounded by `timeout_s`."""
    cfg = _config(timeout_s)
    score, g, answer = _fast_score(response, gold, cfg)
    if score is not None:
        return score
    return 1.0 if _pool(cfg).check(g, answer, cfg.timeout_s) else 0.0


def math_rewards(
    responses: Sequence[str],
    golds: Sequence[str],
    timeout_s: float = 5.0,
    num_workers: int | None = None,
) -> list[float]:
    """Score a batch; the symbolic checks run in parallel on `num_workers` worker processes."""
    if len(responses) != len(golds):
        raise ValueError(f"math_rewards: {len(responses)} responses but {len(golds)} golds")
    cfg = _config(timeout_s, num_workers)
    out: list[float] = [0.0] * len(responses)
    todo: list[tuple[int, str, str]] = []
    for i, (r, g) in enumerate(zip(responses, golds)):
        score, gg, answer = _fast_score(r, g, cfg)
        if score is None:
            todo.append((i, gg, answer))
        else:
            out[i] = score
    if not todo:
        return out
    pool = _pool(cfg)
    if len(todo) == 1:
        i, g, a = todo[0]
        out[i] = 1.0 if pool.check(g, a, cfg.timeout_s) else 0.0
        return out
    with ThreadPoolExecutor(max_workers=min(pool.size, len(todo))) as ex:
        results = list(ex.map(lambda t: pool.check(t[1], t[2], cfg.timeout_s), todo))
    for (i, _, _), ok in zip(todo, results):
        out[i] = 1.0 if ok else 0.0
    return out
