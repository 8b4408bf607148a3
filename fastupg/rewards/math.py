"""Rule-based 0/1 verifier for math answers (docs/math.md §3; what it accepts and rejects, with
examples: docs/verifier.md).

    math_reward(response, gold, timeout_s=5.0) -> 1.0 | 0.0
    math_rewards(responses, golds, timeout_s=5.0, num_workers=None) -> list[float]

Pipeline for one (response, gold):

1. read the FINAL boxes of the response: the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces
   balanced, and the earlier boxes of the same sentence (no `.`/`!`/`?` + space, blank line or
   ``</think>`` between them); no box (or an unbalanced last one) scores 0;
2. gold is a letter A-D (GPQA): compare with the boxed letter (several different boxed letters
   score 0), or else the last "answer is (C)";
3. several distinct final answers: when the gold holds k > 1 answers they are compared as one set
   ``a, b, ...``; when it holds one, every one of them must be equivalent to it (boxing several
   candidates scores 0);
4. a number is read (``7 dollars``, ``1,000\\%``, ``\\text{12.5}``: value-preserving rewrites
   that math-verify cannot do itself, seen by steps 4 and 5), then a cheap normalised string
   match (``\\dfrac`` -> ``\\frac``, ``\\left(`` -> ``(``, ``\\text{}``, degrees, percent,
   standard-form thousands separators, ``$``, spaces ...): equal strings score 1 at once. It
   never accepts what step 5 would reject (tests/test_math_reward.py checks this);
5. otherwise symbolic equivalence with math-verify, gold first:
   ``verify(parse(gold), parse(answer))``.

Step 5 runs in a persistent pool of worker *subprocesses* (``python -m
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
    "extract_final_boxes",
    "extract_choice_letter",
    "normalize_answer",
    "gold_answer_count",
    "math_reward",
    "math_rewards",
    "shutdown_verifier_pool",
]


_MAX_FINAL_BOXES = 16   # final boxes read from one response; more candidates than this is not an answer


@dataclass(frozen=True)
class VerifierConfig:
    timeout_s: float = 5.0             # wall-clock bound of one symbolic check
    max_answer_chars: int = 2000       # longer extracted answers score 0 without a symbolic check
    num_workers: int | None = None     # subprocess pool size; None: min(8, cpu count)
    max_final_boxes: int = _MAX_FINAL_BOXES  # final boxes read from one response (the last ones)
    startup_timeout_s: float = 120.0   # a worker must import math-verify/sympy within this

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"VerifierConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_answer_chars < 1:
            raise ValueError(f"VerifierConfig.max_answer_chars must be >= 1, got {self.max_answer_chars}")
        if self.max_final_boxes < 1:
            raise ValueError(f"VerifierConfig.max_final_boxes must be >= 1, got {self.max_final_boxes}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"VerifierConfig.num_workers must be >= 1 or None, got {self.num_workers}")


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _last_box_command(text: str, end: int) -> tuple[int, int]:
    """(start, command length) of the last `\\boxed` / `\\fbox` starting before `end`; (-1, 0) if none."""
    start, cmd_len = -1, 0
    for cmd in _BOX_COMMANDS:
        i = text.rfind(cmd, 0, end)
        # `\boxed` must not be the prefix of a longer command name (e.g. a user macro \boxedx)
        while i >= 0:
            j = i + len(cmd)
            if j >= len(text) or not text[j].isalpha():
                break
            i = text.rfind(cmd, 0, i)
        if i > start:
            start, cmd_len = i, len(cmd)
    return start, cmd_len


def _box_argument(text: str, i: int, limit: int) -> tuple[str, int] | None:
    """(content, end) of the box argument starting at `i`, read no further than `limit`.

    `end` is the index just after the argument. None when the braces do not balance before
    `limit` (an unbalanced box, or a box that wraps a later one: `\\boxed{x = \\boxed{3}}`).
    """
    while i < limit and text[i] in " \t":
        i += 1
    if i >= limit:
        return None
    if text[i] != "{":
        # `\boxed 5` form: the argument runs to the next whitespace, `$` or end
        m = re.compile(r"[^\s$]+").match(text, i, limit)
        return (m.group(0), m.end()) if m else None
    depth = 0
    j = i
    while j < limit:
        c = text[j]
        if c == "\\":
            j += 2  # `\{`, `\}` are literal braces (sets), `\\` a line break: skip the pair
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j], j + 1
        j += 1
    return None


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in `text`.

    Returns None when there is no box or the last box's braces never balance. Linear time:
    one ``rfind`` per command and one forward scan.
    """
    got = _last_box(text)
    return got[1] if got else None


