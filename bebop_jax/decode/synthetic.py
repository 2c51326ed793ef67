"""Value-only rewrites of a policy's parameters that fix the drafts' acceptance.

Shapes never change, so the compute per step is exactly the model's: what these
measure is the decoder, not a smaller model. Used by ``experiments/bench_decode.py``
(the cost of a speculative step, a synthetic upper range) and by the tests of the
adaptive draft length.

``never_accepted_params``: every token embedding (and untied LM-head column) but
token 0's gets a large common offset along one direction e and token 0's is zeroed,
the trunk's layer outputs are scaled down so its hidden state stays along e, and
each MTP module passes the (offset-dominated) token embedding through with a negated
final norm. The trunk then gives every token but 0 a logit ~60 above token 0's
(p(0) ~ 0), while the heads give token 0 a logit ~40 above every other (q(0) ~ 1):
drafts are (almost) always token 0 and the target never accepts them, so each verify
step emits exactly one token, as a vanilla step does. Prompts should avoid token 0.

``agreeing_params``: the trunk's layer outputs are scaled down (a near-Markov chain on
the current token) and each MTP module passes the token embedding through, so drafts
nearly equal the target and acceptance is high.
"""

from __future__ import annotations

import copy

import jax
import numpy as np

from bebop_jax.config import ModelConfig
from bebop_jax.model.params import head_params, layer_params


def _host_copy(params) -> dict:
    return copy.deepcopy(jax.tree.map(np.asarray, jax.device_get(params)))


def _scale_layer_outputs(layer: dict, scale: float) -> None:
    layer["self_attn"]["o_proj"] = layer["self_attn"]["o_proj"] * scale
    layer["mlp"]["down_proj"] = layer["mlp"]["down_proj"] * scale


def _pass_embedding_through(module: dict, h: int, out_scale: float) -> None:
    """MTP fc = [identity on the embedding half; 0 on the hidden half]; layer outputs scaled."""
    module["fc"] = np.concatenate([np.eye(h, dtype=module["fc"].dtype),
                                   np.zeros((h, h), module["fc"].dtype)], axis=0)
    module["pre_fc_norm_embedding"]["scale"] = np.ones_like(module["pre_fc_norm_embedding"]["scale"])
    _scale_layer_outputs(module["layer"], out_scale)


def never_accepted_params(cfg: ModelConfig, params, offset: float = 4.0, trunk_scale: float = 0.05) -> dict:
    """Same shapes, values such that every draft is rejected (see the module docstring)."""
    p = _host_copy(params)
    h = cfg.hidden_size
    e = np.full((h,), h ** -0.5, np.float32)  # unit direction
    emb = p["embed_tokens"].astype(np.float32) + offset * e
    emb[0] = 0.0
    p["embed_tokens"] = emb.astype(p["embed_tokens"].dtype)
    if not cfg.tie_embeddings:
        head = p["lm_head"].astype(np.float32) + offset * e[:, None]
        head[:, 0] = 0.0
        p["lm_head"] = head.astype(p["lm_head"].dtype)
    p["norm"]["scale"] = np.ones_like(p["norm"]["scale"])
    for layer in layer_params(p).values():  # the sub-dicts of p, rewritten in place
        _scale_layer_outputs(layer, trunk_scale)
    for module in head_params(p).values():
        _pass_embedding_through(module, h, 0.0)
        module["norm"]["scale"] = -np.ones_like(module["norm"]["scale"])
    return p


def agreeing_params(cfg: ModelConfig, params, scale: float = 0.03) -> dict:
    """Near-Markov trunk, MTP heads that nearly copy it: high acceptance (synthetic)."""
    p = _host_copy(params)
    for layer in layer_params(p).values():  # the sub-dicts of p, rewritten in place
        _scale_layer_outputs(layer, scale)
    for module in head_params(p).values():
        _pass_embedding_through(module, cfg.hidden_size, scale)
    return p
