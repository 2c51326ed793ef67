"""Text in, text out: batched rollouts through ``bebop_jax.decode.generate``.

Prompts are tokenized with the chat format the training data uses
(``bos + format_prompt(prompt)``), right-padded to one fixed length and cut into
fixed-size batches (the last one padded by repeating a prompt), so one compiled
decode loop serves a whole evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from bebop_jax.config import ModelConfig, SpecConfig
from bebop_jax.data.tokenizer import Tokenizer, bos_prefix
from bebop_jax.sampling import SamplingConfig
from bebop_jax.decode.host import generate
from bebop_jax.decode.stats import DecodeStats


@dataclasses.dataclass
class Rollouts:
    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]    # generated tokens, the end-of-turn token included if emitted
    logprobs: list[list[float]]      # per generated token: log-prob under its sampling distribution
    entropy: list[list[float]]       # per generated token: that distribution's entropy (nats)
    texts: list[str]                 # decoded responses (special tokens dropped)
    stats: DecodeStats               # generate() stats pooled over batches (DecodeStats.merge)


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [bos_prefix(tokenizer) + tokenizer.format_prompt(p) for p in prompts]


def pad_prompts(ids: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompts [B, length] right-padded with ``pad_id``, lengths [B]): what ``generate`` takes."""
    arr = np.full((len(ids), length), pad_id, np.int32)
    for i, row in enumerate(ids):
        arr[i, :len(row)] = row
    return arr, np.array([len(r) for r in ids], np.int32)


def rollout(params, model_config: ModelConfig, tokenizer: Tokenizer, prompts: Sequence[str], key: jax.Array, *,
            max_new_tokens: int, sampling: SamplingConfig, spec: SpecConfig = SpecConfig(),
            batch_size: int = 64, prompt_len: int | None = None, impl: str = "auto",
            controller=None) -> Rollouts:
    """Generate one response per prompt. ``prompt_len`` fixes the padded length (default: longest).

    ``controller``: the ``DraftController`` of an adaptive ``spec`` (kept by the caller).

    The last batch is filled up by repeating its last prompt; those extra rows
    count in ``stats`` (pick ``batch_size`` dividing ``len(prompts)`` for exact stats).
    """
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    ids = encode_prompts(tokenizer, prompts)
    longest = max(len(x) for x in ids)
    prompt_len = longest if prompt_len is None else prompt_len
    if longest > prompt_len:
        raise ValueError(f"prompt_len={prompt_len} is shorter than the longest encoded prompt ({longest} tokens)")
    n = len(ids)
    bs = min(batch_size, n)
    responses: list[list[int]] = []
    logprobs: list[list[float]] = []
    entropy: list[list[float]] = []
    all_stats = []
    for start in range(0, n, bs):
        chunk = ids[start:start + bs]
        chunk = chunk + [chunk[-1]] * (bs - len(chunk))
        arr, lens = pad_prompts(chunk, prompt_len, tokenizer.pad_id)
        res = generate(params, model_config, arr, lens, jax.random.fold_in(key, start), max_new_tokens=max_new_tokens,
                       sampling=sampling, spec=spec, eos_id=tokenizer.eos_id, impl=impl, controller=controller)
        for i in range(min(bs, n - start)):
            n_i = res.lengths[i]
            responses.append(res.tokens[i, :n_i].tolist())
            logprobs.append(res.logprobs[i, :n_i].tolist())
            entropy.append(res.entropy[i, :n_i].tolist())
        all_stats.append(res.stats)
    texts = [tokenizer.decode(r) for r in responses]
    return Rollouts(prompts=list(prompts), prompt_ids=ids, response_ids=responses, logprobs=logprobs,
                    entropy=entropy, texts=texts, stats=DecodeStats.merge(all_stats))
