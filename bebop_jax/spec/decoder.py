"""KV-cached generation: vanilla sampling and MTP speculative decoding.

Everything after ``generate``'s argument checks runs on the device: a prefill,
then one jitted ``lax.while_loop``. Each speculative step

1. drafts K tokens with the MTP depths (depth k samples x_{L+k} from q_k),
2. verifies them in ONE trunk forward of K+1 tokens [x_L, d_1..d_K],
3. accepts / rejects per row (``rejection_sample``) and emits A+1 tokens,

where L is a row's number of cached tokens and x_L its pending token (emitted,
not yet fed to the trunk). Rows advance by their own accepted counts, cut
after EOS and at max_new_tokens (so a returned state ends at the returned tokens).

MTP caches, exactly. Depth k's attention at position s reads entries computed
from (depth k-1 hidden at s, x_{s+k}). For s <= L-k all of that is known; for
the last k-1 positions it involves the drafts d_1..d_{k-1} the step is
conditioning on. So every draft step recomputes each depth over a window of the
last W = K+1 positions [L-W, L-1] (overwriting their cache slots), and entries
older than the window were last written when all their tokens were known or
accepted: with at most K+1 tokens emitted per step, an entry leaves the window
only after every draft it used was accepted. The drafts therefore follow the
same distribution the teacher-forced training forward defines.

Multi-turn rollouts: ``generate(..., return_state=True)`` returns the caches, and
``continue_generate(state, env_tokens, ...)`` appends an environment turn and
generates the next response without re-prefilling the conversation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax import sampling
from bebop_jax.config import ModelConfig, SpecConfig
from bebop_jax.model import Policy, empty_kv_cache
from bebop_jax.sampling import SamplingConfig
from bebop_jax.spec.rejection import rejection_sample

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Per-row decoding state; also what a continued generation starts from."""

    trunk_cache: list      # per layer {"k","v"}: [B, S, Nkv, D]
    mtp_cache: list        # per depth {"k","v"} (empty list for vanilla)
    seq: Array             # [B, S] every token so far (prompt, generated, pending)
    length: Array          # [B] tokens in the trunk cache (the pending token sits at seq[length])
    hidden_window: Array   # [B, W, H] trunk hidden at positions [length-W, length-1]


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    tokens: np.ndarray     # [B, max_new_tokens] int32, -1 after each row's end
    lengths: np.ndarray    # [B] generated tokens per row (EOS included)
    stats: dict
    state: DecodeState | None = None


def _positions(start_B: Array, t: int) -> Array:
    return start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def _gather_rows(x_BxNx: Array, idx_BxT: Array) -> Array:
    """x[b, idx[b, t]] for 2-D or 3-D x (indices clipped into range)."""
    idx = jnp.clip(idx_BxT, 0, x_BxNx.shape[1] - 1)
    if x_BxNx.ndim == 2:
        return jnp.take_along_axis(x_BxNx, idx, axis=1)
    return jnp.take_along_axis(x_BxNx, idx[..., None], axis=1)


def _scatter_rows(x_BxN: Array, idx_BxT: Array, values_BxT: Array, keep_BxT: Array | None = None) -> Array:
    n = x_BxN.shape[1]
    ok = (idx_BxT >= 0) & (idx_BxT < n)
    if keep_BxT is not None:
        ok &= keep_BxT
    idx = jnp.where(ok, idx_BxT, n)
    rows = jnp.arange(x_BxN.shape[0])[:, None]
    return x_BxN.at[rows, idx].set(values_BxT.astype(x_BxN.dtype), mode="drop")


class _Model:
    """Thin wrappers around Policy methods (one place that calls ``apply``)."""

    def __init__(self, params, config: ModelConfig):
        self.params, self.config, self.policy = params, config, Policy(config)

    def trunk(self, tokens, positions, caches):
        return self.policy.apply({"params": self.params}, tokens, positions, caches, method=Policy.trunk)

    def mtp(self, depth, hidden, tokens, positions, cache, last_only=False):
        return self.policy.apply({"params": self.params}, depth, hidden, tokens, positions, cache,
                                 last_only=last_only, method=Policy.mtp_depth)


