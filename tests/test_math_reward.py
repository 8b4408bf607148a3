"""fastupg.rewards.math: extraction, normalisation, the regression suite, time bounds."""
import multiprocessing as mp
import threading

import pytest

import math_verify  # noqa: F401  (installed by the README test command: missing must fail, not skip)

from fastupg.rewards.math import (  # noqa: E402
    VerifierConfig,
    extract_choice_letter,
    extract_final_boxes,
    extract_last_boxed,
    gold_answer_count,
    math_reward,
    math_rewards,
    normalize_answer,
)

# ---------------------------------------------------------------- regression suite: (gold, response, expected)
# In the style of math-verify's own tests; doubles as our regression set.

B = lambda s: "The final answer is $\\boxed{" + s + "}$."  # noqa: E731

CASES: list[tuple[str, str, float]] = [
    # --- integers and plain numbers
    ("3", B("3"), 1.0),
    ("3", B("4"), 0.0),
    ("-7", B("-7"), 1.0),
    ("-7", B("7"), 0.0),
    ("204", B("204"), 1.0),
    ("\\boxed{204}", B("204"), 1.0),          # AIME24-style boxed gold
    ("\\boxed{204}", B("240"), 0.0),
    ("0", B("0"), 1.0),
    ("4", B("4.0"), 1.0),
    ("4", B("4.00"), 1.0),
    ("4", B("4.1"), 0.0),
    ("0.5", B(".5"), 1.0),
    ("2.50", B("2.5"), 1.0),
    ("100", B("10^2"), 1.0),
    ("1024", B("2^{10}"), 1.0),
    ("1025", B("2^{10}"), 0.0),
    ("36", B("6^2"), 1.0),
    # --- fractions vs decimals
    ("\\frac{1}{2}", B("0.5"), 1.0),
    ("\\frac{1}{2}", B("\\frac12"), 1.0),
    ("\\frac{1}{2}", B("1/2"), 1.0),
    ("\\frac{1}{2}", B("\\dfrac{1}{2}"), 1.0),
    ("\\frac{1}{2}", B("\\tfrac{1}{2}"), 1.0),
    ("\\frac{1}{2}", B("\\frac{2}{4}"), 1.0),
    ("\\frac{1}{2}", B("\\frac{1}{3}"), 0.0),
    ("\\dfrac{3}{4}", B("0.75"), 1.0),
    ("\\dfrac{3}{4}", B("\\frac{3}{4}"), 1.0),
    ("\\frac{3}{4}", B("\\frac{4}{3}"), 0.0),
    ("\\frac{14}{3}", B("\\frac{14}{3}"), 1.0),
    ("\\frac{14}{3}", B("4\\frac{2}{3}"), 1.0),
    ("-\\frac{2}{3}", B("-\\frac{2}{3}"), 1.0),
    ("-\\frac{2}{3}", B("\\frac{-2}{3}"), 1.0),
    ("-\\frac{2}{3}", B("\\frac{2}{3}"), 0.0),
    ("\\frac{1}{3}", B("0.3333333333"), 1.0),
    ("\\frac{1}{3}", B("0.3"), 0.0),
    ("0.25", B("\\frac{1}{4}"), 1.0),
    ("1.5", B("\\frac{3}{2}"), 1.0),
    ("1.5", B("\\frac{5}{2}"), 0.0),
    # --- radicals, pi, expressions
    ("2\\sqrt{2}", B("\\sqrt{8}"), 1.0),
    ("2\\sqrt{2}", B("2\\sqrt2"), 1.0),
    ("2\\sqrt{2}", B("\\sqrt{2}"), 0.0),
    ("\\frac{\\sqrt{3}}{2}", B("\\frac{1}{2}\\sqrt{3}"), 1.0),
    ("\\frac{\\sqrt{3}}{2}", B("\\frac{\\sqrt{2}}{2}"), 0.0),
    ("12\\pi", B("12\\pi"), 1.0),
    ("12\\pi", B("12 \\pi"), 1.0),
    ("12\\pi", B("\\pi \\cdot 12"), 1.0),
    ("12\\pi", B("6\\pi"), 0.0),
    ("\\frac{\\pi}{4}", B("\\pi/4"), 1.0),
    ("\\frac{\\pi}{4}", B("\\frac{\\pi}{3}"), 0.0),
    ("x^2+1", B("1+x^2"), 1.0),
    ("x^2+1", B("x^2-1"), 0.0),
    ("(x+1)^2", B("x^2+2x+1"), 1.0),
    ("2x+3", B("3+2x"), 1.0),
    ("p - q", B("p-q"), 1.0),
    ("p - q", B("q-p"), 0.0),
    ("\\sqrt{2}+1", B("1+\\sqrt{2}"), 1.0),
    ("3 + 2\\sqrt{2}", B("2\\sqrt{2}+3"), 1.0),
    ("e^2", B("e^{2}"), 1.0),
    ("\\log_2 3", B("\\log_{2}3"), 1.0),
    ("\\infty", B("\\infty"), 1.0),
    ("-\\infty", B("\\infty"), 0.0),
    ("i", B("i"), 1.0),
    ("1+2i", B("2i+1"), 1.0),
    ("1+2i", B("1-2i"), 0.0),
    # --- equations vs values
    ("3", B("x=3"), 1.0),
    ("x=3", B("3"), 1.0),
    ("x=3", B("x = 3"), 1.0),
    ("3", B("x=4"), 0.0),
    ("y=2x+1", B("y = 2x + 1"), 1.0),
    ("y=2x+1", B("y=2x-1"), 0.0),
    ("y=2x+1", B("2x+1"), 1.0),
    # --- intervals
    ("(1,2]", B("(1,2]"), 1.0),
    ("(1,2]", B("(1, 2]"), 1.0),
    ("(1,2]", B("(1,2)"), 0.0),
    ("[-2,3)", B("[-2,3)"), 1.0),
    ("[-2,3)", B("[-2,3]"), 0.0),
    ("(-\\infty, 0)", B("(-\\infty,0)"), 1.0),
    ("(-\\infty, 0)", B("(0,\\infty)"), 0.0),
    ("(-\\infty,-2)\\cup(2,\\infty)", B("(-\\infty,-2) \\cup (2,\\infty)"), 1.0),
    ("(-\\infty,-2)\\cup(2,\\infty)", B("(-\\infty,-2]\\cup[2,\\infty)"), 0.0),
    ("[0,1]", B("\\left[0, 1\\right]"), 1.0),
    # --- sets and tuples
    ("\\{1,2\\}", B("\\{2,1\\}"), 1.0),
    ("\\{1,2\\}", B("\\{1,3\\}"), 0.0),
    ("1,2", B("2,1"), 1.0),
    ("1, 2, 3", B("1,2,3"), 1.0),
    ("1, 2, 3", B("1,2"), 0.0),
    ("(3, \\frac{\\pi}{2})", B("\\left( 3, \\frac{\\pi}{2} \\right)"), 1.0),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", B("(3,\\frac{\\pi}{2})"), 1.0),
    ("(3, \\frac{\\pi}{2})", B("(3, \\pi)"), 0.0),
    ("(1,2)", B("(1, 2)"), 1.0),
    ("(1,2,3)", B("(1,2,3)"), 1.0),
    ("(1,2,3)", B("(3,2,1)"), 0.0),
    ("(2,-1)", B("\\left(2,-1\\right)"), 1.0),
    ("-2, 1", B("1, -2"), 1.0),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", B("\\begin{pmatrix}1\\\\2\\end{pmatrix}"), 1.0),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", B("\\begin{pmatrix}2\\\\1\\end{pmatrix}"), 0.0),
    # --- units, degrees, money, percent, thousands
    ("5", B("5\\text{ cm}"), 1.0),
    ("5", B("5 \\text{cm}"), 1.0),
    ("5", B("5\\,\\text{cm}"), 1.0),
    ("5", B("6\\text{ cm}"), 0.0),
    ("12", B("12 \\text{ inches}"), 1.0),
    ("48", B("48\\text{ square units}"), 1.0),
    ("30", B("30^\\circ"), 1.0),
    ("30", B("30^{\\circ}"), 1.0),
    ("30^\\circ", B("30"), 1.0),
    ("30", B("60^\\circ"), 0.0),
    ("90", B("90°"), 1.0),
    ("10", B("\\$10"), 1.0),
    ("10.50", B("\\$10.50"), 1.0),
    ("1000", B("1,000"), 1.0),
    ("1000000", B("1,000,000"), 1.0),
    ("1000000", B("1{,}000{,}000"), 1.0),
    ("1,000", B("1000"), 1.0),
    ("1000", B("1,001"), 0.0),
    ("50\\%", B("50\\%"), 1.0),
    ("50\\%", B("50"), 1.0),
    ("50", B("50\\%"), 1.0),
    ("25\\%", B("30\\%"), 0.0),
    ("5", B("5 \\text{ meters}"), 1.0),
    ("3", B("3 \\text{ hours}"), 1.0),
    ("5", B("5\\,\\mathrm{m}^2"), 1.0),
    # --- thousands separators: only the standard form (1-3 digits not starting with 0, then groups
    # of three, no space after the comma); otherwise the comma separates answers (issue 17)
    ("32349", B("32,349"), 1.0),
    ("32349", B("32, 349"), 0.0),             # two answers, not 32349
    ("32, 349", B("32349"), 0.0),
    ("32, 349", B("349, 32"), 1.0),
    ("5, 125", B("5125"), 0.0),               # a two-answer gold is not one number
    ("5, 125", B("5, 125"), 1.0),
    ("5, 125", B("125,5"), 1.0),
    ("111", B("0,111"), 0.0),                 # no leading `0,` group
    ("1111", B("1,111"), 1.0),
    ("1234", B("1, 234"), 0.0),
    ("10000", B("10,000"), 1.0),
    ("10000", B("1,0000"), 0.0),
    ("1000", B("10,00"), 0.0),
    ("1000000", B("1,000, 000"), 0.0),
    ("1000000", B("1{,}000{,}000"), 1.0),
    ("-1234.5", B("-1,234.5"), 1.0),
    ("10,\\!080", B("10080"), 1.0),          # MATH's thousands style: `,\!` is a comma without space
    ("10080", B("10,\\!080"), 1.0),
    ("11,\\! 111,\\! 111,\\! 100", B("11111111100"), 1.0),
    ("\\$32,\\!348", B("32348"), 1.0),
    ("10080", B("10, 080"), 0.0),
    ("10080", B("10,\\!08"), 0.0),
    ("23", B("2 3"), 0.0),                    # a space never joins digits
    ("1000", B("1\\,000"), 0.0),              # math-verify reads 1*0; the fast path must not overrule it
    # --- currency: an escaped \$ is a dollar sign, not the end of the math
    ("1000.99", B("1,000.99\\$"), 1.0),
    ("1000.99", B("1,000.98\\$"), 0.0),
    ("12.50", B("12.50\\$"), 1.0),
    ("12.50", B("12.05\\$"), 0.0),
    ("12.5", B("\\$12.50"), 1.0),
    ("\\$12.50", B("12.5"), 1.0),
    ("1000", B("\\$1,000"), 1.0),
    # --- numbers read before both paths (math-verify alone cannot parse these right answers)
    ("7", B("7 dollars"), 1.0),
    ("7", B("7."), 1.0),
    ("7", B("7\\,\\%"), 1.0),
    ("1000", B("1,000\\%"), 1.0),
    ("1000", B("1,000^\\circ"), 1.0),
    ("12.5", B("\\text{12.5}"), 1.0),
    ("0.125", B("12.5\\%"), 1.0),              # math-verify reads a decimal percent as x/100
    ("8", B("7 dollars"), 0.0),
    ("1000", B("1,001\\%"), 0.0),
    # --- text answers
    ("\\text{Evelyn}", B("\\text{Evelyn}"), 1.0),
    ("\\text{Evelyn}", B("Evelyn"), 1.0),
    ("\\text{Evelyn}", B("\\text{Bob}"), 0.0),
    ("\\text{yes}", B("\\text{Yes}"), 1.0),
    ("\\text{yes}", B("\\text{no}"), 0.0),
    ("\\text{odd}", B("\\text{odd}"), 1.0),
    ("\\text{odd}", B("\\text{even}"), 0.0),
    ("\\text{(C)}", B("\\text{(C)}"), 1.0),
    ("\\text{(C)}", B("(C)"), 1.0),
    ("\\text{(C)}", B("(D)"), 0.0),
    ("\\text{Sunday}", B("\\textbf{Sunday}"), 1.0),
    # --- where the box is: last box, \fbox, no box, unbalanced, box-in-text
    ("3", "First \\boxed{5}, wait, I mean \\boxed{3}.", 0.0),   # two final answers in one sentence
    ("3", "First \\boxed{5}. Wait, I mean \\boxed{3}.", 1.0),   # the final sentence decides
    ("3", "First \\boxed{3}, wait, I mean \\boxed{5}.", 0.0),
    ("3", "So the answer is \\fbox{3}.", 1.0),
    ("3", "The answer is 3.", 0.0),
    ("3", "", 0.0),
    ("3", "\\boxed{3", 0.0),
    ("3", "\\boxed{}", 0.0),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}", 0.0),
    ("3", "\\boxed 3", 1.0),
    ("3", "<think>maybe \\boxed{4}</think> final: \\boxed{3}", 1.0),
    ("\\frac{1}{2}", "$\\boxed{\\frac{1}{2}}$", 1.0),
    ("\\frac{1}{2}", "\\[\\boxed{\\dfrac{1}{2}}\\]", 1.0),
    ("3", "\\boxed{\\boxed{3}}", 1.0),
    ("2", "\\boxed{x = 2}", 1.0),
    ("\\{1,2\\}", "The set is $\\boxed{\\{1, 2\\}}$", 1.0),
    ("3", "The answer is \\boxed{3}. \\boxed{", 0.0),
    # --- more MATH-500 style golds
    ("\\frac{\\sqrt{2}}{2}", B("\\frac{1}{\\sqrt{2}}"), 1.0),
    ("\\sqrt{5}", B("\\sqrt5"), 1.0),
    ("\\sqrt{5}", B("5^{1/2}"), 1.0),
    ("\\sqrt{5}", B("\\sqrt{6}"), 0.0),
    ("27", B("27"), 1.0),
    ("27", B("\\text{27}"), 1.0),
    ("-1", B("-1"), 1.0),
    ("\\pm 2", B("\\pm 2"), 1.0),
    ("6+9i", B("6+9i"), 1.0),
    ("6+9i", B("9i+6"), 1.0),
    ("\\frac{9}{256}", B("\\frac{9}{256}"), 1.0),
    ("\\frac{9}{256}", B("0.03515625"), 1.0),
    ("\\frac{9}{256}", B("\\frac{9}{265}"), 0.0),
    ("x \\in [-2,7]", B("[-2,7]"), 1.0),
    ("11\\sqrt2", B("11\\sqrt{2}"), 1.0),
    ("\\text{A}", B("A"), 1.0),
    ("2^{12}", B("4096"), 1.0),
    ("3\\sqrt{3}", B("\\sqrt{27}"), 1.0),
    ("\\frac{5}{3}", B("1.\\overline{6}"), 1.0),
    ("0", B("-0"), 1.0),
    ("17", B("0017"), 1.0),
    ("8", B("\\mathbf{8}"), 1.0),
    # AMC-style choice label in front of the value; scientific-notation golds (Minerva)
    ("12", B("\\text{(C)}\\ 12"), 1.0),
    ("12", B("\\textbf{(C) }12"), 1.0),
    ("12", B("\\textbf{(C) 12}"), 1.0),
    ("12", B("\\textbf{(C) }13"), 0.0),
    ("\\frac{1}{2}", B("(A)\\ \\frac{1}{2}"), 1.0),
    ("4.5e33", B("4.5 \\times 10^{33}"), 1.0),
    ("4.5e33", B("4.6 \\times 10^{33}"), 0.0),
    ("1e-3", B("0.001"), 1.0),
]

