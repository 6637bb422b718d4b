r"""Math answer grading: every RL reward in this project is grade(response, gold).

    extract_answer(response) -> str | None   the final \boxed{...} answer of a response
    is_equiv(pred, gold) -> bool             are two final answers the same?
    grade(response, gold) -> float           1.0 or 0.0
    parsable(answer) -> bool                 can it be read as mathematics (a teacher's answer, B.2)?

is_equiv tries the cheapest test first, in the numbered sections below (1. normalize, 2. plain
numbers, 3. tuples, intervals, lists and inequalities, 4. sympy, run in a helper subprocess under
a time limit); most answers never reach sympy. Sympy decides an expression by evaluating both sides
at four points (the first two symbols take both signs), never by simplify(), whose time is unbounded.

Choices, each with a test in test_soar.py, and why:
  * Exact numbers. 1000 != 1001, and a decimal never rounds to an integer (999.9999 != 1000). A
    decimal with 6 or more significant digits stands for a rounded value and matches when right to
    them (0.166667 == 1/6, 3.14159 == pi); a shorter one is exact (0.33 != 1/3, 2.5 == 5/2): a
    reward that takes two-digit roundings pays for an approximation where an exact value is asked.
  * No European decimal comma. "1,5" is the list 1, 5 and "1,000" is one thousand (a comma before
    exactly three digits groups thousands); guessing would let "1,5" match both 1.5 and 15.
  * Units and percent are dropped: 5\text{ cm} == 5, 50\% == 50 percent == 50, but 50\% != 0.5.
    MATH asks "what percent?" for the number before the sign, and a grader that took both would
    accept a wrong answer to one of the two questions.
  * Degrees. A degree mark is a unit (30^\circ == 30), and an answer with pi and no mark is an angle
    in radians, so 60^\circ == \frac{\pi}{3}; a bare 60 names no unit, since grade() never sees
    the problem (a gold answer carries the mark when the unit matters).
  * Relations. An inequality in one variable is the set it defines, compared with intervals and
    other inequalities either way round (x \ge 5 == 5 \le x == -x \le -5 == [5, \infty), but
    != (5, \infty) and != 5); a bare interval names no variable, while x > 5 != y > 5. Equations
    match when one is a nonzero multiple of the other (y = 2x + 1 and 2x - y + 1 = 0), inequalities
    a positive one; a leading "x =" is stripped.
  * Boxes. The last box is the answer; boxes before it that only commas, "and" or spaces separate
    join it into one list (\boxed{1}, \boxed{2} == 1, 2). "Or" between boxes offers alternatives
    (MATH-500 writes \boxed{15\frac{39}{40}}, or \boxed{\frac{639}{40}}): the last box stays the
    answer, so a hedge still gets one answer read.
  * No sentence in a box counts as its number (\boxed{\text{The answer is 5}} != 5), and there is
    no fallback to the last number of an unboxed response: a lenient extractor is a reward hack.
  * Tuples and intervals keep their brackets ([1, 2) != (1, 2), (1, 2) != \{1, 2\}), bare lists
    are unordered; text and choice letters compare case-insensitively.
  * Nothing raises and nothing hangs: malformed input is simply wrong.
"""
import atexit
import cmath
import json
import os
import random
import re
import select
import subprocess
import sys
import threading
import time
import timeit
from fractions import Fraction

SYMPY_TIMEOUT_S = 1.0     # sympy time allowed for one is_equiv call, all its comparisons together
STARTUP_TIMEOUT_S = 60.0  # one-off start of the sympy helper (importing sympy); not counted above
REL_TOL = Fraction(5, 10**6)  # relative error of a decimal rounded to 6 significant digits
MAX_ANSWER_CHARS = 1000   # longer answers must match exactly: no real answer is this long
MAX_SYMPY_CHARS = 300     # longer expressions are never sent to sympy

_BOX = re.compile(r"\\(?:boxed|fbox|framebox)(?![a-zA-Z])")

def _closing(s, i, opening="{", closing="}"):
    """Index of the bracket closing the one at s[i], or None. Escaped characters (\\{) are skipped."""
    depth = 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        depth += (s[i] in opening) - (s[i] in closing)
        if depth == 0:
            return i
        i += 1
    return None