def _last_box(text: str):
    """(start of the last box command, its content) of `text`, or None (no box, or braces never balance)."""
    if not isinstance(text, str):
        raise TypeError(f"response must be str, got {type(text).__name__}")
    start, cmd_len = _last_box_command(text, len(text))
    if start < 0:
        return None
    got = _box_argument(text, start + cmd_len, len(text))
    return None if got is None else (start, got[0])


# Where the final sentence (or the final reasoning step) begins: `.`, `!` or `?` followed by
# whitespace (a `$`, `\\)` or `\\]` that closes math may come between), a blank line, or the end of
# a thinking block.
_SENTENCE_END = re.compile(r"[.!?](?:\$+|\\[\)\]])?(?:\s|$)|\n[ \t]*\n|</think>")


def extract_final_boxes(text: str, max_boxes: int = _MAX_FINAL_BOXES) -> list[str] | None:
    """Contents of the final boxes of `text`, in order: the last box and every earlier box of the
    same sentence (no sentence end, blank line or ``</think>`` between them).

    ``"so x_1 = \\boxed{2} and x_2 = \\boxed{3}."`` gives ``["2", "3"]``; ``"\\boxed{5}. So \\boxed{3}"``
    gives ``["3"]``. A box that wraps a later one (``\\boxed{\\boxed{3}}``) ends the group. At most
    `max_boxes` boxes (the last ones) are returned. None when there is no box or the last box's
    braces never balance. Linear time: each earlier box is read only up to the group's start.
    """
    last = _last_box(text)
    if last is None:
        return None
    group_start, first = last
    boxes = [first]
    while len(boxes) < max_boxes:
        prev, cmd_len = _last_box_command(text, group_start)
        if prev < 0:
            break
        got = _box_argument(text, prev + cmd_len, group_start)
        if got is None:
            break
        content, end = got
        if _SENTENCE_END.search(text, end, group_start):
            break
        boxes.append(content)
        group_start = prev
    boxes.reverse()
    return boxes


