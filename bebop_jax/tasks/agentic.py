"""Multi-turn tasks: a procedural calculator tool-use task and textarena games.

Conversation protocol (what the RL loop and decoder rely on):

- The user turn is the example's prompt. The assistant writes; its turn ends
  at end-of-sequence or when its text ends with one of ``task.stop_strings``.
  The environment's reply (``env.step(text).observation``) is appended as an
  ``env`` turn (``trainable=False``), and the assistant continues.
- Turn texts concatenate with no separator (``join_turns``).

``calculator``: the assistant calls the tool as ``calc[37*48]``; the env replies
``=1776``; the final answer is a last line ``Answer: N``.

textarena games (``guess_the_number``, ``tower_of_hanoi``, ``frozen_lake``): each
assistant turn is one bracketed move (``[12]``, ``[A C]``, ``[down]``); the env
replies with the game's messages. A flat response is graded by replaying its
bracketed moves in order. Reward 1 for a win, else 0 (textarena's shaped
partial credit is reported in the reason).
"""

from __future__ import annotations

import ast
import contextlib
import random
import re
from typing import Iterator

from bebop_jax.tasks.base import (Chooser, Env, Example, Grade, StepResult, Task, Turn,
                                  check_response, extract_answer, join_turns, register)

# ----------------------------------------------------------------------------- calculator

_CALL_RE = re.compile(r"calc\[([^\[\]]{0,80})\]\s*$")


