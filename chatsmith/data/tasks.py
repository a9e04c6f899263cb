"""Verifiable tasks: a seeded generator of questions whose answers a program can check.

Three families, all with integer answers:

- ``arithmetic``: ``+``, ``-`` and ``×`` on small integers ("What is 37 + 48?" -> "85").
- ``word_problem``: templated one- or two-step stories (apples, trains, coins, ...).
- ``number_sense``: which of two numbers is larger or smaller, what comes after or before a
  number. The easy end of the range: rules a tiny model can learn and apply to numbers it never
  saw, where single-digit arithmetic facts held out of training can only be guessed.

Every task is a dict::

    {"family": "arithmetic", "question": "What is 37 + 48?", "answer": "85", "answers": ["85"],
     "worked": "37 + 48 = 85. The answer is 85.", "key": "arithmetic:37+48"}

``worked`` is a short solution that ends with the final answer ("The answer is N." or, for a
question asked in Chinese, "答案是 N。"). ``key`` names the underlying problem independently of
how the question is phrased, so that two phrasings of one problem can be kept on the same side
of a train/held-out split.

The same functions grade replies everywhere (SFT evaluation, RL rewards): :func:`normalise`
and :func:`check_answer`. Generation is a pure function of ``(family, n, seed, difficulty)``,
and ``generate_tasks(f, n, s)`` is a prefix of ``generate_tasks(f, n + k, s)``.
"""

from __future__ import annotations

import random
import re
import unicodedata
from typing import Callable

from chatsmith.errors import UserError

FAMILIES = ("arithmetic", "word_problem", "number_sense")
# Families whose answers are numbers: a reply is graded on the final number in it.
NUMERIC_FAMILIES = frozenset(FAMILIES)
DIFFICULTIES = (1, 2, 3)

# --------------------------------------------------------------------------- grading

# Punctuation that may trail (or lead) an answer without changing it: ASCII and CJK.
_EDGE_PUNCT = ".,!?;:。，！？；：、…\"'“”‘’`()[]（）「」『』《》*_"
_THOUSANDS = re.compile(r"(?<![\d.,])(\d{1,3})((?:,\d{3})+)(?![\d,])")
_SPACES = re.compile(r"\s+")
# "the answer is 85", "final answer: 85", "answer = 85", "答案是 85", "答案：85"
_ANSWER_MARK = re.compile(r"(?:final\s+)?answer\s*(?:is|:|=)\s*|答案\s*(?:是|为|:|：|=)\s*", re.I)
# A sign is part of a number only at the start or after a space/bracket/operator, so "5-3"
# reads as 5 and 3 but "= -3" as -3.
_NUMBER = re.compile(r"(?:(?<![^\s(=:$])-)?\d+(?:\.\d+)?")
_ARTICLE = re.compile(r"^(?:the|a|an)\s+")


def normalise(text: str) -> str:
    """Canonical form of a short answer for comparison: Unicode NFKC (full-width digits and
    punctuation become ASCII), the Unicode minus becomes '-', lower case, whitespace collapsed,
    thousands separators removed from numbers ("1,234" -> "1234"), and punctuation trimmed
    from both ends ("Paris." -> "paris")."""
    t = unicodedata.normalize("NFKC", str(text)).replace("\u2212", "-")
    t = _SPACES.sub(" ", t.lower()).strip()
    t = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), t)
    prev = None
    while prev != t:  # trim repeatedly: "(85.)" -> "85"
        prev = t
        t = t.strip(_EDGE_PUNCT).strip()
    return t


def final_answer(reply: str) -> str:
    """The part of a reply after its last answer marker ("The answer is", "Answer:", "答案是"),
    up to the end of that sentence or line; the whole reply when it has no marker."""
    marks = list(_ANSWER_MARK.finditer(reply))
    if not marks:
        return reply
    rest = reply[marks[-1].end():]
    # Cut at the end of the sentence: a line break, or a full stop not inside a number.
    m = re.search(r"\n|。|[.!?](?!\d)", rest)
    return rest[:m.start()] if m else rest


def extract_number(text: str) -> str | None:
    """The last number in ``text`` after normalisation (thousands separators dropped), as
    written ("85", "-3", "2.5"), or None when there is none."""
    nums = _NUMBER.findall(normalise(text))
    return nums[-1] if nums else None


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def _is_number(s: str) -> bool:
    return re.fullmatch(r"-?\d+(?:\.\d+)?", s) is not None


def _text_variants(s: str) -> set[str]:
    n = normalise(s)
    return {n, _ARTICLE.sub("", n)} - {""}