_BOX_ARG = re.compile(r"\s*(?:(\{)|[^\s$]+)")  # a box's {argument}, or a word up to a space or $
_LIST_GAP = re.compile(r"(?:\s|[,;$]|\\[,;: ]|\\q?quad|\\text\{\s*and\s*\}|and)*")  # not "or"

def extract_answer(response: str) -> str | None:
    r"""Content of the last \boxed{...} (or \fbox, \framebox; `\boxed 5` reads up to the next space
    or `$`), with the boxes right before it that only commas, "and" or spaces separate: "\boxed{1}
    and \boxed{2}" is the list "1, 2". None if there is no box or the last one never closes."""
    text, answers, start = response if isinstance(response, str) else "", [], None
    for m in reversed(list(_BOX.finditer(text))):
        arg = _BOX_ARG.match(text, m.end())
        end = arg and (_closing(text, arg.start(1)) if arg[1] else arg.end() - 1)  # last character
        if end is None or answers and not (end < start and _LIST_GAP.fullmatch(text, end + 1, start)):
            break  # each scan stops at its box's end: linear in all
        answers.append(text[arg.start(1) + 1:end].strip() if arg[1] else arg[0].strip())
        start = m.start()
    return ", ".join(answers[::-1]) if answers else None

# ------------------------------------------------------------------------ 1. normalization
_TEXT = r"\\(?:text(?:normal|rm|bf|it)?|mbox|math(?:rm|bf|it)|boldsymbol|operatorname)\s*\{"
_RELATIONS = {"ge": "≥", "le": "≤", "ne": "≠", "gt": ">", "lt": "<", ">=": "≥", "<=": "≤", "!=": "≠"}
_REWRITES = [(re.compile(pattern), repl) for pattern, repl in [
    (r"\\[dtc]frac(?:\[[lrc]\])?", r"\\frac"), (r"\\[dt]binom", r"\\binom"),  # display variants
    (r"\\left\.|\\right\.|\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", ""),  # delimiter sizing
    (r"(?<!\\)\\[,!:; ]|\\q?quad(?![a-zA-Z])|\\displaystyle|~", ""),  # spacing (\\ is a row break)
    (r"\{,\}", ","), (r"\\mp(?![a-zA-Z])", r"\\pm"),                # 32{,}348; \mp as \pm
    (r"\\?\$|\\?%|(?<=[\d}.])\s*(?:per ?cent(?:age)?|pct)(?![a-zA-Z])", ""),  # $, 50\%, 50 percent
    # one relation sign for each relation: \geq, \ge, \geqslant, >= -> ≥; \gt -> >; \neq, != -> ≠
    (r"\\([gl][et]|ne)(?:qq|qslant|q)?(?![a-zA-Z])|([<>!]=)", lambda m: _RELATIONS[m[1] or m[2]]),
    # a degree mark stays, as ° (see _atoms_equal): 30^\circ, 30^{\circ}, 30\degree, 30 \text{ degrees}
    (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree(?![a-zA-Z])|(?<=[\d}])\s*" + _TEXT
     + r"\s*degrees?\s*\}", "°"),
    (r"\\(?:text|mbox)\{\s*(?:and|or)\s*\}", ","),                # "1 \text{ or } 2" is a list
    # a word in \text{} (\mathrm{}, ...) after a number is a unit: 5\text{ cm}, 3\mbox{ in}^2 (not e, i)
    (r"(?<=[\d}).])\s*" + _TEXT + r"\s*(?![ei]\s*\})[a-zA-Z][a-zA-Z .]*\}(?:\^\{?\d\}?)?", ""),
    (r"^\s*(?:[a-zA-Z]|\\[a-zA-Z]+)\s*\\in(?![a-zA-Z])", ""),     # "x \in [1, 2]"
    # \left[\begin{array}{cc} ... \end{array}\right] is a matrix (_structure drops the brackets)
    (r"(\\begin)\{array\}\{[^{}]*\}|(\\end)\{array\}", r"\1\2{matrix}"),
]]
_WRAPPER = re.compile(_TEXT)  # \text{...} and the like