# Several boxes (issue 17, docs/verifier.md "Several boxes"): the final boxes (the last box and the
# earlier boxes of the same sentence) are read; a k-answer gold compares them as a set, a one-answer
# gold needs every distinct final answer to be equivalent to it.
MULTI_BOX_CASES: list[tuple[str, str, float]] = [
    # --- a gold with k answers: the final boxes as a set, any order
    ("(2,2),(6,2)", "So \\boxed{(2,2)} and \\boxed{(6,2)}.", 1.0),
    ("(2,2),(6,2)", "The solutions are $\\boxed{(6,2)}$ and $\\boxed{(2,2)}$.", 1.0),
    ("(2,2),(6,2)", "The solutions are \\boxed{(2,2),(6,2)}.", 1.0),
    ("2, 3", "The roots are $x_1 = \\boxed{2}$, $x_2 = \\boxed{3}$.", 1.0),
    ("2, 3", "$x_1 = \\boxed{3}$,\n$x_2 = \\boxed{2}$", 1.0),
    ("2, 3", "\\[x_1 = \\boxed{2}, \\quad x_2 = \\boxed{3}\\]", 1.0),
    ("2, 3", "\\boxed{2}, \\boxed{3}, \\boxed{2}", 1.0),             # a repeated box is one answer
    ("\\{1,2\\}", "$\\boxed{1}$ and $\\boxed{2}$", 1.0),
    ("$69$,$84$", "So \\boxed{84} and \\boxed{69}.", 1.0),          # OlympiadBench writes golds so
    ("$69$,$84$", "So \\boxed{84} and \\boxed{68}.", 0.0),
    ("x=2 \\text{ or } x=3", "so \\boxed{x=2} or \\boxed{x=3}", 1.0),
    ("\\frac{1}{2}, -3", "x = \\boxed{-3} or x = \\boxed{0.5}", 1.0),
    ("(2,2),(6,2)", "So \\boxed{(2,2)} and \\boxed{(6,3)}.", 0.0),
    ("(2,2),(6,2)", "So \\boxed{(2,2)}.", 0.0),                      # one of two answers
    ("(2,2),(6,2)", "\\boxed{(2,2)}, \\boxed{(6,2)} and \\boxed{(1,1)}", 0.0),  # an extra candidate
    ("2, 3", "The first root is \\boxed{2}. The second root is \\boxed{3}.", 0.0),  # only the final sentence
    ("2, 3", "\\boxed{2}\n\nThe other root is \\boxed{3}", 0.0),    # a blank line starts a new step
    ("5, 125", "\\boxed{5125}", 0.0),
    # --- a gold with one answer: several different final answers score 0
    ("3", "\\boxed{5} or \\boxed{3}", 0.0),
    ("3", "$\\boxed{3}$ or $\\boxed{5}$", 0.0),
    ("3", "\\boxed{3}, that is \\boxed{3}", 1.0),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}} = \\boxed{0.5}", 1.0),      # equivalent forms of one answer
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}} or \\boxed{\\frac{1}{3}}", 0.0),
    ("0.5", "\\boxed{50\\%} = \\boxed{0.5}", 1.0),
    ("0.5", "\\boxed{50\\%} or \\boxed{0.4}", 0.0),
    ("\\text{yes}", "\\boxed{\\text{yes}} or \\boxed{\\text{no}}", 0.0),
    ("32349", "\\boxed{32}, \\boxed{349}", 0.0),                  # math-verify joins these to 32,349
    ("(3,4)", "\\boxed{3}, \\boxed{4}", 0.0),                     # a point is one answer
    ("5", "<think>\\boxed{4}</think>\\boxed{5}", 1.0),
    ("5", "\\boxed{4}\n\nSo the answer is \\boxed{5}", 1.0),
    ("5", "\\boxed{4}\n\nSo the answer is \\boxed{5} or \\boxed{6}", 0.0),
    ("3", "\\boxed{\\boxed{3}}", 1.0),
    ("3", "\\boxed{} and \\boxed{3}", 1.0),                       # an empty box is no answer
    ("3", "\\boxed{\\,} and \\boxed{3}", 1.0),
    ("3", "\\boxed{3} and \\boxed{}", 1.0),
    ("3", "\\boxed{} and \\boxed{\\,}", 0.0),                   # only empty final boxes
    # --- letters: boxing several different letters scores 0
    ("C", "\\boxed{A} or \\boxed{C}", 0.0),
    ("C", "\\boxed{C} (that is, \\boxed{\\text{C}})", 1.0),
    ("C", "\\boxed{A}. On reflection the answer is \\boxed{C}.", 1.0),
]