def check_answer(family: str, reply: str, answers: list[str]) -> bool:
    """Whether ``reply`` gives one of the accepted ``answers``.

    Numeric families (and any question whose accepted answers are all numbers) compare the
    final number of the reply: the number after the last "The answer is" when there is one
    (no number there is wrong), else the last number anywhere, so "37 + 48 = 85. The answer
    is 85." and " 85 " pass and "58" and "85. The answer is ." fail. Other families compare
    whole normalised strings, ignoring a leading article ("the Nile" = "Nile") and an answer
    marker ("The answer is Paris." = "Paris"). Never raises on odd input: a reply that is not
    a string, or no answers, is simply wrong.
    """
    if not isinstance(reply, str) or not answers:
        return False
    answers = [str(a) for a in answers]
    numeric = family in NUMERIC_FAMILIES or all(_is_number(normalise(a)) for a in answers)
    if numeric:
        # no fallback to numbers before the marker: "48 > 0. The answer is ." states no answer,
        # and crediting its stray 0 taught RL policies to end on an empty answer
        got = extract_number(final_answer(reply))
        return got is not None and any(_same_number(got, normalise(a)) for a in answers)
    candidates = _text_variants(reply) | _text_variants(final_answer(reply))
    return any(candidates & _text_variants(a) for a in answers)


# --------------------------------------------------------------------------- generation

def _task(family: str, question: str, answer: int, worked: str, key: str) -> dict:
    a = str(answer)
    return {"family": family, "question": question, "answer": a, "answers": [a],
            "worked": worked, "key": key}


def _end(answer: int, zh: bool) -> str:
    return f"答案是 {answer}。" if zh else f"The answer is {answer}."


def _operand(rng: random.Random, digits: int) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10 ** digits - 1)


_EN_QUESTIONS = ("What is {e}?", "What is {e}?", "Calculate {e}.", "Compute {e}.", "{e} = ?",
                 "What does {e} equal?", "Work out {e}.")
_EN_WORDS = {"+": ("plus", "What is {a} plus {b}?"), "-": ("minus", "What is {a} minus {b}?"),
             "×": ("times", "What is {a} times {b}?")}
_ZH_QUESTIONS = ("{e} 等于多少？", "计算 {e}。", "{e} = ?")


def _arithmetic(rng: random.Random, difficulty: int) -> dict:
    op = rng.choice("+-×")
    # Operand sizes: at difficulty d each operand has 1..d digits, so difficulty 2 mixes one-
    # and two-digit numbers; multiplication keeps one factor to a single digit below level 3.
    if op == "×":
        a = _operand(rng, rng.randint(1, difficulty))
        b = _operand(rng, 1 if difficulty < 3 else rng.randint(1, 2))
        if rng.random() < 0.5:
            a, b = b, a
    else:
        a = _operand(rng, rng.randint(1, difficulty))
        b = _operand(rng, rng.randint(1, difficulty))
        if op == "-" and difficulty < 3 and b > a:
            a, b = b, a  # no negative results at the easy levels
    c = a + b if op == "+" else a - b if op == "-" else a * b
    e = f"{a} {op} {b}"
    zh = rng.random() < 0.15
    if zh:
        question = rng.choice(_ZH_QUESTIONS).format(e=e)
    elif rng.random() < 0.15:
        question = _EN_WORDS[op][1].format(a=a, b=b)
    else:
        question = rng.choice(_EN_QUESTIONS).format(e=e)
    steps = f"{e} = {c}"
    big, small = (a, b) if abs(a) >= abs(b) else (b, a)
    if op == "×" and big >= 10 and small >= 2:
        # Split the larger factor into tens and ones: 23 × 7 = 20 × 7 + 3 × 7 = 140 + 21 = 161.
        tens, ones = big - big % 10, big % 10
        if ones:
            steps = (f"{e} = {tens} × {small} + {ones} × {small} = {tens * small} + "
                     f"{ones * small} = {c}")
    sep = "。" if zh else ". "
    return _task("arithmetic", question, c, f"{steps}{sep}{_end(c, zh)}", f"arithmetic:{a}{op}{b}")


# Word problems: each template draws its numbers, then returns (question, answer, worked).
_NAMES = ("Tom", "Lily", "Sam", "Mia", "Ben", "Anna", "Leo", "Emma", "Max", "Zoe", "Jack", "Lucy",
          "Omar", "Ravi", "Mei", "Nina", "Carlos", "Sara", "Yuki", "Kofi")
