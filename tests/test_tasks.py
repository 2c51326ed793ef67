"""Every task: disjoint reproducible splits, gold scores 1, corrupted 0, junk 0.

Plus the protocols the rest of the project relies on: multi-turn env turns,
worked-solution length and variety for the small-scale tasks, HumanEval through
the sandbox, and the show command.
"""

import random
import re
import statistics

import pytest

from bebop_jax.tasks import (SMALL_SCALE_TASKS, Example, Grade, Turn, extract_answer, get_task,
                             join_turns, list_tasks)
from bebop_jax.tasks.agentic import safe_arith
from bebop_jax.tasks.show import main as show_main

ALL_TASKS = ["arithmetic", "calculator", "chain_sum", "code_expr", "countdown", "frozen_lake",
             "gsm_symbolic", "guess_the_number", "humaneval", "tower_of_hanoi"]
# (train n, test n) per task: small enough for the smallest problem spaces.
SIZES = {"guess_the_number": (8, 3), "tower_of_hanoi": (10, 4), "humaneval": (12, 6)}
ANSWER_LINE_TASKS = ["arithmetic", "chain_sum", "countdown", "gsm_symbolic", "calculator"]
TEXTARENA = ["frozen_lake", "guess_the_number", "tower_of_hanoi"]


def _sizes(name):
    return SIZES.get(name, (30, 10))


def test_registry():
    # Tests may register toy tasks of their own (tests/toy_tasks.py) in the same worker.
    builtin = [name for name in list_tasks() if get_task(name).__module__.startswith("bebop_jax.")]
    assert builtin == sorted(ALL_TASKS)
    with pytest.raises(ValueError, match="unknown task 'nope'.*arithmetic.*tower_of_hanoi"):
        get_task("nope")
    with pytest.raises(ValueError, match="difficulty"):
        get_task("arithmetic", 0)
    with pytest.raises(ValueError, match="difficulty"):
        get_task("humaneval", 2)
    task = get_task("calculator")
    assert task.name == "calculator" and task.multi_turn and task.stop_strings == ("]",)
    assert not get_task("arithmetic").multi_turn
    with pytest.raises(ValueError, match="split"):
        task.examples("valid", 3, 0)
    with pytest.raises(ValueError, match="n:"):
        task.examples("train", -1, 0)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_splits_disjoint_and_reproducible(name):
    task = get_task(name)
    n_train, n_test = _sizes(name)
    train = [task.examples("train", n_train, seed) for seed in (0, 1)]
    test = [task.examples("test", n_test, seed) for seed in (0, 1)]
    assert task.examples("train", n_train, 0) == train[0]          # reproducible
    assert task.examples("test", n_test, 1) == test[1]
    assert [len(x) for x in train + test] == [n_train] * 2 + [n_test] * 2
    train_keys = {task.split_key(e) for ex in train for e in ex}
    test_keys = {task.split_key(e) for ex in test for e in ex}
    assert not train_keys & test_keys                              # disjoint, across seeds too
    if name != "guess_the_number":  # its prompt is shared by every game; the key holds the secret
        assert not {e.prompt for ex in train for e in ex} & {e.prompt for ex in test for e in ex}
    for ex in train[0]:
        assert task.split_of(ex) == "train"
    for ex in test[0]:
        assert task.split_of(ex) == "test"
    assert len({task.split_key(e) for e in train[0]}) == n_train      # distinct within a call
    if name not in ("humaneval", "tower_of_hanoi", "guess_the_number"):
        assert train[0] != train[1]                                # the seed matters


