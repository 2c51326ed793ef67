"""MTP draft losses on `[..., K, V]` logits: ce, kl, tv and Bebop's end-to-end TV.

Every loss takes logits whose last two axes are (draft depth K, vocabulary V), a mask
`[..., K]` (bool, or float per-token weights), and a temperature applied to both target
and draft logits before the softmax. Math runs in float32 whatever the input dtype
(bf16 or f32). Target distributions are wrapped in `jax.lax.stop_gradient` inside the
loss, so only the draft receives gradient; the temperature is a constant too (it may be
a traced value under jit, but gets no gradient). Gradients are hand-written custom VJPs
(see below), so the losses support reverse-mode differentiation (grad, vjp), not jvp.

Each loss returns `(loss, metrics)`. `loss` is the weighted mean
`sum(mask * term) / max(sum(mask), tiny)` over every position and depth. `metrics` is a
flat dict of float32 arrays computed under stop-gradient (they never change the loss
gradient):

  loss                 scalar, the loss value.
  alpha [K]            masked mean over positions of 1 - TV(p, q): the per-step
                       acceptance probability of rejection sampling at each depth.
  tv [K]               masked mean of TV(p, q).
  kl [K]               masked mean of KL(p || q).
  greedy_alpha [K]     masked mean of p(argmax q): acceptance of a greedy draft.
  target_entropy [K]   masked mean of H(p) in nats.
  expected_accepted    E[A] = masked mean over positions t of sum_j [m_{t,j} != 0] P_{t,j},
                       P_{t,j} = prod_{i<=j} alpha_{t,i} (alpha taken as 1 at masked
                       depths). Positions are weighted by max_j m_{t,j}, so a bool
                       mask counts each position with at least one valid depth once.
  ce [K], accuracy [K] ce_loss only: masked mean of -log q(label) and of
                       [argmax q == label]. ce_loss reports the target-dependent
                       metrics above only when given `target_logits`.

Notation: p = softmax(target_logits / T), q = softmax(draft_logits / T), TV(p, q) =
1/2 sum_v |p(v) - q(v)|, alpha = 1 - TV = sum_v min(p(v), q(v)).
"""

from __future__ import annotations

import numbers
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]

_TINY = float(np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------- validation
# Plain Python on static shapes: runs before any compute and also at jit trace time.


def _check_temperature(temperature) -> None:
    """Rejects temperatures that are not a positive finite scalar; traced values pass."""
    if isinstance(temperature, jax.core.Tracer):
        return  # value unknown at trace time; the caller is responsible for it
    if isinstance(temperature, (bool, np.bool_)):
        raise ValueError(f"temperature must be a positive float, got bool {temperature!r}")
    if isinstance(temperature, (jax.Array, np.ndarray)):
        if temperature.shape != ():
            raise ValueError(
                f"temperature must be a scalar, got an array of shape {temperature.shape}")
        temperature = float(temperature)
    if not isinstance(temperature, numbers.Real):
        raise ValueError(
            f"temperature must be a positive float, got {type(temperature).__name__}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a finite float > 0 for losses, got {temperature!r}")


def _check_logits(name: str, logits) -> tuple[int, ...]:
    shape = tuple(np.shape(logits))
    if len(shape) < 2:
        raise ValueError(f"{name} must have shape [..., K, V] (rank >= 2), got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {jnp.result_type(logits)}")
    if shape[-2] < 1:
        raise ValueError(f"{name} must have K >= 1 draft depths, got shape {shape}")
    if shape[-1] < 2:
        raise ValueError(f"{name} must have vocabulary size V >= 2, got shape {shape}")
    return shape


def _check_pair(target_logits, draft_logits) -> tuple[int, ...]:
    target_shape = _check_logits("target_logits", target_logits)
    draft_shape = _check_logits("draft_logits", draft_logits)
    if target_shape != draft_shape:
        raise ValueError(
            f"target_logits and draft_logits must have the same shape, got target_logits "
            f"{target_shape} and draft_logits {draft_shape}")
    return draft_shape


def _check_mask(mask, logits_shape: tuple[int, ...]) -> None:
    mask_shape = tuple(np.shape(mask))
    if mask_shape != logits_shape[:-1]:
        raise ValueError(
            f"mask must have shape logits.shape[:-1] = {logits_shape[:-1]}, got mask shape "
            f"{mask_shape} (logits shape {logits_shape})")
    dtype = jnp.result_type(mask)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.number)):
        raise ValueError(f"mask must be bool or numeric, got dtype {dtype}")