def _normalize(s):
    """Rewrite an answer into a canonical string, with regexes only (cheap)."""
    if re.fullmatch(r"-?\d+(?:\.\d+)?", s):  # most answers are plain numbers: nothing to rewrite
        return s
    for pattern, repl in _REWRITES:
        s = pattern.sub(repl, s)
    while (m := _WRAPPER.search(s)) and (end := _closing(s, m.end() - 1)):
        s = s[:m.start()] + s[m.end():end] + s[end + 1:]  # \text{(B)} -> (B): keep the content
    # Spaces only matter between two letters (\cot x, New York); drop all others.
    s = re.sub(r"(?<![a-zA-Z]) | (?![a-zA-Z])", "", re.sub(r"\s+", " ", s).strip())
    # Brace one-character arguments: \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}, x^2 -> x^{2}.
    s = re.sub(r"(\\frac|\\sqrt|\^|_)([0-9a-zA-Z])", r"\1{\2}", s)
    s = re.sub(r"(\\frac\{[^{}]*\})([0-9a-zA-Z])", r"\1{\2}", s).rstrip(".")
    if re.fullmatch(r"(?:[a-z]=)?-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # thousands separators: 10,080
        s = s.replace(",", "")
    return s

# ------------------------------------------------------------------------ 2. plain numbers
def _to_number(s):
    """(value, exact) for 12, -0.5, .35, 3/4, \\frac{3}{4}, 2\\frac{1}{2}, 1e3, where exact is False
    when a decimal point was written (it may be rounded); None if not a plain number."""
    if mixed := re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{([1-9]\d*)\}", s):  # 2\frac{1}{2} is 5/2
        return (-1 if mixed[1] else 1) * (int(mixed[2]) + Fraction(int(mixed[3]), int(mixed[4]))), True
    s = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"\1/\2", s)
    if re.fullmatch(r"-?(?:\d+/[1-9]\d*|(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d{1,4})?)", s):
        return Fraction(s), not _rounded(s)
    return None

def _rounded(decimal):  # 6 significant digits make a decimal a rounded value; shorter ones are exact
    mantissa = decimal.lstrip("-").split("e")[0]
    return "." in mantissa and len(mantissa.replace(".", "").lstrip("0")) >= 6

# ------------------------------------------------------------------------ 3. structure
_MATRIX = re.compile(r"\\begin\{[pbvBV]?matrix\}(.*)\\end\{[pbvBV]?matrix\}", re.S)
_VAR = re.compile(r"[a-zA-Z](?:_\{\w+\})?|\\[a-zA-Z]+")  # x, a_{1}, \theta
_PM = re.compile(r"\\pm(?![a-zA-Z])")
_REL = re.compile("([<>≤≥≠])")  # relations after _normalize; a capturing group: split keeps them
_FLIP = dict(zip("<>≤≥≠", "><≥≤≠"))  # a < b is b > a

