"""The rollout worker: prompts -> G samples each through ``bebop_jax.decode`` -> a RolloutBatch.

Rewards come from the tasks' graders (single-turn) or environments (multi-turn);
behaviour log-probs, entropies and acceptance stats from the decoder, with no extra
forward. Multi-turn tasks (``task.multi_turn``): after each assistant turn the
environment's reply is appended with ``continue_generate`` (no re-prefill), and its
tokens get loss mask 0; an episode ends when the environment says so or after
``max_turns`` assistant turns.

Shapes are static across calls (one compiled decode loop): prompts are padded to
``prompt_len``, environment turns to a multiple of ``ENV_PAD``, and rows to
``seq_len`` = prompt_len + max_turns * (max_new_tokens + env width).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from bebop_jax.config import ModelConfig, SpecConfig
from bebop_jax.data.tokenizer import Tokenizer
from bebop_jax.decode import DraftController, continue_generate, generate
from bebop_jax.decode.rollout import encode_prompts, pad_prompts
from bebop_jax.decode.stats import DecodeStats
from bebop_jax.rl.advantages import group_advantages
from bebop_jax.rl.batch import RolloutBatch
from bebop_jax.sampling import SamplingConfig
from bebop_jax.tasks import Example, Task

ENV_PAD = 16  # environment turns are padded to a multiple of this (few distinct compiled shapes)


@dataclasses.dataclass
class _Row:
    """One sampled episode, token by token."""

    tokens: list[int]
    mask: list[float]
    logp: list[float]
    entropy: list[float] = dataclasses.field(default_factory=list)  # per generated token
    reward: float = 0.0
    done: bool = False


@dataclasses.dataclass
class Rollout:
    """What one call of the worker produced (host numpy)."""

    batch: RolloutBatch        # numpy leaves; place with batch.on(mesh)
    rewards: np.ndarray        # [N]
    tasks: list[str]           # [N] task of each row
    stats: dict                # DecodeStats.to_dict() pooled over the calls, decode_seconds, entropy, timing
    texts: list[str]           # [N] the final assistant turn of each row


def _grade(items: Sequence[tuple[Task, Example]], texts: list[str]) -> dict:
    """Row index -> Grade, with each task's ``grade_many`` (code tasks run their programs in parallel)."""
    by_task: dict[str, list[int]] = {}
    for i, (task, _) in enumerate(items):
        by_task.setdefault(task.name, []).append(i)
    out = {}
    for idx in by_task.values():
        task = items[idx[0]][0]
        grades = task.grade_many([items[i][1] for i in idx], [texts[i] for i in idx])
        out.update(zip(idx, grades))
    return out