def _mtp_fill(model: _Model, state: DecodeState, hidden_new_BxTxH: Array, start_B: Array, num_depths: int):
    """(Re)compute every depth's cache over [start-W, start+T) from known tokens in ``seq``."""
    w = state.hidden_window.shape[1]
    t = hidden_new_BxTxH.shape[1]
    hidden = jnp.concatenate([state.hidden_window, hidden_new_BxTxH.astype(state.hidden_window.dtype)], axis=1)
    positions = _positions(start_B - w, w + t)
    caches = []
    for k in range(1, num_depths + 1):
        tokens = _gather_rows(state.seq, positions + k)
        hidden, _, cache = model.mtp(k, hidden, tokens, positions, state.mtp_cache[k - 1])
        caches.append(cache)
    return caches


def _prefill(model: _Model, state: DecodeState, tokens_BxT: Array, lens_B: Array, key: Array,
             sampling_cfg: SamplingConfig, num_depths: int):
    """Feed tokens at positions length.. (per row ``lens`` of them); sample the next pending token."""
    start = state.length
    positions = _positions(start, tokens_BxT.shape[1])
    hidden, logits, trunk_cache = model.trunk(tokens_BxT, positions, state.trunk_cache)
    valid = jnp.arange(tokens_BxT.shape[1])[None, :] < lens_B[:, None]
    seq = _scatter_rows(state.seq, positions, tokens_BxT, valid)
    last_logits = _gather_rows(logits, (lens_B - 1)[:, None])[:, 0]
    pending = sampling.sample(key, last_logits, sampling_cfg.temperature, sampling_cfg.top_k, sampling_cfg.top_p)
    new_len = start + lens_B
    seq = _scatter_rows(seq, new_len[:, None], pending[:, None])
    w = state.hidden_window.shape[1]
    window = jnp.concatenate([state.hidden_window, hidden.astype(state.hidden_window.dtype)], axis=1)
    hidden_window = _gather_rows(window, lens_B[:, None] + jnp.arange(w)[None, :])
    mid = DecodeState(trunk_cache=trunk_cache, mtp_cache=state.mtp_cache, seq=seq, length=start,
                      hidden_window=state.hidden_window)
    mtp_cache = _mtp_fill(model, mid, hidden, start, num_depths) if num_depths else []
    return DecodeState(trunk_cache=trunk_cache, mtp_cache=mtp_cache, seq=seq, length=new_len,
                       hidden_window=hidden_window), pending


def _draft(model: _Model, state: DecodeState, key: Array, k_draft: int, sampling_cfg: SamplingConfig,
           method: str):
    """K draft tokens [B,K] and their logits [B,K,V]; rewrites the MTP window caches."""
    w = state.hidden_window.shape[1]
    positions = _positions(state.length - w, w)
    pending_idx = state.length[:, None]
    drafts = jnp.zeros((state.seq.shape[0], k_draft), jnp.int32)
    hidden, caches, logits_all = state.hidden_window, [], []
    keys = jax.random.split(key, k_draft)
    for k in range(1, k_draft + 1):
        idx = positions + k
        known = _gather_rows(state.seq, idx)
        from_draft = _gather_rows(drafts, idx - pending_idx - 1)
        tokens = jnp.where(idx <= pending_idx, known, from_draft)
        hidden, logits, cache = model.mtp(k, hidden, tokens, positions, state.mtp_cache[k - 1], last_only=True)
        logits = logits[:, -1]  # [B, V]: the draft of x_{L+k}
        if method == "greedy":
            d = jnp.argmax(sampling.process_logits(logits, sampling_cfg.temperature or 1.0,
                                                   sampling_cfg.top_k, sampling_cfg.top_p), axis=-1)
        else:
            d = sampling.sample(keys[k - 1], logits, sampling_cfg.temperature, sampling_cfg.top_k,
                                sampling_cfg.top_p)
        drafts = drafts.at[:, k - 1].set(d.astype(jnp.int32))
        caches.append(cache)
        logits_all.append(logits)
    return drafts, jnp.stack(logits_all, axis=1), caches + list(state.mtp_cache[k_draft:])