def _check_labels(labels, logits_shape: tuple[int, ...]) -> None:
    labels_shape = tuple(np.shape(labels))
    if labels_shape != logits_shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {logits_shape[:-1]}, got labels "
            f"shape {labels_shape} (logits shape {logits_shape})")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integer token ids, got dtype {jnp.result_type(labels)}")


# --------------------------------------------------------------------------- math helpers


def _weighted_mean(term_xK, mask_xK) -> jax.Array:
    """sum(mask * term) / max(sum(mask), tiny); masked terms are zeroed even if non-finite."""
    term_xK = jnp.where(mask_xK != 0, term_xK, 0.0)
    return jnp.sum(mask_xK * term_xK) / jnp.maximum(jnp.sum(mask_xK), _TINY)


def _per_depth_mean(term_xK, mask_xK) -> jax.Array:
    """Masked mean over every axis but the depth axis: [..., K] -> [K]."""
    axes = tuple(range(term_xK.ndim - 1))
    term_xK = jnp.where(mask_xK != 0, term_xK, 0.0)
    num_K = jnp.sum(mask_xK * term_xK, axis=axes)
    return num_K / jnp.maximum(jnp.sum(mask_xK, axis=axes), _TINY)


# Per-token terms over the vocabulary. Memory matters here (V up to ~152k on [B, T, K]):
# every [..., V] float32 quantity below is an elementwise function of one input logits
# tensor and its per-row log-normaliser, so XLA may fuse it into the reduction over V
# that consumes it, and the backward passes are written by hand: they recompute p and q
# from the input logits and save only [..., 1] normalisers as residuals. How many
# [..., V] buffers XLA keeps is up to its fusion heuristics. On CPU (jitted
# value_and_grad with metrics, bf16 [1, 16, 3, 151936] logits, XLA memory_analysis)
# the temporaries were 1 float32 logits-sized buffer for ce, 4 for kl and tv and 6 for
# e2e_tv, against about 3, 6, 6 and 6 for the same math through autodiff of log_softmax.


def _scaled(logits_xKV, temperature) -> jax.Array:
    """logits / temperature in float32. [..., V]"""
    return logits_xKV.astype(jnp.float32) / temperature


def _log_normaliser(scaled_xKV) -> jax.Array:
    """log sum_v exp(scaled_v), kept as [..., 1] for broadcasting."""
    return jax.nn.logsumexp(scaled_xKV, axis=-1, keepdims=True)


class _PairTerms(NamedTuple):
    """Per-token terms between p and q, each [..., K] float32."""

    tv: jax.Array
    kl: jax.Array
    greedy_alpha: jax.Array
    target_entropy: jax.Array