# GPQA-style multiple choice: gold is a letter
CHOICE_CASES: list[tuple[str, str, float]] = [
    ("C", "Reasoning... \\boxed{C}", 1.0),
    ("C", "Reasoning... \\boxed{(C)}", 1.0),
    ("C", "Reasoning... \\boxed{\\text{C}}", 1.0),
    ("C", "Reasoning... \\boxed{C) 42 J}", 1.0),
    ("C", "Reasoning... \\boxed{D}", 0.0),
    ("C", "Therefore the answer is (C).", 1.0),
    ("C", "The answer is C", 1.0),
    ("C", "Answer: C", 1.0),
    ("C", "The answer is (B).", 0.0),
    ("A", "I think the answer is (B), no wait, the answer is (A).", 1.0),
    ("A", "No letter here at all.", 0.0),
    ("D", "\\boxed{\\textbf{(D)}}", 1.0),
    ("B", "\\boxed{b}", 1.0),
    ("(B)", "\\boxed{B}", 1.0),
]

# pathological inputs: bounded by the timeout, score 0 (few, they are slow on purpose)
SLOW_CASES: list[tuple[str, str, float]] = [
    ("3", B("9^{9^{9^{9}}}"), 0.0),
]


# math-verify cannot read repeating decimals; documented misses, still counted in the agreement
KNOWN_MISSES = {("\\frac{5}{3}", "The final answer is $\\boxed{1.\\overline{6}}$.")}


