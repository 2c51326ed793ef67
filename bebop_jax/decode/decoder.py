"""The on-device decoder: vanilla sampling and MTP speculative decoding, as pure functions.

``generate_fn(...)`` returns ``(params, prompts, prompt_lens, key) -> DecodeOutput``:
a prefill, then one ``lax.while_loop`` whose steps run with no host round trip.
It can be jitted with in/out shardings for any mesh (a rollout sub-mesh) and holds
device arrays only. ``bebop_jax.decode.generate`` is the checked host wrapper.

Each speculative step

1. drafts K tokens with the MTP depths (depth k samples x_{L+k} from q_k),
2. verifies them in ONE trunk forward of K+1 tokens [x_L, d_1..d_K],
3. accepts / rejects per row (``rejection_sample``) and emits A+1 tokens,

where L is a row's number of cached tokens and x_L its pending token (emitted,
not yet fed to the trunk). Rows advance by their own accepted counts, cut
after EOS and at max_new_tokens (so a returned state ends at the returned tokens).

Per-token outputs. Every emitted token comes with the log-probability it has under
the distribution it was sampled from (the target after temperature, top-k and
top-p: ``sampling.process_logits``) and that distribution's entropy, both read from
logits the step computed anyway (the verify forward, or the 1-token forward of
vanilla decoding; the prefill for the first token). Exact rejection sampling emits
every token distributed as that target, so these are the behaviour log-probs RL
needs. At temperature 0 (argmax) they are taken under the temperature-1
distribution with the same top-k / top-p.

MTP caches, exactly. Depth k's attention at position s reads entries computed
from (depth k-1 hidden at s, x_{s+k}). For s <= L-k all of that is known; for
the last k-1 positions it involves the drafts d_1..d_{k-1} the step is
conditioning on. So every draft step recomputes each depth over a window of the
last W = K+1 positions [L-W, L-1] (overwriting their cache slots), and entries
older than the window were last written when all their tokens were known or
accepted: with at most K+1 tokens emitted per step, an entry leaves the window
only after every draft it used was accepted. The drafts therefore follow the
same distribution the teacher-forced training forward defines.

Multi-turn rollouts: ``continue_fn`` feeds an environment turn onto a returned
``DecodeState`` and generates the next response without re-prefilling.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bebop_jax import sampling
from bebop_jax.config import ModelConfig, SpecConfig
from bebop_jax.decode.rejection import rejection_sample_with_noise
from bebop_jax.decode.rejection_common import draw_randomness
from bebop_jax.model import Policy, empty_kv_cache
from bebop_jax.sampling import SamplingConfig

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """What one decode call returns, as device arrays (nothing is fetched to the host)."""

    tokens: Array           # [B, N] int32, -1 after each row's end
    lengths: Array          # [B] int32 generated tokens per row (EOS included)
    logprobs: Array         # [B, N] float32 log p(token) under its sampling distribution, 0 after the end
    entropy: Array          # [B, N] float32 entropy (nats) of that distribution, 0 after the end
    accepted: Array         # [B] int32 drafts accepted per row, summed over its verify steps
    verify_steps: Array     # [B] int32 verify (or vanilla) steps each row was live in
    depth_accepted: Array   # [B, max(K,1)] int32 steps whose depth-j draft was accepted
    depth_attempted: Array  # [B, max(K,1)] int32 steps that reached depth j
    steps: Array            # [] int32 loop iterations (target forwards after the prefill)
    state: DecodeState | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Out:
    """The output buffers a decode loop writes: tokens and their per-token values."""

    tokens: Array    # [B, N + K + 1] int32
    logprobs: Array  # [B, N + K + 1] float32
    entropy: Array   # [B, N + K + 1] float32


def _empty_out(b: int, width: int) -> _Out:
    return _Out(tokens=jnp.full((b, width), -1, jnp.int32), logprobs=jnp.zeros((b, width), jnp.float32),
                entropy=jnp.zeros((b, width), jnp.float32))


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


def row_keys(key: Array, batch: int) -> Array:
    """One PRNG key per row: ``key`` itself when it already holds ``batch`` keys (a request's own
    key per row), else ``batch`` keys split from the one ``key``."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == (batch,):
        return key
    if key.shape == ():
        return jax.random.split(key, batch)
    raise ValueError(f"key: one PRNG key or one per row ({batch}), got keys of shape {key.shape}")