def _pair_terms_forward(target_logits, draft_logits, temperature):
    scaled_t_xKV = _scaled(target_logits, temperature)
    scaled_d_xKV = _scaled(draft_logits, temperature)
    lse_t_xK1 = _log_normaliser(scaled_t_xKV)
    lse_d_xK1 = _log_normaliser(scaled_d_xKV)
    logp_xKV = scaled_t_xKV - lse_t_xK1
    logq_xKV = scaled_d_xKV - lse_d_xK1
    p_xKV = jnp.exp(logp_xKV)
    q_xKV = jnp.exp(logq_xKV)
    tv_xK = 0.5 * jnp.sum(jnp.abs(p_xKV - q_xKV), axis=-1)
    # p * (log p - log q) with an exact 0 where p == 0 (log p = -inf there).
    kl_xK = jnp.sum(jnp.where(p_xKV > 0, p_xKV * (logp_xKV - logq_xKV), 0.0), axis=-1)
    entropy_xK = -jnp.sum(jnp.where(p_xKV > 0, p_xKV * logp_xKV, 0.0), axis=-1)
    # argmax of the raw logits is the argmax of q for any temperature > 0.
    draft_argmax_xK1 = jnp.argmax(draft_logits, axis=-1)[..., None]
    greedy_logit_xK1 = jnp.take_along_axis(target_logits, draft_argmax_xK1, axis=-1)
    greedy_alpha_xK = jnp.exp(_scaled(greedy_logit_xK1, temperature) - lse_t_xK1)[..., 0]
    terms = _PairTerms(tv_xK, kl_xK, greedy_alpha_xK, entropy_xK)
    return terms, (lse_t_xK1, lse_d_xK1)


@jax.custom_vjp
def _pair_terms(target_logits, draft_logits, temperature) -> _PairTerms:
    """tv, kl, greedy_alpha and target_entropy, each [..., K] float32.

    p = softmax(target_logits / T), q = softmax(draft_logits / T). The gradient flows to
    draft_logits only: the target is a constant (the stop-gradient of Eq. 13) and so is
    the temperature. greedy_alpha = p(argmax q) and the entropy of p have zero derivative
    in the draft, so only tv and kl carry gradient.
    """
    return _pair_terms_forward(target_logits, draft_logits, temperature)[0]


def _pair_terms_fwd(target_logits, draft_logits, temperature):
    terms, (lse_t_xK1, lse_d_xK1) = _pair_terms_forward(
        target_logits, draft_logits, temperature)
    return terms, (target_logits, draft_logits, temperature, lse_t_xK1, lse_d_xK1)


def _pair_terms_bwd(residuals, cotangents):
    # With u = z / T the draft logits scaled, q = softmax(u):
    #   d KL(p||q) / du_k = q_k - p_k
    #   d TV(p, q) / du_k = q_k (s_k - sum_v q_v s_v),  s = sign(q - p) / 2
    target_logits, draft_logits, temperature, lse_t_xK1, lse_d_xK1 = residuals
    g_tv_xK, g_kl_xK, _, _ = cotangents
    p_xKV = jnp.exp(_scaled(target_logits, temperature) - lse_t_xK1)
    q_xKV = jnp.exp(_scaled(draft_logits, temperature) - lse_d_xK1)
    s_xKV = 0.5 * jnp.sign(q_xKV - p_xKV)
    qs_xK1 = jnp.sum(q_xKV * s_xKV, axis=-1, keepdims=True)
    grad_xKV = (g_kl_xK[..., None] * (q_xKV - p_xKV)
                + g_tv_xK[..., None] * q_xKV * (s_xKV - qs_xK1)) / temperature
    return (jnp.zeros_like(target_logits), grad_xKV.astype(draft_logits.dtype),
            jnp.zeros_like(temperature))


_pair_terms.defvjp(_pair_terms_fwd, _pair_terms_bwd)


def _pair_terms_reference(target_logits, draft_logits, temperature):
    """Plain-autodiff twin of _pair_terms (same values, gradient up to TV's subgradient
    at p == q); kept for tests."""
    logp_xKV = jax.nn.log_softmax(
        _scaled(jax.lax.stop_gradient(target_logits), temperature), axis=-1)
    logq_xKV = jax.nn.log_softmax(_scaled(draft_logits, temperature), axis=-1)
    p_xKV, q_xKV = jnp.exp(logp_xKV), jnp.exp(logq_xKV)
    tv_xK = 0.5 * jnp.sum(jnp.abs(p_xKV - q_xKV), axis=-1)
    kl_xK = jnp.sum(jnp.where(p_xKV > 0, p_xKV * (logp_xKV - logq_xKV), 0.0), axis=-1)
    entropy_xK = -jnp.sum(jnp.where(p_xKV > 0, p_xKV * logp_xKV, 0.0), axis=-1)
    draft_argmax_xK1 = jnp.argmax(logq_xKV, axis=-1)[..., None]
    greedy_alpha_xK = jnp.take_along_axis(p_xKV, draft_argmax_xK1, axis=-1)[..., 0]
    return _PairTerms(tv_xK, kl_xK, jax.lax.stop_gradient(greedy_alpha_xK), entropy_xK)