@pytest.fixture(scope="module")
def suite_scores():
    cases = CASES + CHOICE_CASES + MULTI_BOX_CASES
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
    ("\\boxed{(2,2)} and \\boxed{(6,2)}", ["(2,2)", "(6,2)"]),
    ("x_1 = \\boxed{2}, x_2 = \\boxed{3}.", ["2", "3"]),
    ("$\\boxed{1}$ and\n$\\boxed{2}$", ["1", "2"]),
    ("\\boxed{5}. So \\boxed{3}", ["3"]),
    ("\\boxed{5}! So \\boxed{3}", ["3"]),
    ("$\\boxed{5}.$ Then $\\boxed{3}$", ["3"]),
    ("\\boxed{5}\n\n\\boxed{3}", ["3"]),
    ("\\boxed{5}</think>\\boxed{3}", ["3"]),
    ("\\boxed{3.5} and \\boxed{2}", ["3.5", "2"]),              # a decimal point is no sentence end
    ("\\boxed{\\boxed{3}}", ["3"]),
    ("\\boxed{a} \\boxed{x = \\boxed{3}}", ["3"]),             # a wrapping box ends the group
    ("\\boxed 5 and \\fbox{6}", ["5", "6"]),
    ("\\boxed{1}" * 40, ["1"] * 16),                             # at most 16 final boxes
    ("no box", None),
    ("\\boxed{2} and \\boxed{3", None),
])
def test_extract_final_boxes(text, expected):
    assert extract_final_boxes(text) == expected


