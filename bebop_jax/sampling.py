"""Temperature / top-k / top-p: one definition for sampling, drafting and verifying.

Speculative decoding is exact only if the target distribution p and the draft
distribution q are transformed the same way before they are compared, so every
caller (plain sampling, the MTP drafter, the rejection sampler) goes through
`process_logits` below.

Order of the transforms (fixed, documented, tested):
  1. temperature: logits / temperature, in float32. temperature == 0 means greedy:
     the logits are returned unscaled and unmasked, callers take the argmax
     (top-k and top-p never remove the argmax, so they are no-ops for greedy).
  2. top-k (top_k > 0): keep the k largest logits.
  3. top-p (top_p < 1): on the distribution renormalised over the top-k set, keep
     the smallest prefix of the tokens sorted by probability whose mass is >= top_p
     (a token is kept iff the mass strictly before it is < top_p, so the most likely
     token is always kept).
Everything outside the kept set gets logit -inf.

Ties are broken deterministically by vocabulary index: tokens are ranked by
(logit descending, index ascending), and top-k / top-p keep a prefix of that
ranking. So top-k keeps exactly min(k, V) tokens even when logits tie at the
boundary (the lower indices win), and top-p keeps exactly as many tokens as its
prefix rule says.

Implementation: `lax.top_k` gives the sorted kept logits (a full sort when only
top-p is on, which costs O(V log V) per row), the kept count follows from them,
and an exclusive cumulative count of the logits equal to the threshold applies the
index tie rule without a scatter.

`top_k == 0` and `top_p == 1.0` mean "off". All three values are static Python
numbers under jit (they select code paths and shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp


def validate_sampling(temperature, top_k, top_p) -> None:
    """Raises ValueError naming the argument if a sampling setting is invalid."""
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)):
        raise ValueError(
            f"temperature must be a Python number (static under jit), got {temperature!r}")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise ValueError(f"top_k must be a Python int (0 = off), got {top_k!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise ValueError(f"top_p must be a Python number in (0, 1], got {top_p!r}")
    if not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn: temperature (0 = greedy), top_k (0 = off), top_p (1.0 = off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def is_filtering(top_k: int, top_p: float, vocab_size: int) -> bool:
    """True if top-k or top-p can remove tokens from a vocabulary of this size."""
    return (0 < top_k < vocab_size) or top_p < 1.0


def _keep_first_ranked(x_NxV, threshold_Nx1, count_Nx1):
    """Keeps the first `count` tokens of the (logit desc, index asc) ranking.

    `threshold` is the logit of the count-th ranked token. Everything above it is
    kept; among the tokens equal to it, the lowest indices fill the remaining slots.
    """
    greater_NxV = x_NxV > threshold_Nx1
    equal_NxV = x_NxV == threshold_Nx1
    num_greater_Nx1 = jnp.sum(greater_NxV, axis=-1, keepdims=True, dtype=jnp.int32)
    equal_i32 = equal_NxV.astype(jnp.int32)
    equal_before_NxV = jnp.cumsum(equal_i32, axis=-1) - equal_i32  # exclusive count
    return greater_NxV | (equal_NxV & (equal_before_NxV < count_Nx1 - num_greater_Nx1))


def process_logits(logits, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0):
    """Applies temperature, then top-k, then top-p. logits [..., V] -> f32 [..., V].

    Tokens outside the kept set get -inf. For temperature == 0 the logits are
    returned as float32, unscaled and unmasked; the caller takes the argmax.
    """
    validate_sampling(temperature, top_k, top_p)
    return _process_logits(jnp.asarray(logits), temperature, top_k, top_p)


def scale_logits(logits, temperature: float):
    """The temperature step alone: float32 logits / temperature (unscaled for 0 or 1).

    Elementwise, so callers that read logits more than once (the rejection sampler) can
    apply it where they read instead of materialising a float32 copy.
    """
    x = logits.astype(jnp.float32)
    if temperature in (0, 1):
        return x
    return x / jnp.float32(temperature)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _process_logits(logits, temperature, top_k, top_p):
    x = scale_logits(logits, temperature)
    if temperature == 0:
        return x
    vocab_size = x.shape[-1]
    if not is_filtering(top_k, top_p, vocab_size):
        return x
    batch_shape = x.shape[:-1]
    x_NxV = x.reshape(-1, vocab_size)
    k_eff = top_k if 0 < top_k < vocab_size else vocab_size
    # Sorted (descending) logits of the top-k set; with top-k off this is a full sort.
    sorted_NxK = jax.lax.top_k(x_NxV, k_eff)[0]
    if top_p < 1.0:
        probs_NxK = jax.nn.softmax(sorted_NxK, axis=-1)  # renormalised over top-k
        mass_before_NxK = jnp.cumsum(probs_NxK, axis=-1) - probs_NxK
        count_Nx1 = jnp.sum(mass_before_NxK < jnp.float32(top_p), axis=-1,
                            keepdims=True, dtype=jnp.int32)
    else:
        count_Nx1 = jnp.full((x_NxV.shape[0], 1), k_eff, jnp.int32)
    threshold_Nx1 = jnp.take_along_axis(sorted_NxK, count_Nx1 - 1, axis=-1)
    keep_NxV = _keep_first_ranked(x_NxV, threshold_Nx1, count_Nx1)
    x_NxV = jnp.where(keep_NxV, x_NxV, -jnp.inf)
    return x_NxV.reshape(*batch_shape, vocab_size)


def probs(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """The sampling distribution [..., V] (f32). temperature == 0 gives one-hot(argmax)."""
    validate_sampling(temperature, top_k, top_p)
    return _probs(jnp.asarray(logits), temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _probs(logits, temperature, top_k, top_p):
    x = _process_logits(logits, temperature, top_k, top_p)
    if temperature == 0:
        return jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(x, axis=-1)


def log_probs(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """log of `probs` (-inf outside the kept set). Not defined for temperature == 0."""
    if temperature == 0:
        raise ValueError("temperature must be > 0 for log_probs (greedy has no density)")
    return jax.nn.log_softmax(process_logits(logits, temperature, top_k, top_p), axis=-1)


def sample(key, logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Draws one token per row of logits [..., V] -> int32 [...]; argmax if temperature == 0."""
    validate_sampling(temperature, top_k, top_p)
    return _sample(key, jnp.asarray(logits), temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample(key, logits, temperature, top_k, top_p):
    x = _process_logits(logits, temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