@jax.custom_vjp
def _label_nll(draft_logits, labels, temperature):
    """-log softmax(draft_logits / T)[label], [..., K] float32; gradient to the draft only.

    labels must already lie in [0, V).
    """
    return _label_nll_fwd(draft_logits, labels, temperature)[0]


def _label_nll_fwd(draft_logits, labels, temperature):
    lse_xK1 = _log_normaliser(_scaled(draft_logits, temperature))
    label_logit_xK1 = jnp.take_along_axis(draft_logits, labels[..., None], axis=-1)
    nll_xK = (lse_xK1 - _scaled(label_logit_xK1, temperature))[..., 0]
    return nll_xK, (draft_logits, labels, temperature, lse_xK1)


def _label_nll_bwd(residuals, g_nll_xK):
    # d(-log q_label) / du_k = q_k - [k == label], u = z / T.
    draft_logits, labels, temperature, lse_xK1 = residuals
    q_xKV = jnp.exp(_scaled(draft_logits, temperature) - lse_xK1)
    vocab_ids_V = jnp.arange(draft_logits.shape[-1], dtype=labels.dtype)
    onehot_xKV = vocab_ids_V == labels[..., None]
    grad_xKV = g_nll_xK[..., None] * (q_xKV - onehot_xKV) / temperature
    return (grad_xKV.astype(draft_logits.dtype),
            np.zeros(labels.shape, dtype=jax.dtypes.float0),
            jnp.zeros_like(temperature))


_label_nll.defvjp(_label_nll_fwd, _label_nll_bwd)


def _as_temperature(temperature) -> jax.Array:
    return jnp.asarray(temperature, dtype=jnp.float32)


def _acceptance_prefix_products(alpha_xK, mask_xK) -> jax.Array:
    """P_{t,j} = prod_{i<=j} alpha_{t,i}, with alpha = 1 at masked depths. [..., K]."""
    return jnp.cumprod(jnp.where(mask_xK != 0, alpha_xK, 1.0), axis=-1)


def _pair_metrics(terms, mask_xK, loss) -> Metrics:
    """Metrics shared by every loss with a target; all under stop-gradient."""
    tv_xK, kl_xK, greedy_alpha_xK, entropy_xK = jax.lax.stop_gradient(terms)
    mask_xK = jax.lax.stop_gradient(mask_xK)
    alpha_xK = 1.0 - tv_xK
    prefix_xK = _acceptance_prefix_products(alpha_xK, mask_xK)
    accepted_x = jnp.sum(jnp.where(mask_xK != 0, prefix_xK, 0.0), axis=-1)  # weights don't scale E[A]
    position_weight_x = jnp.max(mask_xK, axis=-1)
    expected_accepted = jnp.sum(position_weight_x * accepted_x) / jnp.maximum(
        jnp.sum(position_weight_x), _TINY)
    return {
        "loss": jax.lax.stop_gradient(loss),
        "alpha": _per_depth_mean(alpha_xK, mask_xK),
        "tv": _per_depth_mean(tv_xK, mask_xK),
        "kl": _per_depth_mean(kl_xK, mask_xK),
        "greedy_alpha": _per_depth_mean(greedy_alpha_xK, mask_xK),
        "target_entropy": _per_depth_mean(entropy_xK, mask_xK),
        "expected_accepted": expected_accepted,
    }