_CHOICE_IN_BOX = re.compile(r"^\s*(?:\\text\{|\\textbf\{|\\mathrm\{)?\s*\(?\s*([A-Ja-j])(?![A-Za-z0-9])")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:\s]*\**\s*\(?\s*\$?\s*(?:\\text\{|\\textbf\{)?\(?([A-J])\)?\b", re.I)


def extract_choice_letter(response: str) -> str | None:
    """Multiple-choice letter of a response: the letter of its final boxes, else the last 'answer is (C)'.

    Final boxes that name different letters (``\\boxed{A} or \\boxed{C}``) give None: boxing every
    candidate must not pay.
    """
    boxes = extract_final_boxes(response)
    if boxes:
        letters = {m.group(1).upper() for m in map(_CHOICE_IN_BOX.match, boxes) if m}
        if len(letters) > 1:
            return None
        if letters:
            return letters.pop()
    last = None
    for m in _ANSWER_IS.finditer(response):
        last = m
    return last.group(1).upper() if last else None


# --------------------------------------------------------------------------------------------
# cheap normalisation (conservative: two different answers must never normalise equal)
# --------------------------------------------------------------------------------------------

# A comma is a thousands separator only in the standard form: a first group of 1-3 digits that
# does not start with 0, then groups of exactly three digits, no space after any comma
# ("1,000", "12,345.5"). Anything else ("32, 349", "0,111", "1,0000") keeps its comma, which
# then separates answers, as it does for math-verify.
_THOUSANDS = re.compile(r"^[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$")
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


def _strip_math_dollars(s: str) -> str:
    """Drop the `$` that open and close math around a whole answer, never an escaped `\\$`."""
    s = re.sub(r"^\$+", "", s)
    s = re.sub(r"(?<!\\)\$+$", "", s)
    return s.strip()


def _tidy_commas(s: str) -> str:
    """LaTeX's ways of writing a comma without the space after it, ``1{,}000`` and ``10,\\!080``
    (the MATH dataset's thousands style; math-verify reads both as one number), as a plain comma."""
    return re.sub(r",\s*\\!\s*", ",", s.replace("{,}", ","))


def normalize_answer(s: str) -> str:
    """Cheap canonical form of an answer string, for the fast exact-match path."""
    s = s.strip()
    # the whole answer wrapped in $...$ or \( \) / \[ \]; an escaped `\$` is currency, not a delimiter
    s = _strip_math_dollars(s)
    s = re.sub(r"^\\[\(\[]|\\[\)\]]$", "", s).strip()
    m = _UNIT_TAIL.match(s)
    if m:
        s = m.group("num")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)     # not \leftarrow
    s = _tidy_commas(s)
    # LaTeX spacing becomes a plain space: between two digits it must not join them ("1\\,000"
    # reads 1*0 for math-verify, "2 3" is not 23); elsewhere it is dropped below
    s = re.sub(r"\\[!,;:]|~|\\ ", " ", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)
    # a percent sign after a non-negative integer only: math-verify reads "25\\%" as 25 or 0.25,
    # but "12.5\\%" not as 12.5 (nor "-3\\%" as -3), and the fast path must not accept more than it
    s = re.sub(r"(?<![\d.,+\-])(\d{1,3}(?:,\d{3})+|\d+)\s*\\?%", r"\1", s)
    s = s.replace("\\$", "")
    for _ in range(3):  # nested \text{\textbf{..}}
        s2 = _TEXT_CMD.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    s = s.strip().rstrip(".").strip()
    if _THOUSANDS.match(s):                # before any space is removed: "32, 349" is two answers
        s = s.replace(",", "")
    # drop whitespace, except one space between two digits
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"(?<!\d) | (?!\d)", "", s)
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
    """Gold answers sometimes come boxed (`\\boxed{204}`) or in `$...$` (`$69$,$84$` in
    OlympiadBench): keep the content, without the math delimiters (an escaped `\\$` stays)."""
    g = gold.strip()
    if "\\boxed" in g or "\\fbox" in g:
        inner = extract_last_boxed(g)
        if inner is not None:
            g = inner
    g = re.sub(r"(?<!\\)\$", "", g).strip()
    return _read_answer(_sci_to_latex(g))


_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_STANDARD_NUMBER = re.compile(r"(?<![\d.,])[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?(?!,?\d)")


def _read_answer(a: str) -> str:
    """The answer both the fast path and math-verify see: value-preserving rewrites of a number
    that math-verify cannot parse itself, so that the fast path never accepts more than math-verify.

    Only when the whole answer normalises to one plain number: `$` delimiters and a trailing
    sentence period are dropped (``$7.$``), standard-form thousands separators are removed
    (``1,000\\%`` -> ``1000\\%``, ``1{,}000`` -> ``1000``), a number followed by a unit becomes the
    number (``7 dollars``, ``5\\,\\mathrm{m}^2``), LaTeX spacing next to a non-digit and
    ``\\text{}``-like wrappers are dropped (``7\\,\\%``, ``\\text{12.5}``). Everything else is left
    as written; spacing between two digits stays (``1\\,000`` is not read as 1000).
    """
    if not _PLAIN_NUMBER.fullmatch(normalize_answer(a)):
        return a
    a = re.sub(r"(?<=[\d}])\s*\.$", "", _strip_math_dollars(a))
    a = _STANDARD_NUMBER.sub(lambda m: m.group(0).replace(",", ""), _tidy_commas(a))
    m = _UNIT_TAIL.match(a)
    if m:
        return m.group("num")
    # LaTeX spacing next to a non-digit ("7\\,\\%"); between two digits it stays ("1\\,000")
    a = re.sub(r"(?<!\d)(?:\\[,;:! ]|~)+|(?:\\[,;:! ]|~)+(?!\d)", "", a)
    for _ in range(3):  # \text{12.5}, \mathbf{\text{..}}: formatting, not value
        a2 = _TEXT_CMD.sub(r"\1", a)
        if a2 == a:
            break
        a = a2
    return a
_WORD_SEPARATOR = re.compile(r"\\(?:text|textrm|mbox|mathrm)\s*\{\s*(?:and|or)\s*\}|(?<=\s)(?:and|or)(?=\s)")


def gold_answer_count(gold: str) -> int:
    """How many answers a gold holds: its parts separated by a top-level `,`, `;`, "and" or "or".

    A comma inside brackets (a tuple, an interval) does not count, nor one inside a number in the
    standard thousands form; a gold that is one set literal ``\\{1, 2\\}`` holds its elements.
    ``"(2,2),(6,2)"`` -> 2, ``"5, 125"`` -> 2, ``"(1,2]"`` -> 1, ``"1,000"`` -> 1, ``"\\{1,2,3\\}"`` -> 3.
    """
    s = _STANDARD_NUMBER.sub("0", _tidy_commas(_strip_math_dollars(gold.strip())))
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s).strip()
    if s.startswith("\\{") and s.endswith("\\}") and _closes_at_end(s):
        s = s[2:-2]
    s = _WORD_SEPARATOR.sub(",", s)
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if depth == 0 and c in ",;":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return max(1, sum(1 for p in parts if p.strip()))


