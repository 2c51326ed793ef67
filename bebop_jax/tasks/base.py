"""The task interface: examples with disjoint seeded splits, graders, environments.

Every task is a ``Task``: ``examples(split, n, seed)`` draws prompts, ``grade``
turns a text response into a reward in [0, 1] with a reason, ``solution`` writes a
worked response, and multi-turn tasks add ``make_env`` (observation in, action
out) and ``solution_turns``. Responses are text; tokenization lives in
``bebop_jax.data``.

Splits. An example belongs to "test" iff a hash of its ``split_key`` (the prompt,
or prompt plus hidden state for games whose prompt is shared) falls in the
lowest ``test_fraction`` of the hash range, and to "train" otherwise. The split
is a property of the example itself, so the two splits can never share a
prompt, whatever seeds are used; seeds only choose which examples are drawn.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
import random
import re
from typing import Callable, Iterator, Literal, Mapping, Sequence

SPLITS = ("train", "test")
MAX_RESPONSE_CHARS = 100_000
SMALL_MAX_CHARS = 160  # prompt + separator + solution, for the tiny byte-level model
_ANSWER_RE = re.compile(r"^[ \t]*Answer:[ \t]*(.*?)[ \t]*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem: ``prompt`` shown to the model, gold final ``answer``, task ``meta``."""

    prompt: str
    answer: str
    meta: Mapping = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class Grade:
    """A verifier's verdict: ``reward`` in [0, 1] and a human-readable ``reason``."""

    reward: float
    reason: str

    def __post_init__(self):
        if not (isinstance(self.reward, (int, float)) and 0.0 <= self.reward <= 1.0):
            raise ValueError(f"Grade.reward: must be a number in [0, 1], got {self.reward!r}")


