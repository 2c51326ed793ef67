"""Math tasks on reasoning-gym generators and graders.

- ``arithmetic`` (basic_arithmetic) and ``chain_sum``: evaluate an expression.
- ``countdown``: combine given numbers into a target.
- ``gsm_symbolic``: grade-school word problems (long; for real models).

Problems and gold answers come from ``reasoning_gym`` (``create_dataset``), and
rewards from its ``score_answer``, made binary: 1 only for a full score (its
partial credit for near-misses would let a corrupted answer score > 0). The
small-scale tasks add worked solutions written here, with many phrasings and
optional or reordered steps drawn from ``rng``, so one prompt has many valid
solutions. Every response ends with a last line ``Answer: <final answer>``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import random
import re
from typing import Iterator

from bebop_jax.tasks.base import (Chooser, Example, Grade, Task, derive_seed, extract_answer,
                                  register)

_RG_CHUNK = 256


def _rg_stream(name: str, seed: int, check_gold: bool = True, **config) -> Iterator[dict]:
    """reasoning-gym entries, chunk by chunk, each chunk under its own derived seed.

    With ``check_gold``, entries whose own gold answer reasoning-gym does not score
    1.0 are dropped (gsm_symbolic's grader misreads negative answers: "-1" scores
    0.01).
    """
    import reasoning_gym

    for chunk in itertools.count():
        ds = reasoning_gym.create_dataset(name, size=_RG_CHUNK,
                                          seed=derive_seed(seed, chunk) % 2**32, **config)
        for i in range(_RG_CHUNK):
            try:
                entry = ds[i]
            except ValueError:  # a generator that gave up on this index
                continue
            if not check_gold or ds.score_answer(entry["answer"], entry) >= 1.0:
                yield entry


def _rg_grader(name: str, **config):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=1, seed=0, **config)


def _rg_grade(grader, example: Example, answer: str | None) -> Grade:
    if answer is None:
        return Grade(0.0, "no final 'Answer:' line")
    entry = {"question": example.meta.get("rg_question", example.prompt),
             "answer": example.answer, "metadata": example.meta["rg_metadata"]}
    score = float(grader.score_answer(answer, entry))
    if score >= 1.0:
        return Grade(1.0, "correct")
    return Grade(0.0, f"wrong answer {answer[:80]!r} (gold {example.answer!r}; "
                      f"reasoning-gym score {score:.2f})")


# ----------------------------------------------------------------------------- expressions
# A tiny expression tree for step-by-step evaluation of reasoning-gym expressions.

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "/"}


@dataclasses.dataclass(frozen=True)
class _Num:
    value: int


@dataclasses.dataclass(frozen=True)
class _Bin:
    op: str
    left: object
    right: object


@dataclasses.dataclass(frozen=True)
class _Neg:
    child: object


def _parse(expr: str):
    def conv(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return _Num(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            child = conv(node.operand)
            return _Num(-child.value) if isinstance(child, _Num) else _Neg(child)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return _Bin(_AST_OPS[type(node.op)], conv(node.left), conv(node.right))
        raise ValueError(f"unsupported expression node {ast.dump(node)}")

    return conv(ast.parse(expr, mode="eval").body)


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b  # reasoning-gym evaluates "/" as floor division (exact by construction)


def _render(node, sep: str, parent_prec: int = 0, right: bool = False) -> str:
    if isinstance(node, _Num):
        return str(node.value)
    if isinstance(node, _Neg):
        return f"-({_render(node.child, sep)})"
    prec = _PREC[node.op]
    text = (_render(node.left, sep, prec) + sep + node.op + sep
            + _render(node.right, sep, prec, right=True))
    if prec < parent_prec or (right and prec == parent_prec):
        return f"({text})"
    return text


def _ready(node, path=()):
    """Paths of nodes whose operands are all numbers (the steps that can go next)."""
    if isinstance(node, _Num):
        return []
    if isinstance(node, _Neg):
        return [path] if isinstance(node.child, _Num) else _ready(node.child, path + ("child",))
    if isinstance(node.left, _Num) and isinstance(node.right, _Num):
        return [path]
    return _ready(node.left, path + ("left",)) + _ready(node.right, path + ("right",))


def _get(node, path):
    for p in path:
        node = getattr(node, p)
    return node


def _replace(node, path, new):
    if not path:
        return new
    return dataclasses.replace(node, **{path[0]: _replace(getattr(node, path[0]), path[1:], new)})


def _steps(expr: str, pick) -> list[tuple[str, int, str, int, int, object]]:
    """Evaluate step by step; ``pick(paths)`` chooses which ready step goes next.

    Returns (op, a, b, result, tree after the step) per step; a ``-(x)`` step has op "neg".
    """
    tree, out = _parse(expr), []
    while not isinstance(tree, _Num):
        path = pick(_ready(tree))
        node = _get(tree, path)
        if isinstance(node, _Neg):
            a = node.child.value
            out.append(("neg", a, 0, -a, _replace(tree, path, _Num(-a))))
        else:
            a, b = node.left.value, node.right.value
            r = _apply(node.op, a, b)
            out.append((node.op, a, b, r, _replace(tree, path, _Num(r))))
        tree = out[-1][-1]
    return out


def _eval(expr: str) -> int:
    steps = _steps(expr, lambda paths: paths[0])
    return steps[-1][3] if steps else _parse(expr).value


_OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def _step_text(op: str, a: int, b: int, c: Chooser, sep: str, simplify: bool,
               words: bool = False) -> str:
    """``a op b`` as written in one step; operand order, sign form and wording vary."""
    if op == "neg":
        return f"-({a})"
    if simplify and op in "+-" and b < 0:  # a + -b -> a - b, a - -b -> a + b
        op, b = ("-" if op == "+" else "+"), -b
    if op in "+*" and c.coin(0.3):  # commutative: either order
        a, b = b, a
    if words and c.coin(0.3):
        return f"{a} {_OP_WORDS[op]} {b}"
    return f"{a}{sep}{op}{sep}{b}"


def _arith_solution(expr: str, answer: str, c: Chooser) -> str:
    """A worked evaluation of ``expr``; style, phrasing and step order drawn from ``c``."""
    sep = c.pick([" ", ""], weights=[3, 2])
    ordered = c.coin(0.5)  # leftmost ready step first, or any ready step
    steps = _steps(expr, lambda paths: paths[0] if ordered or len(paths) == 1 else c.pick(paths))
    simplify = c.coin(0.3)
    style = c.pick(["lines", "chain", "prose", "direct"], weights=[3, 3, 4, 1])
    if not steps:
        style = "direct"
    lines = []
    if style != "direct":
        intro = c.pick(["", "Step by step.", "Let's compute.", "Work:", "Order of operations.",
                        "We evaluate it.", "Compute in order.", "Solve:",
                        f"{_render(_parse(expr), sep)}:"],
                       weights=[8, 1, 1, 1, 1, 1, 1, 1, 1])
        if intro:
            lines.append(intro)
    if style == "lines":
        bullet = c.pick(["", "> ", "Step: "], weights=[3, 1, 1])
        for op, a, b, r, _ in steps:
            eq = c.pick([" = ", "="]) if sep else "="
            lines.append(f"{bullet}{_step_text(op, a, b, c, sep, simplify)}{eq}{r}")
    elif style == "chain":
        eq = c.pick([" = ", "="]) if sep else "="
        parts = [_render(_parse(expr), sep)] if c.coin(0.5) else []
        parts += [_render(tree, sep) for *_, tree in steps]
        lines.append(eq.join(parts))
    elif style == "prose":
        words, first = [], True
        for op, a, b, r, _ in steps:
            verb = c.pick([" is ", " gives ", " makes ", " = ", "=", " equals ", " comes to "])
            if first:
                lead = c.pick(["", "First ", "First, ", "Start: ", "Begin with "],
                              weights=[3, 2, 1, 1, 1])
            else:
                lead = c.pick([", then ", ". Then ", ", next ", ". Now ", "; ", ", so ",
                               ". Next, ", " and "])
            first = False
            words.append(f"{lead}{_step_text(op, a, b, c, sep, simplify, words=True)}{verb}{r}")
        lines.append("".join(words) + c.pick([".", ""]))
    if style != "direct":
        close = c.pick(["", f"So {answer}.", f"Result: {answer}", f"That gives {answer}.",
                        f"The value is {answer}.", f"Done: {answer}."],
                       weights=[6, 1, 1, 1, 1, 1])
        if close:
            lines.append(close)
    lines.append(f"Answer: {answer}")
    return "\n".join(lines)


class _ExpressionTask(Task):
    """Shared by ``arithmetic`` and ``chain_sum``: prompt is reasoning-gym's question."""

    small_scale = True
    rg_name = ""

    def _config(self) -> dict:
        raise NotImplementedError

    def _stream(self, seed: int) -> Iterator[Example]:
        for entry in _rg_stream(self.rg_name, seed, **self._config()):
            meta = {"rg_metadata": entry["metadata"], "expression": entry["metadata"]["expression"]}
            yield Example(prompt=entry["question"], answer=entry["answer"], meta=meta)

    def _grade(self, example: Example, response: str) -> Grade:
        if not hasattr(self, "_grader"):
            self._grader = _rg_grader(self.rg_name, **self._config())
        answer = extract_answer(response)
        if answer is not None and len(answer) > 40:
            return Grade(0.0, f"answer too long ({len(answer)} characters)")
        return _rg_grade(self._grader, example, answer)

    def _write_solution(self, example: Example, c: Chooser) -> str:
        return _arith_solution(example.meta["expression"], example.answer, c)

    def corrupted(self, example: Example, rng: random.Random) -> str:
        wrong = int(example.answer) + rng.choice([-10, -2, -1, 1, 2, 10])
        return f"{example.meta['expression']} = {wrong}\nAnswer: {wrong}"


