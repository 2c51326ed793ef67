"""Tokenizers behind one interface: a byte-level tokenizer for small-scale runs and a
wrapper around Hugging Face `tokenizer.json` files for real checkpoints (Qwen3 and kin).

Chat layout. A conversation is a sequence of turns; each turn is
`turn_header(role, first=...) + encode(text) + turn_footer(role)`. The header is never
trained on; the footer of an assistant turn is the end-of-turn token the model must learn
to emit (for both tokenizers here it equals `eos_id`). Roles: "system", "user",
"assistant" and "env" (a tool or environment observation in agentic tasks).

Encoding the header, text and footer separately (instead of the rendered string in one
go) fixes the loss-mask boundary exactly and matches what the model sees at generation
time, where it produces the text tokens right after the assistant header. For BPE
tokenizers this equals encoding the whole rendered string except when the text begins
or ends with whitespace that would merge with a neighbouring newline.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

ROLES = ("system", "user", "assistant", "env")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of bebop_jax relies on (both tokenizers below implement it)."""

    vocab_size: int  # every id the tokenizer can produce is < vocab_size
    pad_id: int
    bos_id: int
    eos_id: int  # end of an assistant turn: generation stops here
    add_bos: bool  # whether sequences start with bos_id (False for Qwen: it has no BOS)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    def turn_header(self, role: str, *, first: bool = False) -> list[int]: ...

    def turn_footer(self, role: str) -> list[int]: ...

    def format_turn(self, role: str, text: str, *, first: bool = False) -> list[int]: ...

    def format_prompt(self, prompt: str) -> list[int]: ...

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]: ...


def bos_prefix(tokenizer: Tokenizer) -> list[int]:
    """`[bos_id]` if the tokenizer's sequences start with a BOS token, else `[]`."""
    return [tokenizer.bos_id] if tokenizer.add_bos else []


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


def _check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES + ("tool",):
            raise ValueError(f"messages[{i}]['role'] must be one of {ROLES + ('tool',)}, "
                             f"got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"messages[{i}]['content'] must be a str, got "
                             f"{type(message['content']).__name__}")