@pytest.mark.parametrize("gold,k", [
    ("(2,2),(6,2)", 2), ("5, 125", 2), ("5,125", 1), ("(1,2]", 1), ("1,000", 1), ("1,000, 2,000", 2),
    ("\\{1,2,3\\}", 3), ("\\left\\{1,2\\right\\}", 2), ("\\{1\\}\\cup\\{2\\}", 1), ("3", 1),
    ("x=2 \\text{ or } x=3", 2), ("2 and 3", 2), ("[0,\\infty)", 1), ("\\left( 3, \\frac{\\pi}{2} \\right)", 1),
    ("1,2,3", 3), ("\\frac{1}{2}, \\frac{1}{3}", 2), ("10,\\!080", 1), ("11,\\! 111,\\! 100", 1),
    ("$69$,$84$", 2), ("2500,7500", 2), ("$1, 2$", 2), ("(-\\infty,-2)\\cup(2,\\infty)", 1),
])
def test_gold_answer_count(gold, k):
    assert gold_answer_count(gold) == k


def test_several_boxes_cost_one_check_per_distinct_answer():
    # a one-answer gold with k distinct final answers needs every one equivalent: the batch and the
    # single call agree, and two different plain numbers are rejected without any symbolic check
    from fastupg.rewards.math import _plan

    score, _, todo = _plan("\\boxed{2} or \\boxed{3}", "3", VerifierConfig())
    assert score == 0.0 and todo == []
    score, _, todo = _plan("\\boxed{\\frac{1}{2}} = \\boxed{0.5} = \\boxed{\\tfrac12}", "0.5", VerifierConfig())
    assert score is None and todo == ["\\frac{1}{2}"]
    rs = ["\\boxed{\\frac{1}{2}} = \\boxed{0.5}", "\\boxed{\\frac{1}{2}} = \\boxed{\\frac{2}{3}}"]
    assert math_rewards(rs, ["0.5", "0.5"]) == [math_reward(rs[0], "0.5"), math_reward(rs[1], "0.5")] == [1.0, 0.0]


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
    ("1,000.99\\$", "1000.99"), ("12.50\\$", "12.5"), ("$12.50\\$$", "12.5"), ("1{,}000", "1000"),
    ("-1,234,567", "-1234567"),
])
def test_normalize_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a,b", [
    ("32, 349", "32349"), ("0,111", "111"), ("2 3", "23"), ("1\\,000", "1000"), ("1, 234", "1234"),
    ("12.50\\$", "12.05"),
    ("1,2", "12"), ("(1,2)", "[1,2]"), ("-3", "3"), ("\\frac{1}{2}", "\\frac{2}{1}"), ("x", "y"),
    ("2^3", "23"), ("1,0000", "10000"), ("2 m", "2"), ("2m", "2"),
])
def test_normalize_keeps_different_apart(a, b):
    assert normalize_answer(a) != normalize_answer(b)