@register("arithmetic")
class Arithmetic(_ExpressionTask):
    """reasoning-gym basic_arithmetic: + - * (and / from difficulty 3), parentheses.

    Difficulty 1: 2-3 one-digit terms (numbers may be negative) -- the small-scale
    default. Higher: more terms and digits.
    """

    rg_name = "basic_arithmetic"

    def _config(self) -> dict:
        d = self.difficulty
        terms = {1: (2, 3), 2: (2, 4), 3: (3, 4), 4: (3, 5), 5: (4, 6)}[d]
        digits = {1: (1, 1), 2: (1, 2), 3: (1, 2), 4: (1, 3), 5: (2, 4)}[d]
        ops = ("+", "-", "*") if d < 3 else ("+", "-", "*", "/")
        return dict(min_terms=terms[0], max_terms=terms[1], min_digits=digits[0],
                    max_digits=digits[1], operators=ops, allow_parentheses=True,
                    allow_negation=d >= 2)


@register("chain_sum")
class ChainSum(_ExpressionTask):
    """reasoning-gym chain_sum: a chain of additions and subtractions."""

    rg_name = "chain_sum"

    def _config(self) -> dict:
        d = self.difficulty
        terms = {1: (2, 3), 2: (3, 4), 3: (3, 5), 4: (4, 6), 5: (5, 7)}[d]
        digits = {1: (1, 1), 2: (1, 2), 3: (2, 2), 4: (2, 3), 5: (3, 4)}[d]
        return dict(min_terms=terms[0], max_terms=terms[1], min_digits=digits[0],
                    max_digits=digits[1])