def _turns_from_messages(tokenizer: Tokenizer, messages: Sequence[dict],
                         add_generation_prompt: bool) -> list[int]:
    """Native chat rendering: bos, the turns in order, then the assistant header."""
    ids = bos_prefix(tokenizer)
    for i, message in enumerate(messages):
        role = "env" if message["role"] == "tool" else message["role"]
        ids += tokenizer.format_turn(role, message["content"], first=i == 0)
    if add_generation_prompt:
        ids += tokenizer.turn_header("assistant", first=not messages)
    return ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then special tokens; the small-scale default.

    Special ids: 256 pad, 257 bos, 258 eos (= end of turn), 259 system, 260 user,
    261 assistant, 262 env, 263 reserved; vocab_size = 264 (a multiple of 8).
    A turn is `[<|role|>] + utf8(text) + [eos]`.

    `encode` never produces special ids unless `allow_special=True`, in which case the
    literal strings "<|eos|>" etc. map to their ids. `decode` never raises: invalid UTF-8
    becomes U+FFFD, ids outside [0, vocab_size) (e.g. the -1 padding of `generate`) are
    skipped, special ids are dropped (skip_special=True) or written as their strings.
    """

    SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>",
                      "<|assistant|>", "<|env|>", "<|reserved_0|>")

    def __init__(self):
        self.num_bytes = 256
        self.vocab_size = -(-(self.num_bytes + len(self.SPECIAL_TOKENS)) // 8) * 8
        self._special_to_id = {s: self.num_bytes + i for i, s in enumerate(self.SPECIAL_TOKENS)}
        self.pad_id = self._special_to_id["<|pad|>"]
        self.bos_id = self._special_to_id["<|bos|>"]
        self.eos_id = self._special_to_id["<|eos|>"]
        self.add_bos = True
        self._role_ids = {role: self._special_to_id[f"<|{role}|>"] for role in ROLES}
        self._special_re = re.compile("|".join(re.escape(s) for s in self.SPECIAL_TOKENS))

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if not allow_special:
            return list(text.encode("utf-8"))
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            ids += text[start:match.start()].encode("utf-8")
            ids.append(self._special_to_id[match.group()])
            start = match.end()
        ids += text[start:].encode("utf-8")
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        pieces, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < self.num_bytes:
                run.append(i)
            elif self.num_bytes <= i < self.vocab_size:
                pieces.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                if not skip_special:
                    pieces.append(self.SPECIAL_TOKENS[i - self.num_bytes])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def is_special(self, token_id: int) -> bool:
        return self.num_bytes <= int(token_id) < self.vocab_size

    def turn_header(self, role: str, *, first: bool = False) -> list[int]:
        del first  # turns need no separator here
        return [self._role_ids[_check_role(role)]]

    def turn_footer(self, role: str) -> list[int]:
        _check_role(role)
        return [self.eos_id]

    def format_turn(self, role: str, text: str, *, first: bool = False) -> list[int]:
        return self.turn_header(role, first=first) + self.encode(text) + self.turn_footer(role)

    def format_prompt(self, prompt: str) -> list[int]:
        """A single user turn then the assistant header (no bos: see `bos_prefix`)."""
        return self.format_turn("user", prompt, first=True) + self.turn_header("assistant")

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """bos + every turn (+ the assistant header); role "tool" is read as "env"."""
        _check_messages(messages)
        return _turns_from_messages(self, messages, add_generation_prompt)


def _token_content(entry: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a str or as {"content": str, ...}."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    raise ValueError(f"cannot read a special token from {entry!r}")


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str):
    try:
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:  # pragma: no cover - jinja2 is a requirement
        raise ImportError("rendering a chat template needs jinja2 (pip install jinja2)") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, indent=None):
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[dict], add_generation_prompt: bool,
                         **variables: Any) -> str:
    """Renders a Hugging Face jinja chat template the way `transformers` does
    (sandboxed, trim_blocks, lstrip_blocks, non-ASCII-preserving `tojson`)."""
    return _compile_chat_template(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` behind the bebop_jax interface.

    `apply_chat` renders the model's own jinja chat template when it has one (so it matches
    `transformers`' `apply_chat_template`, thinking-mode details included); the turn
    methods (`format_turn`, `format_prompt`, ...) build ChatML (`<|im_start|>role\\n...
    <|im_end|>`, Qwen's format) and raise ValueError for tokenizers without those tokens.
    ChatML turns are joined by "\\n"; the "\\n" belongs to the next turn's header
    (first=False) so that an assistant turn ends exactly at `<|im_end|>` (= eos).
    An "env" turn is written like the Qwen3 template writes a "tool" message:
    a user turn wrapping the text in `<tool_response>\\n...\\n</tool_response>`
    (plain user turn if the vocab has no `<tool_response>` token).

    `decode` never raises: ids outside [0, vocab_size) are skipped (the model's embedding
    table is often padded past the tokenizer's vocab), invalid UTF-8 becomes U+FFFD.
    """

    def __init__(self, tokenizer, *, eos_token: str, pad_token: str | None = None,
                 bos_token: str | None = None, add_bos: bool | None = None,
                 chat_template: str | None = None):
        self._tok = tokenizer
        # encode() toggles `encode_special_tokens` on the shared Rust object.
        self._lock = threading.Lock()
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1

        def token_id(name, token):
            if token not in vocab:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
            return vocab[token]

        self.eos_id = token_id("eos_token", eos_token)
        self.pad_id = token_id("pad_token", pad_token) if pad_token is not None else self.eos_id
        # Without a BOS token (Qwen), bos_id is pad_id and is never prepended.
        self.bos_id = token_id("bos_token", bos_token) if bos_token is not None else self.pad_id
        self.add_bos = (bos_token is not None) if add_bos is None else bool(add_bos)
        if self.add_bos and bos_token is None:
            raise ValueError("add_bos=True needs a bos_token")
        self.chat_template = chat_template
        self._special_ids = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._chatml = "<|im_start|>" in vocab and "<|im_end|>" in vocab
        self._env_as_tool_response = "<tool_response>" in vocab and "</tool_response>" in vocab
        if self._chatml:
            self._im_start, self._im_end = vocab["<|im_start|>"], vocab["<|im_end|>"]

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "HFTokenizer":
        """Reads `tokenizer.json`, and `tokenizer_config.json` (special tokens, chat template)
        plus `chat_template.jinja` when present."""
        import tokenizers

        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ValueError(f"path {path!r} has no tokenizer.json")
        tok = tokenizers.Tokenizer.from_file(tokenizer_file)
        config = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        template_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        eos_token = _token_content(config.get("eos_token"))
        if eos_token is None:
            vocab = tok.get_vocab(with_added_tokens=True)
            candidates = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
            eos_token = next((c for c in candidates if c in vocab), None)
            if eos_token is None:
                raise ValueError(f"path {path!r}: no eos_token in tokenizer_config.json and "
                                 f"none of {candidates} in the vocabulary")
        add_bos = config.get("add_bos_token")
        bos_token = _token_content(config.get("bos_token"))
        return cls(tok, eos_token=eos_token, pad_token=_token_content(config.get("pad_token")),
                   bos_token=bos_token,
                   add_bos=add_bos if bos_token is not None else False,
                   chat_template=template)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text to ids, never adding BOS/EOS. Special-token strings in `text` stay plain text
        unless `allow_special`; added non-special tokens (Qwen's `<think>`) always match."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        with self._lock:
            self._tok.encode_special_tokens = not allow_special
            try:
                return self._tok.encode(text, add_special_tokens=False).ids
            finally:
                self._tok.encode_special_tokens = False

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        valid = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(valid, skip_special_tokens=skip_special)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def _check_chatml(self):
        if not self._chatml:
            raise ValueError("this tokenizer has no <|im_start|>/<|im_end|> tokens: the turn "
                             "methods build ChatML only; use apply_chat with its chat template")

    def turn_header(self, role: str, *, first: bool = False) -> list[int]:
        self._check_chatml()
        _check_role(role)
        name = "user" if role == "env" else role
        ids = ([] if first else self.encode("\n")) + [self._im_start] + self.encode(f"{name}\n")
        if role == "env" and self._env_as_tool_response:
            ids += self.encode("<tool_response>\n")
        return ids

    def turn_footer(self, role: str) -> list[int]:
        self._check_chatml()
        _check_role(role)
        ids = [self._im_end]
        if role == "env" and self._env_as_tool_response:
            ids = self.encode("\n</tool_response>") + ids
        return ids

    def format_turn(self, role: str, text: str, *, first: bool = False) -> list[int]:
        return self.turn_header(role, first=first) + self.encode(text) + self.turn_footer(role)

    def format_prompt(self, prompt: str) -> list[int]:
        """`<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n` as ids."""
        return self.format_turn("user", prompt, first=True) + self.turn_header("assistant")

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool,
                   **template_variables: Any) -> list[int]:
        """The conversation as model input ids. With a chat template: render it (role "env"
        is passed as "tool"; extra variables such as enable_thinking=False reach the template)
        and encode the result with special tokens parsed; BOS is prepended if `add_bos` and
        the template did not write it. Without a template: native ChatML."""
        _check_messages(messages)
        if self.chat_template is None:
            if template_variables:
                raise ValueError(f"template_variables {sorted(template_variables)} given but the "
                                 "tokenizer has no chat template")
            return _turns_from_messages(self, messages, add_generation_prompt)
        rendered_messages = [dict(m, role="tool") if m["role"] == "env" else m for m in messages]
        text = render_chat_template(
            self.chat_template, rendered_messages, add_generation_prompt,
            bos_token=self._tok.id_to_token(self.bos_id),
            eos_token=self._tok.id_to_token(self.eos_id), **template_variables)
        ids = self.encode(text, allow_special=True)
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids


def load_tokenizer(name_or_dir: str | os.PathLike) -> Tokenizer:
    """"byte" -> ByteTokenizer; a directory holding tokenizer.json -> HFTokenizer."""
    if isinstance(name_or_dir, str) and name_or_dir == "byte":
        return ByteTokenizer()
    if isinstance(name_or_dir, (str, os.PathLike)) and os.path.isdir(name_or_dir):
        if not os.path.isfile(os.path.join(name_or_dir, "tokenizer.json")):
            raise ValueError(f"name_or_dir {os.fspath(name_or_dir)!r} is a directory without "
                             "tokenizer.json")
        return HFTokenizer.from_dir(name_or_dir)
    raise ValueError(f"name_or_dir must be 'byte' or a directory holding tokenizer.json, "
                     f"got {name_or_dir!r}")
