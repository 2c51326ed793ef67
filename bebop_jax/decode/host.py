"""The checked host wrappers around the on-device decoder: ``generate`` and ``continue_generate``.

They validate every argument on the host (a ValueError naming it, before anything
compiles), compile the pure decode function once per signature (a small LRU
cache), run it, and fetch tokens, per-token log-probs / entropies and stats. With
``SpecConfig(adaptive=True)`` a ``DraftController`` the caller keeps picks the
draft length of each call.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bebop_jax.config import ModelConfig, SpecConfig
from bebop_jax.decode.adaptive import DraftController
from bebop_jax.decode.compile_cache import compiled
from bebop_jax.decode.decoder import DecodeOutput, DecodeState, continue_fn, generate_fn, needed_cache_len
from bebop_jax.decode.stats import DecodeStats
from bebop_jax.parallel import batch_sharding
from bebop_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    tokens: np.ndarray     # [B, max_new_tokens] int32, -1 after each row's end
    lengths: np.ndarray    # [B] generated tokens per row (EOS included)
    logprobs: np.ndarray   # [B, max_new_tokens] float32 behaviour log-probs, 0 after the end
    entropy: np.ndarray    # [B, max_new_tokens] float32 sampling-distribution entropy (nats), 0 after the end
    stats: DecodeStats     # counts of this call (per-depth acceptance, mean accepted, ...): see decode.stats
    accepted: np.ndarray | None = None      # [B] drafts accepted per row (summed over its verify steps)
    verify_steps: np.ndarray | None = None  # [B] verify steps each row was live in
    state: DecodeState | None = None


def _check_configs(sampling: SamplingConfig, spec: SpecConfig, max_new_tokens: int) -> None:
    """The checks ``generate`` and ``continue_generate`` share."""
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if not isinstance(spec, SpecConfig):
        raise ValueError(f"spec must be a SpecConfig, got {type(spec).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def _check_controller(spec: SpecConfig, controller: DraftController | None) -> None:
    if spec.adaptive and not isinstance(controller, DraftController):
        raise ValueError("controller: spec.adaptive needs a DraftController(spec) that the caller keeps "
                         f"between calls, got {type(controller).__name__}")
    if spec.adaptive:
        controller.check_spec(spec)


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
    if prompts.ndim != 2 or prompts.shape[1] < 1 or prompts.shape[0] < 1:
        raise ValueError(f"prompts must be [B, P] with B, P >= 1, got shape {tuple(prompts.shape)}")
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
    needed = needed_cache_len(prompts.shape[1], max_new_tokens, spec)
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
             return_state: bool = False, controller: DraftController | None = None,
             mesh: Mesh | None = None) -> GenerateResult:
    """Generate up to ``max_new_tokens`` per row after right-padded ``prompts`` [B, P].

    ``spec.method``: "none" (vanilla KV-cached sampling), "greedy" (drafts = argmax q,
    accepted with probability p(d)) or "rejection" (drafts ~ q, exact rejection
    sampling). Output distribution is the target's in every case. Per token:
    ``logprobs`` and ``entropy`` of the sampling distribution. Stats hold per-depth
    conditional acceptance, mean accepted drafts per verify step, target forwards,
    the draft length used, and tokens per second (compile excluded). With
    ``spec.adaptive`` the ``controller`` chooses the draft length (calibrating its
    step costs the first time it sees this batch size) and learns from the result.
    ``mesh``: run on this mesh (e.g. a rollout sub-mesh that ``params`` live on), rows
    split over its data x fsdp axes; every process passes the same prompts. ``key``: one
    PRNG key, or one per row ([B]): then each row's output depends on its own key and prompt
    only, not on the other rows (see ``decoder.row_keys``).
    """
    _check_configs(sampling, spec, max_new_tokens)
    _check_controller(spec, controller)
    prompts_np = np.asarray(prompts)
    lens_np = np.asarray(prompt_lens)
    cache_len = validate_generate_args(model_config, prompts_np, lens_np, max_new_tokens, spec, cache_len)
    args = (params, *on_mesh((prompts_np.astype(np.int32), lens_np.astype(np.int32)), key, mesh))
    run_spec = spec
    if spec.adaptive:
        run_spec = controller.prepare(params, model_config, args[1], args[2], args[3], sampling,
                                      max_new_tokens=max_new_tokens, cache_len=cache_len, impl=impl)
    sig = ("generate", model_config, max_new_tokens, sampling, run_spec, eos_id, cache_len, impl, prompts_np.shape,
           return_state)
    build = lambda: packed(generate_fn(model_config, max_new_tokens=max_new_tokens, sampling=sampling, spec=run_spec,
                                       eos_id=eos_id, cache_len=cache_len, impl=impl, return_state=return_state))
    result = _run(compiled(sig, build), args, run_spec, mesh)
    if spec.adaptive:
        controller.observe(result.stats)
        result = dataclasses.replace(result, stats=dataclasses.replace(
            result.stats, adaptive=controller.report(prompts_np.shape[0])))
    return result


def continue_generate(params, model_config: ModelConfig, state: DecodeState, new_tokens, new_lens, key, *,
                      max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                      spec: SpecConfig = SpecConfig(), eos_id: int | None = None, impl: str = "auto",
                      return_state: bool = False, mesh: Mesh | None = None) -> GenerateResult:
    """Append an environment turn to a returned ``state`` and generate the next response.

    ``state`` comes from ``generate(..., return_state=True)`` (or from an earlier
    continuation); ``new_tokens`` [B, T] right-padded with ``new_lens`` [B] real
    tokens per row (0 is allowed: the row just goes on). The conversation so far is
    not re-prefilled: the last returned token (pending in ``state``) and the new
    tokens are fed at positions ``state.length..`` onto the cached keys and values,
    and the result equals ``generate`` on the whole conversation. ``spec`` must
    use the ``num_draft`` the state was made with (its MTP window caches; with
    ``spec.adaptive``, the draft length the controller chose for that state), and the
    state's cache (``generate``'s ``cache_len``) must have room for the new tokens,
    ``max_new_tokens``, and ``num_draft + 1`` scratch slots. Returned ``tokens`` hold
    only the newly generated tokens. ``state`` is donated (its caches are updated in
    place on accelerators): use the returned state, not the one passed in.
    """
    _check_configs(sampling, spec, max_new_tokens)
    if not isinstance(state, DecodeState):
        raise ValueError(f"state must be the DecodeState of generate(..., return_state=True), "
                         f"got {type(state).__name__}")
    k = len(state.mtp_cache)
    if spec.adaptive and k <= spec.num_draft:
        spec = spec.with_draft(k)  # the draft length this conversation was started with
    if k != spec.drafts:
        raise ValueError(f"spec: the state was made with num_draft={k} (0 = method 'none'); "
                         f"continue with the same, got num_draft={spec.drafts}")
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
    sig = ("continue", model_config, max_new_tokens, sampling, spec, eos_id, impl, tokens_np.shape, cache_len,
           return_state)
    args = (params, state, *on_mesh((tokens_np.astype(np.int32), lens_np.astype(np.int32)), key, mesh))
    build = lambda: packed(continue_fn(model_config, max_new_tokens=max_new_tokens, sampling=sampling, spec=spec,
                                       eos_id=eos_id, impl=impl, return_state=return_state))
    return _run(compiled(sig, build, donate=(1,)), args, spec, mesh)


def on_mesh(rows: tuple[np.ndarray, ...], key, mesh: Mesh | None) -> tuple:
    """Host row arrays (and the key) as the decoder's inputs: on ``mesh`` rows split over its
    data x fsdp axes and the key replicated, built from each process's identical copy."""
    if mesh is None:
        return (*rows, key)  # numpy: the jitted call transfers them
    placed = tuple(jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda i, x=x: x[i])
                   for x in rows)
    data = np.asarray(jax.random.key_data(key))
    key_data = jax.make_array_from_callback(data.shape, NamedSharding(mesh, P()), lambda i: data[i])
    return (*placed, jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(key)))