def _closes_at_end(s: str) -> bool:
    """True when the bracket opened by the first character of `s` closes at its last character."""
    depth = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


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

_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def _final_answers(response: str, g: str, cfg: VerifierConfig) -> dict[str, str] | None:
    """The distinct final answers of `response` to compare with the (stripped) gold `g`, keyed by
    their normalised form; several answers are joined into one ``a, b, ...`` when the gold holds
    several answers. None when the response has no usable final box or an over-long one."""
    boxes = extract_final_boxes(response, cfg.max_final_boxes)
    if boxes is None:
        return None
    keep_label = bool(_CHOICE_LABEL.match(g))  # a gold that itself starts with "(A)" keeps the answer's label
    answers: dict[str, str] = {}               # normalised form -> answer, first seen first
    for box in boxes:
        if len(box) > cfg.max_answer_chars:
            return None
        box = re.sub(r"(?<!\\)\$", "", box)      # math delimiters inside a box (`\\$` is currency)
        a = _read_answer(_sci_to_latex(box if keep_label else _strip_choice_label(box)))
        na = normalize_answer(a)
        if na:                                  # an empty box (`\boxed{}`, `\boxed{\,}`) is no answer
            answers.setdefault(na, a)
    if len(answers) > 1 and gold_answer_count(g) > 1:
        joined = ", ".join(answers.values())
        if len(joined) > cfg.max_answer_chars:
            return None
        answers = {normalize_answer(joined): joined}
    return answers