def safe_arith(expr: str) -> int | None:
    """Value of an integer arithmetic expression (+ - * / // % and parentheses), or None.

    Parsed, never evaluated as code; magnitudes are capped so the tool stays cheap.
    ``/`` is allowed only when it divides exactly.
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                r = a + b
            elif isinstance(node.op, ast.Sub):
                r = a - b
            elif isinstance(node.op, ast.Mult):
                r = a * b
            elif isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
                if b == 0 or (isinstance(node.op, ast.Div) and a % b):
                    raise ArithmeticError
                r = a % b if isinstance(node.op, ast.Mod) else a // b
            else:
                raise ArithmeticError
            if abs(r) > 10**15:
                raise ArithmeticError
            return r
        raise ArithmeticError

    try:
        return ev(tree)
    except (ArithmeticError, RecursionError):
        return None


class CalculatorEnv(Env):
    """Answers ``calc[...]`` calls with ``=value``; ends on an ``Answer:`` line."""

    def __init__(self, example: Example, max_calls: int):
        self.example, self.max_calls = example, max_calls
        self.calls, self.done = 0, True

    def reset(self) -> str:
        self.calls, self.done = 0, False
        return self.example.prompt

    def step(self, action: str) -> StepResult:
        if self.done:
            return StepResult("", 0.0, True, "episode already finished")
        problem = check_response(action)
        if problem is not None:
            self.done = True
            return StepResult("", 0.0, True, problem)
        answer = extract_answer(action)
        if answer is not None:
            self.done = True
            grade = _grade_calc(self.example, answer)
            return StepResult("", grade.reward, True, grade.reason)
        call = _CALL_RE.search(action)
        if call is None:
            self.done = True
            return StepResult("", 0.0, True, "turn ended without a calc[...] call or an "
                                             "'Answer:' line")
        self.calls += 1
        if self.calls > self.max_calls:
            self.done = True
            return StepResult("", 0.0, True, f"more than {self.max_calls} tool calls")
        value = safe_arith(call.group(1))
        obs = "=error" if value is None else f"={value}"
        return StepResult(obs, 0.0, False, f"tool call {self.calls}: {call.group(1)!r}")


def _grade_calc(example: Example, answer: str | None) -> Grade:
    if answer is None:
        return Grade(0.0, "no final 'Answer:' line")
    if answer.strip() == example.answer:
        return Grade(1.0, "correct")
    return Grade(0.0, f"wrong answer {answer[:40]!r} (gold {example.answer})")


@register("calculator")
class Calculator(Task):
    """Tool use: compute e.g. ``37*48+5`` with a calculator the model calls.

    Two-digit products are hard for a tiny model in its head, so solving needs the
    tool and copying its result into the next step. Difficulty 1: one product and
    a small term; higher: two products, larger numbers.
    """

    multi_turn = True
    small_scale = True
    stop_strings = ("]",)
    max_calls = 4

    def _stream(self, seed: int) -> Iterator[Example]:
        rng = random.Random(seed)
        d = self.difficulty
        hi = {1: 99, 2: 99, 3: 999, 4: 999, 5: 9999}[d]
        forms = ["a*b+c", "a*b-c", "c+a*b", "(a+b)*c"] + (["a*b+c*e", "a*b-c*e"] if d >= 2
                                                         else [])
        while True:
            form = rng.choice(forms)
            a, b = rng.randint(11, hi), rng.randint(11, hi)
            c = rng.randint(2, 9) if d == 1 else rng.randint(2, 99)
            e = rng.randint(2, 99)
            expr = (form.replace("a", str(a)).replace("b", str(b)).replace("c", str(c))
                    .replace("e", str(e)))
            yield Example(prompt=f"Compute {expr}.", answer=str(safe_arith(expr)),
                          meta={"form": form, "a": a, "b": b, "c": c, "e": e, "expr": expr})

    def make_env(self, example: Example) -> CalculatorEnv:
        return CalculatorEnv(example, self.max_calls)

    def _grade(self, example: Example, response: str) -> Grade:
        return _grade_calc(example, extract_answer(response))

    def _write_solution(self, example: Example, c: Chooser) -> str:
        return join_turns(self._script(example, c)[1:])[0]

    def solution_turns(self, example: Example, rng: random.Random) -> list[Turn]:
        def write(c):
            turns = self._script(example, c)
            return turns, join_turns(turns[1:])[0]

        return self._fit(example, rng, write)[0]

    def _script(self, example: Example, c: Chooser) -> list[Turn]:
        """A full conversation; env turns come from a real ``CalculatorEnv``."""
        m = example.meta
        a, b, cc, e, form = m["a"], m["b"], m["c"], m["e"], m["form"]
        s = c.pick(["", " "], weights=[2, 1])

        def mul(x, y):  # either operand order
            return f"{x}{s}*{s}{y}" if c.coin(0.5) else f"{y}{s}*{s}{x}"

        # Plan: list of ("call", expr) / ("say", template with {0},{1} for earlier results).
        plan = []
        if form in ("a*b+c", "a*b-c", "c+a*b"):
            op = "-" if form == "a*b-c" else "+"
            how = c.pick(["whole", "then_mental", "then_tool"], weights=[2, 3, 3])
            if how == "whole":
                plan = [("call", example.meta["expr"])]
            else:
                plan = [("call", mul(a, b))]
                if op == "+" and c.coin(0.5):
                    step = "{0}" + f"{s}+{s}{cc}" if c.coin(0.5) else f"{cc}{s}+{s}" + "{0}"
                else:
                    step = "{0}" + f"{s}{op}{s}{cc}"
                plan.append(("call" if how == "then_tool" else "say", step))
        elif form == "(a+b)*c":
            how = c.pick(["whole", "sum_first", "two_calls"])
            if how == "whole":
                plan = [("call", example.meta["expr"])]
            elif how == "sum_first":  # add in the head, multiply with the tool
                plan = [("say", f"{a}{s}+{s}{b}" + "={A}"), ("call", "{A}" + f"{s}*{s}{cc}")]
            else:
                plan = [("call", f"{a}{s}+{s}{b}"), ("call", "{0}" + f"{s}*{s}{cc}")]
        else:  # a*b+c*e, a*b-c*e
            op = "-" if "-" in form else "+"
            how = c.pick(["whole", "products_mental", "three_calls"])
            if how == "whole":
                plan = [("call", example.meta["expr"])]
            else:
                plan = [("call", mul(a, b)), ("call", mul(cc, e))]
                plan.append(("call" if how == "three_calls" else "say",
                             "{0}" + f"{s}{op}{s}" + "{1}"))
        env = self.make_env(example)
        turns = [Turn("user", env.reset(), False)]
        results, pending = [], c.pick(["", "Use the tool. ", "Let me compute. ", "First, ",
                                        "Tool: ", "Calculator: ", "Start with "],
                                       weights=[4, 1, 1, 1, 1, 1, 1])
        sum_ab = m["a"] + m["b"]
        for kind, template in plan:
            text = template.replace("{A}", str(sum_ab))
            for i, r in enumerate(results):
                text = text.replace("{" + str(i) + "}", str(r))
            if kind == "say":
                val = safe_arith(text.split("=")[0])
                if "{A}" in template:
                    pending += text + c.pick([", ", ". ", "; then "])
                else:
                    results.append(val)
                    # Never glue digits straight onto the tool's "=value".
                    glue = c.pick([" so ", ", then ", ". ", " and ", ", add: ", "; ", " "])
                    pending += f"{glue}{text}{s}={s}{val}"
            else:
                if results or (turns and len(turns) > 1):
                    pending += c.pick([" ", ", then ", " and ", ". Next ", ", now ", "; "])
                pending += f"calc[{text}]"
                turns.append(Turn("assistant", pending, True))
                res = env.step(pending)
                turns.append(Turn("env", res.observation, False))
                results.append(int(res.observation[1:]))
                pending = ""
        ans = example.answer
        closing = c.pick(["", ".", f". So {ans}.", ". Done.", f", total {ans}.", " is the result."],
                         weights=[5, 2, 1, 1, 1, 1])
        pending += f"{closing}\nAnswer: {example.answer}"
        turns.append(Turn("assistant", pending, True))
        final = env.step(pending)
        if final.reward != 1.0:  # the script is wrong: a bug, not a model error
            raise AssertionError(f"calculator script failed: {final.reason}: {turns}")
        return turns

    def corrupted(self, example: Example, rng: random.Random) -> str:
        wrong = int(example.answer) + rng.choice([-10, -1, 1, 10])
        return f"calc[{example.meta['expr']}]=?\nAnswer: {wrong}"


# ----------------------------------------------------------------------------- textarena

@contextlib.contextmanager
def _own_global_random():
    """textarena seeds and draws from the global ``random``; keep the caller's state."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