@pytest.mark.parametrize("name", ALL_TASKS)
def test_gold_scores_one_and_corrupted_scores_zero(name):
    task = get_task(name)
    n_train, n_test = _sizes(name)
    examples = task.examples("train", n_train, 5) + task.examples("test", n_test, 5)
    rng = random.Random(0)
    solutions = [task.solution(ex, rng) for ex in examples]
    corrupted = [task.corrupted(ex, rng) for ex in examples]
    gold = task.grade_many(examples, solutions)
    bad = task.grade_many(examples, corrupted)
    assert all(isinstance(g, Grade) for g in gold + bad)
    assert [g.reward for g in gold] == [1.0] * len(examples), [g.reason for g in gold]
    assert [g.reward for g in bad] == [0.0] * len(examples), [g.reason for g in bad]
    assert all(g.reason for g in bad)
    if name in ANSWER_LINE_TASKS:  # the bare gold answer in the final-answer format
        bare = task.grade_many(examples, [f"Answer: {ex.answer}" for ex in examples])
        assert [g.reward for g in bare] == [1.0] * len(examples)
    if name in TEXTARENA or name == "humaneval":  # the gold answer itself is a response
        bare = task.grade_many(examples, [ex.answer for ex in examples])
        assert [g.reward for g in bare] == [1.0] * len(examples)
    if name == "code_expr":
        bare = task.grade_many(examples, [f"Answer: {ex.answer}" for ex in examples])
        assert [g.reward for g in bare] == [1.0] * len(examples)


@pytest.mark.parametrize("name", [n for n in ALL_TASKS if n != "humaneval"])
def test_every_difficulty_gold_scores_one(name):
    top = get_task(name).max_difficulty
    for difficulty in range(2, top + 1):
        task = get_task(name, difficulty)
        examples = task.examples("train", 3, 7) + task.examples("test", 2, 7)
        rng = random.Random(difficulty)
        grades = task.grade_many(examples, [task.solution(ex, rng) for ex in examples])
        assert [g.reward for g in grades] == [1.0] * 5, (difficulty, [g.reason for g in grades])
        assert task.max_chars is None  # only difficulty 1 is capped for the tiny model
    if name in ("arithmetic", "countdown", "calculator", "code_expr", "tower_of_hanoi"):
        assert top == 5


MALFORMED = {
    "empty": "",
    "whitespace": " \n\t ",
    "binary_junk": bytes(random.Random(0).randrange(256) for _ in range(4096)).decode("latin-1"),
    "lone_surrogates": b"\xff\xfe\x00garbage".decode("utf-8", errors="surrogateescape"),
    "one_megabyte": "Answer: 1\n" * 100_000,
    "unterminated_code_block": "```python\ndef f(x):\n    return x +",
    "nul_bytes": "Answer: 4\x00\x00",
    "huge_answer_line": "Answer: " + "9" * 50_000,
    "not_text": b"Answer: 4",
}


@pytest.mark.parametrize("name", ALL_TASKS)
def test_malformed_responses_score_zero_with_a_reason(name):
    task = get_task(name)
    ex = task.examples("test", 1, 0)[0]
    for label, response in MALFORMED.items():
        grade = task.grade(ex, response)
        assert grade.reward == 0.0 and grade.reason, (label, grade)


def test_malformed_reasons_are_specific():
    task = get_task("humaneval")
    ex = task.examples("test", 1, 0)[0]
    assert "unterminated code block" in task.grade(ex, MALFORMED["unterminated_code_block"]).reason
    assert "empty" in task.grade(ex, "").reason
    assert "characters" in task.grade(ex, MALFORMED["one_megabyte"]).reason
    assert "NUL" in task.grade(ex, MALFORMED["nul_bytes"]).reason
    arith = get_task("arithmetic")
    ex = arith.examples("test", 1, 0)[0]
    assert "Answer:" in arith.grade(ex, "the answer is 4").reason


@pytest.mark.parametrize("name", SMALL_SCALE_TASKS)
def test_small_scale_solutions_are_short_ascii_and_varied(name):
    task = get_task(name)
    assert task.small_scale and task.max_chars == 160
    rng = random.Random(0)
    distinct, nats_per_byte = [], []
    for ex in task.examples("train", 25, 3):
        draws = [task.solution_and_nats(ex, rng) for _ in range(40)]
        for text, _ in draws:
            assert (ex.prompt + "\n" + text).isascii()
            assert len(ex.prompt) + 1 + len(text) <= 160, (ex.prompt, text)
            assert extract_answer(text) is not None
            assert text.splitlines()[-1].startswith("Answer: ")
        distinct.append(len({t for t, _ in draws}))
        nats_per_byte.append(statistics.mean(n for _, n in draws)
                             / statistics.mean(len(t) + 1 for t, _ in draws))
    # Many solutions per prompt: real entropy for the MTP experiments.
    assert statistics.mean(distinct) >= 8, distinct
    assert statistics.mean(nats_per_byte) >= 0.08, statistics.mean(nats_per_byte)