def _prepare_pair(target_logits, draft_logits, mask, temperature):
    shape = _check_pair(target_logits, draft_logits)
    _check_mask(mask, shape)
    _check_temperature(temperature)
    mask_xK = jnp.asarray(mask).astype(jnp.float32)
    terms = _pair_terms(
        jax.lax.stop_gradient(target_logits), draft_logits, _as_temperature(temperature))
    return terms, mask_xK


# --------------------------------------------------------------------------- losses


def ce_loss(
    labels, draft_logits, mask, temperature=1.0, *, target_logits=None
) -> tuple[jax.Array, Metrics]:
    """Cross-entropy of the draft against the sampled next tokens.

    Args:
        labels: [..., K] int token ids. Values at masked entries are ignored (e.g. -1 pad);
            unmasked entries must lie in [0, V).
        draft_logits: [..., K, V].
        mask: [..., K] bool or float weights.
        temperature: > 0; the draft is softmax(draft_logits / temperature).
        target_logits: optional [..., K, V]; only used for metrics (alpha, tv, kl, E[A]).

    Returns:
        (loss, metrics): loss = weighted mean of -log q(label).
    """
    shape = _check_logits("draft_logits", draft_logits)
    if target_logits is not None:
        shape = _check_pair(target_logits, draft_logits)
    _check_labels(labels, shape)
    _check_mask(mask, shape)
    _check_temperature(temperature)

    mask_xK = jnp.asarray(mask).astype(jnp.float32)
    labels_xK = jnp.asarray(labels).astype(jnp.int32)
    vocab_size = shape[-1]
    in_range_xK = (labels_xK >= 0) & (labels_xK < vocab_size)
    safe_labels_xK = jnp.where(in_range_xK, labels_xK, 0)

    temperature = _as_temperature(temperature)
    ce_xK = _label_nll(draft_logits, safe_labels_xK, temperature)
    loss = _loss_of_terms("ce", None, ce_xK, mask_xK)

    if target_logits is not None:
        terms = _pair_terms(jax.lax.stop_gradient(target_logits), draft_logits, temperature)
        metrics = _pair_metrics(terms, mask_xK, loss)
    else:
        metrics = {"loss": jax.lax.stop_gradient(loss)}
    # argmax of the raw logits is the argmax of q for any temperature > 0.
    correct_xK = jnp.argmax(jax.lax.stop_gradient(draft_logits), axis=-1) == labels_xK
    metrics["ce"] = _per_depth_mean(jax.lax.stop_gradient(ce_xK), mask_xK)
    metrics["accuracy"] = _per_depth_mean(correct_xK.astype(jnp.float32), mask_xK)
    return loss, metrics


def _loss_of_terms(name: str, terms: _PairTerms, ce_xK, mask_xK) -> jax.Array:
    """The loss ``name`` from per-token terms (``ce_xK`` only for "ce")."""
    if name == "ce":
        return _weighted_mean(ce_xK, mask_xK)
    if name == "kl":
        return _weighted_mean(terms.kl, mask_xK)
    if name == "tv":
        return _weighted_mean(terms.tv, mask_xK)
    prefix_xK = _acceptance_prefix_products(1.0 - terms.tv, mask_xK)
    return _weighted_mean(1.0 - prefix_xK, mask_xK)


def kl_loss(
    target_logits, draft_logits, mask, temperature=1.0
) -> tuple[jax.Array, Metrics]:
    """Forward KL(p || q) per token, weighted mean over positions and depths."""
    terms, mask_xK = _prepare_pair(target_logits, draft_logits, mask, temperature)
    loss = _loss_of_terms("kl", terms, None, mask_xK)
    return loss, _pair_metrics(terms, mask_xK, loss)