@dataclasses.dataclass(frozen=True)
class Turn:
    """One turn of a conversation.

    ``env`` turns (tool results, game messages) and ``user`` turns are never
    trainable: RL masks them out of the loss and the decoder appends them
    mid-rollout. Turns concatenate with no separator; each text carries its own
    whitespace.
    """

    role: Literal["user", "assistant", "env"]
    text: str
    trainable: bool

    def __post_init__(self):
        if self.role not in ("user", "assistant", "env"):
            raise ValueError(f"Turn.role: must be 'user', 'assistant' or 'env', got {self.role!r}")
        if self.trainable and self.role != "assistant":
            raise ValueError(f"Turn.trainable: only assistant turns may be trainable, got a "
                             f"trainable {self.role!r} turn")


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What an environment returns for one action."""

    observation: str
    reward: float
    done: bool
    reason: str


def join_turns(turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int, bool]]]:
    """Concatenate turn texts; return the text and ``(start, end, trainable)`` char spans."""
    text, spans, pos = [], [], 0
    for turn in turns:
        text.append(turn.text)
        spans.append((pos, pos + len(turn.text), turn.trainable))
        pos += len(turn.text)
    return "".join(text), spans


def extract_answer(response: str) -> str | None:
    """The text after the last ``Answer:`` at the start of a line, or None."""
    matches = _ANSWER_RE.findall(response)
    return matches[-1] if matches else None


def check_response(response) -> str | None:
    """Why a response cannot be graded at all (None if it can)."""
    if not isinstance(response, str):
        return f"malformed response: expected text, got {type(response).__name__}"
    if len(response) > MAX_RESPONSE_CHARS:
        return f"malformed response: {len(response)} characters, more than {MAX_RESPONSE_CHARS}"
    if not response.strip():
        return "malformed response: empty"
    if "\x00" in response:
        return "malformed response: contains NUL bytes (binary data)"
    try:
        response.encode("utf-8")
    except UnicodeEncodeError:
        return "malformed response: not valid unicode (lone surrogates)"
    return None


def split_of(key: str, test_fraction: float) -> str:
    """'test' if the hash of ``key`` lies in the lowest ``test_fraction`` of its range."""
    digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()
    return "test" if int.from_bytes(digest[:8], "big") < test_fraction * 2.0**64 else "train"


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Chooser:
    """``random.Random`` choices that also total their log-probability.

    Solution writers draw every stylistic choice through one Chooser, so the sum
    of ``-log p`` over a sampled solution (``nats``) is an upper bound on its
    contribution to the entropy of the solution distribution (equal when
    distinct choice paths give distinct texts).
    """

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.nats = 0.0

    def pick(self, options: Sequence, weights: Sequence[float] | None = None):
        if weights is None:
            self.nats += math.log(len(options))
            return options[self.rng.randrange(len(options))]
        total = float(sum(weights))
        i = self.rng.choices(range(len(options)), weights=weights)[0]
        self.nats -= math.log(weights[i] / total)
        return options[i]

    def coin(self, p_true: float) -> bool:
        value = self.rng.random() < p_true
        self.nats -= math.log(p_true if value else 1.0 - p_true)
        return value


class Env(abc.ABC):
    """A multi-turn environment: ``reset()`` gives the first observation, ``step`` the rest."""

    @abc.abstractmethod
    def reset(self) -> str: ...

    @abc.abstractmethod
    def step(self, action: str) -> StepResult: ...


class Task(abc.ABC):
    """Base class of all tasks. Subclasses set ``name`` and implement the hooks below."""

    name: str = ""
    multi_turn: bool = False
    small_scale: bool = False      # short ASCII prompt+solution, for the tiny byte-level model
    test_fraction: float = 0.25
    max_difficulty: int = 5
    # Multi-turn only: generation of an assistant turn stops when its text ends with
    # one of these (besides end-of-sequence); the env then answers.
    stop_strings: tuple[str, ...] = ()

    def __init__(self, difficulty: int = 1):
        if not (isinstance(difficulty, int) and not isinstance(difficulty, bool)
                and 1 <= difficulty <= self.max_difficulty):
            raise ValueError(f"difficulty: task {self.name!r} takes an int in "
                             f"[1, {self.max_difficulty}], got {difficulty!r}")
        self.difficulty = difficulty

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, difficulty={self.difficulty})"

    # ---- hooks -------------------------------------------------------------------
    @abc.abstractmethod
    def _stream(self, seed: int) -> Iterator[Example]:
        """An endless (or, for fixed datasets, finite) deterministic stream of candidates."""

    @abc.abstractmethod
    def _grade(self, example: Example, response: str) -> Grade:
        """Grade a response that passed ``check_response``."""

    def split_key(self, example: Example) -> str:
        """What decides the split; two examples with equal keys count as duplicates."""
        return example.prompt

    def _write_solution(self, example: Example, c: Chooser) -> str:
        """One worked solution, every stylistic choice drawn through ``c``."""
        raise NotImplementedError(f"task {self.name!r} has no worked solutions")

    @property
    def max_chars(self) -> int | None:
        """Cap on len(prompt) + 1 + len(solution) (small-scale tasks at difficulty 1)."""
        return SMALL_MAX_CHARS if self.small_scale and self.difficulty == 1 else None

    def _fit(self, example: Example, rng: random.Random, write: Callable[[Chooser], tuple]):
        """Draw ``write(chooser) -> (value, text)`` until the text fits ``max_chars``.

        Returns (value, nats); after 32 misses, the shortest draw.
        """
        best = None
        for _ in range(32):
            c = Chooser(rng)
            value, text = write(c)
            if self.max_chars is None or len(example.prompt) + 1 + len(text) <= self.max_chars:
                return value, c.nats
            if best is None or len(text) < best[2]:
                best = (value, c.nats, len(text))
        return best[0], best[1]

    def solution(self, example: Example, rng: random.Random) -> str:
        """A worked response ending in the final answer in the form ``grade`` accepts."""
        return self.solution_and_nats(example, rng)[0]

    def solution_and_nats(self, example: Example, rng: random.Random) -> tuple[str, float]:
        """A solution and the total -log p of the choices that produced it.

        Averaged over draws, nats / len(solution) bounds from above the mean
        per-byte entropy of the solution distribution (for the entropy target).
        """
        def write(c):
            text = self._write_solution(example, c)
            return text, text

        return self._fit(example, rng, write)

    def corrupted(self, example: Example, rng: random.Random) -> str:
        """A plausible-looking wrong response (for tests and ``show``); grades 0."""
        raise NotImplementedError(f"task {self.name!r} has no corrupted responses")

    def make_env(self, example: Example) -> Env:
        raise NotImplementedError(f"task {self.name!r} is single-turn")

    def solution_turns(self, example: Example, rng: random.Random) -> list[Turn]:
        raise NotImplementedError(f"task {self.name!r} has no scripted conversations")

    # ---- public API ----------------------------------------------------------------
    def split_of(self, example: Example) -> str:
        return split_of(self.split_key(example), self.test_fraction)

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` distinct examples of ``split``, the same for the same arguments.

        Examples of the two splits never share a ``split_key``. Raises ValueError
        if the task has fewer than ``n`` distinct examples in that split.
        """
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise ValueError(f"n: must be an int >= 0, got {n!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed: must be an int, got {seed!r}")
        out, seen = [], set()
        budget = 200 + 40 * n
        for tries, ex in enumerate(self._stream(derive_seed(self.name, split, seed))):
            if len(out) == n:
                return out
            if tries >= budget:
                break
            key = self.split_key(ex)
            if key in seen or split_of(key, self.test_fraction) != split:
                continue
            seen.add(key)
            out.append(ex)
        if len(out) == n:
            return out
        raise ValueError(f"n: task {self.name!r} (difficulty {self.difficulty}) yielded only "
                         f"{len(out)} distinct {split!r} examples, {n} requested")

    def grade(self, example: Example, response: str) -> Grade:
        """Reward in [0, 1] with a reason. Never raises on a malformed response."""
        problem = check_response(response)
        if problem is not None:
            return Grade(0.0, problem)
        return self._grade(example, response)

    def grade_many(self, examples: Sequence[Example], responses: Sequence[str]) -> list[Grade]:
        """``grade`` pairwise; code tasks override this to run programs in parallel."""
        if len(examples) != len(responses):
            raise ValueError(f"responses: need one per example ({len(examples)}), "
                             f"got {len(responses)}")
        return [self.grade(e, r) for e, r in zip(examples, responses)]