def _emit(out, n_gen, done, new_BxE, count_B, eos_id, max_new):
    """Append up to ``count`` tokens per row; stop rows at EOS or max_new.

    Returns ``take`` [B], the tokens each row actually keeps (cut after EOS and at
    max_new): rows advance by exactly that, so a returned state ends at the returned
    tokens and a continuation never sees tokens the caller was not given.
    """
    e = new_BxE.shape[1]
    j = jnp.arange(e)[None, :]
    valid = (j < count_B[:, None]) & ~done[:, None]
    is_eos = valid & (new_BxE == eos_id) if eos_id is not None else jnp.zeros_like(valid)
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, e + 1)
    take = jnp.where(done, 0, jnp.minimum(jnp.minimum(count_B, first_eos), max_new - n_gen))
    out = _scatter_rows(out, n_gen[:, None] + j, new_BxE, j < take[:, None])
    n_gen = n_gen + take
    done = done | (first_eos <= e) & (take > 0) | (n_gen >= max_new)
    return out, n_gen, done, take


def _init_state(model_config: ModelConfig, batch: int, cache_len: int, num_depths: int, dtype) -> DecodeState:
    w = num_depths + 1
    return DecodeState(
        trunk_cache=[empty_kv_cache(model_config, batch, cache_len, dtype) for _ in range(model_config.num_layers)],
        mtp_cache=[empty_kv_cache(model_config, batch, cache_len, dtype) for _ in range(num_depths)],
        seq=jnp.zeros((batch, cache_len), jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
        hidden_window=jnp.zeros((batch, w, model_config.hidden_size), jnp.dtype(model_config.dtype)))


def _generate_impl(params, prompts, prompt_lens, key, *, model_config: ModelConfig, max_new_tokens: int,
                   sampling_cfg: SamplingConfig, spec: SpecConfig, eos_id: int | None, cache_len: int,
                   impl: str):
    model = _Model(params, model_config)
    k_draft = spec.drafts
    state = _init_state(model_config, prompts.shape[0], cache_len, k_draft, jnp.dtype(model_config.dtype))
    state, pending = _prefill(model, state, prompts, prompt_lens, jax.random.fold_in(key, 0), sampling_cfg, k_draft)
    return _decode(model, state, pending, key, max_new_tokens=max_new_tokens, sampling_cfg=sampling_cfg, spec=spec,
                   eos_id=eos_id, impl=impl)


def _continue_impl(params, state: DecodeState, new_tokens, new_lens, key, *, model_config: ModelConfig,
                   max_new_tokens: int, sampling_cfg: SamplingConfig, spec: SpecConfig, eos_id: int | None,
                   impl: str):
    """Feed [pending token] + ``new_tokens`` (an environment turn) onto ``state``, then decode."""
    model = _Model(params, model_config)
    k_draft = spec.drafts
    pending = _gather_rows(state.seq, state.length[:, None])
    tokens = jnp.concatenate([pending, new_tokens], axis=1)
    state, pending = _prefill(model, state, tokens, new_lens + 1, jax.random.fold_in(key, 0), sampling_cfg, k_draft)
    return _decode(model, state, pending, key, max_new_tokens=max_new_tokens, sampling_cfg=sampling_cfg, spec=spec,
                   eos_id=eos_id, impl=impl)


def _decode(model: _Model, state: DecodeState, pending: Array, key: Array, *, max_new_tokens: int,
            sampling_cfg: SamplingConfig, spec: SpecConfig, eos_id: int | None, impl: str):
    """The on-device loop after a prefill: emit ``pending``, then draft / verify / accept until done."""
    b = pending.shape[0]
    k_draft = spec.drafts
    out = jnp.full((b, max_new_tokens + k_draft + 1), -1, jnp.int32)
    out, n_gen, done, _ = _emit(out, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), pending[:, None],
                                jnp.ones((b,), jnp.int32), eos_id, max_new_tokens)
    kk = max(k_draft, 1)
    stats0 = dict(steps=jnp.zeros((), jnp.int32), row_steps=jnp.zeros((), jnp.int32),
                  accepted=jnp.zeros((kk,), jnp.int32), attempted=jnp.zeros((kk,), jnp.int32),
                  accepted_total=jnp.zeros((), jnp.int32))
    max_steps = max_new_tokens  # every step emits >= 1 token per live row

    def cond(carry):
        _, _, _, done, stats = carry
        return jnp.any(~done) & (stats["steps"] < max_steps)

    def body(carry):
        state, out, n_gen, done, stats = carry
        step_key = jax.random.fold_in(key, stats["steps"] + 1)
        pending = _gather_rows(state.seq, state.length[:, None])[:, 0]
        if k_draft == 0:
            positions = state.length[:, None]
            _, logits, trunk_cache = model.trunk(pending[:, None], positions, state.trunk_cache)
            nxt = sampling.sample(step_key, logits[:, 0], sampling_cfg.temperature, sampling_cfg.top_k,
                                  sampling_cfg.top_p)
            emitted, n_acc = nxt[:, None], jnp.zeros((b,), jnp.int32)
            new_state = dataclasses.replace(state, trunk_cache=trunk_cache)
            hidden_v = None
        else:
            draft_key, verify_key = jax.random.split(step_key)
            drafts, draft_logits, mtp_cache = _draft(model, state, draft_key, k_draft, sampling_cfg, spec.method)
            verify_tokens = jnp.concatenate([pending[:, None], drafts], axis=1)  # [B, K+1]
            hidden_v, target_logits, trunk_cache = model.trunk(
                verify_tokens, _positions(state.length, k_draft + 1), state.trunk_cache)
            emitted, n_acc = rejection_sample(
                target_logits, draft_logits, drafts, verify_key, temperature=sampling_cfg.temperature,
                top_k=sampling_cfg.top_k, top_p=sampling_cfg.top_p, method=spec.method, impl=impl)
            new_state = dataclasses.replace(state, trunk_cache=trunk_cache, mtp_cache=mtp_cache)
        count = n_acc + 1
        live = ~done
        out, n_gen, done_new, adv = _emit(out, n_gen, done, emitted, count, eos_id, max_new_tokens)
        new_len = state.length + adv
        seq = _scatter_rows(new_state.seq, state.length[:, None] + 1 + jnp.arange(emitted.shape[1])[None, :],
                            emitted, (jnp.arange(emitted.shape[1])[None, :] < adv[:, None]))
        if hidden_v is not None:
            w = state.hidden_window.shape[1]
            window = jnp.concatenate([state.hidden_window, hidden_v.astype(state.hidden_window.dtype)], axis=1)
            hidden_window = _gather_rows(window, adv[:, None] + jnp.arange(w)[None, :])
        else:
            hidden_window = state.hidden_window
        new_state = dataclasses.replace(new_state, seq=seq, length=new_len, hidden_window=hidden_window)
        depth = jnp.arange(1, kk + 1)[None, :]
        live_i = live[:, None].astype(jnp.int32)
        stats = dict(steps=stats["steps"] + 1,
                     row_steps=stats["row_steps"] + jnp.sum(live.astype(jnp.int32)),
                     accepted=stats["accepted"] + jnp.sum(live_i * (n_acc[:, None] >= depth), axis=0),
                     attempted=stats["attempted"] + jnp.sum(live_i * (n_acc[:, None] >= depth - 1), axis=0),
                     accepted_total=stats["accepted_total"] + jnp.sum(jnp.where(live, n_acc, 0)))
        return new_state, out, n_gen, done_new, stats

    state, out, n_gen, done, stats = jax.lax.while_loop(cond, body, (state, out, n_gen, done, stats0))
    lengths = jnp.minimum(n_gen, max_new_tokens)
    tokens = jnp.where(jnp.arange(max_new_tokens)[None, :] < lengths[:, None], out[:, :max_new_tokens], -1)
    return tokens, lengths, stats, state


