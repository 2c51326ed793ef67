"""The speculative decoder (bebop_jax.decode): exactness, MTP cache exactness,
the continuation seam, and argument checks.

Random-init MTP heads almost never agree with the trunk, which would leave the
acceptance paths untested. So the tests build "easy" parameters (``easy_params``):
the attention / MLP output projections of the trunk and of every MTP layer are
scaled down (not zeroed) and each MTP ``fc`` passes the token embedding through
unchanged (identity on its embedding half, hidden half scaled down). The trunk is
then nearly a Markov chain on the current token and depth k drafts nearly the
trunk's own next-token distribution: acceptance is high but not 1, so steps
accept several drafts, reject others, and rows advance by different amounts,
while the small attention terms keep every KV cache (and the MTP window caches)
on the path from inputs to outputs.

Compiles dominate the run time (each distinct (K, method, shape, sampling) compiles
the whole while_loop: 12 loops here), so runs are shared and cached
(``functools.lru_cache``): the cache-exactness and continuation tests read the
states the greedy-equivalence and distribution runs return, and every direct call
into decoder internals goes through one jitted wrapper per (config, K, sampling).
Parameters are drawn with numpy from ``abstract_params`` (no init compile).
"""

import copy
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from bebop_jax import sampling
from bebop_jax.config import ModelConfig, SpecConfig
from bebop_jax.model import Policy, abstract_params, head_params, layer_params
from bebop_jax.sampling import SamplingConfig
from bebop_jax.decode import decoder as dec
from bebop_jax.decode import continue_generate, generate

V = 16          # the distribution test's vocabulary: a 3-token joint with few cells
V_GREEDY = 64   # the greedy tests': longer, more varied greedy paths than V=16 gives
K_MAX = 4
MAX_SEQ = 48
# One MTP module for every depth (greedy / cache / continuation tests) ...
CFG = ModelConfig.tiny(vocab_size=V_GREEDY, num_mtp_depths=K_MAX, tie_embeddings=False, max_seq_len=MAX_SEQ)
# ... and one module per depth (distribution test and its cache check).
CFG_M4 = ModelConfig.tiny(vocab_size=V, num_mtp_depths=K_MAX, num_mtp_modules=K_MAX,
                          tie_embeddings=False, max_seq_len=MAX_SEQ)
ALPHA = 1e-3  # significance level of every chi-squared test below

# The greedy-equivalence batch: rows of different prompt lengths (1 .. P).
PROMPT_LENS = np.array([7, 1, 3, 5, 2, 7], np.int32)
PROMPTS = np.random.default_rng(0).integers(0, V_GREEDY, (len(PROMPT_LENS), 7)).astype(np.int32)
MAX_NEW = 20
CACHE_LEN = MAX_SEQ  # room left after generation for the continuation test