def grade_all(task: Task, examples: Sequence[Example], texts: Sequence[str]) -> dict:
    """Mean reward of ``texts`` against ``examples`` with the task's grader:
    ``{"accuracy", "n", "grades"}``."""
    grades = task.grade_many(examples, texts)
    rewards = [g.reward for g in grades]
    return {"accuracy": sum(rewards) / len(rewards) if rewards else 0.0, "n": len(rewards), "grades": grades}


_REGISTRY: dict[str, Callable[[int], Task]] = {}


def register(name: str):
    """Class decorator: make a Task available as ``get_task(name)``."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_REGISTRY)


def check_task_names(names: Sequence[str], *, field: str = "tasks") -> None:
    """Raise ValueError("field: ...") unless ``names`` is a non-empty list of registered tasks."""
    if not names:
        raise ValueError(f"{field}: give at least one task; valid: {list_tasks()}")
    unknown = [t for t in names if t not in _REGISTRY]
    if unknown:
        raise ValueError(f"{field}: unknown {unknown}; valid: {list_tasks()}")


def get_task(name: str, difficulty: int = 1) -> Task:
    """The task called ``name`` at ``difficulty`` (1 = the small-scale default)."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown task {name!r}; valid tasks: {', '.join(list_tasks())}")
    return _REGISTRY[name](difficulty)