def tv_loss(
    target_logits, draft_logits, mask, temperature=1.0
) -> tuple[jax.Array, Metrics]:
    """Per-depth total variation TV(p, q), weighted mean over positions and depths.

    Each depth is trained to its own one-step acceptance 1 - TV, independently of the
    others (contrast e2e_tv_loss).
    """
    terms, mask_xK = _prepare_pair(target_logits, draft_logits, mask, temperature)
    loss = _loss_of_terms("tv", terms, None, mask_xK)
    return loss, _pair_metrics(terms, mask_xK, loss)


def e2e_tv_loss(
    target_logits, draft_logits, mask, temperature=1.0
) -> tuple[jax.Array, Metrics]:
    """End-to-end TV loss (Bebop Eq. 13): one minus the normalised expected accepted length.

    Per position t: alpha_{t,i} = 1 - TV(stop_gradient(p_{t,i}), q_{t,i}) and
    P_{t,j} = prod_{i<=j} alpha_{t,i}, where alpha is taken as 1 at depths with
    m_{t,i} = 0 so that a masked depth does not break the chain. Then

        loss = sum_{t,j} m_{t,j} (1 - P_{t,j}) / sum_{t,j} m_{t,j}.

    With a full mask this is exactly mean_t [1 - (1/K) sum_j prod_{i<=j} alpha_{t,i}], i.e.
    K * (1 - loss) is the mean number of drafts accepted by multi-step rejection sampling.
    The gradient flows through the products, so an early depth is weighted by how much
    acceptance of the later depths hangs on it.
    """
    terms, mask_xK = _prepare_pair(target_logits, draft_logits, mask, temperature)
    loss = _loss_of_terms("e2e_tv", terms, None, mask_xK)
    return loss, _pair_metrics(terms, mask_xK, loss)


def loss_from_terms(name: str, mask, *, alpha, kl, greedy_alpha, target_entropy, ce,
                    accuracy) -> tuple[jax.Array, Metrics]:
    """The loss ``name`` and the metrics its logits version reports, from per-token terms [..., K]
    (``bebop_jax.ops.draft_agreement``'s outputs: differentiable ``alpha``, ``kl``, ``ce``; the rest
    metrics). The same formulas as the losses above: ``tv = 1 - alpha``; e2e TV's products over
    depths as ``e2e_tv_loss`` defines them."""
    get_loss(name)
    mask_xK = jnp.asarray(mask).astype(jnp.float32)
    terms = _PairTerms(1.0 - alpha, kl, greedy_alpha, target_entropy)
    loss = _loss_of_terms(name, terms, ce, mask_xK)
    metrics = _pair_metrics(terms, mask_xK, loss)
    if name == "ce":
        metrics["ce"] = _per_depth_mean(jax.lax.stop_gradient(ce), mask_xK)
        metrics["accuracy"] = _per_depth_mean(jax.lax.stop_gradient(accuracy), mask_xK)
    return loss, metrics


LOSSES: Mapping[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "ce": ce_loss,
    "kl": kl_loss,
    "tv": tv_loss,
    "e2e_tv": e2e_tv_loss,
}


def get_loss(name: str) -> Callable[..., tuple[jax.Array, Metrics]]:
    """The loss function registered under `name` in LOSSES."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss name {name!r}; valid names: {sorted(LOSSES)}")
    return LOSSES[name]


def compute_loss(
    name: str, *, draft_logits, mask, target_logits=None, labels=None, temperature=1.0
) -> tuple[jax.Array, Metrics]:
    """Calls the loss `name` with one keyword signature for all of them.

    ce needs `labels` (target_logits optional, for metrics); kl, tv and e2e_tv need
    `target_logits` and ignore `labels`.
    """
    loss_fn = get_loss(name)
    if name == "ce":
        if labels is None:
            raise ValueError("labels must be given for the 'ce' loss")
        return loss_fn(labels, draft_logits, mask, temperature, target_logits=target_logits)
    if target_logits is None:
        raise ValueError(f"target_logits must be given for the {name!r} loss")
    return loss_fn(target_logits, draft_logits, mask, temperature)