_PRONOUN = {"Tom": "he", "Sam": "he", "Ben": "he", "Leo": "he", "Max": "he", "Jack": "he",
            "Omar": "he", "Ravi": "he", "Carlos": "he", "Kofi": "he"}
_FRUIT = ("apples", "oranges", "pears", "bananas", "plums", "lemons")
_THINGS = ("marbles", "stickers", "stamps", "cards", "shells", "pencils", "books", "coins")


def _he(name: str) -> str:
    return _PRONOUN.get(name, "she")


def _wp_buy(rng, d):
    n, f = rng.choice(_NAMES), rng.choice(_FRUIT)
    a, b = rng.randint(2, 10 * d + 10), rng.randint(2, 10 * d + 10)
    q = f"{n} has {a} {f}. {_he(n).capitalize()} buys {b} more. How many {f} does {n} have now?"
    return q, a + b, f"{n} has {a} + {b} = {a + b} {f}.", ("buy", a, b)


def _wp_give(rng, d):
    n, t = rng.choice(_NAMES), rng.choice(_THINGS)
    a = rng.randint(5, 10 * d + 20)
    b = rng.randint(1, a - 1)
    q = f"{n} had {a} {t} and gave {b} of them to a friend. How many {t} does {n} have left?"
    return q, a - b, f"{n} has {a} - {b} = {a - b} {t} left.", ("give", a, b)


def _wp_rows(rng, d):
    r, c = rng.randint(2, 9), rng.randint(2, 5 * d + 5)
    thing = rng.choice(("chairs", "trees", "desks", "cars", "flowers"))
    q = f"There are {r} rows of {thing} with {c} {thing} in each row. How many {thing} are there?"
    return q, r * c, f"{r} rows × {c} {thing} = {r * c} {thing}.", ("rows", r, c)


def _wp_train(rng, d):
    v = rng.choice((20, 30, 40, 50, 60, 70, 80, 90, 100, 120)) if d > 1 else rng.randint(2, 12)
    t = rng.randint(2, 5)
    q = f"A train travels at {v} kilometres per hour for {t} hours. How many kilometres does it travel?"
    return q, v * t, f"Distance = speed × time = {v} × {t} = {v * t} km.", ("train", v, t)


def _wp_coins(rng, d):
    n, k = rng.choice(_NAMES), rng.randint(2, 5 * d + 5)
    coin = rng.choice((2, 5, 10, 20, 50)) if d > 1 else rng.choice((2, 5, 10))
    q = f"{n} has {k} coins worth {coin} cents each. How many cents does {n} have in total?"
    return q, k * coin, f"{k} × {coin} = {k * coin} cents.", ("coins", k, coin)


def _wp_share(rng, d):
    kids, each = rng.randint(2, 9), rng.randint(2, 5 * d + 5)
    total = kids * each
    item = rng.choice(("cookies", "sweets", "grapes", "crayons"))
    q = f"{total} {item} are shared equally among {kids} children. How many {item} does each child get?"
    return q, each, f"{total} ÷ {kids} = {each} {item} each.", ("share", total, kids)


def _wp_marbles(rng, d):
    n = rng.choice(_NAMES)
    a, b = rng.randint(3, 10 * d + 10), rng.randint(1, 10 * d)
    c = rng.randint(1, a + b - 1)
    he = _he(n)
    q = f"{n} has {a} marbles, wins {b} more, then loses {c}. How many marbles does {he} have now?"
    w = f"After winning: {a} + {b} = {a + b}.\nAfter losing: {a + b} - {c} = {a + b - c}."
    return q, a + b - c, w, ("marbles", a, b, c)


def _wp_shop(rng, d):
    n = rng.choice(_NAMES)
    p, m, nb = rng.randint(1, 5 * d), rng.randint(2, 6), rng.randint(2, 10 * d)
    q = (f"A pencil costs {p} dollars and a notebook costs {nb} dollars. {n} buys {m} pencils "
         f"and one notebook. How many dollars does {n} spend?")
    w = f"Pencils: {m} × {p} = {m * p}.\nTotal: {m * p} + {nb} = {m * p + nb} dollars."
    return q, m * p + nb, w, ("shop", p, nb, m)


def _wp_age(rng, d):
    n = rng.choice(_NAMES)
    a, b, c = rng.randint(3, 15), rng.randint(1, 10), rng.randint(1, 5 * d)
    q = f"{n} is {a} years old. {n}'s brother is {b} years older. How old will the brother be in {c} years?"
    w = f"The brother is {a} + {b} = {a + b} now.\nIn {c} years: {a + b} + {c} = {a + b + c}."
    return q, a + b + c, w, ("age", a, b, c)