def _keys_at(keys_B: Array, index_B: Array) -> Array:
    """Each row's key for the draws that produce its token at position ``index``: a function of
    (the row's key, the position) only, never of the batch, the slot or the step count."""
    return jax.vmap(jax.random.fold_in)(keys_B, index_B)


def _split_rows(keys_B: Array, n: int) -> Array:
    """[B, n]: ``n`` independent keys per row."""
    return jax.vmap(lambda k: jax.random.split(k, n))(keys_B)


def _sample_rows(keys_B: Array, logits_BxV: Array, sampling_cfg: SamplingConfig) -> Array:
    """One token per row [B] int32, row b drawn with its own key."""
    draw = lambda k, logits_V: sampling.sample(k, logits_V, sampling_cfg.temperature, sampling_cfg.top_k,
                                               sampling_cfg.top_p)
    return jax.vmap(draw)(keys_B, logits_BxV)


def token_logprob_entropy(logits_BxTxV: Array, tokens_BxT: Array, sampling_cfg: SamplingConfig):
    """(log p(token) [B,T], entropy [B,T]) of the distribution tokens are sampled from.

    p = softmax(process_logits(logits)) with the sampling settings; temperature 0
    reads the temperature-1 distribution (argmax sampling has no density).
    """
    x = sampling.process_logits(logits_BxTxV, sampling_cfg.temperature or 1.0, sampling_cfg.top_k,
                                sampling_cfg.top_p)
    logp_BxTxV = jax.nn.log_softmax(x, axis=-1)
    tok = jnp.clip(tokens_BxT, 0, x.shape[-1] - 1)
    logp_BxT = jnp.take_along_axis(logp_BxTxV, tok[..., None], axis=-1)[..., 0]
    p = jnp.exp(logp_BxTxV)
    entropy_BxT = -jnp.sum(jnp.where(p > 0, p * logp_BxTxV, 0.0), axis=-1)
    return logp_BxT, entropy_BxT


class _Model:
    """Thin wrappers around Policy methods (one place that calls ``apply``)."""

    def __init__(self, params, config: ModelConfig):
        self.params, self.config, self.policy = params, config, Policy(config)

    def trunk(self, tokens, positions, caches):
        return self.policy.apply({"params": self.params}, tokens, positions, caches, method=Policy.trunk)

    def trunk_features(self, tokens, positions, caches):
        return self.policy.apply({"params": self.params}, tokens, positions, caches, method=Policy.trunk_features)

    def head(self, normed):
        return self.policy.apply({"params": self.params}, normed, method=Policy.head)

    def mtp_features(self, depth, hidden, tokens, positions, cache):
        return self.policy.apply({"params": self.params}, depth, hidden, tokens, positions, cache,
                                 method=Policy.mtp_depth_features)

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
        hidden, _, cache = model.mtp_features(k, hidden, tokens, positions, state.mtp_cache[k - 1])
        caches.append(cache)
    return caches