# ---------------------------------------------------------------- separators: property-style checks (issue 17)

def _renderings(n: int) -> list[str]:
    """Ways to write the integer n: plain, standard thousands, LaTeX {,}, and non-standard separators."""
    std = f"{n:,}"
    return [str(n), std, std.replace(",", "{,}"), std.replace(",", ", "), std.replace(",", " "),
            std.replace(",", "\\,"), "$" + std + "$"]


def _distinct_int_pairs(seed: int, count: int) -> list[tuple[int, int]]:
    import random

    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        a = rng.choice([rng.randrange(1, 1000), rng.randrange(1000, 10**6), rng.randrange(10**6, 10**9)])
        # neighbours that the old rule confused: digits of a joined or split at a comma
        b = rng.choice([a + rng.choice([-1, 1]), int(str(a)[::-1]), int(str(a) + str(rng.randrange(10))),
                        int(str(a)[:-1] or "0"), rng.randrange(1, 10**9)])
        if a != b and b > 0:
            pairs.append((a, b))
    return pairs


def test_distinct_integers_never_normalise_equal():
    # a pure-normalisation sweep (no math-verify): every rendering of a against every rendering of b
    for a, b in _distinct_int_pairs(seed=17, count=500):
        na = {normalize_answer(r): r for r in _renderings(a)}
        nb = {normalize_answer(r): r for r in _renderings(b)}
        assert not na.keys() & nb.keys(), [(na[k], nb[k]) for k in na.keys() & nb.keys()]