def random_params(cfg: ModelConfig, seed: int):
    """Fan-in scaled normal weights, unit norm scales; drawn in numpy from the abstract tree."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "embed_tokens":
            fan_in = cfg.hidden_size
        elif name == "o_proj":
            fan_in = leaf.shape[0] * leaf.shape[1]
        else:
            fan_in = leaf.shape[0]
        return (rng.standard_normal(leaf.shape) * fan_in ** -0.5).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


def easy_params(params, trunk_scale: float, mtp_scale: float, hidden_scale: float = 0.0):
    """Near-Markov trunk, MTP depths that nearly copy it (see the module docstring)."""
    p = copy.deepcopy(jax.device_get(params))
    layers, heads = layer_params(p), head_params(p)
    for name, sub in p.items():
        if name in layers or name in heads:
            layer = sub if name in layers else sub["layer"]
            s = trunk_scale if name in layers else mtp_scale
            layer["self_attn"]["o_proj"] = layer["self_attn"]["o_proj"] * s
            layer["mlp"]["down_proj"] = layer["mlp"]["down_proj"] * s
        if name in heads:
            h = sub["fc"].shape[1]
            sub["fc"] = np.concatenate([np.eye(h, dtype=np.float32), hidden_scale * sub["fc"][h:]], 0)
    return p


@functools.lru_cache(maxsize=None)
def params_for(which: str):
    if which == "greedy":  # T=0, K=4: per-depth acceptance ~0.7-0.9, multi-token steps and rejections
        return easy_params(random_params(CFG, 0), 0.03, 0.03)
    if which == "dist":    # one MTP module per depth; accepts, rejections and bonuses all frequent
        return easy_params(random_params(CFG_M4, 1), 0.1, 0.1, 0.1)
    raise KeyError(which)


def truncate_at_eos(tokens_BxN: np.ndarray, eos_id: int):
    """What generation with ``eos_id`` must return, given the output without it."""
    out = np.full_like(tokens_BxN, -1)
    lengths = np.zeros(len(tokens_BxN), np.int32)
    for b, row in enumerate(tokens_BxN):
        hits = np.nonzero(row == eos_id)[0]
        n = hits[0] + 1 if len(hits) else len(row)
        out[b, :n] = row[:n]
        lengths[b] = n
    return out, lengths


@functools.lru_cache(maxsize=None)
def greedy_reference():
    """Vanilla greedy output (no EOS) and an EOS id that stops >= 2 rows mid-output and not >= 2 others."""
    ref = generate(params_for("greedy"), CFG, PROMPTS, PROMPT_LENS, jax.random.key(0),
                   max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=0.0),
                   spec=SpecConfig("none"), cache_len=CACHE_LEN)
    best, best_hits = None, 0
    for v in range(V_GREEDY):
        first = [np.nonzero(row == v)[0] for row in ref.tokens]
        mid = sum(1 for f in first if len(f) and 2 <= f[0] <= MAX_NEW - 3)
        never = sum(1 for f in first if not len(f))
        if never >= 2 and mid > best_hits:
            best, best_hits = v, mid
    return ref.tokens, best


@functools.lru_cache(maxsize=None)
def greedy_spec_run(method: str, k: int):
    _, eos_id = greedy_reference()
    return generate(params_for("greedy"), CFG, PROMPTS, PROMPT_LENS, jax.random.key(1),
                    max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=0.0),
                    spec=SpecConfig(method, k), eos_id=eos_id, cache_len=CACHE_LEN, return_state=True)


# ------------------------------------------------------------------ temperature 0: token-exact

@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("method", ["greedy", "rejection"])
def test_greedy_spec_matches_vanilla_token_for_token(method, k):
    ref_tokens, eos_id = greedy_reference()
    want_tokens, want_lengths = truncate_at_eos(ref_tokens, eos_id)
    # The case is meaningful: EOS stops >= 2 rows mid-output, >= 2 rows run to max_new.
    assert np.sum((want_lengths >= 3) & (want_lengths < MAX_NEW - 1)) >= 2, want_lengths
    assert np.sum(want_lengths == MAX_NEW) >= 2, want_lengths

    res = greedy_spec_run(method, k)
    np.testing.assert_array_equal(res.tokens, want_tokens)
    np.testing.assert_array_equal(res.lengths, want_lengths)
    # Both acceptance paths were taken: some drafts rejected, and (K >= 2) multi-token steps.
    stats = res.stats
    assert 0.3 < stats["per_depth_acceptance"][0] < 1.0, stats
    assert stats["accepted_counts"][k - 1] > 0, stats  # some steps accepted all K drafts
    assert stats["target_forwards"] < MAX_NEW, stats


# ------------------------------------------------------------------ temperature > 0: distribution

DIST_SAMPLING = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)
DIST_PROMPT = np.array([3, 9, 1, 12], np.int32)
DIST_BATCH = 3000
DIST_NEW = 10  # the test reads the first 3 tokens; later steps leave varied states for the cache check
# greedy K=1: token 3 is a bonus or the next step's; rejection K=3: tokens 2-3 are drafts or residuals.
DIST_SPECS = {"none": SpecConfig("none"), "greedy": SpecConfig("greedy", 1),
              "rejection": SpecConfig("rejection", 3)}


@functools.lru_cache(maxsize=None)
def dist_run(name: str):
    prompts = np.tile(DIST_PROMPT, (DIST_BATCH, 1))
    lens = np.full((DIST_BATCH,), len(DIST_PROMPT), np.int32)
    res = generate(params_for("dist"), CFG_M4, prompts, lens, jax.random.key(100 + len(name)),
                   max_new_tokens=DIST_NEW, sampling=DIST_SAMPLING, spec=DIST_SPECS[name],
                   cache_len=CACHE_LEN, return_state=True)
    assert np.all(res.lengths == DIST_NEW)
    x = res.tokens.astype(np.int64)
    return np.bincount((x[:, 0] * V + x[:, 1]) * V + x[:, 2], minlength=V ** 3), res


@functools.lru_cache(maxsize=None)
def exact_joints():
    """The target's joint of the first 3 tokens, by a teacher-forced forward on all V^2 prefixes.

    Also the joint one would get by accepting every draft unconditionally
    (x1 ~ p, x2 ~ q_1, x3 ~ q_2): used to show the test has power.
    """
    params, s = params_for("dist"), DIST_SAMPLING
    pairs = np.stack(np.meshgrid(np.arange(V), np.arange(V), indexing="ij"), -1).reshape(-1, 2)
    seqs = np.concatenate([np.tile(DIST_PROMPT, (V * V, 1)), pairs], 1).astype(np.int32)  # [V^2, P+2]
    out = jitted_policy(CFG_M4)(params, jnp.asarray(seqs))
    probs = lambda lg: np.asarray(sampling.probs(lg, s.temperature, s.top_k, s.top_p), np.float64)
    p_len = len(DIST_PROMPT)
    p1 = probs(out.logits[0, p_len - 1])                             # [V]
    p2 = probs(out.logits[::V, p_len]).reshape(V, V)                 # [x1, x2]
    p3 = probs(out.logits[:, p_len + 1]).reshape(V, V, V)            # [x1, x2, x3]
    q1 = probs(out.mtp_logits[::V, p_len - 1, 0]).reshape(V, V)      # depth 1 at t=P-1 drafts x2
    q2 = probs(out.mtp_logits[:, p_len - 1, 1]).reshape(V, V, V)     # depth 2 at t=P-1 drafts x3
    exact = (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1)
    drafts_only = (p1[:, None, None] * q1[:, :, None] * q2).reshape(-1)
    return exact, drafts_only


def merged_cells(expected_counts: np.ndarray, min_expected: float = 5.0):
    """Cell index -> merged cell: cells expecting fewer than ``min_expected`` share one cell."""
    big = expected_counts >= min_expected
    mapping = np.where(big, np.cumsum(big) - 1, big.sum())
    return mapping, int(big.sum()) + 1


def gof_pvalue(counts, probs):
    n = counts.sum()
    mapping, cells = merged_cells(n * probs)
    obs = np.bincount(mapping, counts, minlength=cells)
    exp = np.bincount(mapping, n * probs, minlength=cells)
    keep = exp > 0
    return scipy.stats.chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue


def test_spec_sampling_joint_distribution_matches_vanilla_and_exact():
    """Chi-squared tests at alpha = 0.001 (fixed seeds): the joint of the first 3 tokens.

    temperature 0.8, top-k 5, top-p 0.9; 3000 rows per method, one generate call each.
    With greedy K=1 token 3 is a bonus (draft accepted) or the next step's draft or
    residual; with rejection K=3 tokens 2-3 are accepted drafts or residual draws at
    depths 1-2. Cells the exact joint expects fewer than 5 samples in are merged into one.
    """
    exact, drafts_only = exact_joints()
    counts = {name: dist_run(name)[0] for name in DIST_SPECS}
    mapping, cells = merged_cells(DIST_BATCH * exact)
    assert cells >= 20, cells  # a joint with real spread, not a near-deterministic one
    for name in ("greedy", "rejection"):
        stats = dist_run(name)[1].stats
        acc = stats["per_depth_acceptance"]
        assert 0.3 < acc[0] < 0.97, stats  # accepts, rejections (residual draws) and bonuses all occur
        table = np.stack([np.bincount(mapping, counts[name], minlength=cells),
                          np.bincount(mapping, counts["none"], minlength=cells)])
        table = table[:, table.sum(0) > 0]
        p_two_sample = scipy.stats.chi2_contingency(table).pvalue
        assert p_two_sample > ALPHA, (name, "vs vanilla", p_two_sample)
        p_exact = gof_pvalue(counts[name], exact)
        assert p_exact > ALPHA, (name, "vs exact", p_exact)
    assert gof_pvalue(counts["none"], exact) > ALPHA
    # Power: the same test rejects the joint obtained by accepting every draft.
    assert gof_pvalue(counts["rejection"], drafts_only) < ALPHA


# ------------------------------------------------------------------ MTP / trunk cache exactness

PREFILL_WIDTH = 32  # every direct prefill below is padded to this width (one compile)


@functools.lru_cache(maxsize=None)
def jitted_policy(cfg: ModelConfig):
    return jax.jit(lambda params, tokens: Policy(cfg).apply({"params": params}, tokens))


@functools.lru_cache(maxsize=None)
def jitted_prefill(cfg: ModelConfig, k: int, sampling_cfg: SamplingConfig):
    def prefill(params, state, tokens_BxT, lens_B, key):
        return dec._prefill(dec._Model(params, cfg), state, tokens_BxT, lens_B,
                            dec.row_keys(key, tokens_BxT.shape[0]), sampling_cfg, k)
    return jax.jit(prefill)


@functools.lru_cache(maxsize=None)
def jitted_draft_verify(cfg: ModelConfig, k: int, sampling_cfg: SamplingConfig, method: str):
    """From a state: the K drafts, their logits (MTP caches + hidden window) and the verify logits."""
    def draft_verify(params, state, key):
        model = dec._Model(params, cfg)
        drafts, draft_logits, _ = dec._draft(model, state, dec.row_keys(key, state.seq.shape[0]), k, sampling_cfg,
                                             method)
        pending = dec._gather_rows(state.seq, state.length[:, None])  # [B, 1]
        verify = jnp.concatenate([pending, drafts], axis=1)            # [B, K+1]
        hidden, target_logits, _ = model.trunk(verify, dec._positions(state.length, k + 1), state.trunk_cache)
        return drafts, draft_logits, target_logits
    return jax.jit(draft_verify)


def pad_to(x_BxT: np.ndarray, width: int) -> np.ndarray:
    return np.pad(x_BxT, ((0, 0), (0, width - x_BxT.shape[1])))


def teacher_forced_check(params, cfg: ModelConfig, state: dec.DecodeState, k: int,
                         sampling_cfg: SamplingConfig, method: str, key, atol: float = 1e-4):
    """Drafts and verify logits from ``state`` equal a teacher-forced forward of the sequence.

    Teacher-forced on x_0..x_L (L = length, x_L the pending token) followed by the K
    drafts: the draft logits of depth j must equal mtp_logits at position L-1, depth j;
    the verify logits must equal logits at positions L..L+K; the hidden window must
    equal the trunk hidden at positions L-W..L-1.
    """
    drafts, draft_logits, target_logits = jitted_draft_verify(cfg, k, sampling_cfg, method)(params, state, key)
    length = np.asarray(state.length)
    seq = np.asarray(state.seq)
    drafts_np = np.asarray(drafts)
    full = np.zeros((len(length), MAX_SEQ), np.int32)  # right-padded: causal, padding is never seen
    for b, n in enumerate(length):
        full[b, :n + 1] = seq[b, :n + 1]
        full[b, n + 1:n + 1 + k] = drafts_np[b]
    out = jitted_policy(cfg)(params, jnp.asarray(full))
    w = state.hidden_window.shape[1]
    for b, n in enumerate(length):
        np.testing.assert_allclose(draft_logits[b], out.mtp_logits[b, n - 1, :k], atol=atol,
                                   err_msg=f"row {b}: draft logits (MTP caches) at length {n}")
        np.testing.assert_allclose(target_logits[b], out.logits[b, n:n + k + 1], atol=atol,
                                   err_msg=f"row {b}: verify logits (trunk cache) at length {n}")
        lo = max(n - w, 0)
        np.testing.assert_allclose(state.hidden_window[b, w - (n - lo):], out.hidden[b, lo:n], atol=atol,
                                   err_msg=f"row {b}: hidden window at length {n}")
    return drafts_np


GREEDY = SamplingConfig(temperature=0.0)


def test_mtp_caches_exact_after_prefill():
    """Right after prefill (rows of prompt length 1..7: the window reaches before position 0)."""
    params, k = params_for("greedy"), K_MAX
    state = dec.init_state(CFG, len(PROMPTS), CACHE_LEN, k)
    state, _ = jitted_prefill(CFG, k, GREEDY)(params, state, jnp.asarray(pad_to(PROMPTS, PREFILL_WIDTH)),
                                             jnp.asarray(PROMPT_LENS), jax.random.key(0))
    np.testing.assert_array_equal(state.length, PROMPT_LENS)
    teacher_forced_check(params, CFG, state, k, GREEDY, "rejection", jax.random.key(3))


def test_mtp_caches_exact_after_greedy_generation():
    """The state the real loop leaves after many steps (accepts, rejections, EOS-stopped rows)."""
    res = greedy_spec_run("rejection", K_MAX)
    assert res.stats.per_depth_acceptance[0] < 1.0
    teacher_forced_check(params_for("greedy"), CFG, res.state, K_MAX, GREEDY, "rejection", jax.random.key(4))


def test_mtp_caches_exact_after_sampled_generation_one_module_per_depth():
    """T=0.8 / top-k / top-p rejection sampling (the distribution test's run), M = K modules.

    Rows share a prompt and a final length but not their accept / reject histories,
    which decide when each MTP cache entry was last written.
    """
    res = dist_run("rejection")[1]
    assert res.stats.mean_accepted > 1.0, res.stats
    state = jax.tree.map(lambda x: x[:6], res.state)
    teacher_forced_check(params_for("dist"), CFG_M4, state, DIST_SPECS["rejection"].num_draft, DIST_SAMPLING,
                         "rejection", jax.random.key(8))


# ------------------------------------------------------------------ continuation seam

def test_returned_state_ends_at_the_returned_tokens():
    """The state holds exactly prompt + returned tokens; the last returned token is pending.

    A continuation (environment turn) starts from this state, so tokens the caller
    never saw (drafts accepted past EOS or past max_new_tokens) must not be in it.
    """
    for k in (2, 4):
        res = greedy_spec_run("rejection", k)
        st = res.state
        np.testing.assert_array_equal(np.asarray(st.length), PROMPT_LENS + res.lengths - 1,
                                      err_msg=f"K={k}: state.length != prompt_len + generated - 1")
        seq = np.asarray(st.seq)
        for b, (p, n) in enumerate(zip(PROMPT_LENS, res.lengths)):
            np.testing.assert_array_equal(seq[b, :p], PROMPTS[b, :p])
            np.testing.assert_array_equal(seq[b, p:p + n], res.tokens[b, :n])


def test_prefill_continuation_equals_prefill_of_whole_conversation():
    """Appending an environment turn to a returned state == prefilling the whole conversation.

    Continuation feeds [last returned token] + env tokens at positions length.. (the
    last returned token is pending: emitted, not yet in the trunk cache).
    """
    res = greedy_spec_run("rejection", K_MAX)
    params, k, b = params_for("greedy"), K_MAX, len(PROMPTS)
    prefill = jitted_prefill(CFG, k, GREEDY)
    env_lens = np.array([1, 2, 3, 4, 2, 1], np.int32)
    env = np.random.default_rng(5).integers(0, V_GREEDY, (b, env_lens.max())).astype(np.int32)
    turn = np.zeros((b, PREFILL_WIDTH), np.int32)
    conv = np.zeros((b, PREFILL_WIDTH), np.int32)
    conv_lens = PROMPT_LENS + res.lengths + env_lens
    for i in range(b):
        p, n, e = PROMPT_LENS[i], res.lengths[i], env_lens[i]
        turn[i, :1 + e] = np.concatenate([res.tokens[i, n - 1:n], env[i, :e]])
        conv[i, :p + n + e] = np.concatenate([PROMPTS[i, :p], res.tokens[i, :n], env[i, :e]])
    cont, pending_c = prefill(params, res.state, jnp.asarray(turn), jnp.asarray(env_lens + 1), jax.random.key(0))
    fresh = dec.init_state(CFG, b, CACHE_LEN, k)
    whole, pending_w = prefill(params, fresh, jnp.asarray(conv), jnp.asarray(conv_lens), jax.random.key(0))

    np.testing.assert_array_equal(cont.length, conv_lens)
    np.testing.assert_array_equal(whole.length, conv_lens)
    np.testing.assert_array_equal(pending_c.tokens, pending_w.tokens)
    np.testing.assert_allclose(pending_c.logprobs, pending_w.logprobs, atol=1e-5)
    np.testing.assert_allclose(cont.hidden_window, whole.hidden_window, atol=1e-5)
    for i, n in enumerate(conv_lens):
        np.testing.assert_array_equal(np.asarray(cont.seq)[i, :n + 1], np.asarray(whole.seq)[i, :n + 1])
        for lc, lw in zip(cont.trunk_cache, whole.trunk_cache):
            np.testing.assert_allclose(lc["k"][i, :n], lw["k"][i, :n], atol=1e-5)
            np.testing.assert_allclose(lc["v"][i, :n], lw["v"][i, :n], atol=1e-5)
    # Same drafts, draft logits and verify logits from both states ...
    draft_verify = jitted_draft_verify(CFG, k, GREEDY, "rejection")
    d_c, dl_c, tl_c = draft_verify(params, cont, jax.random.key(1))
    d_w, dl_w, tl_w = draft_verify(params, whole, jax.random.key(1))
    np.testing.assert_array_equal(d_c, d_w)
    np.testing.assert_allclose(dl_c, dl_w, atol=1e-5)
    np.testing.assert_allclose(tl_c, tl_w, atol=1e-5)
    # ... and both equal the teacher-forced forward of the conversation.
    teacher_forced_check(params, CFG, cont, k, GREEDY, "rejection", jax.random.key(1))


def env_turn(b: int):
    lens = np.array([1, 2, 3, 4, 0, 1], np.int32)[:b]
    return np.random.default_rng(5).integers(0, V_GREEDY, (b, 4)).astype(np.int32), lens


def test_continue_generate_equals_generate_on_the_whole_conversation():
    """The public seam: an environment turn appended to a returned state, then more
    tokens, equals generating from the whole conversation (greedy: token for token),
    also for a row whose previous response stopped at EOS and a row with an empty turn."""
    res = greedy_spec_run("rejection", K_MAX)
    _, eos_id = greedy_reference()
    assert np.any(res.lengths < MAX_NEW), "no row stopped at EOS: the test would not cover done rows"
    b = len(PROMPTS)
    env, env_lens = env_turn(b)
    state = jax.tree.map(jnp.copy, res.state)  # continue_generate donates its state; keep the cached one intact
    more = 8
    cont = continue_generate(params_for("greedy"), CFG, state, env, env_lens, jax.random.key(2),
                                 max_new_tokens=more, sampling=SamplingConfig(temperature=0.0),
                                 spec=SpecConfig("rejection", K_MAX), eos_id=eos_id, return_state=True)
    conv_lens = PROMPT_LENS + res.lengths + env_lens
    conv = np.zeros((b, conv_lens.max()), np.int32)
    for i in range(b):
        p, n, e = PROMPT_LENS[i], res.lengths[i], env_lens[i]
        conv[i, :p + n + e] = np.concatenate([PROMPTS[i, :p], res.tokens[i, :n], env[i, :e]])
    ref = generate(params_for("greedy"), CFG, conv, conv_lens, jax.random.key(3), max_new_tokens=more,
                   sampling=SamplingConfig(temperature=0.0), spec=SpecConfig("none"), eos_id=eos_id)
    np.testing.assert_array_equal(cont.tokens, ref.tokens)
    np.testing.assert_array_equal(cont.lengths, ref.lengths)
    np.testing.assert_array_equal(np.asarray(cont.state.length), conv_lens + cont.lengths - 1)


BAD_CONTINUE_ARGS = {
    "spec": dict(spec=SpecConfig("rejection", 2)),
    "cache_len": dict(max_new_tokens=40),
    "new_lens": dict(new_lens=np.array([5, 0, 0, 0, 0, 0])),
    "new_tokens": dict(new_tokens=np.full((6, 4), V_GREEDY)),
    "new_tokens ": dict(new_tokens=np.zeros((5, 4), np.int32)),
    "state": dict(state="not a state"),
}


@pytest.mark.parametrize("arg", list(BAD_CONTINUE_ARGS))
def test_continue_generate_rejects_bad_arguments_before_compiling(arg, monkeypatch):
    state = greedy_spec_run("rejection", K_MAX).state
    env, env_lens = env_turn(len(PROMPTS))
    monkeypatch.setattr(jax, "jit", _no_jit)
    kwargs = dict(state=state, new_tokens=env, new_lens=env_lens, max_new_tokens=4, spec=SpecConfig("rejection", K_MAX))
    kwargs.update(BAD_CONTINUE_ARGS[arg])
    with pytest.raises(ValueError, match=arg.strip()):
        continue_generate(params_for("greedy"), CFG, kwargs.pop("state"), kwargs.pop("new_tokens"),
                              kwargs.pop("new_lens"), jax.random.key(0), **kwargs)


# ------------------------------------------------------------------ bad input

def _no_jit(*args, **kwargs):
    raise AssertionError("jax.jit reached: argument checks must run before any compile")


BAD_GENERATE_ARGS = {
    "num_draft": dict(spec=SpecConfig("rejection", K_MAX + 1)),
    "max_seq_len": dict(prompts=np.zeros((2, 40), np.int32), prompt_lens=np.array([40, 3]), max_new_tokens=20),
    "cache_len": dict(cache_len=8),
    "prompt_lens": dict(prompt_lens=np.array([3, 0])),
    "prompt_lens ": dict(prompt_lens=np.array([3, 3, 3])),
    "prompt_lens  ": dict(prompt_lens=np.array([3, 9])),
    "prompts": dict(prompts=np.array([[1, 2, V_GREEDY], [1, 2, 3]], np.int32)),
    "prompts ": dict(prompts=np.zeros((2, 3), np.float32)),
    "max_new_tokens": dict(max_new_tokens=0),
    "sampling": dict(sampling=dict(temperature=1.0)),
    "spec": dict(spec="rejection"),
}


@pytest.mark.parametrize("arg", list(BAD_GENERATE_ARGS))
def test_generate_rejects_bad_arguments_before_compiling(arg, monkeypatch):
    monkeypatch.setattr(jax, "jit", _no_jit)
    kwargs = dict(prompts=np.ones((2, 3), np.int32), prompt_lens=np.array([3, 2]), max_new_tokens=4,
                  spec=SpecConfig("rejection", 2))
    kwargs.update(BAD_GENERATE_ARGS[arg])
    prompts, lens = kwargs.pop("prompts"), kwargs.pop("prompt_lens")
    with pytest.raises(ValueError, match=arg.strip()):
        generate(None, CFG, prompts, lens, jax.random.key(0), **kwargs)


@pytest.mark.parametrize("field,kwargs", [
    ("temperature", dict(temperature=-0.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-1)),
])
def test_sampling_config_rejects_bad_values(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("num_draft", [0, -1, True, 2.0])
def test_spec_config_rejects_bad_num_draft(num_draft):
    with pytest.raises(ValueError, match="num_draft"):
        SpecConfig("rejection", num_draft)


def test_prefill_computes_logits_only_where_it_samples():
    """The prefill of a [B, T] prompt block holds [B, V] logits (the pending token's), never
    [B, T, V]: at a 151,936-token vocabulary the full block would be the largest buffer of a rollout."""
    cfg = ModelConfig.tiny(vocab_size=97)
    b, t = 2, 9
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_params(cfg))
    state = dec.init_state(cfg, b, 32, cfg.num_mtp_depths)

    def prefill(params, tokens, lens):
        return dec._prefill(dec._Model(params, cfg), state, tokens, lens, dec.row_keys(jax.random.key(0), b),
                            SamplingConfig(),
                            cfg.num_mtp_depths)

    jaxpr = jax.make_jaxpr(prefill)(params, jnp.zeros((b, t), jnp.int32), jnp.full((b,), t, jnp.int32))
    shapes = []

    def walk(jx):
        for eqn in jx.eqns:
            shapes.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    per_row = {s for s in shapes if len(s) >= 2 and s[0] == b and s[-1] == cfg.vocab_size}  # not [H, V] weights
    assert (b, 1, cfg.vocab_size) in per_row  # the test sees the head's output
    assert all(np.prod(s[1:-1]) == 1 for s in per_row), sorted(per_row)


@pytest.mark.parametrize("spec", [SpecConfig("none"), SpecConfig("rejection", 2)], ids=["vanilla", "rejection"])
def test_a_rows_output_depends_only_on_its_own_key_and_prompt(spec):
    """Per-request randomness (one key per row, folded with the position of each token drawn): a
    row's tokens are identical, and its log-probs equal within 1e-5, whether it runs alone or among
    the others in shuffled order; the same prompt under different keys gives different samples."""
    params, n = params_for("greedy"), len(PROMPT_LENS)
    fn = jax.jit(dec.generate_fn(CFG, max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=1.0), spec=spec,
                                 cache_len=CACHE_LEN))
    keys = jax.random.split(jax.random.key(5), n)
    order = np.random.default_rng(1).permutation(n)
    together = jax.device_get(fn(params, PROMPTS[order], PROMPT_LENS[order], keys[order]))
    for row, i in enumerate(order):
        alone = jax.device_get(fn(params, PROMPTS[i:i + 1], PROMPT_LENS[i:i + 1], keys[i:i + 1]))
        assert together.lengths[row] == alone.lengths[0] == MAX_NEW
        np.testing.assert_array_equal(together.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(together.logprobs[row], alone.logprobs[0], atol=1e-5)
    same_prompt = jax.device_get(fn(params, np.repeat(PROMPTS[:1], n, 0), np.repeat(PROMPT_LENS[:1], n), keys))
    assert len({tuple(t) for t in same_prompt.tokens}) > 1
