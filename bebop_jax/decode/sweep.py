"""Acceptance against entropy: decode the same prompts at several temperatures, greedy and
rejection verification, and record per batch the mean token entropy and the acceptance.

One record per (label, temperature, batch of prompts), in the shape
``bebop_jax.analysis.entropy_law`` and ``gap_vs_entropy`` read:
``{"label", "task", "temperature", "entropy", "acceptance": {method: E[A]/K},
"per_depth": {method: [alpha_j]}, "weight": tokens}``. The entropy is that of the
sampling distribution at the emitted tokens (the decoder's own output, no extra
forward), averaged over both methods' tokens.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from bebop_jax.config import ModelConfig, SpecConfig
from bebop_jax.data.tokenizer import Tokenizer
from bebop_jax.decode.host import generate
from bebop_jax.decode.rollout import encode_prompts, pad_prompts
from bebop_jax.sampling import SamplingConfig

METHODS = ("greedy", "rejection")


def acceptance_sweep(params, model_config: ModelConfig, tokenizer: Tokenizer, prompts: Sequence[str], key, *,
                     temperatures: Sequence[float], num_draft: int, max_new_tokens: int, batch_size: int,
                     label: str = "", task: str = "") -> list[dict]:
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures: must be > 0 (entropy needs a distribution), got {list(temperatures)}")
    ids = encode_prompts(tokenizer, prompts)
    width = max(len(x) for x in ids)
    records = []
    for ti, temp in enumerate(temperatures):
        for start in range(0, len(ids) - batch_size + 1, batch_size):  # whole batches only: one compiled shape
            arr, lens = pad_prompts(ids[start:start + batch_size], width, tokenizer.pad_id)
            ent_sum, tokens, acc, depth = 0.0, 0, {}, {}
            for m, method in enumerate(METHODS):
                res = generate(params, model_config, arr, lens, jax.random.fold_in(key, 1000 * ti + 10 * start + m),
                               max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature=float(temp)),
                               spec=SpecConfig(method, num_draft), eos_id=tokenizer.eos_id)
                live = np.arange(res.tokens.shape[1])[None, :] < res.lengths[:, None]
                ent_sum += float(res.entropy[live].sum())
                tokens += int(live.sum())
                acc[method] = res.stats.mean_accepted / num_draft
                depth[method] = res.stats.per_depth_acceptance
            records.append({"label": label, "task": task, "temperature": float(temp), "batch": start // batch_size,
                            "entropy": ent_sum / max(tokens, 1), "acceptance": acc, "per_depth": depth,
                            "weight": tokens})
    return records