def fetch(tree, mesh: Mesh | None = None):
    """Device arrays to host numpy. Arrays spanning processes are first replicated over their
    own ``mesh`` (a collective of that mesh's devices only, so it cannot interleave with
    another thread's collectives over other devices), then read locally."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)):
        return jax.device_get(tree)
    if mesh is None:
        raise ValueError("mesh: arrays that span processes are fetched through their mesh")
    replicated = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), replicated)


def packed(fn):
    """``fn`` returning (tokens, [logprobs; entropy], per-row ints, state): three device-to-host
    transfers per call instead of nine (each costs tens of microseconds, a share of a short call)."""

    def run(*args):
        out = fn(*args)
        b = out.tokens.shape[0]
        ints = jnp.concatenate([out.lengths[:, None], out.accepted[:, None], out.verify_steps[:, None],
                                jnp.broadcast_to(out.steps, (b, 1)), out.depth_accepted, out.depth_attempted], axis=1)
        return out.tokens, jnp.stack([out.logprobs, out.entropy], axis=1), ints, out.state

    return run


def _unpack(tokens, floats, ints) -> DecodeOutput:
    kk = (ints.shape[1] - 4) // 2
    return DecodeOutput(tokens=tokens, lengths=ints[:, 0], logprobs=floats[:, 0], entropy=floats[:, 1],
                        accepted=ints[:, 1], verify_steps=ints[:, 2], steps=ints[0, 3],
                        depth_accepted=ints[:, 4:4 + kk], depth_attempted=ints[:, 4 + kk:])


def _run(exe, args: tuple, spec: SpecConfig, mesh: Mesh | None) -> GenerateResult:
    """Run a compiled (``packed``) decode function and gather tokens, per-token values and stats."""
    t0 = time.perf_counter()
    tokens, floats, ints, state = exe(*args)
    host = _unpack(*(np.asarray(x) for x in fetch((tokens, floats, ints), mesh)))
    seconds = time.perf_counter() - t0
    stats = DecodeStats.from_output(host, num_draft=spec.drafts, method=spec.method, seconds=seconds)
    return GenerateResult(tokens=host.tokens, lengths=host.lengths, logprobs=host.logprobs, entropy=host.entropy,
                          stats=stats, accepted=host.accepted, verify_steps=host.verify_steps, state=state)