def _prefill(model: _Model, state: DecodeState, tokens_BxT: Array, lens_B: Array, keys_B: Array,
             sampling_cfg: SamplingConfig, num_depths: int):
    """Feed tokens at positions length.. (per row ``lens`` of them); sample the next pending token
    (at position length + lens, with that row's key at that position).

    Returns (state, the pending token [B, 1] with its log-prob and entropy as an ``_Out``).
    """
    start = state.length
    positions = _positions(start, tokens_BxT.shape[1])
    hidden, normed, trunk_cache = model.trunk_features(tokens_BxT, positions, state.trunk_cache)
    valid = jnp.arange(tokens_BxT.shape[1])[None, :] < lens_B[:, None]
    seq = _scatter_rows(state.seq, positions, tokens_BxT, valid)
    # logits only where the pending token is sampled: [B, V], not [B, T, V]
    last_logits = model.head(_gather_rows(normed, (lens_B - 1)[:, None]))[:, 0]
    new_len = start + lens_B
    pending = _sample_rows(_keys_at(keys_B, new_len), last_logits, sampling_cfg)
    logp, ent = token_logprob_entropy(last_logits[:, None], pending[:, None], sampling_cfg)
    seq = _scatter_rows(seq, new_len[:, None], pending[:, None])
    w = state.hidden_window.shape[1]
    window = jnp.concatenate([state.hidden_window, hidden.astype(state.hidden_window.dtype)], axis=1)
    hidden_window = _gather_rows(window, lens_B[:, None] + jnp.arange(w)[None, :])
    mid = DecodeState(trunk_cache=trunk_cache, mtp_cache=state.mtp_cache, seq=seq, length=start,
                      hidden_window=state.hidden_window)
    mtp_cache = _mtp_fill(model, mid, hidden, start, num_depths) if num_depths else []
    new_state = DecodeState(trunk_cache=trunk_cache, mtp_cache=mtp_cache, seq=seq, length=new_len,
                            hidden_window=hidden_window)
    return new_state, _Out(tokens=pending[:, None], logprobs=logp, entropy=ent)


def _draft(model: _Model, state: DecodeState, keys_B: Array, k_draft: int, sampling_cfg: SamplingConfig,
           method: str):
    """K draft tokens [B,K] and their logits [B,K,V]; rewrites the MTP window caches."""
    w = state.hidden_window.shape[1]
    positions = _positions(state.length - w, w)
    pending_idx = state.length[:, None]
    drafts = jnp.zeros((state.seq.shape[0], k_draft), jnp.int32)
    hidden, caches, logits_all = state.hidden_window, [], []
    keys = _split_rows(keys_B, k_draft)  # [B, K]
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
            d = _sample_rows(keys[:, k - 1], logits, sampling_cfg)
        drafts = drafts.at[:, k - 1].set(d.astype(jnp.int32))
        caches.append(cache)
        logits_all.append(logits)
    return drafts, jnp.stack(logits_all, axis=1), caches + list(state.mtp_cache[k_draft:])


def _emit(out: _Out, n_gen, done, new: _Out, count_B, eos_id, max_new):
    """Append up to ``count`` tokens (with their values) per row; stop rows at EOS or max_new.

    Returns ``take`` [B], the tokens each row actually keeps (cut after EOS and at
    max_new): rows advance by exactly that, so a returned state ends at the returned
    tokens and a continuation never sees tokens the caller was not given.
    """
    e = new.tokens.shape[1]
    j = jnp.arange(e)[None, :]
    valid = (j < count_B[:, None]) & ~done[:, None]
    is_eos = valid & (new.tokens == eos_id) if eos_id is not None else jnp.zeros_like(valid)
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, e + 1)
    take = jnp.where(done, 0, jnp.minimum(jnp.minimum(count_B, first_eos), max_new - n_gen))
    idx, keep = n_gen[:, None] + j, j < take[:, None]
    out = jax.tree.map(lambda buf, val: _scatter_rows(buf, idx, val, keep), out, new)
    n_gen = n_gen + take
    done = done | (first_eos <= e) & (take > 0) | (n_gen >= max_new)
    return out, n_gen, done, take


