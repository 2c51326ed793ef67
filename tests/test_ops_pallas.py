"""The Pallas kernels of the vocabulary-chunked ops (ops/pallas_sweeps.py): both kernel structures
(the TPU grid and the Triton loop) in the Pallas interpreter against the dense formulas, and both
ops, forward and backward, lowering to Mosaic (TPU) and Triton (GPU) from this CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bebop_jax.ops import draft_agreement, draft_agreement_reference, token_logprobs, token_logprobs_reference
from bebop_jax.ops.pallas_sweeps import Tiles
from test_ops import _close, _da_scalar, _inputs, _tl_scalar

STRUCTURES = ["grid", "loop"]


@pytest.mark.parametrize("interpret", STRUCTURES)
@pytest.mark.parametrize("temperature,chunk_size", [(0.7, 16), (1.3, None)])  # 4 chunks (last shifted); 2 of 32
def test_token_logprobs_kernels_equal_the_dense_formula(interpret, temperature, chunk_size):
    hidden, _, head, ids = _inputs(11)
    kw = dict(temperature=temperature, chunk_size=chunk_size, impl="pallas", interpret=interpret)
    ref_kw = dict(temperature=temperature)
    for got, want in zip(token_logprobs(hidden, head, ids, **kw), token_logprobs_reference(hidden, head, ids, **ref_kw)):
        _close(got, want, 1e-5)
    grads = jax.grad(_tl_scalar(token_logprobs, **kw), argnums=(0, 1))(hidden, head, ids)
    ref = jax.grad(_tl_scalar(token_logprobs_reference, **ref_kw), argnums=(0, 1))(hidden, head, ids)
    for g, r in zip(grads, ref):
        _close(g, r, 1e-4, atol=1e-5)


@pytest.mark.parametrize("interpret", STRUCTURES)
@pytest.mark.parametrize("head_grad", [False, True])
def test_draft_agreement_kernels_equal_the_dense_formulas(interpret, head_grad):
    target, draft, head, ids = _inputs(12)
    kw = dict(temperature=0.8, chunk_size=16, impl="pallas", interpret=interpret, head_grad=head_grad)
    ref_kw = dict(temperature=0.8, head_grad=head_grad)
    out, ref = draft_agreement(target, draft, head, ids, **kw), draft_agreement_reference(target, draft, head, ids, **ref_kw)
    for key in ref:
        _close(out[key], ref[key], 1e-5)
    grads = jax.grad(_da_scalar(draft_agreement, **kw), argnums=(0, 1, 2))(target, draft, head, ids)
    want = jax.grad(_da_scalar(draft_agreement_reference, **ref_kw), argnums=(0, 1, 2))(target, draft, head, ids)
    assert not np.any(np.asarray(grads[0]))
    assert np.any(np.asarray(grads[2])) == head_grad
    for g, r in zip(grads[1:], want[1:]):
        _close(g, r, 1e-4, atol=1e-5)


@pytest.mark.parametrize("interpret", STRUCTURES)
def test_kernels_take_bfloat16_and_rows_that_fill_no_block(interpret):
    """bf16 hidden and head, 7 rows in blocks of 64 (padded), float32 sums: as the XLA path."""
    hidden, draft, head, ids = _inputs(13, dtype=jnp.bfloat16)
    head = head.astype(jnp.bfloat16)
    kw = dict(temperature=0.9, chunk_size=16)
    for got, want in zip(token_logprobs(hidden, head, ids, impl="pallas", interpret=interpret, **kw),
                         token_logprobs(hidden, head, ids, impl="xla", **kw)):
        assert got.dtype == jnp.float32
        _close(got, want, 1e-5, atol=1e-5)
    out = draft_agreement(hidden, draft, head, ids, impl="pallas", interpret=interpret, **kw)
    want = draft_agreement(hidden, draft, head, ids, impl="xla", **kw)
    for key in want:
        _close(out[key], want[key], 1e-5, atol=1e-5)


@pytest.mark.parametrize("interpret", STRUCTURES)
def test_kernels_keep_extreme_logits_finite(interpret):
    """Logits in the hundreds: every sum relative to the running max, inside the kernels too."""
    hidden, draft, head, ids = _inputs(14, scale=400.0)
    kw = dict(chunk_size=16, impl="pallas", interpret=interpret)
    for got, want in zip(token_logprobs(hidden, head, ids, **kw), token_logprobs_reference(hidden, head, ids)):
        assert np.all(np.isfinite(np.asarray(got)))
        _close(got, want, 1e-5, atol=1e-3)
    out, ref = draft_agreement(hidden, draft, head, ids, **kw), draft_agreement_reference(hidden, draft, head, ids)
    for key in ref:
        assert np.all(np.isfinite(np.asarray(out[key])))
        _close(out[key], ref[key], 1e-5, atol=1e-3)
    grads = jax.grad(_da_scalar(draft_agreement, **kw), argnums=1)(hidden, draft, head, ids)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_tiles_must_be_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Tiles(chunk=100)
    with pytest.raises(ValueError, match="power of two"):
        Tiles(block_rows=0)


# ------------------------------------------------------------------ lowering for TPU / GPU


def _custom_calls(fn, args, platform):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return re.findall(r"custom_call @([\w$.]+)", text), text


def _tl_loss(h, w, t):
    logp, ent = token_logprobs(h, w, t, impl="pallas")
    return jnp.sum(logp) + jnp.sum(ent)


def _da_loss(a, b, w, t):
    out = draft_agreement(a, b, w, t, impl="pallas", head_grad=True)
    return jnp.sum(out["alpha"]) + jnp.sum(out["kl"]) + jnp.sum(out["ce"])


KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_mosaic_and_triton_at_the_qwen3_vocabulary(platform, dtype):
    """Forward and backward of both ops at V = 151,936 (1,187 x 128: no power-of-two chunk divides
    it): token_logprobs = stats + dhidden + dlm_head kernels; draft_agreement (head_grad) = two
    forward passes + dhidden + dlm_head."""
    n, h, v = 256, 256, 151_936
    rows, head, ids = (jax.ShapeDtypeStruct((n, h), dtype), jax.ShapeDtypeStruct((h, v), dtype),
                       jax.ShapeDtypeStruct((n,), jnp.int32))
    calls, text = _custom_calls(jax.grad(_tl_loss, argnums=(0, 1)), (rows, head, ids), platform)
    assert calls.count(KERNEL_CALL[platform]) == 3
    calls, text = _custom_calls(jax.grad(_da_loss, argnums=(1, 2)), (rows, rows, head, ids), platform)
    assert calls.count(KERNEL_CALL[platform]) == 4
    assert "stablehlo.while" not in text  # the kernels, not the interpreter's or XLA's loops