_JIT_CACHE: dict = {}


def _check_configs(sampling: SamplingConfig, spec: SpecConfig, max_new_tokens: int) -> None:
    """The checks ``generate`` and ``continue_generate`` share."""
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if not isinstance(spec, SpecConfig):
        raise ValueError(f"spec must be a SpecConfig, got {type(spec).__name__}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def _check_ids(name: str, ids: np.ndarray, model_config: ModelConfig) -> None:
    if np.any((ids < 0) | (ids >= model_config.vocab_size)):
        raise ValueError(f"{name}: token ids must lie in [0, vocab_size={model_config.vocab_size})")


def validate_generate_args(model_config: ModelConfig, prompts, prompt_lens, max_new_tokens: int,
                           spec: SpecConfig, cache_len: int | None) -> int:
    """Checks the prompts and the cache on host values (after ``_check_configs``); returns the
    cache length. Raises ValueError naming the argument."""
    if spec.drafts > model_config.num_mtp_depths:
        raise ValueError(f"spec.num_draft={spec.num_draft} exceeds the model's "
                         f"num_mtp_depths={model_config.num_mtp_depths}")
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be [B, P] with P >= 1, got shape {tuple(prompts.shape)}")
    if not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must be integer token ids, got dtype {prompts.dtype}")
    if prompt_lens.shape != (prompts.shape[0],):
        raise ValueError(f"prompt_lens must have shape [B] = ({prompts.shape[0]},), got {tuple(prompt_lens.shape)}")
    if np.any(prompt_lens < 1):
        raise ValueError(f"prompt_lens: empty prompts are not allowed (rows {np.nonzero(prompt_lens < 1)[0].tolist()})")
    if np.any(prompt_lens > prompts.shape[1]):
        raise ValueError(f"prompt_lens: values exceed the padded prompt length {prompts.shape[1]}")
    _check_ids("prompts", prompts, model_config)
    k = spec.drafts
    needed = prompts.shape[1] + max_new_tokens + k + 1
    if cache_len is None:
        cache_len = needed
    elif cache_len < needed:
        raise ValueError(f"cache_len={cache_len} is too short: prompts ({prompts.shape[1]}) + max_new_tokens "
                         f"({max_new_tokens}) + num_draft + 1 need {needed}")
    if cache_len > model_config.max_seq_len + k + 1:
        raise ValueError(f"prompts: padded prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} "
                         f"exceeds ModelConfig.max_seq_len={model_config.max_seq_len}")
    return cache_len


def generate(params, model_config: ModelConfig, prompts, prompt_lens, key, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), spec: SpecConfig = SpecConfig(),
             eos_id: int | None = None, cache_len: int | None = None, impl: str = "auto",
             return_state: bool = False) -> GenerateResult:
    """Generate up to ``max_new_tokens`` per row after right-padded ``prompts`` [B, P].

    ``spec.method``: "none" (vanilla KV-cached sampling), "greedy" (drafts = argmax q,
    accepted with probability p(d)) or "rejection" (drafts ~ q, exact rejection
    sampling). Output distribution is the target's in every case. Stats hold
    per-depth conditional acceptance, mean accepted drafts per verify step,
    target forwards, and tokens per second (compile excluded).
    """
    _check_configs(sampling, spec, max_new_tokens)
    prompts_np = np.asarray(prompts)
    lens_np = np.asarray(prompt_lens)
    cache_len = validate_generate_args(model_config, prompts_np, lens_np, max_new_tokens, spec, cache_len)
    sig = ("generate", model_config, max_new_tokens, sampling, spec, eos_id, cache_len, impl, prompts_np.shape)
    args = (params, jnp.asarray(prompts_np, jnp.int32), jnp.asarray(lens_np, jnp.int32), key)
    fn = functools.partial(_generate_impl, model_config=model_config, max_new_tokens=max_new_tokens,
                           sampling_cfg=sampling, spec=spec, eos_id=eos_id, cache_len=cache_len, impl=impl)
    return _run(sig, fn, args, spec, return_state, donate=())