def _plan(response: str, gold: str, cfg: VerifierConfig) -> tuple[float | None, str, list[str]]:
    """(score, gold, answers): when score is None, the response scores 1 iff math-verify finds
    every answer in `answers` equivalent to `gold` (each answer one symbolic check).

    The several-boxes rule (docs/verifier.md): the final boxes of the response (extract_final_boxes)
    are read. Distinct final answers (after normalisation) are compared
    - when there is one, with the gold as usual;
    - when the gold holds one answer (gold_answer_count), each with the gold: every one must be
      equivalent, so boxing several different candidates scores 0;
    - when the gold holds k > 1 answers, together as one set, written ``a, b, ...``.
    """
    if not isinstance(gold, str):
        raise TypeError(f"gold must be str, got {type(gold).__name__}")
    letter = _choice_gold(gold)
    if letter is not None:
        return (1.0 if extract_choice_letter(response) == letter else 0.0), gold, []
    g = _strip_gold(gold)
    if not g:
        raise ValueError("gold answer is empty")
    answers = _final_answers(response, g, cfg)
    if not answers:
        return 0.0, g, []
    ng = normalize_answer(g)
    # one-answer gold, several final answers: two different plain numbers can never both be right
    # (a percent is not a plain number: 50\% and 0.5 may both be right)
    numbers = {na for na, a in answers.items() if _PLAIN_NUMBER.fullmatch(na) and "%" not in a}
    if len(numbers) > 1:
        return 0.0, g, []
    todo = []
    for na, a in answers.items():
        if na == ng:
            continue
        if _is_plain_text(ng) and _is_plain_text(na):
            # word answers ("Evelyn", "yes"): math-verify would read them as products of symbols
            if ng.lower() == na.lower():
                continue
            return 0.0, g, []
        todo.append(a)
    return (None if todo else 1.0), g, todo


def _config(timeout_s: float, num_workers: int | None = None) -> VerifierConfig:
    return VerifierConfig(timeout_s=float(timeout_s), num_workers=num_workers)


def math_reward(response: str, gold: str, timeout_s: float = 5.0) -> float:
    """1.0 when the final boxed answer(s) of `response` equal `gold`, else 0.0. The symbolic
    checks of one call (one per distinct final answer) share one deadline of `timeout_s`."""
    cfg = _config(timeout_s)
    score, g, answers = _plan(response, gold, cfg)
    if score is not None:
        return score
    pool = _pool(cfg)
    deadline = time.monotonic() + cfg.timeout_s
    for a in answers:
        left = deadline - time.monotonic()
        if left <= 0 or not pool.check(g, a, left):
            return 0.0
    return 1.0


def math_rewards(
    responses: Sequence[str],
    golds: Sequence[str],
    timeout_s: float = 5.0,
    num_workers: int | None = None,
) -> list[float]:
    """Score a batch; the symbolic checks run in parallel on `num_workers` worker processes.

    Each check is bounded by `timeout_s`; a response with several distinct final answers costs one
    check per answer (at most VerifierConfig.max_final_boxes) and scores 1 only if all pass."""
    if len(responses) != len(golds):
        raise ValueError(f"math_rewards: {len(responses)} responses but {len(golds)} golds")
    cfg = _config(timeout_s, num_workers)
    out: list[float] = [0.0] * len(responses)
    todo: list[tuple[int, str, str]] = []     # (response index, gold, answer): all must hold
    for i, (r, g) in enumerate(zip(responses, golds)):
        score, gg, answers = _plan(r, g, cfg)
        if score is None:
            out[i] = 1.0
            todo.extend((i, gg, a) for a in answers)
        else:
            out[i] = score
    if not todo:
        return out
    pool = _pool(cfg)
    if len(todo) == 1:
        results = [pool.check(todo[0][1], todo[0][2], cfg.timeout_s)]
    else:
        with ThreadPoolExecutor(max_workers=min(pool.size, len(todo))) as ex:
            results = list(ex.map(lambda t: pool.check(t[1], t[2], cfg.timeout_s), todo))
    for (i, _, _), ok in zip(todo, results):
        if not ok:
            out[i] = 0.0
    return out