def _split_top(s, sep):
    """Split s at each `sep` that is not inside (), [] or {}."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        depth += (s[i] in "([{") - (s[i] in ")]}")
        if depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i = start = i + len(sep)
        else:
            i += 1
    return parts + [s[start:]]

def _enclosed(s):  # (1,2] is enclosed by its first bracket, (1)(2) is not
    return s[:1] in ("(", "[") and s[-1:] in (")", "]") and _closing(s, 0, "([", ")]") == len(s) - 1

def _structure(s):
    """("atom", s), ("set", items) for unordered lists of solutions and unions, or
    ("tuple", brackets, items) for ordered points, intervals, vectors and matrices."""
    while s[:1] in ("(", "[") and _enclosed(s) and len(_split_top(s[1:-1], ",")) == 1:
        s = s[1:-1]  # (113), (B) and [matrix] are just bracketed
    if m := _MATRIX.fullmatch(s):
        rows = [_split_top(r, "&") for r in _split_top(m[1], "\\\\") if r]
        if len(rows) == 1 or all(len(r) == 1 for r in rows):  # a vector is the tuple (a, b, c)
            return ("tuple", "()", [x for r in rows for x in r])
        return ("tuple", "matrix", ["(" + ",".join(r) + ")" for r in rows])
    if len(parts := _split_top(s, "\\cup")) > 1:
        return ("set", parts)
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]  # {1, 2}: a set, same as the bare list below
    elif _enclosed(s):
        return ("tuple", s[0] + s[-1], _split_top(s[1:-1], ","))
    items = []
    for x in _split_top(s, ","):  # a \pm b stands for the two answers a + b and a - b
        items += [_PM.sub(sign, x) for sign in "+-"] if len(_PM.findall(x)) == 1 else [x]
    return ("set", items) if len(items) > 1 else ("atom", s)

def _equal(a, b, depth, budget):
    """Compare two normalized answers; budget[0] holds the sympy seconds still allowed."""
    if a == b:
        return True
    if depth > 8 or not a or not b:
        return False
    if _REL.search(a) or _REL.search(b):
        if (same := _relations_equal(a, b, depth, budget)) is not None:
            return same
    ea, eb = (p if len(p := _split_top(x, "=")) == 2 else None for x in (a, b))
    if ea and eb and not (ea[0] == eb[0] and _VAR.fullmatch(ea[0])):
        return _multiples(*ea, *eb, "eq", budget)  # two equations (lines, planes)
    # Drop a leading variable: "x = 5" answers "5", and y = 2x+1 vs y = 1+2x compares 2x+1, 1+2x.
    a, b = (e[1] if e and _VAR.fullmatch(e[0]) else x for x, e in ((a, ea), (b, eb)))
    sa, sb = _structure(a), _structure(b)
    kinds = (sa[0], sb[0])
    if kinds == ("atom", "atom"):
        return _atoms_equal(sa[1], sb[1], budget)
    if kinds == ("set", "set"):  # unordered; greedy matching is exact since equality is transitive
        unmatched = list(sb[1]) if len(sa[1]) == len(sb[1]) <= 20 else []
        for x in sa[1]:
            match = next((y for y in unmatched if _equal(x, y, depth + 1, budget)), None)
            if match is None:
                return False
            unmatched.remove(match)
        return True
    if kinds != ("tuple", "tuple") or sa[1] != sb[1]:
        return False  # an ordered pair is not a list of solutions, and [1,2) != (1,2)
    xs, ys = sa[-1], sb[-1]
    return len(xs) == len(ys) and all(_equal(x, y, depth + 1, budget) for x, y in zip(xs, ys))

def _one_variable(s):
    """x > 2, 5 ≤ x, -x < 1, -2 ≤ x < 7, x ≠ 3 as (x, the interval or union they define), else None."""
    p = _REL.split(s)  # term, relation, term[, relation, term]
    at = [i for i in range(0, len(p), 2)
          if _VAR.fullmatch(v := p[i].removeprefix("-")) and v not in _NAMES]
    if len(p) not in (3, 5) or len(at) != 1:
        return None
    k, var, bounds = at[0], p[at[0]].removeprefix("-"), {">": ("-\\infty", 0), "<": ("\\infty", 0)}
    for j in [j for j in (k - 1, k + 1) if 0 < j < len(p)]:  # x's relations, read as "x op c"
        op, c = (_FLIP[p[j]], p[j - 1]) if j < k else (p[j], p[j + 1])
        if not c or "," in c or var in _VAR.findall(c):
            return None
        if p[k][0] == "-":  # -x > c is x < -c
            op, c = _FLIP[op], c[1:] if re.fullmatch(r"-[^-+]+", c) else f"-({c})"
        if op == "≠":
            return (var, f"(-\\infty,{c})\\cup({c},\\infty)") if len(p) == 3 else None
        bounds[">" if op in ">≥" else "<"] = c, op in "≤≥"
    (lo, lo_closed), (hi, hi_closed) = bounds[">"], bounds["<"]
    if len(p) == 5 and (p[1] in "<≤") != (p[3] in "<≤") or (
            (x := _to_number(lo)) and (y := _to_number(hi)) and x[0] >= y[0]):
        return None  # 1 < x > 2 bounds one side twice; 8 < x < -2 is empty, not the point (8, -2)
    return var, "([" [lo_closed] + lo + "," + hi + ")]"[hi_closed]

def _relations_equal(a, b, depth, budget):
    r"""Inequalities, or None for lists of them. In one variable they are the intervals they define:
    x ≥ 5 = [5, \infty) = 5 ≤ x = -x ≤ -5 (a bare interval names no variable; x > 5 is not y > 5).
    Else both sides' differences are positive multiples: y > 2x + 1 = 2x - y + 1 < 0, 2x > 4 = x > 2."""
    ra, rb = _one_variable(a), _one_variable(b)
    if ra and rb:
        return ra[0] == rb[0] and _equal(ra[1], rb[1], depth + 1, budget)
    if (ra or rb) and not _REL.search(b if ra else a):
        return _equal((ra or rb)[1], b if ra else a, depth + 1, budget)
    if len(pa := _REL.split(a)) != 3 or len(pb := _REL.split(b)) != 3:
        return None  # lists of relations (x < 2 or x > 3) are compared item by item
    (l1, o1, r1), (l2, o2, r2) = (p if p[1] in ">≥≠" else (p[2], _FLIP[p[1]], p[0]) for p in (pa, pb))
    return o1 == o2 and _multiples(l1, r1, l2, r2, "eq" if o1 == "≠" else "gt", budget)