def continue_generate(params, model_config: ModelConfig, state: DecodeState, new_tokens, new_lens, key, *,
                      max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                      spec: SpecConfig = SpecConfig(), eos_id: int | None = None, impl: str = "auto",
                      return_state: bool = False) -> GenerateResult:
    """Append an environment turn to a returned ``state`` and generate the next response.

    ``state`` comes from ``generate(..., return_state=True)`` (or from an earlier
    continuation); ``new_tokens`` [B, T] right-padded with ``new_lens`` [B] real
    tokens per row (0 is allowed: the row just goes on). The conversation so far is
    not re-prefilled: the last returned token (pending in ``state``) and the new
    tokens are fed at positions ``state.length..`` onto the cached keys and values,
    and the result equals ``generate`` on the whole conversation. ``spec`` must
    use the ``num_draft`` the state was made with (its MTP window caches), and the
    state's cache (``generate``'s ``cache_len``) must have room for the new tokens,
    ``max_new_tokens``, and ``num_draft + 1`` scratch slots. Returned ``tokens`` hold
    only the newly generated tokens. ``state`` is donated (its caches are updated in
    place on accelerators): use the returned state, not the one passed in.
    """
    _check_configs(sampling, spec, max_new_tokens)
    if not isinstance(state, DecodeState):
        raise ValueError(f"state must be the DecodeState of generate(..., return_state=True), "
                         f"got {type(state).__name__}")
    k = spec.drafts
    if len(state.mtp_cache) != k:
        raise ValueError(f"spec: the state was made with num_draft={len(state.mtp_cache)} (0 = method 'none'); "
                         f"continue with the same, got num_draft={k}")
    tokens_np, lens_np = np.asarray(new_tokens), np.asarray(new_lens)
    b, cache_len = state.seq.shape
    if tokens_np.ndim != 2 or tokens_np.shape[0] != b or not np.issubdtype(tokens_np.dtype, np.integer):
        raise ValueError(f"new_tokens must be integer ids of shape [B={b}, T], got {tokens_np.dtype} "
                         f"{tuple(tokens_np.shape)}")
    _check_ids("new_tokens", tokens_np, model_config)
    if lens_np.shape != (b,) or np.any(lens_np < 0) or np.any(lens_np > tokens_np.shape[1]):
        raise ValueError(f"new_lens must have shape [B] = ({b},) with values in [0, {tokens_np.shape[1]}], "
                         f"got {lens_np.tolist()}")
    needed = int(np.max(np.asarray(state.length))) + 1 + tokens_np.shape[1] + max_new_tokens + k + 1
    if needed > cache_len:
        raise ValueError(f"cache_len: the state's cache holds {cache_len} positions; continuing needs {needed} "
                         f"(conversation + new_tokens + max_new_tokens + num_draft + 1). Pass a larger "
                         f"cache_len to the first generate call.")
    sig = ("continue", model_config, max_new_tokens, sampling, spec, eos_id, impl, tokens_np.shape, cache_len)
    args = (params, state, jnp.asarray(tokens_np, jnp.int32), jnp.asarray(lens_np, jnp.int32), key)
    fn = functools.partial(_continue_impl, model_config=model_config, max_new_tokens=max_new_tokens,
                           sampling_cfg=sampling, spec=spec, eos_id=eos_id, impl=impl)
    return _run(sig, fn, args, spec, return_state, donate=(1,))