def test_same_integer_standard_forms_normalise_equal():
    for a, _ in _distinct_int_pairs(seed=3, count=300):
        std = f"{a:,}"
        assert normalize_answer(std) == normalize_answer(str(a)) == normalize_answer(std.replace(",", "{,}"))


def test_distinct_integers_never_judged_equal_end_to_end():
    # the whole verifier (fast path + math-verify), on a small random sample, both gold orders
    rng = __import__("random").Random(1717)
    golds, responses = [], []
    for a, b in _distinct_int_pairs(seed=1717, count=24):
        ra, rb = rng.choice(_renderings(a)), rng.choice(_renderings(b))
        golds += [ra, rb]
        responses += [B(rb), B(ra)]
    # the issue's own traps: digits joined by a comma and a space, or split after a leading 0
    for x, y in [(32, 349), (5, 125), (7, 1), (12, 34)]:
        golds += [str(int(f"{x}{y}")), f"{x}, {y}"]
        responses += [B(f"{x}, {y}"), B(f"{x}{y}")]
    golds.append("111")
    responses.append(B("0,111"))
    assert math_rewards(responses, golds, num_workers=2) == [0.0] * len(golds)


def _decorated(x) -> list[str]:
    """A number as models box it: separators, currency, percent, degrees, units, wrappers, a period."""
    s = f"{x:,}"
    return [str(x), s, s.replace(",", "{,}"), "$" + s + "$", "\\$" + s, s + "\\$", s + "\\%", s + "\\,\\%",
            s + "^\\circ", s + "°", s + "\\text{ cm}", s + "\\;\\text{cm}", s + " dollars", s + ".0", s + ".",
            "$" + s + ".$", "\\text{" + s + "}", "\\mathbf{\\text{" + s + "}}", "\\textbf{(B) }" + s,
            "0" + str(x), "\\left(" + str(x) + "\\right)", s.replace(",", "\\,"), s.replace(",", ", ")]