_ACTION_RE = re.compile(r"\[[^\[\]\n]{1,20}\]")
MAX_REPLAY_ACTIONS = 300


class TextArenaEnv(Env):
    """A textarena single-player game as an ``Env``, with the example's hidden state."""

    def __init__(self, task: "_TextArenaTask", example: Example):
        self.task, self.example = task, example
        self._env, self.done = None, True

    def reset(self) -> str:
        import textarena

        with _own_global_random():
            self._env = textarena.make(self.example.meta["env_id"])
            self._env.reset(num_players=1, seed=self.example.meta["game_seed"])
            self.task._apply_state(self._env, self.example.meta["state"])
            self._env.get_observation()  # drop textarena's initial messages; we render them
        self.done = False
        return self.task._render_prompt(self._env)

    def step(self, action: str) -> StepResult:
        if self.done or self._env is None:
            return StepResult("", 0.0, True, "episode already finished")
        problem = check_response(action)
        if problem is not None:
            self.done = True
            return StepResult("", 0.0, True, problem)
        import textarena

        with _own_global_random():
            done, _ = self._env.step(action)
            _, messages = self._env.get_observation()
        # Game messages only: not the echo of the player's own move.
        text = "\n".join(m[1] for m in messages
                         if m[2] != textarena.ObservationType.PLAYER_ACTION)
        if not done:
            return StepResult(text, 0.0, False, "game continues")
        self.done = True
        with _own_global_random():
            rewards, info = self._env.close()
        shaped = float(rewards.get(0, 0.0))
        why = (info or {}).get(0, {}).get("reason", "")
        won = shaped >= 1.0
        return StepResult(text, 1.0 if won else 0.0, True,
                          ("won: " if won else f"lost (textarena score {shaped:.2f}): ") + why)