def test_arithmetic_golden_solution_and_steps():
    task = get_task("arithmetic")
    ex = Example(prompt="Calculate 3 + 4 * -5.", answer="-17",
                 meta={"expression": "3 + 4 * -5",
                       "rg_metadata": {"expression": "3 + 4 * -5"}})
    texts = {task.solution(ex, random.Random(s)) for s in range(300)}
    assert all(t.endswith("\nAnswer: -17") or t == "Answer: -17" for t in texts)
    # Every shown step is a true equation (checked independently with eval): whole
    # arithmetic lines (chains: all parts equal) and single "a op b = r" steps in prose.
    step = re.compile(r"(?<![\d*+-])(-?\d+) ?([-+*]|plus|minus|times) ?(-?\d+)"
                      r"(?: = |=| is | gives | makes | equals | comes to )(-?\d+)(?![\d*+-])")
    words = {"plus": "+", "minus": "-", "times": "*"}
    checked = 0
    for t in texts:
        for line in t.splitlines():
            if re.fullmatch(r"[-\d +*()]+(=[-\d +*()]+)+", line):
                values = {eval(part) for part in line.split("=")}
                assert len(values) == 1, t
                checked += 1
                continue
            for a, op, b, r in step.findall(line):
                assert eval(f"{a} {words.get(op, op)} ({b})") == int(r), t
                checked += 1
    assert checked > 300
    assert any("4 * -5 = -20" in t or "4*-5=-20" in t for t in texts)
    assert len(texts) >= 30
    assert task.grade(ex, "Answer: -17").reward == 1.0
    assert task.grade(ex, "Answer: -170").reward == 0.0  # reasoning-gym gives 0.3 here


def test_countdown_grader_never_evaluates_code():
    task = get_task("countdown")
    ex = task.examples("test", 1, 0)[0]
    for evil in ["__import__('os').system('echo hi')", "9**9**9**9", "1//1", "a + b"]:
        grade = task.grade(ex, f"Answer: {evil}")
        assert grade.reward == 0.0 and "not a plain arithmetic expression" in grade.reason


def test_code_expr_rejects_early_exit_and_syntax_errors():
    task = get_task("code_expr")
    ex = task.examples("test", 1, 0)[0]
    early = task.grade(ex, "Answer: __import__('os')._exit(0)")
    assert early.reward == 0.0 and "exited before the tests finished" in early.reason
    syntax = task.grade(ex, "Answer: x +* 2")
    assert syntax.reward == 0.0 and "not a Python expression" in syntax.reason
    loop = task.grade(ex, "Answer: [0 for _ in iter(int, 1)]")
    assert loop.reward == 0.0 and "timeout" in loop.reason


@pytest.mark.slow
def test_humaneval_all_canonical_solutions_pass_in_the_sandbox():
    task = get_task("humaneval")
    examples = task.all_examples()
    assert len(examples) == 164 and examples[0].meta["task_id"] == "HumanEval/0"
    n_train = sum(task.split_of(ex) == "train" for ex in examples)
    with pytest.raises(ValueError, match="yielded only"):
        task.examples("train", n_train + 1, 0)
    grades = task.grade_many(examples, [ex.answer for ex in examples])
    failed = [(ex.meta["task_id"], g.reason) for ex, g in zip(examples, grades) if g.reward != 1]
    assert failed == []
    ex = examples[0]
    fenced = f"Here you go:\n```python\n{ex.prompt}{ex.answer}```\n"
    assert task.grade(ex, fenced).reward == 1.0
    exit_hack = "    import os\n    os._exit(0)\n"
    assert task.grade(ex, exit_hack).reward == 0.0
    sys_exit = "    raise SystemExit(0)\n"
    assert task.grade(ex, sys_exit).reward == 0.0