def _multiples(l1, r1, l2, r2, mode, budget):
    """Are l1 - r1 and l2 - r2 nonzero ("eq") or positive ("gt") multiples of each other?"""
    d1, d2 = _to_python(f"{l1}-({r1})"), _to_python(f"{l2}-({r2})")
    return None not in (d1, d2) and _HELPER.ask([d1, d2, mode], budget)

def _atoms_equal(a, b, budget):
    if a == b:
        return True
    if "°" in a + b:  # a degree mark is a unit: 30° = 30; and 60° = \frac{\pi}{3}, the same in radians
        da, db, a, b = "°" in a, "°" in b, a.replace("°", ""), b.replace("°", "")
        if da != db and "\\pi" in (b if da else a):
            a, b = (f"\\frac{{{a}}}{{180}}\\pi", b) if da else (a, f"\\frac{{{b}}}{{180}}\\pi")
        return _atoms_equal(a, b, budget)
    if re.fullmatch(r"[A-Za-z ]+", a) and re.fullmatch(r"[A-Za-z ]+", b):
        return a.casefold() == b.casefold()  # text answers and choice letters
    if (x := _to_number(a)) and (y := _to_number(b)):
        (u, exact_u), (v, exact_v) = x, y
        if (exact_u and exact_v) or 1 in (u.denominator, v.denominator):
            return u == v  # never round to an integer: 1000 != 1001, 999.9999
        return abs(u - v) <= REL_TOL * max(abs(u), abs(v))
    pa, pb = _to_python(a), _to_python(b)
    return pa is not None and pb is not None and _HELPER.ask([pa, pb, "expr"], budget)

