"""Per-token decoder outputs (behaviour log-probs, entropy) and the pure ``generate_fn`` core.

The log-prob of every emitted token, and the entropy of the distribution it was drawn
from, must equal what a teacher-forced trunk forward over the returned sequence gives
(the sampling transform applied to its logits), for vanilla, greedy-draft and
rejection decoding, at K = 1..4, on rows of mixed prompt lengths stopped by EOS, and
across a continuation. The runs are the ones test_decoder.py caches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bebop_jax import sampling
from bebop_jax.config import MeshConfig, ModelConfig, SpecConfig
from bebop_jax.decode import DecodeOutput, continue_generate, generate, generate_fn
from bebop_jax.model import shard_params_for
from bebop_jax.parallel import batch_sharding, make_mesh
from bebop_jax.sampling import SamplingConfig
from jax.sharding import NamedSharding, PartitionSpec as P

from test_decoder import (CACHE_LEN, CFG, CFG_M4, DIST_PROMPT, DIST_SAMPLING, DIST_SPECS, MAX_NEW, PROMPT_LENS,
                          PROMPTS, dist_run, env_turn, greedy_reference, greedy_spec_run, jitted_policy, params_for)

ATOL = 1e-4


def reference_logprob_entropy(params, cfg: ModelConfig, prompts, prompt_lens, tokens, lengths,
                              sampling_cfg: SamplingConfig):
    """(logprobs, entropy) [B, N] from ONE teacher-forced forward over prompt + returned tokens.

    The logits predicting token i of a row sit at position p + i - 1; the distribution is
    the sampling transform of those logits (temperature 0: the temperature-1 one), and
    log-probs / entropies are computed here in float64.
    """
    b, n = tokens.shape
    full = np.zeros((b, cfg.max_seq_len), np.int32)
    for i in range(b):
        p, m = prompt_lens[i], lengths[i]
        full[i, :p] = prompts[i, :p]
        full[i, p:p + m] = tokens[i, :m]
    logits = np.asarray(jitted_policy(cfg)(params, jnp.asarray(full)).logits)
    x = np.asarray(sampling.process_logits(logits, sampling_cfg.temperature or 1.0, sampling_cfg.top_k,
                                           sampling_cfg.top_p), np.float64)
    x = x - x.max(-1, keepdims=True)
    logp_all = x - np.log(np.exp(x).sum(-1, keepdims=True))
    probs = np.exp(logp_all)
    ent_all = -np.sum(np.where(probs > 0, probs * np.where(probs > 0, logp_all, 0.0), 0.0), axis=-1)
    logp, ent = np.zeros((b, n)), np.zeros((b, n))
    for i in range(b):
        p, m = prompt_lens[i], lengths[i]
        pos = p - 1 + np.arange(m)
        logp[i, :m] = logp_all[i, pos, tokens[i, :m]]
        ent[i, :m] = ent_all[i, pos]
    return logp, ent


def check_against_teacher_forced(res, params, cfg, prompts, prompt_lens, sampling_cfg):
    want_lp, want_ent = reference_logprob_entropy(params, cfg, prompts, prompt_lens, res.tokens, res.lengths,
                                                  sampling_cfg)
    np.testing.assert_allclose(res.logprobs, want_lp, atol=ATOL)
    np.testing.assert_allclose(res.entropy, want_ent, atol=ATOL)
    after_end = np.arange(res.tokens.shape[1])[None, :] >= res.lengths[:, None]
    assert np.all(res.logprobs[after_end] == 0) and np.all(res.entropy[after_end] == 0)
    return want_lp, want_ent


def test_vanilla_greedy_logprobs_and_entropy_match_teacher_forcing():
    """Temperature 0: values under the temperature-1 distribution; rows of mixed length, EOS."""
    _, eos_id = greedy_reference()
    res = generate(params_for("greedy"), CFG, PROMPTS, PROMPT_LENS, jax.random.key(1), max_new_tokens=MAX_NEW,
                   sampling=SamplingConfig(temperature=0.0), spec=SpecConfig("none"), eos_id=eos_id,
                   cache_len=CACHE_LEN)
    assert len(set(res.lengths.tolist())) > 1, res.lengths  # EOS stopped some rows early
    lp, ent = check_against_teacher_forced(res, params_for("greedy"), CFG, PROMPTS, PROMPT_LENS,
                                           SamplingConfig(temperature=0.0))
    assert np.all(lp <= 0) and np.mean(ent[res.tokens >= 0]) > 0.1  # real distributions, not one-hots


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("method", ["greedy", "rejection"])
def test_spec_greedy_logprobs_and_entropy_match_teacher_forcing(method, k):
    """Speculative decoding at T = 0 (the runs of the token-exactness test, with EOS)."""
    res = greedy_spec_run(method, k)
    assert res.stats.mean_accepted > 0.3, res.stats  # multi-token steps: values come from verify positions > 0
    check_against_teacher_forced(res, params_for("greedy"), CFG, PROMPTS, PROMPT_LENS,
                                 SamplingConfig(temperature=0.0))


@pytest.mark.parametrize("name", list(DIST_SPECS))
def test_sampled_logprobs_and_entropy_match_teacher_forcing(name):
    """T = 0.8, top-k 5, top-p 0.9: the log-prob under the filtered, renormalised target."""
    res = dist_run(name)[1]
    rows = np.arange(0, 3000, 250)  # 12 rows with different accept / reject histories
    sub = type(res)(tokens=res.tokens[rows], lengths=res.lengths[rows], logprobs=res.logprobs[rows],
                    entropy=res.entropy[rows], stats=res.stats)
    prompts = np.tile(DIST_PROMPT, (len(rows), 1))
    lens = np.full((len(rows),), len(DIST_PROMPT), np.int32)
    lp, _ = check_against_teacher_forced(sub, params_for("dist"), CFG_M4, prompts, lens, DIST_SAMPLING)
    assert np.all(np.isfinite(lp)) and np.any(lp < -0.05), lp  # filtered target, tokens inside the kept set


@functools.lru_cache(maxsize=None)
def sampled_eos_run(method: str, k: int):
    """T = 1 with top-p on the mixed-length batch, with an EOS that stops some rows."""
    _, eos_id = greedy_reference()
    spec = SpecConfig(method, k) if k else SpecConfig("none")
    return generate(params_for("greedy"), CFG, PROMPTS, PROMPT_LENS, jax.random.key(7), max_new_tokens=MAX_NEW,
                    sampling=SamplingConfig(temperature=1.0, top_p=0.95), spec=spec, eos_id=eos_id,
                    cache_len=CACHE_LEN, return_state=True)


@pytest.mark.parametrize("method,k", [("rejection", 2), ("greedy", 3)])
def test_sampled_logprobs_with_mixed_prompts_and_eos(method, k):
    res = sampled_eos_run(method, k)
    check_against_teacher_forced(res, params_for("greedy"), CFG, PROMPTS, PROMPT_LENS,
                                 SamplingConfig(temperature=1.0, top_p=0.95))


def test_continuation_logprobs_match_teacher_forcing_of_the_whole_conversation():
    res = sampled_eos_run("rejection", 2)
    b = len(PROMPTS)
    env, env_lens = env_turn(b)
    s = SamplingConfig(temperature=1.0, top_p=0.95)
    cont = continue_generate(params_for("greedy"), CFG, jax.tree.map(jnp.copy, res.state), env, env_lens,
                             jax.random.key(9), max_new_tokens=8, sampling=s, spec=SpecConfig("rejection", 2))
    conv_lens = PROMPT_LENS + res.lengths + env_lens
    conv = np.zeros((b, conv_lens.max()), np.int32)
    for i in range(b):
        p, n, e = PROMPT_LENS[i], res.lengths[i], env_lens[i]
        conv[i, :p + n + e] = np.concatenate([PROMPTS[i, :p], res.tokens[i, :n], env[i, :e]])
    check_against_teacher_forced(cont, params_for("greedy"), CFG, conv, conv_lens, s)


# ------------------------------------------------------------------ the pure core on a sub-mesh

def test_generate_fn_jitted_on_a_two_device_sub_mesh_matches_generate():
    """Rows split over a 2-device mesh made of devices 2..3 of the 8: same tokens, log-probs, stats."""
    assert jax.device_count() == 8
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, model=1), devices=jax.devices()[2:4])
    _, eos_id = greedy_reference()
    s, spec = SamplingConfig(temperature=1.0, top_p=0.95), SpecConfig("rejection", 2)
    fn = generate_fn(CFG, max_new_tokens=MAX_NEW, sampling=s, spec=spec, eos_id=eos_id, cache_len=CACHE_LEN)
    rows, replicated = batch_sharding(mesh, 1), NamedSharding(mesh, P())
    row_sharding = lambda x: NamedSharding(mesh, P(("data", "fsdp"), *([None] * (x.ndim - 1))))
    out_sh = jax.tree.map(lambda x: replicated if x.ndim == 0 else row_sharding(x),
                          jax.eval_shape(fn, params_for("greedy"), PROMPTS, PROMPT_LENS, jax.random.key(7)))
    param_sh = shard_params_for(CFG, mesh)
    jitted = jax.jit(fn, in_shardings=(param_sh, batch_sharding(mesh), rows, replicated), out_shardings=out_sh)
    params = jax.device_put(params_for("greedy"), param_sh)
    out = jitted(params, jnp.asarray(PROMPTS), jnp.asarray(PROMPT_LENS), jax.random.key(7))
    assert isinstance(out, DecodeOutput) and out.state is None
    assert set(out.tokens.sharding.device_set) == set(jax.devices()[2:4])
    ref = sampled_eos_run("rejection", 2)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens)
    np.testing.assert_array_equal(np.asarray(out.lengths), ref.lengths)
    np.testing.assert_allclose(np.asarray(out.logprobs), ref.logprobs, atol=1e-5)
    assert int(np.asarray(out.accepted).sum()) == round(ref.stats.mean_accepted * ref.stats.row_steps)
    assert int(np.asarray(out.verify_steps).sum()) == ref.stats.row_steps


def test_generate_fn_refuses_bad_configurations():
    with pytest.raises(ValueError, match="adaptive"):
        generate_fn(CFG, max_new_tokens=4, spec=SpecConfig("rejection", 2, adaptive=True))
    with pytest.raises(ValueError, match="num_draft"):
        generate_fn(CFG, max_new_tokens=4, spec=SpecConfig("rejection", CFG.num_mtp_depths + 1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_fn(CFG, max_new_tokens=0)


def test_compiled_function_cache_is_bounded(monkeypatch):
    from bebop_jax.decode import compile_cache as cache
    monkeypatch.setattr(cache, "MAX_COMPILED", 2)
    for n in (1, 2, 3, 2):
        generate(params_for("greedy"), CFG, PROMPTS[:2, :3], np.array([3, 2]), jax.random.key(0),
                 max_new_tokens=n, sampling=SamplingConfig(temperature=0.0))
    sigs = list(cache._COMPILED)
    assert len(sigs) == 2
    assert [s[2] for s in sigs] == [3, 2]  # max_new_tokens of the two most recently used, LRU order