def _wp_pages(rng, d):
    n = rng.choice(_NAMES)
    r, days = rng.randint(3, 10 * d + 5), rng.randint(2, 7)
    q = f"{n} reads {r} pages a day. How many pages does {n} read in {days} days?"
    return q, r * days, f"{r} × {days} = {r * days} pages.", ("pages", r, days)


def _wp_boxes(rng, d):
    k, boxes = rng.choice((4, 6, 10, 12)), rng.randint(2, 5 * d + 4)
    q = f"Eggs come in boxes of {k}. How many boxes are needed for exactly {k * boxes} eggs?"
    return q, boxes, f"{k * boxes} ÷ {k} = {boxes} boxes.", ("boxes", k, boxes)


def _wp_bus(rng, d):
    a = rng.randint(5, 10 * d + 20)
    off = rng.randint(1, a - 1)
    on = rng.randint(1, 10 * d)
    q = (f"A bus has {a} passengers. At the next stop {off} get off and {on} get on. "
         f"How many passengers are on the bus now?")
    w = f"{a} - {off} = {a - off}.\n{a - off} + {on} = {a - off + on} passengers."
    return q, a - off + on, w, ("bus", a, off, on)


_WORD_PROBLEMS: tuple[Callable, ...] = (_wp_buy, _wp_give, _wp_rows, _wp_train, _wp_coins,
                                        _wp_share, _wp_marbles, _wp_shop, _wp_age, _wp_pages,
                                        _wp_boxes, _wp_bus)


def _word_problem(rng: random.Random, difficulty: int) -> dict:
    make = rng.choice(_WORD_PROBLEMS)
    question, answer, worked, key = make(rng, difficulty)
    return _task("word_problem", question, answer, f"{worked}\n{_end(answer, False)}",
                 "word_problem:" + ":".join(map(str, key)))


_NS_ZH = {"larger": "{a} 和 {b} 哪个大？", "smaller": "{a} 和 {b} 哪个小？", "after": "{a} 后面的数是多少？",
          "before": "{a} 前面的数是多少？"}


def _number_sense(rng: random.Random, difficulty: int) -> dict:
    kind = rng.choice(("larger", "smaller", "after", "before"))
    a = _operand(rng, rng.randint(1, difficulty))
    zh = rng.random() < 0.15
    if kind in ("larger", "smaller"):
        b = _operand(rng, rng.randint(1, difficulty))
        while b == a:
            b = _operand(rng, rng.randint(1, difficulty))
        hi, lo = max(a, b), min(a, b)
        ans = hi if kind == "larger" else lo
        question = (_NS_ZH[kind].format(a=a, b=b) if zh else
                    rng.choice((f"Which is {kind}, {a} or {b}?", f"Which number is {kind}: {a} or {b}?")))
        worked = f"{hi} > {lo}"
        key = f"number_sense:{kind}:{min(a, b)}:{max(a, b)}"
    else:
        if kind == "before" and a == 0:
            a = 1
        ans = a + 1 if kind == "after" else a - 1
        question = (_NS_ZH[kind].format(a=a) if zh else
                    rng.choice((f"What number comes {kind} {a}?", f"What is the number just {kind} {a}?")))
        worked = f"{a} + 1 = {ans}" if kind == "after" else f"{a} - 1 = {ans}"
        key = f"number_sense:{kind}:{a}"
    sep = "。" if zh else ". "
    return _task("number_sense", question, ans, f"{worked}{sep}{_end(ans, zh)}", key)


_GENERATORS = {"arithmetic": _arithmetic, "word_problem": _word_problem, "number_sense": _number_sense}


def generate_tasks(family: str, n: int, seed: int, difficulty: int = 2) -> list[dict]:
    """``n`` tasks of ``family`` drawn from a generator seeded by ``(family, seed, difficulty)``.

    ``difficulty`` 1 keeps operands to one digit (word problems to small numbers), 2 (the
    default) mixes one- and two-digit operands, 3 allows three-digit operands, two-digit
    factors and negative results. Duplicates are possible (they are independent draws)."""
    if family not in _GENERATORS:
        raise UserError(f"unknown task family {family!r}; choose one of: {', '.join(FAMILIES)}")
    if not isinstance(n, int) or n < 0:
        raise UserError(f"number of tasks must be a non-negative integer, got {n!r}")
    if difficulty not in DIFFICULTIES:
        raise UserError(f"task difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    rng = random.Random(f"chatsmith-tasks:{family}:{seed}:{difficulty}")
    make = _GENERATORS[family]
    return [make(rng, difficulty) for _ in range(n)]