# ------------------------------------------------------------------------ 4. LaTeX -> sympy
_TOKENS = re.compile(r"\\[a-zA-Z]+|\d+(?:\.\d*)?|\.\d+|[a-zA-Z](?:_\{\w+\})?|\S", re.ASCII)
_FUNCS = {**{f: f for f in ["sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "sinh", "cosh"]},
          "arcsin": "asin", "arccos": "acos", "arctan": "atan", "ln": "log"}
_NAMES = {"\\pi": "pi", "\\infty": "oo", "i": "I", "e": "E"}  # i, e: imaginary unit, Euler's e
_OPS = {"+": "+", "-": "-", "*": "*", "/": "/", "\\cdot": "*", "\\times": "*", "\\div": "/"}

def _to_python(latex):
    """sympy's Python syntax for a LaTeX expression, or None outside a small subset. The output
    holds only numbers, Symbol('x'), whitelisted names, operators and parentheses: safe to eval."""
    # 52_{8} is base 8, not 52; "The answer is 0" is a sentence, not T*h*e*...*0 = 0
    if len(latex) > MAX_SYMPY_CHARS or re.search(r"\d_|(?:^|[^a-zA-Z\\])[a-zA-Z]+ [a-zA-Z]", latex):
        return None
    tokens = _TOKENS.findall(latex)[::-1]  # reversed: tokens.pop() takes the next one
    try:
        out = _expression(tokens)
    except (ValueError, IndexError, RecursionError):
        return None
    return out if out and not tokens else None

def _expression(tokens, closer=None):
    """Convert tokens up to `closer` (consumed); juxtaposed operands multiply: 2x, (a)(b)."""
    out, after_operand = [], False
    while tokens and tokens[-1] != closer:
        if tokens[-1] in _OPS:
            out.append(_OPS[tokens.pop()])
            after_operand = False
        elif tokens[-1] == "^":
            out.append(_power(tokens))
        elif tokens[-1] == "!":  # 5! (but not 5!!, nor 10^{4}! and beyond: they would never finish)
            tokens.pop()
            if not after_operand or tokens[-1:] == ["!"] or re.search(r"\*|\d{4}|factorial", out[-1]):
                raise ValueError("unsupported factorial")
            out[-1] = f"factorial({out[-1]})"
        else:
            out += ["*", _operand(tokens)] if after_operand else [_operand(tokens)]
            after_operand = True
    if closer and tokens.pop() != closer:
        raise ValueError("unbalanced")
    return "".join(out)

def _operand(tokens):
    """Convert one operand: a number, letter, {group}, (group) or command such as \\frac{a}{b}."""
    t = tokens.pop()
    if t[0] in "0123456789.":
        if "." in t and not _rounded(t):
            return f"Rational('{t}')"  # exact: sympy's tolerance applies only to 6-digit decimals
        return re.sub(r"^0+(?=\d)", "", t)  # 025 is 25 (Python reads 025 as an error)
    if t in ("{", "("):
        return "(" + _expression(tokens, "}" if t == "{" else ")") + ")"
    if t == "\\frac":
        return f"({_operand(tokens)})/({_operand(tokens)})"
    if t == "\\sqrt":  # \sqrt{2}, \sqrt[3]{x}
        index = _expression(tokens, "]") if tokens[-1] == "[" and tokens.pop() else "2"
        return f"root({_operand(tokens)},{index})"
    if t == "\\binom":
        return f"binomial({_operand(tokens)},{_operand(tokens)})"
    if t == "|":  # |x|
        return f"Abs({_expression(tokens, '|')})"
    if t[1:] in _FUNCS:  # \sin x, \cos(2x), \sin^2 x, \sin^{-1} x, \log_2 8
        name, base, power = _FUNCS[t[1:]], "", ""
        if name == "log" and tokens[-1] == "_":
            tokens.pop()
            base = "," + _operand(tokens)
        if tokens[-1] == "^":
            power = _power(tokens)
            if power == "**(-1)" and name in ("sin", "cos", "tan"):
                name, power = "a" + name, ""  # the inverse function
        arg = _operand(tokens)  # a group, or the operands that follow: \sin 2x is sin(2x), not sin(2)x
        while tokens and arg[0] != "(" and re.fullmatch(r"\^|\w.*|\\(?:pi|frac|sqrt)", tokens[-1]):
            arg += _power(tokens) if tokens[-1] == "^" else "*" + _operand(tokens)
        return f"{name}({arg}{base}){power}"
    if t in _NAMES:
        return _NAMES[t]
    if re.fullmatch(r"[a-zA-Z].*", t):  # a letter, maybe with a subscript: x, a_{1}
        return "Symbol('%s')" % re.sub(r"[{}]", "", t)
    raise ValueError(f"unsupported token {t!r}")

def _power(tokens):
    tokens.pop()  # ^
    exponent = _operand(tokens)
    if "**" in exponent or re.search(r"\d{5}", exponent):
        raise ValueError("power tower or huge exponent")  # 9^{9^{9}} would never finish
    return "**" + exponent

# ------------------------------------------------------------------------ sympy helper process
class _SympyHelper:
    """A persistent `python grader.py --sympy-worker` subprocess that does all sympy work.
    sympy can run for unbounded time on adversarial answers, and Python cannot interrupt a
    computation from another thread (signal.alarm works only in the main thread), but a process
    can always be killed. The helper starts lazily, is reused (importing sympy takes a second),
    is killed on timeout and restarts on the next request. Popen is fork+exec, unlike fork-based
    multiprocessing, so it is safe next to vLLM/CUDA threads. A lock serializes the callers."""

    def __init__(self):
        self._lock, self._proc = threading.Lock(), None

    def ask(self, request, budget):
        """Send [a, b, mode]; True if the helper answers "equal" within budget[0] seconds."""
        if budget[0] <= 0:
            return False
        with self._lock:
            try:
                if self._proc is None:
                    command = [sys.executable, os.path.abspath(__file__), "--sympy-worker"]
                    self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                    if self._read_line(STARTUP_TIMEOUT_S) != b"ready":
                        raise OSError("the sympy helper did not start")
                start = time.monotonic()
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
                reply = self._read_line(budget[0])
                budget[0] -= time.monotonic() - start
            except OSError:
                reply = b""
            if not reply:  # timed out or died: kill it now so that nothing keeps running
                self.stop()
            return reply == b"1"

    def _read_line(self, timeout):
        """The helper's next line, or b"" if none comes in `timeout` seconds. Replies are short
        lines written at once: when select() sees data, readline() cannot block."""
        if select.select([self._proc.stdout], [], [], max(timeout, 0))[0]:
            return self._proc.stdout.readline().strip()
        return b""

    def stop(self):
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.communicate()  # closes the pipes and reaps it: no zombie is left behind

_HELPER = _SympyHelper()
atexit.register(_HELPER.stop)

def _serve_sympy():
    """The helper's loop: read [a, b, mode] JSON lines, answer "1" (equal) or "0" to each."""
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations
    names = {"__builtins__": {}, **{n: getattr(sympy, n) for n in [
        "Integer", "Float", "Rational", "Symbol", "root", "factorial", "binomial", "Abs",
        *_NAMES.values(), *_FUNCS.values()]}}
    print("ready", flush=True)
    for line in sys.stdin:  # ends when the parent closes the pipe, or exits
        try:
            a, b, mode = json.loads(line)
            a, b = (parse_expr(x, global_dict=dict(names), transformations=standard_transformations)
                    for x in (a, b))
            ok = _same_value(a, b, mode, sympy)
        except Exception:  # noqa: BLE001 - any failure means "not shown equal"
            ok = False
        print("1" if ok else "0", flush=True)

def _same_value(a, b, mode, sympy):
    """In the helper: a == b ("expr"), or a == c * b with c != 0 ("eq": equations' lhs - rhs) or with
    c > 0 ("gt": inequalities')?  Decided at random points of either sign (so |x| != x), not by
    simplify() whose running time is unbounded: a chance agreement is negligible."""
    if a.has(sympy.zoo, sympy.nan) or b.has(sympy.zoo, sympy.nan):
        return False  # 1/0 is no answer
    exact = not (a.has(sympy.Float) or b.has(sympy.Float))  # no decimals written: compare strictly
    if mode == "expr" and (a == b or (exact and a.is_Rational and b.is_Rational)):
        return a == b  # a == b also covers oo; exact numbers: 10^{7} + 1 != 10^{7}
    symbols, rng, values = sorted(a.free_symbols | b.free_symbols, key=str), random.Random(0), []
    for k in range(4 if symbols else 1):  # the first two symbols' signs take all four patterns
        point = {s: sympy.Rational((-1) ** ((k >> (j % 2)) & 1) * rng.randint(50, 300), 97)
                 for j, s in enumerate(symbols)}
        try:
            va, vb = (complex(e.evalf(30, subs=point)) for e in (a, b))
        except (TypeError, ValueError, OverflowError):
            continue
        if cmath.isfinite(va) and cmath.isfinite(vb):
            values.append((va, vb))
    if mode != "expr":  # a = c * b: the ratio a / b is the same nonzero c at every point
        if not values or any(va * vb == 0 for va, vb in values):
            return False
        c = values[0][0] / values[0][1]
        if mode == "gt" and not (c.real > 0 and abs(c.imag) <= 1e-9 * abs(c)):
            return False  # x > 2 is not x < 2, the relation read the other way round
        values = [(va / vb, c) for va, vb in values]
    tol = 1e-12 if exact else REL_TOL
    return bool(values) and all(abs(u - v) <= tol * max(abs(u), abs(v), 1e-10) for u, v in values)

# ------------------------------------------------------------------------ public API
def is_equiv(pred: str, gold: str) -> bool:
    r"""Is the final answer `pred` the same as the reference `gold`?  Both are bare answers (the
    content of a \boxed{}), e.g. "\frac12" and "0.5". Never raises; sympy time <= SYMPY_TIMEOUT_S."""
    try:
        pred, gold = (str(x) if isinstance(x, (int, float)) else x for x in (pred, gold))
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        if max(len(pred), len(gold)) > MAX_ANSWER_CHARS:
            return pred.strip() == gold.strip()
        return _equal(_normalize(pred), _normalize(gold), 0, [SYMPY_TIMEOUT_S])
    except Exception:  # noqa: BLE001 - a reward function must never crash the trainer
        return False

def parsable(answer: str) -> bool:
    r"""Can the grader read `answer` (a boxed answer's content) as mathematics? The paper keeps a
    teacher's question only when its answer parses in a symbolic checker (B.2): a number, an
    expression sympy reads, an equation or inequality of such, a tuple, interval, matrix or list of
    them, or a short text answer (a choice letter, a name: at most three words; a sentence is not)."""
    try:
        s = _normalize(answer) if isinstance(answer, str) and len(answer) <= MAX_ANSWER_CHARS else ""
        return _readable(s, 0)
    except Exception:  # noqa: BLE001 - malformed input is simply unparsable
        return False

def _readable(s, depth):
    if depth > 8 or not s:
        return False
    if _REL.search(s) or len(sides := _split_top(s, "=")) > 1:  # relations and equations: every side
        return all(_readable(side, depth + 1) for side in (_REL.split(s)[::2] if _REL.search(s) else sides))
    kind, *parts = _structure(s)
    if kind != "atom":
        return all(_readable(x, depth + 1) for x in parts[-1])
    atom = parts[0].replace("°", "")
    return bool(re.fullmatch(r"[A-Za-z]+(?: [A-Za-z]+){0,2}", atom)) or _to_number(atom) is not None \
        or _to_python(atom) is not None

def grade(response: str, gold: str) -> float:
    r"""1.0 if the last \boxed{} answer of `response` is equivalent to `gold`, else 0.0.
    `gold` may be a bare answer ("\frac{1}{2}") or a text with a \boxed{} answer in it."""
    if (pred := extract_answer(response)) is None:
        return 0.0
    if isinstance(gold, str) and _BOX.search(gold):
        gold = extract_answer(gold) or gold
    return 1.0 if is_equiv(pred, gold) else 0.0

def _report(path, n_pairs=5000, seed=0):
    """Self-agreement, false-match rate and speed of grade() on a jsonl file of solutions."""
    with open(path) as f:
        rows = [r for r in map(json.loads, filter(str.strip, f)) if "solution" in r and "answer" in r]
    if not rows:  # amc23.jsonl, for one, has answers only
        print(f"{path}: no row has both a 'solution' and an 'answer'", file=sys.stderr)
        sys.exit(2)
    sols, golds = [r["solution"] for r in rows], [str(r["answer"]) for r in rows]
    _HELPER.ask(["1", "1", "expr"], [STARTUP_TIMEOUT_S])  # start sympy before timing
    grades = [grade(s, g) for s, g in zip(sols, golds)]
    # the best of 5 passes: other programs on the machine only ever make a pass slower
    speed = len(rows) / min(timeit.repeat(lambda: [grade(s, g) for s, g in zip(sols, golds)],
                                          number=1, repeat=5))
    rng, pairs = random.Random(seed), []
    while len(pairs) < n_pairs and len(set(golds)) > 1:  # pairs with different reference answers
        i, j = rng.randrange(len(rows)), rng.randrange(len(rows))
        pairs += [(i, j)] if "".join(golds[i].split()) != "".join(golds[j].split()) else []
    matches = [[extract_answer(sols[i]), golds[j]] for i, j in pairs if grade(sols[i], golds[j])]
    return {"file": os.path.basename(path), "rows": len(rows), "grades_per_second": round(speed),
            "rows_without_box": sum(extract_answer(s) is None for s in sols),
            "self_agreement": sum(grades) / len(rows), "failures": [
                [i, golds[i], extract_answer(sols[i])] for i, x in enumerate(grades) if not x],
            "false_match_rate": len(matches) / max(len(pairs), 1), "false_matches": matches}

if __name__ == "__main__":
    if sys.argv[1:] == ["--sympy-worker"]:
        _serve_sympy()
    else:  # python grader.py FILE.jsonl [FILE ...]
        if hasattr(os, "sched_setaffinity"):  # measure on one core (the helper inherits it)
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        for file in sys.argv[1:]:
            print(json.dumps(_report(file)))