def _run(sig: tuple, fn, args: tuple, spec: SpecConfig, return_state: bool, donate: tuple) -> GenerateResult:
    """Compile ``fn`` once per signature, run it, and gather tokens and stats on the host."""
    compiled = _JIT_CACHE.get(sig)
    if compiled is None:
        compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        _JIT_CACHE[sig] = compiled
    t0 = time.perf_counter()
    tokens, lengths, stats, state = compiled(*args)
    tokens = np.asarray(jax.device_get(tokens))
    seconds = time.perf_counter() - t0
    lengths = np.asarray(lengths)
    stats = jax.device_get(stats)
    k = spec.drafts
    row_steps = int(stats["row_steps"])
    per_depth = (np.asarray(stats["accepted"]) / np.maximum(np.asarray(stats["attempted"]), 1)).tolist() if k else []
    out_stats = {
        "method": spec.method,
        "num_draft": k,
        "per_depth_acceptance": per_depth[:k],
        "mean_accepted": float(stats["accepted_total"]) / max(row_steps, 1) if k else 0.0,
        "target_forwards": int(stats["steps"]) + 1,
        # tokens each row got per target forward it took part in (the prefill emits one)
        "tokens_per_forward": float(lengths.sum()) / (row_steps + len(lengths)),
        "tokens_generated": int(lengths.sum()),
        "row_steps": row_steps,  # verify steps summed over live rows
        "accepted_counts": np.asarray(stats["accepted"])[:k].tolist(),   # depth j accepted
        "attempted_counts": np.asarray(stats["attempted"])[:k].tolist(),  # depth j reached
        "seconds": seconds,
        "tokens_per_second": float(lengths.sum()) / max(seconds, 1e-9),
    }
    return GenerateResult(tokens=tokens, lengths=lengths, stats=out_stats, state=state if return_state else None)