def test_calculator_env_protocol():
    task = get_task("calculator")
    ex = Example(prompt="Compute 37*48+5.", answer="1781",
                 meta={"form": "a*b+c", "a": 37, "b": 48, "c": 5, "e": 2, "expr": "37*48+5"})
    env = task.make_env(ex)
    assert env.reset() == ex.prompt
    res = env.step("First calc[37*48]")
    assert (res.observation, res.reward, res.done) == ("=1776", 0.0, False)
    res = env.step(" and calc[__import__('os')]")
    assert (res.observation, res.done) == ("=error", False)
    res = env.step(" so 1776+5=1781\nAnswer: 1781")
    assert (res.reward, res.done) == (1.0, True)
    env.reset()
    assert env.step("calc[1+1]").observation == "=2"
    res = env.step("no tool and no answer")
    assert res.done and res.reward == 0.0 and "calc" in res.reason
    env.reset()
    for _ in range(task.max_calls):
        assert not env.step("calc[2*3]").done
    res = env.step("calc[2*3]")
    assert res.done and res.reward == 0.0 and "tool calls" in res.reason
    assert safe_arith("(11+35)*7") == 322 and safe_arith("7/2") is None
    assert safe_arith("2**10") is None and safe_arith("abs(-3)") is None
    assert safe_arith("9" * 20 + "*" + "9" * 20) is None


@pytest.mark.parametrize("name", ["calculator"] + TEXTARENA)
def test_scripted_turns_replay_through_a_fresh_env(name):
    task = get_task(name)
    rng = random.Random(1)
    for ex in task.examples("train", 4, 2):
        turns = task.solution_turns(ex, rng)
        assert turns[0] == Turn("user", ex.prompt, False)
        assert all(t.trainable == (t.role == "assistant") for t in turns)
        assert any(t.role == "env" for t in turns) or len(turns) == 2
        env = task.make_env(ex)
        assert env.reset() == ex.prompt
        replayed = [turns[0]]
        for turn in turns[1:]:
            if turn.role != "assistant":
                continue
            replayed.append(turn)
            res = env.step(turn.text)
            if res.done:
                assert res.reward == 1.0, res
                break
            assert turn.text.endswith(task.stop_strings)  # the decoder stops here
            prefix = "" if name == "calculator" else "\n"
            replayed.append(Turn("env", prefix + res.observation, False))
        assert replayed == turns
        text, spans = join_turns(turns[1:])
        assert text == "".join(t.text for t in turns[1:])
        assert [text[a:b] for a, b, _ in spans] == [t.text for t in turns[1:]]
        if name == "calculator":  # a flat transcript, env turns included, grades 1
            assert task.grade(ex, text).reward == 1.0
        assistant_text = "".join(t.text for t in turns if t.role == "assistant")
        assert task.grade(ex, assistant_text).reward == 1.0


def test_textarena_keeps_callers_global_random_state():
    task = get_task("frozen_lake")
    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    ex = task.examples("train", 3, 0)[0]
    task.grade(ex, ex.answer)
    assert random.random() == expected


def test_turn_validation():
    with pytest.raises(ValueError, match="trainable"):
        Turn("env", "=3", True)
    with pytest.raises(ValueError, match="role"):
        Turn("tool", "=3", False)
    with pytest.raises(ValueError, match="reward"):
        Grade(1.5, "too much")


def test_show_prints_every_task(capsys):
    assert show_main(["--tasks", *ALL_TASKS, "-n", "1", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example 0 ---") == len(ALL_TASKS)
    assert out.count("worked solution -> reward 1 ") == len(ALL_TASKS)
    assert out.count("corrupted response -> reward 0 ") == len(ALL_TASKS)
    assert "[env, masked]" in out
    with pytest.raises(SystemExit):
        show_main(["--tasks", "nope"])