# ----------------------------------------------------------------------------- countdown

_COUNTDOWN_OK = re.compile(r"^[0-9()+\-*/ ]{1,120}$")


def _combine_all(items, out, path, limit):
    """Depth-first over all ways to combine numbers pairwise into one (classic Countdown).

    ``items`` are (value, expression text, precedence); every final value is
    appended to ``out`` as (value, expression, steps). Only non-negative integer
    intermediates are kept, as a person would write them.
    """
    if len(out) >= limit:
        return
    if len(items) == 1:
        out.append((items[0][0], items[0][1], tuple(path)))
        return
    n = len(items)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            (a, ea, pa), (b, eb, pb) = items[i], items[j]
            rest = [items[k] for k in range(n) if k not in (i, j)]
            for op in "+-*/":
                if op == "-" and a < b or op == "/" and (b == 0 or a % b):
                    continue
                if op in "+*" and i > j and a == b:
                    continue
                r = _apply(op, a, b)
                prec = _PREC[op]
                left = f"({ea})" if pa < prec else ea
                right = f"({eb})" if pb < prec or (pb == prec and op in "-/") else eb
                expr = f"{left} {op} {right}"
                path.append((a, op, b, r))
                _combine_all(rest + [(r, expr, prec)], out, path, limit)
                path.pop()


@functools.lru_cache(maxsize=4096)
def _countdown_procedures(numbers: tuple[int, ...], target: int):
    """(solutions, non-solutions): expression -> steps, for up to 4 numbers."""
    if len(numbers) > 4:
        return [], []
    out = []
    _combine_all([(v, str(v), 3) for v in numbers], out, [], limit=200_000)
    good = {e: s for v, e, s in out if v == target}
    bad = {e: (v, s) for v, e, s in out if v != target}
    return sorted(good.items()), sorted(bad.items())