def test_fast_path_never_accepts_what_math_verify_rejects():
    # every answer the cheap string match accepts, math-verify (gold first, as our worker calls it,
    # on the same read answer) must accept too: the fast path only saves time, it never widens the
    # rule. Letter golds are out of scope: they never reach math-verify.
    import random

    from fastupg.rewards._verify_worker import check
    from fastupg.rewards.math import _choice_gold, _final_answers, _plan

    cfg = VerifierConfig()
    pairs = [(g, r) for g, r, _ in CASES + MULTI_BOX_CASES]
    rng = random.Random(11)
    for x in [7, 1234, 32349, 1000000, 12.5, 1000.99, -1234, 0.5, -3, 0]:
        golds = _decorated(x)[:6]
        answers = _decorated(x) + _decorated(x + 1)
        pairs += [(rng.choice(golds), B(a)) for a in rng.sample(answers, 12)]
    checked = 0
    for g, r in pairs:
        if _choice_gold(g):
            continue
        score, gg, _ = _plan(r, g, cfg)
        if score == 1.0:
            for answer in _final_answers(r, gg, cfg).values():
                assert check(gg, answer), (g, r, answer)
            checked += 1
    assert checked >= 100


def test_choice_letter():
    assert extract_choice_letter("\\boxed{A} or \\boxed{C}") is None
    assert extract_choice_letter("\\boxed{A} or \\boxed{C}. The answer is (C)") is None   # boxes decide
    assert extract_choice_letter("\\boxed{42} or \\boxed{C}") == "C"
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


def _doc_examples() -> list[tuple[str, str, float]]:
    """Rows `| `gold` | `response` | 0/1 | ...` of docs/verifier.md (both of its tables)."""
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "verifier.md"
    rows = []
    for line in doc.read_text().splitlines():
        m = re.match(r"^\| `([^`]+)` \| `([^`]+)` \| ([01]) \|", line)
        if m:
            rows.append((m.group(1), m.group(2), float(m.group(3))))
    return rows


def test_docs_examples():
    # what docs/verifier.md says is accepted and rejected is what the verifier does
    rows = _doc_examples()
    assert len(rows) >= 60
    got = math_rewards([r for _, r, _ in rows], [g for g, _, _ in rows], num_workers=2)
    assert [(g, r, s) for (g, r, _), s in zip(rows, got)] == rows


def test_trainer_and_eval_use_this_rule():
    # the RL reward and the reported accuracy are one function: the several-boxes and separator
    # rules reach both (fastupg eval scores with fastupg.rewards.math.math_rewards directly)
    import fastupg.evaluate as evaluate
    from fastupg.rewards import math as verifier
    from fastupg.trainer import reward_fn

    assert evaluate.math_rewards is verifier.math_rewards
    texts = ["So $\\boxed{(2,2)}$ and $\\boxed{(6,2)}$.", "$\\boxed{5}$ or $\\boxed{3}$", B("32, 349")]
    golds = ["(2,2),(6,2)", "3", "32349"]
    assert reward_fn("math")(texts, golds) == [1.0, 0.0, 0.0]
