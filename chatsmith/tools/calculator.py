"""The built-in calculator: exact arithmetic over a parsed expression, never `eval`.

The expression is parsed by Python's own parser (`ast.parse(mode="eval")`) and the tree walked
by hand over a whitelist: number literals, + - * / // % **, unary + -, parentheses (they only
shape the tree). Everything else (names, calls, attributes, strings, comparisons) is refused
before any arithmetic runs. Numbers stay exact: integers are Python ints and division gives a
`Fraction`, so "0.1 + 0.2" is 0.3 and "7 / 2" is 3.5; a result that is not a terminating
decimal is shown to 12 significant digits.

What the model (or a user) writes can be hostile, so every cost is bounded before it is paid:
the text's length, the tree's size and depth (checked on the token stream before `ast.parse`,
whose recursion a long "((((…" would exhaust), each number's digits, and each power's exponent
and result size (estimated from bit lengths before computing). A bad expression is a
`CalcError` with a one-line message, which the tool returns to the model as text.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

MAX_CHARS = 256
MAX_NODES = 200
MAX_DEPTH = 32
MAX_DIGITS = 60  # of any literal, intermediate or result
MAX_EXPONENT = 1000
MAX_BITS = int(MAX_DIGITS * math.log2(10)) + 1

# the characters an arithmetic expression can hold; anything else fails before parsing
_ALLOWED = re.compile(r"[0-9.+\-*/%()\s_eE]*")
# what people and models write for the operators Python spells differently
_SPELLINGS = {"×": "*", "x": "*", "X": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "^": "**", "，": ",",
              "（": "(", "）": ")"}


class CalcError(ValueError):
    """The expression cannot be evaluated; str(e) is the message the model sees."""


def _normalise(expr: str) -> str:
    for a, b in _SPELLINGS.items():
        expr = expr.replace(a, b)
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)  # thousands separators: 1,000 -> 1000
    return expr.strip().rstrip("=").strip()


def _check_shape(expr: str):
    """Depth and size on the raw text: parentheses nest at most MAX_DEPTH deep, and the number of
    operators and operands is bounded, so the parser itself never recurses far."""
    depth = 0
    for ch in expr:
        depth += (ch == "(") - (ch == ")")
        if depth > MAX_DEPTH:
            raise CalcError(f"the expression nests deeper than {MAX_DEPTH} parentheses")
        if depth < 0:
            raise CalcError("unbalanced parentheses")
    if depth:
        raise CalcError("unbalanced parentheses")
    # unary signs nest too ("- - - - 1") without parentheses
    if len(re.findall(r"[+\-*/%]", expr)) > MAX_NODES // 2:
        raise CalcError(f"the expression has more than {MAX_NODES // 2} operators")


def _bits(x) -> int:
    if isinstance(x, Fraction):
        return max(abs(x.numerator).bit_length(), x.denominator.bit_length())
    return abs(x).bit_length()


def _bounded(x):
    if _bits(x) > MAX_BITS:
        raise CalcError(f"a number in the calculation has more than {MAX_DIGITS} digits")
    return x


def _power(a, b):
    if isinstance(b, Fraction):
        if b.denominator != 1:
            raise CalcError("only whole-number exponents are supported")
        b = b.numerator
    if abs(b) > MAX_EXPONENT:
        raise CalcError(f"exponents are limited to {MAX_EXPONENT} in size")
    if a == 0 and b < 0:
        raise CalcError("division by zero")
    # the result has about |b| * bits(a) bits: refuse before computing it
    if abs(b) * max(_bits(a), 1) > MAX_BITS * 2 and abs(a) != 1:
        raise CalcError(f"the result would have more than {MAX_DIGITS} digits")
    return Fraction(a) ** b if b < 0 or isinstance(a, Fraction) else a ** b


def _binop(op, a, b):
    if isinstance(op, ast.Add):
        return a + b
    if isinstance(op, ast.Sub):
        return a - b
    if isinstance(op, ast.Mult):
        return a * b
    if isinstance(op, ast.Pow):
        return _power(a, b)
    if b == 0:
        raise CalcError("division by zero")
    if isinstance(op, ast.Div):
        return Fraction(a) / Fraction(b)
    if isinstance(op, ast.FloorDiv):
        return Fraction(a) // Fraction(b)
    if isinstance(op, ast.Mod):
        return Fraction(a) % Fraction(b)
    raise CalcError(f"the operator {type(op).__name__} is not supported")


def _literal(node: ast.Constant):
    v = node.value
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CalcError("only numbers and + - * / // % ** ( ) are allowed")
    if isinstance(v, float):
        # exact decimal value of what was written, not of the binary float
        src = repr(v)
        if not math.isfinite(v):
            raise CalcError("a number in the calculation is too large")
        return _bounded(Fraction(src))
    return _bounded(v)


def _eval(node, depth: int = 0):
    if depth > MAX_DEPTH * 2:
        raise CalcError(f"the expression nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant):
        return _literal(node)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, depth + 1)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        return _bounded(_binop(node.op, _eval(node.left, depth + 1), _eval(node.right, depth + 1)))
    raise CalcError("only numbers and + - * / // % ** ( ) are allowed")


def format_number(x) -> str:
    """An int as is; a Fraction as an exact decimal when it terminates, else 12 significant digits."""
    if isinstance(x, Fraction):
        if x.denominator == 1:
            return str(x.numerator)
        d = x.denominator
        for p in (2, 5):
            while d % p == 0:
                d //= p
        if d == 1:  # terminating: the exact decimal, trailing zeros dropped
            digits = 0
            while (x * 10 ** digits).denominator != 1:
                digits += 1
            n = x * 10 ** digits
            s = f"{abs(n.numerator):0{digits + 1}d}"
            s = f"{'-' if x < 0 else ''}{s[:-digits]}.{s[-digits:]}"
            return s
        return f"{float(x):.12g}"
    return str(x)


def evaluate(expr) -> str:
    """The value of an arithmetic expression as text; CalcError for anything else."""
    if not isinstance(expr, str):
        raise CalcError("the expression must be a string")
    expr = _normalise(expr)
    if not expr:
        raise CalcError("the expression is empty")
    if len(expr) > MAX_CHARS:
        raise CalcError(f"the expression is longer than {MAX_CHARS} characters")
    if not _ALLOWED.fullmatch(expr):
        raise CalcError("only numbers and + - * / // % ** ( ) are allowed")
    if any(len(d) > MAX_DIGITS for d in re.findall(r"[0-9_]+", expr)):
        raise CalcError(f"a number in the expression has more than {MAX_DIGITS} digits")
    _check_shape(expr)
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalcError("the expression is not valid arithmetic") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalcError(f"the expression has more than {MAX_NODES} parts")
    return format_number(_eval(tree))


def calculator(arguments: dict) -> str:
    """The tool: {"expression": "..."} -> the value, or "error: ..." (never raises)."""
    expr = arguments.get("expression") if isinstance(arguments, dict) else arguments
    try:
        return evaluate(expr)
    except CalcError as e:
        return f"error: {e}"


SPEC = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses).",
    "parameters": {"type": "object", "properties": {"expression": {
        "type": "string", "description": "the expression, e.g. 23 * (4 + 5)"}},
        "required": ["expression"]}}}