@register("countdown")
class Countdown(Task):
    """reasoning-gym countdown: use every given number once to reach the target.

    Prompt (short, for the tiny model): ``Make 21 from 12 5 3.``; reasoning-gym's
    own long question is kept in ``meta["rg_question"]``. Difficulty 1: three
    numbers in 1..20, target 10..100.
    """

    small_scale = True

    def _config(self) -> dict:
        d = self.difficulty
        nums = {1: (3, 3), 2: (3, 4), 3: (4, 4), 4: (4, 5), 5: (4, 6)}[d]
        value = {1: 20, 2: 25, 3: 25, 4: 50, 5: 100}[d]
        target = {1: (10, 100), 2: (10, 200), 3: (10, 300), 4: (100, 500), 5: (100, 999)}[d]
        return dict(min_numbers=nums[0], max_numbers=nums[1], min_value=1, max_value=value,
                    min_target=target[0], max_target=target[1])

    def _stream(self, seed: int) -> Iterator[Example]:
        # No gold self-check: sympy parsing costs ~15% of generation, and 0 of 2000
        # sampled gold expressions failed it (tests grade every drawn gold answer).
        for entry in _rg_stream("countdown", seed, check_gold=False, **self._config()):
            md = entry["metadata"]
            prompt = f"Make {md['target']} from {' '.join(map(str, md['numbers']))}."
            yield Example(prompt=prompt, answer=entry["answer"],
                          meta={"rg_metadata": md, "rg_question": entry["question"],
                                "numbers": list(md["numbers"]), "target": md["target"]})

    def _grade(self, example: Example, response: str) -> Grade:
        answer = extract_answer(response)
        # score_answer parses with sympy (which evaluates text): let only arithmetic through.
        if answer is not None and (not _COUNTDOWN_OK.match(answer) or "**" in answer
                                   or "//" in answer):
            return Grade(0.0, f"answer {answer[:60]!r} is not a plain arithmetic expression")
        if not hasattr(self, "_grader"):
            self._grader = _rg_grader("countdown", **self._config())
        return _rg_grade(self._grader, example, answer)

    def _procedures(self, example: Example):
        return _countdown_procedures(tuple(example.meta["numbers"]), example.meta["target"])

    def _write_solution(self, example: Example, c: Chooser) -> str:
        good, bad = self._procedures(example)
        target = example.meta["target"]
        if good:
            expr, steps = c.pick(good)
        else:  # too many numbers to enumerate, or only non-integer routes: use the gold one
            expr = example.answer
            steps = [(a, op, b, r) for op, a, b, r, _ in _steps(expr, lambda p: p[0])]
        sep = c.pick([" ", ""], weights=[1, 2])
        joiner = c.pick([", ", "; ", "\n", ", then ", ". "])

        def show(steps_):
            parts = []
            for i, (a, op, b, r) in enumerate(steps_):
                eq = "=" if not sep else c.pick([" = ", "="])
                glue = "" if i == 0 else c.pick([joiner, joiner, ", so ", " and "])
                parts.append(f"{glue}{a}{sep}{op}{sep}{b}{eq}{r}")
            return "".join(parts)

        lines = []
        intro = c.pick(["", f"Target {target}.", f"Need {target}.", "Search:"],
                       weights=[6, 1, 1, 1])
        if intro:
            lines.append(intro)
        if bad and c.coin(0.3):  # a failed attempt first
            _, (value, wrong_steps) = c.pick(bad)
            lead = c.pick(["Try ", "Try: ", "", "Maybe "])
            verdict = c.pick(["no", f"not {target}", "miss", "wrong",
                              "too big" if value > target else "too small"])
            lines.append(f"{lead}{show(wrong_steps)}, {verdict}.")
            lead = c.pick(["", "", "So ", "Then ", "Got it: ", "Instead "])
        else:
            lead = c.pick(["", "", "Try ", "Use "])
        close = c.pick(["", f" Yes, {target}.", " Works.", "."], weights=[5, 1, 1, 1])
        lines.append(lead + show(steps) + close)
        final = expr if c.coin(0.6) else expr.replace(" ", "")
        lines.append(f"Answer: {final}")
        return "\n".join(lines)

    def corrupted(self, example: Example, rng: random.Random) -> str:
        _, bad = self._procedures(example)
        if bad:
            expr, (value, _) = rng.choice(bad)
            return f"{expr} = {value}\nAnswer: {expr}"
        return f"Answer: {example.answer} + 1"  # an extra number: never a valid use of the set


# ----------------------------------------------------------------------------- gsm

@register("gsm_symbolic")
class GSMSymbolic(Task):
    """reasoning-gym gsm_symbolic word problems (long prompts; for real models).

    ``solution`` is reasoning-gym's own chain of thought, ending ``Answer: N``.
    """

    max_difficulty = 1  # reasoning-gym supports only its difficulty 1.0

    def _stream(self, seed: int) -> Iterator[Example]:
        for entry in _rg_stream("gsm_symbolic", seed, difficulty=1.0):
            yield Example(prompt=entry["question"], answer=entry["answer"],
                          meta={"rg_metadata": entry["metadata"]})

    def _grade(self, example: Example, response: str) -> Grade:
        if not hasattr(self, "_grader"):
            self._grader = _rg_grader("gsm_symbolic", difficulty=1.0)
        return _rg_grade(self._grader, example, extract_answer(response))

    def solution(self, example: Example, rng: random.Random) -> str:
        cot = example.meta["rg_metadata"].get("answer_cot", "").strip()
        body = re.sub(r"\n?####.*$", "", cot, flags=re.S).strip()
        return (body + "\n" if body else "") + f"Answer: {example.answer}"

    def corrupted(self, example: Example, rng: random.Random) -> str:
        value = float(example.answer) + rng.choice([1, 2, 10])
        return f"Answer: {value:g}"