class RolloutWorker:
    """Samples episodes (and groups of them per prompt) with the speculative decoder.

    Keeps the ``DraftController`` of an adaptive ``spec`` between calls.
    """

    def __init__(self, model_config: ModelConfig, tokenizer: Tokenizer, *, max_new_tokens: int, prompt_len: int,
                 sampling: SamplingConfig, spec: SpecConfig, decode_batch: int, max_turns: int = 1,
                 env_len: int = ENV_PAD, mesh: Mesh | None = None):
        if spec.drafts > model_config.num_mtp_depths:
            raise ValueError(f"spec.num_draft={spec.num_draft} exceeds the model's num_mtp_depths="
                             f"{model_config.num_mtp_depths}")
        if not (isinstance(decode_batch, int) and decode_batch >= 1):
            raise ValueError(f"decode_batch: must be an int >= 1, got {decode_batch!r}")
        self.model_config, self.tokenizer = model_config, tokenizer
        self.max_new_tokens, self.prompt_len = max_new_tokens, prompt_len
        self.sampling, self.spec, self.decode_batch = sampling, spec, decode_batch
        self.max_turns, self.env_len = max_turns, -(-env_len // ENV_PAD) * ENV_PAD
        self.mesh = mesh  # where the decoder runs (rows split over its data axes); None: the params' devices
        self.controller = DraftController(spec) if spec.adaptive else None
        self.seq_len = prompt_len + max_turns * max_new_tokens + (max_turns - 1) * self.env_len
        if self.seq_len > model_config.max_seq_len:
            raise ValueError(f"prompt_len + max_turns * (max_new_tokens + env_len) = {self.seq_len} exceeds "
                             f"ModelConfig.max_seq_len={model_config.max_seq_len}")

    def check_prompts(self, examples: Sequence[Example]) -> None:
        """Refuse, before any work, prompts that do not fit ``prompt_len`` (a mid-run failure otherwise)."""
        longest = max(len(x) for x in encode_prompts(self.tokenizer, [e.prompt for e in examples]))
        if longest > self.prompt_len:
            raise ValueError(f"rl.prompt_len={self.prompt_len} is shorter than the longest prompt of the tasks "
                             f"({longest} tokens): pass --rl.prompt-len {longest}")

    def variant(self, sampling: SamplingConfig, spec: SpecConfig, mesh: Mesh | None = None) -> "RolloutWorker":
        """The same worker with other sampling / spec settings (its own draft controller), on ``mesh``
        (default: this worker's)."""
        out = copy.copy(self)
        out.sampling, out.spec, out.mesh = sampling, spec, self.mesh if mesh is None else mesh
        out.controller = DraftController(spec) if spec.adaptive else None
        return out

    # -- one call ------------------------------------------------------------------------------
    def sample(self, params, items: Sequence[tuple[Task, Example]], key: jax.Array, *, group_size: int,
               version: int = 0, std_normalize: bool = True) -> Rollout:
        """``group_size`` episodes for each (task, example); rows g*G..g*G+G-1 share a prompt."""
        if not items:
            raise ValueError("items: need at least one (task, example)")
        t0 = time.perf_counter()
        expanded = [it for it in items for _ in range(group_size)]
        rows, texts, decoded = self.episodes(params, expanded, key)
        rewards = np.array([r.reward for r in rows], np.float32)
        adv = np.asarray(group_advantages(rewards, group_size, std_normalize=std_normalize))
        batch = self._to_batch(rows, adv, version)
        gen = [e for r in rows for e in r.entropy]
        stats = {**decoded.to_dict(), "decode_seconds": decoded.seconds,
                 "entropy": float(np.mean(gen)) if gen else 0.0,
                 "rollout_seconds": time.perf_counter() - t0, "response_tokens": int(batch.loss_mask.sum())}
        return Rollout(batch=batch, rewards=rewards, tasks=[t.name for t, _ in expanded], stats=stats, texts=texts)

    def episodes(self, params, items: Sequence[tuple[Task, Example]], key: jax.Array):
        """One episode per item, in fixed-size decode calls: (rows, final texts, the calls' pooled DecodeStats,
        per-depth lists padded to the spec's draft length)."""
        rows: list[_Row] = []
        texts: list[str] = []
        stats = []
        chunk = self.decode_batch
        for start in range(0, len(items), chunk):
            part = list(items[start:start + chunk])
            fill = part + [part[-1]] * (chunk - len(part))  # fixed batch: one compiled shape
            got, got_texts, got_stats = self._episodes(params, fill, jax.random.fold_in(key, start))
            rows += got[:len(part)]
            texts += got_texts[:len(part)]
            stats += got_stats
        return rows, texts, DecodeStats.merge(stats, depths=max(self.spec.drafts, 1))

    def _to_batch(self, rows: list[_Row], adv: np.ndarray, version: int) -> RolloutBatch:
        n, t = len(rows), self.seq_len
        tokens = np.full((n, t), self.tokenizer.pad_id, np.int32)
        mask, logp = np.zeros((n, t), np.float32), np.zeros((n, t), np.float32)
        for i, r in enumerate(rows):
            m = min(len(r.tokens), t)
            tokens[i, :m], mask[i, :m], logp[i, :m] = r.tokens[:m], r.mask[:m], r.logp[:m]
        return RolloutBatch(tokens=tokens, loss_mask=mask, advantages=adv, behaviour_logp=logp,
                            version=np.asarray(version, np.int32))

    def _generate(self, params, prompts, lens, key, **kwargs):
        return generate(params, self.model_config, prompts, lens, key, max_new_tokens=self.max_new_tokens,
                        sampling=self.sampling, spec=self.spec, eos_id=self.tokenizer.eos_id,
                        controller=self.controller, mesh=self.mesh, **kwargs)

    def _episodes(self, params, items, key):
        tok = self.tokenizer
        multi = items[0][0].multi_turn
        envs = [task.make_env(ex) for task, ex in items] if multi else None
        prompts_text = [env.reset() for env in envs] if multi else [ex.prompt for _, ex in items]
        ids = encode_prompts(tok, prompts_text)
        longest = max(len(x) for x in ids)
        if longest > self.prompt_len:
            raise ValueError(f"prompt_len={self.prompt_len} is shorter than an encoded prompt ({longest} tokens)")
        prompts, lens = pad_prompts(ids, self.prompt_len, tok.pad_id)
        rows = [_Row(tokens=list(x), mask=[0.0] * len(x), logp=[0.0] * len(x)) for x in ids]
        if not multi:
            res = self._generate(params, prompts, lens, key)
            texts = self._append(rows, res)
            for i, grade in _grade(items, texts).items():
                rows[i].reward = float(grade.reward)
            return rows, texts, [res.stats]
        cache_len = self.seq_len + self.spec.drafts + 1
        res = self._generate(params, prompts, lens, key, cache_len=cache_len, return_state=True)
        stats, texts = [res.stats], self._append(rows, res)
        for turn in range(1, self.max_turns + 1):
            env_ids = []
            for env, r, text in zip(envs, rows, texts):
                if r.done:
                    env_ids.append([])
                    continue
                step = env.step(text)
                r.reward, r.done = float(step.reward), step.done
                env_ids.append([] if step.done or turn == self.max_turns else
                               tok.format_turn("env", step.observation) + tok.turn_header("assistant"))
            if turn == self.max_turns or all(r.done for r in rows):
                break
            width = max(1, max(len(e) for e in env_ids))
            if width > self.env_len:
                raise ValueError(f"env_len={self.env_len}: an environment turn took {width} tokens")
            new, new_lens = pad_prompts([e or [tok.pad_id] for e in env_ids], self.env_len, tok.pad_id)
            new_lens = np.where([bool(e) for e in env_ids], new_lens, 0).astype(np.int32)
            for r, e in zip(rows, env_ids):
                r.tokens += e
                r.mask += [0.0] * len(e)
                r.logp += [0.0] * len(e)
            res = continue_generate(params, self.model_config, res.state, new, new_lens,
                                    jax.random.fold_in(key, 1000 + turn), max_new_tokens=self.max_new_tokens,
                                    sampling=self.sampling, spec=self.spec, eos_id=tok.eos_id, return_state=True,
                                    mesh=self.mesh)
            stats.append(res.stats)
            texts = self._append(rows, res, skip=[r.done for r in rows])
        return rows, texts, stats

    def _append(self, rows: list[_Row], res, skip=None) -> list[str]:
        """Add each row's generated tokens (mask 1, behaviour log-probs); return their texts."""
        texts = []
        for i, r in enumerate(rows):
            n = int(res.lengths[i])
            ids = res.tokens[i, :n].tolist()
            texts.append(self.tokenizer.decode(ids))
            if skip is not None and skip[i]:
                continue
            r.tokens += ids
            r.mask += [1.0] * n
            r.logp += res.logprobs[i, :n].tolist()
            r.entropy += res.entropy[i, :n].tolist()
        return texts