def init_state(model_config: ModelConfig, batch: int, cache_len: int, num_depths: int) -> DecodeState:
    """Empty caches for ``batch`` rows of ``cache_len`` positions and ``num_depths`` MTP depths."""
    w = num_depths + 1
    dtype = jnp.dtype(model_config.dtype)
    return DecodeState(
        trunk_cache=[empty_kv_cache(model_config, batch, cache_len, dtype) for _ in range(model_config.num_layers)],
        mtp_cache=[empty_kv_cache(model_config, batch, cache_len, dtype) for _ in range(num_depths)],
        seq=jnp.zeros((batch, cache_len), jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
        hidden_window=jnp.zeros((batch, w, model_config.hidden_size), dtype))


def _verify_step(model: _Model, state: DecodeState, pending: Array, keys_B: Array, k_draft: int,
                 sampling_cfg: SamplingConfig, method: str, impl: str):
    """One draft + verify step -> (emitted [B,K+1] with log-probs/entropies, accepted [B], state, hidden).
    ``keys_B``: each row's key for this step (drafts, accept tests and the recovered / bonus token)."""
    keys = _split_rows(keys_B, 2)
    drafts, draft_logits, mtp_cache = _draft(model, state, keys[:, 0], k_draft, sampling_cfg, method)
    verify_tokens = jnp.concatenate([pending[:, None], drafts], axis=1)  # [B, K+1]
    hidden_v, target_logits, trunk_cache = model.trunk(
        verify_tokens, _positions(state.length, k_draft + 1), state.trunk_cache)
    uniforms, gumbel = jax.vmap(lambda k: draw_randomness(k, 1, k_draft, target_logits.shape[-1]))(keys[:, 1])
    emitted, n_acc = rejection_sample_with_noise(
        target_logits, draft_logits, drafts, uniforms[:, 0], gumbel[:, 0], temperature=sampling_cfg.temperature,
        top_k=sampling_cfg.top_k, top_p=sampling_cfg.top_p, method=method, impl=impl)
    # emitted[:, j] (j <= n_acc) is distributed as the target at verify position j
    logp, ent = token_logprob_entropy(target_logits, emitted, sampling_cfg)
    new_state = dataclasses.replace(state, trunk_cache=trunk_cache, mtp_cache=mtp_cache)
    return _Out(tokens=emitted, logprobs=logp, entropy=ent), n_acc, new_state, hidden_v


def _vanilla_step(model: _Model, state: DecodeState, pending: Array, keys_B: Array, sampling_cfg: SamplingConfig):
    _, logits, trunk_cache = model.trunk(pending[:, None], state.length[:, None], state.trunk_cache)
    nxt = _sample_rows(keys_B, logits[:, 0], sampling_cfg)
    logp, ent = token_logprob_entropy(logits, nxt[:, None], sampling_cfg)
    new_state = dataclasses.replace(state, trunk_cache=trunk_cache)
    return _Out(tokens=nxt[:, None], logprobs=logp, entropy=ent), jnp.zeros_like(nxt), new_state


def _decode(model: _Model, state: DecodeState, first: _Out, keys_B: Array, *, max_new_tokens: int,
            sampling_cfg: SamplingConfig, spec: SpecConfig, eos_id: int | None, impl: str,
            max_steps=None, return_state: bool = False) -> DecodeOutput:
    """The on-device loop after a prefill: emit the pending token ``first``, then step until done.

    ``max_steps`` (default max_new_tokens: every step emits >= 1 token per live row)
    may be a traced scalar: the cost calibration runs a fixed number of steps.
    """
    b = first.tokens.shape[0]
    k_draft = spec.drafts
    out = _empty_out(b, max_new_tokens + k_draft + 1)
    out, n_gen, done, _ = _emit(out, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), first,
                                jnp.ones((b,), jnp.int32), eos_id, max_new_tokens)
    kk = max(k_draft, 1)
    zeros_b = jnp.zeros((b,), jnp.int32)
    stats0 = dict(steps=jnp.zeros((), jnp.int32), verify_steps=zeros_b, accepted=zeros_b,
                  depth_accepted=jnp.zeros((b, kk), jnp.int32), depth_attempted=jnp.zeros((b, kk), jnp.int32))
    max_steps = max_new_tokens if max_steps is None else max_steps

    def cond(carry):
        _, _, _, done, stats = carry
        return jnp.any(~done) & (stats["steps"] < max_steps)

    def body(carry):
        state, out, n_gen, done, stats = carry
        step_keys = _keys_at(keys_B, state.length + 1)  # the step's first new token sits at length + 1
        pending = _gather_rows(state.seq, state.length[:, None])[:, 0]
        if k_draft == 0:
            new, n_acc, new_state = _vanilla_step(model, state, pending, step_keys, sampling_cfg)
            hidden_v = None
        else:
            new, n_acc, new_state, hidden_v = _verify_step(model, state, pending, step_keys, k_draft, sampling_cfg,
                                                          spec.method, impl)
        live = ~done
        out, n_gen, done_new, adv = _emit(out, n_gen, done, new, n_acc + 1, eos_id, max_new_tokens)
        e = new.tokens.shape[1]
        seq = _scatter_rows(new_state.seq, state.length[:, None] + 1 + jnp.arange(e)[None, :], new.tokens,
                            jnp.arange(e)[None, :] < adv[:, None])
        hidden_window = state.hidden_window
        if hidden_v is not None:
            w = hidden_window.shape[1]
            window = jnp.concatenate([hidden_window, hidden_v.astype(hidden_window.dtype)], axis=1)
            hidden_window = _gather_rows(window, adv[:, None] + jnp.arange(w)[None, :])
        new_state = dataclasses.replace(new_state, seq=seq, length=state.length + adv, hidden_window=hidden_window)
        live_i = live.astype(jnp.int32)
        depth = jnp.arange(1, kk + 1)[None, :]
        stats = dict(steps=stats["steps"] + 1,
                     verify_steps=stats["verify_steps"] + live_i,
                     accepted=stats["accepted"] + live_i * n_acc,
                     depth_accepted=stats["depth_accepted"] + live_i[:, None] * (n_acc[:, None] >= depth),
                     depth_attempted=stats["depth_attempted"] + live_i[:, None] * (n_acc[:, None] >= depth - 1))
        return new_state, out, n_gen, done_new, stats

    state, out, n_gen, done, stats = jax.lax.while_loop(cond, body, (state, out, n_gen, done, stats0))
    lengths = jnp.minimum(n_gen, max_new_tokens)
    keep = jnp.arange(max_new_tokens)[None, :] < lengths[:, None]
    return DecodeOutput(
        tokens=jnp.where(keep, out.tokens[:, :max_new_tokens], -1),
        lengths=lengths,
        logprobs=jnp.where(keep, out.logprobs[:, :max_new_tokens], 0.0),
        entropy=jnp.where(keep, out.entropy[:, :max_new_tokens], 0.0),
        accepted=stats["accepted"], verify_steps=stats["verify_steps"],
        depth_accepted=stats["depth_accepted"], depth_attempted=stats["depth_attempted"],
        steps=stats["steps"], state=state if return_state else None)