class _TextArenaTask(Task):
    multi_turn = True
    stop_strings = ("]",)
    env_ids: dict[int, str] = {}

    def __init__(self, difficulty: int = 1):
        self.max_difficulty = len(self.env_ids)
        super().__init__(difficulty)
        self.env_id = self.env_ids[difficulty]

    # hooks for subclasses
    def _draw_state(self, env, rng: random.Random) -> dict:
        """The hidden state of a fresh game (after textarena's own reset)."""
        raise NotImplementedError

    def _apply_state(self, env, state: dict) -> None:
        raise NotImplementedError

    def _gold_actions(self, state: dict) -> list[str]:
        raise NotImplementedError

    def _render_prompt(self, env) -> str:
        """The first observation: textarena's player prompt and board, after ``_apply_state``."""
        raise NotImplementedError

    def _stream(self, seed: int) -> Iterator[Example]:
        import textarena

        rng = random.Random(seed)
        while True:
            game_seed = rng.randrange(2**31)
            with _own_global_random():
                env = textarena.make(self.env_id)
                env.reset(num_players=1, seed=game_seed)
                state = self._draw_state(env, rng)
                self._apply_state(env, state)
                prompt = self._render_prompt(env)
            yield Example(prompt=prompt, answer="\n".join(self._gold_actions(state)),
                          meta={"env_id": self.env_id, "game_seed": game_seed, "state": state})

    def split_key(self, example: Example) -> str:
        return example.prompt + "\x1e" + example.answer  # the prompt alone may not show the state

    def make_env(self, example: Example) -> TextArenaEnv:
        return TextArenaEnv(self, example)

    def _grade(self, example: Example, response: str) -> Grade:
        actions = _ACTION_RE.findall(response)
        if not actions:
            return Grade(0.0, "no bracketed move like [..] in the response")
        env = self.make_env(example)
        env.reset()
        for i, action in enumerate(actions[:MAX_REPLAY_ACTIONS]):
            res = env.step(action)
            if res.done:
                return Grade(res.reward, res.reason)
        return Grade(0.0, f"game not finished after {min(len(actions), MAX_REPLAY_ACTIONS)} "
                          "moves")

    def solution(self, example: Example, rng: random.Random) -> str:
        turns = self.solution_turns(example, rng)
        return "\n".join(t.text for t in turns if t.role == "assistant")

    def _solution_actions(self, example: Example, rng: random.Random) -> list[str]:
        return example.answer.split("\n")

    def solution_turns(self, example: Example, rng: random.Random) -> list[Turn]:
        """Play the gold moves through the env, recording its replies as env turns."""
        env = self.make_env(example)
        turns = [Turn("user", env.reset(), False)]
        actions = self._solution_actions(example, rng)
        for i, action in enumerate(actions):
            text = action if i == 0 else "\n" + action
            turns.append(Turn("assistant", text, True))
            res = env.step(action)
            if res.done:
                break
            turns.append(Turn("env", "\n" + res.observation, False))
        return turns


@register("guess_the_number")
class GuessTheNumber(_TextArenaTask):
    """textarena GuessTheNumber: find the secret with higher/lower hints.

    The prompt is the same for every game, so the split is by secret number:
    difficulty 1 (1..20) has only 20 games, difficulty 2 (1..50) has 50.
    """

    env_ids = {1: "GuessTheNumber-v0-raw", 2: "GuessTheNumber-v0-hardcore-raw"}
    test_fraction = 0.3

    def _draw_state(self, env, rng):
        return {"secret": int(env.game_number)}

    def _apply_state(self, env, state):
        env.game_number = state["secret"]
        env.state.game_state["game_number"] = state["secret"]

    def _render_prompt(self, env) -> str:
        return env._prompt(0, env.state.game_state)

    def _gold_actions(self, state):
        return [f"[{state['secret']}]"]

    def _solution_actions(self, example, rng):
        """Bisection (with a random tie-break) until the secret is found."""
        secret = example.meta["state"]["secret"]
        lo, hi = 1, {1: 20, 2: 50}[self.difficulty]
        actions = []
        while True:
            mid = (lo + hi + rng.randint(0, 1)) // 2
            actions.append(f"[{mid}]")
            if mid == secret:
                return actions
            lo, hi = (mid + 1, hi) if mid < secret else (lo, mid - 1)

    def corrupted(self, example, rng):
        secret = example.meta["state"]["secret"]
        return f"[{secret + 1 if secret < 20 else secret - 1}]"


