"""fastupg.rewards.math: extraction, normalisation, the regression suite, time bounds."""
import multiprocessing as mp
import os
import sys
import threading

import pytest

pytest.importorskip("math_verify")

sys.path.insert(0, os.path.dirname(__file__))
from math_cases import CASES, CHOICE_CASES, SLOW_CASES  # noqa: E402

from fastupg.rewards.math import (  # noqa: E402
    VerifierConfig,
    extract_choice_letter,
    extract_last_boxed,
    math_reward,
    math_rewards,
    normalize_answer,
)

# math-verify cannot read repeating decimals; documented misses, still counted in the agreement
KNOWN_MISSES = {("\\frac{5}{3}", "The final answer is $\\boxed{1.\\overline{6}}$.")}


@pytest.fixture(scope="module")
def suite_scores():
    cases = CASES + CHOICE_CASES
    return cases, math_rewards([r for _, r, _ in cases], [g for g, _, _ in cases], timeout_s=10.0, num_workers=2)


def test_suite_size():
    assert len(CASES) + len(CHOICE_CASES) >= 150
    # both outcomes well represented, so a constant verifier cannot pass
    n_pos = sum(e == 1.0 for _, _, e in CASES + CHOICE_CASES)
    assert 0.3 < n_pos / (len(CASES) + len(CHOICE_CASES)) < 0.8


def test_suite_agreement(suite_scores):
    cases, got = suite_scores
    wrong = [(g, r, e, s) for (g, r, e), s in zip(cases, got) if s != e]
    agreement = 1 - len(wrong) / len(cases)
    assert agreement >= 0.98, wrong
    unexpected = [w for w in wrong if (w[0], w[1]) not in KNOWN_MISSES]
    assert not unexpected, unexpected


def test_single_matches_batch(suite_scores):
    cases, got = suite_scores
    for i in range(0, len(cases), 23):
        g, r, _ = cases[i]
        assert math_reward(r, g) == got[i], (g, r)


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{3} and \\fbox{4}", "4"),
    ("\\fbox{4} and \\boxed{3}", "3"),
    ("\\boxed 5$", "5"),
    ("\\boxed{a{b}c}", "a{b}c"),
    ("no box", None),
    ("\\boxed{3", None),
    ("\\boxed{", None),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
])
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


def test_extract_rejects_non_str():
    with pytest.raises(TypeError):
        extract_last_boxed(None)
    with pytest.raises(TypeError):
        math_reward("\\boxed{1}", 1)


@pytest.mark.parametrize("a,b", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\left(1,2\\right)", "(1,2)"), ("1,000", "1000"),
    ("30^\\circ", "30"), ("50\\%", "50"), ("$5$", "5"), ("5\\text{ cm}", "5"), ("4.0", "4"),
    ("\\text{Evelyn}", "Evelyn"), ("\\frac12", "\\frac{1}{2}"),
])
def test_normalize_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a,b", [
    ("1,2", "12"), ("(1,2)", "[1,2]"), ("-3", "3"), ("\\frac{1}{2}", "\\frac{2}{1}"), ("x", "y"),
    ("2^3", "23"), ("1,0000", "10000"),
])
def test_normalize_keeps_different_apart(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_choice_letter():
    assert extract_choice_letter("\\boxed{answer}") is None
    assert extract_choice_letter("so the answer is (D) and done") == "D"


def test_pathological_inputs_score_zero():
    # a 100k-character answer, unbalanced braces and a huge tower: all bounded, all 0
    huge = "\\boxed{" + "1+" * 50_000 + "1}"
    assert math_reward(huge, "3", timeout_s=2.0) == 0.0
    assert math_reward("\\boxed{" * 1000 + "3", "3", timeout_s=2.0) == 0.0
    assert math_reward("x" * 100_000 + "\\boxed{3}", "3", timeout_s=2.0) == 1.0
    for gold, resp, expected in SLOW_CASES:
        assert math_reward(resp, gold, timeout_s=1.0) == expected
    # the pool recovers after a killed worker
    assert math_reward("\\boxed{0.5}", "\\frac{1}{2}") == 1.0


def test_threads_get_same_answers():
    items = [("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0), ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
             ("\\boxed{(1,2]}", "(1,2]", 1.0), ("\\boxed{x=3}", "3", 1.0)]
    results = {}

    def run(k):
        r, g, _ = items[k % len(items)]
        results[k] = math_reward(r, g)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[k] for k in range(8)] == [items[k % len(items)][2] for k in range(8)]


def _daemon_target(q):
    q.put(math_rewards(["\\boxed{0.75}", "\\boxed{0.7}"], ["\\frac{3}{4}", "\\frac{3}{4}"], num_workers=1))


def test_works_inside_daemonic_worker_process():
    # multiprocessing forbids daemonic processes to start children; subprocess workers are fine
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_daemon_target, args=(q,), daemon=True)
    p.start()
    out = q.get(timeout=120)
    p.join(timeout=30)
    assert out == [1.0, 0.0]


def test_argument_errors():
    with pytest.raises(ValueError):
        math_rewards(["\\boxed{1}"], ["1", "2"])
    with pytest.raises(ValueError):
        VerifierConfig(timeout_s=0)
    with pytest.raises(ValueError):
        VerifierConfig(num_workers=0)
    with pytest.raises(ValueError):
        math_reward("\\boxed{1}", "  ")