def needed_cache_len(prompt_width: int, max_new_tokens: int, spec: SpecConfig) -> int:
    """Cache positions a call needs: prompts + new tokens + the K+1 scratch slots of a verify step."""
    return prompt_width + max_new_tokens + spec.drafts + 1


def _check_fn_configs(model_config: ModelConfig, max_new_tokens: int, sampling_cfg: SamplingConfig,
                      spec: SpecConfig, cache_len: int | None) -> None:
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(sampling_cfg, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling_cfg).__name__}")
    if not isinstance(spec, SpecConfig):
        raise ValueError(f"spec must be a SpecConfig, got {type(spec).__name__}")
    if spec.adaptive:
        raise ValueError("spec.adaptive: a compiled decode function has one draft length; choose k with a "
                         "DraftController and pass spec.with_draft(k)")
    if spec.drafts > model_config.num_mtp_depths:
        raise ValueError(f"spec.num_draft={spec.num_draft} exceeds the model's "
                         f"num_mtp_depths={model_config.num_mtp_depths}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if cache_len is not None and (not isinstance(cache_len, int) or cache_len < 1):
        raise ValueError(f"cache_len must be None or an int >= 1, got {cache_len!r}")


def generate_fn(model_config: ModelConfig, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                spec: SpecConfig = SpecConfig(), eos_id: int | None = None, cache_len: int | None = None,
                impl: str = "auto", return_state: bool = False):
    """The pure decode function ``(params, prompts [B,P], prompt_lens [B], key) -> DecodeOutput``.

    ``key``: one PRNG key, or one per row ([B]). Every random draw of row b comes from its own
    key folded with the position of the token it produces, so with per-row keys a row's output
    depends only on (params, its prompt, its key, the settings), not on the other rows.

    Jit it as you like (``jax.jit(fn, in_shardings=..., out_shardings=...)``): it
    runs with no host sync. ``cache_len`` None sizes the caches from the prompts'
    static width. Data are not checked here (use ``generate`` for checked calls);
    configurations are, at construction.
    """
    _check_fn_configs(model_config, max_new_tokens, sampling, spec, cache_len)

    def fn(params, prompts, prompt_lens, key) -> DecodeOutput:
        model = _Model(params, model_config)
        k = spec.drafts
        length = cache_len or needed_cache_len(prompts.shape[1], max_new_tokens, spec)
        state = init_state(model_config, prompts.shape[0], length, k)
        keys = row_keys(key, prompts.shape[0])
        state, first = _prefill(model, state, prompts.astype(jnp.int32), prompt_lens.astype(jnp.int32), keys,
                                sampling, k)
        return _decode(model, state, first, keys, max_new_tokens=max_new_tokens, sampling_cfg=sampling, spec=spec,
                       eos_id=eos_id, impl=impl, return_state=return_state)

    return fn


def continue_fn(model_config: ModelConfig, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                spec: SpecConfig = SpecConfig(), eos_id: int | None = None, impl: str = "auto",
                return_state: bool = False):
    """The pure continuation ``(params, state, new_tokens [B,T], new_lens [B], key) -> DecodeOutput``.

    Feeds [pending token] + ``new_tokens`` (an environment turn) onto ``state`` at
    positions ``state.length..``, then decodes. ``spec`` must have the draft length
    the state was made with.
    """
    _check_fn_configs(model_config, max_new_tokens, sampling, spec, None)

    def fn(params, state: DecodeState, new_tokens, new_lens, key) -> DecodeOutput:
        model = _Model(params, model_config)
        pending = _gather_rows(state.seq, state.length[:, None])
        tokens = jnp.concatenate([pending, new_tokens.astype(jnp.int32)], axis=1)
        keys = row_keys(key, tokens.shape[0])
        state, first = _prefill(model, state, tokens, new_lens.astype(jnp.int32) + 1, keys, sampling, spec.drafts)
        return _decode(model, state, first, keys, max_new_tokens=max_new_tokens, sampling_cfg=sampling, spec=spec,
                       eos_id=eos_id, impl=impl, return_state=return_state)

    return fn


def fixed_steps_fn(model_config: ModelConfig, *, sampling: SamplingConfig, spec: SpecConfig, max_new_tokens: int,
                   cache_len: int | None = None, impl: str = "auto"):
    """``(params, prompts, prompt_lens, key, num_steps) -> steps run``: a prefill, then exactly
    ``num_steps`` (traced; at most (max_new_tokens - 1) // (K + 1)) decode steps with every row
    live (no EOS). The buffers and caches are those of a ``generate_fn`` call with the same
    ``max_new_tokens`` / ``cache_len``, so a step costs what it costs there: the adaptive
    draft length's calibration and the benchmark time these."""

    def fn(params, prompts, prompt_lens, key, num_steps):
        model = _Model(params, model_config)
        k = spec.drafts
        length = cache_len or needed_cache_len(prompts.shape[1], max_new_tokens, spec)
        state = init_state(model_config, prompts.shape[0], length, k)
        keys = row_keys(key, prompts.shape[0])
        state, first = _prefill(model, state, prompts, prompt_lens, keys, sampling, k)
        out = _decode(model, state, first, keys, max_new_tokens=max_new_tokens, sampling_cfg=sampling, spec=spec,
                      eos_id=None, impl=impl, max_steps=num_steps)
        return out.steps, out.lengths

    return fn