def _hanoi_moves(towers: dict, n: int, target: str = "C") -> list[tuple[str, str]]:
    """Optimal moves that stack disks n..1 on ``target`` from any legal position."""
    where = {d: p for p, disks in towers.items() for d in disks}
    moves = []

    def solve(k: int, goal: str):
        if k == 0:
            return
        if where[k] == goal:
            solve(k - 1, goal)
            return
        other = ({"A", "B", "C"} - {where[k], goal}).pop()
        solve(k - 1, other)
        moves.append((where[k], goal))
        where[k] = goal
        solve(k - 1, goal)

    solve(n, target)
    return moves


@register("tower_of_hanoi")
class TowerOfHanoi(_TextArenaTask):
    """textarena TowerOfHanoi, started from a random legal position (3^n of them).

    textarena always starts with every disk on A, which would give one game per
    difficulty; a random start makes train/test splits meaningful. Difficulty d
    uses d + 2 disks (textarena's v0 .. extreme variants).
    """

    env_ids = {1: "TowerOfHanoi-v0-raw", 2: "TowerOfHanoi-v0-medium-raw",
               3: "TowerOfHanoi-v0-hard-raw", 4: "TowerOfHanoi-v0-hardcore-raw",
               5: "TowerOfHanoi-v0-extreme-raw"}

    def _draw_state(self, env, rng):
        n = env.num_disks
        while True:
            pegs = [rng.choice("ABC") for _ in range(n)]  # peg of disk n, n-1, ..., 1
            towers = {p: [n - i for i in range(n) if pegs[i] == p] for p in "ABC"}
            if towers["C"] != list(range(n, 0, -1)):
                return {"towers": towers}

    def _apply_state(self, env, state):
        env.state.game_state["towers"] = {p: list(d) for p, d in state["towers"].items()}

    def _render_prompt(self, env) -> str:
        board = "".join(f"{p}: {d}\n" for p, d in env.state.game_state["towers"].items())
        return env._generate_player_prompt(0, env.state.game_state) + \
            f"\nCurrent Board: \n{board}."

    def _gold_actions(self, state):
        n = sum(len(d) for d in state["towers"].values())
        return [f"[{a} {b}]" for a, b in _hanoi_moves(state["towers"], n)]

    def corrupted(self, example, rng):
        moves = example.answer.split("\n")
        return "\n".join(moves[:-1]) if len(moves) > 1 else "[C C]"


@register("frozen_lake")
class FrozenLake(_TextArenaTask):
    """textarena FrozenLake: walk to the goal around holes. Gold: a shortest path."""

    env_ids = {1: "FrozenLake-v0-raw", 2: "FrozenLake-v0-random-raw",
               3: "FrozenLake-v0-hardcore-raw"}

    def _draw_state(self, env, rng):
        gs = env.state.game_state
        return {"grid": [list(r) for r in gs["grid"]], "start": list(gs["player_pos"]),
                "goal": list(gs["goal_pos"])}

    def _apply_state(self, env, state):
        gs = env.state.game_state
        gs["grid"] = [list(r) for r in state["grid"]]
        gs["player_pos"] = tuple(state["start"])
        gs["goal_pos"] = tuple(state["goal"])
        env.player_pos, env.goal_pos = tuple(state["start"]), tuple(state["goal"])

    def _render_prompt(self, env) -> str:
        board = env._render_board()
        return (env._prompt(0, env.state.game_state) + "\nCurrent Board:\n\n" + board +
                "\n\nAvailable Actions: [up], [down], [left], [right], [w], [a], [s], [d]")

    def _gold_actions(self, state):
        grid, start, goal = state["grid"], tuple(state["start"]), tuple(state["goal"])
        size = len(grid)
        moves = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
        prev, queue = {start: None}, [start]
        for pos in queue:  # BFS; queue grows while iterating
            if pos == goal:
                break
            for name, (dr, dc) in moves.items():
                nxt = (pos[0] + dr, pos[1] + dc)
                if (0 <= nxt[0] < size and 0 <= nxt[1] < size and nxt not in prev
                        and grid[nxt[0]][nxt[1]] != "H"):
                    prev[nxt] = (pos, name)
                    queue.append(nxt)
        path, pos = [], goal
        while prev[pos] is not None:
            pos, name = prev[pos]
            path.append(f"[{name}]")
        return path[::-1]

    def corrupted(self, example, rng):
        moves = example.answer.split("\n")
        return "\n".join(moves[:-1]) if len(moves) > 1 else "[up]"
