"""Parameters: initialisation, abstract shapes, shardings, and the trunk / heads split.

A policy's parameters are a dict keyed by top-level module: the trunk's (embedding,
decoder layers, final norm, LM head) and the MTP heads' (one entry per MTP module).
Code that needs one side or the other goes through ``trunk_params`` / ``head_params``
(or ``is_trunk_param`` on a tree path), never through the key names.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, SingleDeviceSharding

from bebop_jax.config import ModelConfig
from bebop_jax.model.policy import HEAD_PREFIX, LAYER_PREFIX, Policy
from bebop_jax.parallel import param_shardings


def _init_boxed(config: ModelConfig, key: jax.Array):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return Policy(config).init(key, tokens)["params"]


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def param_logical_axes(config: ModelConfig) -> Any:
    """Tree of logical-axis tuples, one per parameter (no compute, no allocation)."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))
    return jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=_is_box)


def abstract_params(config: ModelConfig) -> Any:
    """Tree of ShapeDtypeStructs of the parameters."""
    return nn.unbox(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))


def shard_params_for(config: ModelConfig, mesh: Mesh) -> Any:
    """NamedShardings of every parameter on ``mesh`` by ``parallel.RULES``."""
    return param_shardings(param_logical_axes(config), abstract_params(config), mesh)


def init_params(model_config: ModelConfig, key: jax.Array, mesh: Mesh | None = None) -> Any:
    """Initialise parameters; with ``mesh``, each is created directly in its sharding."""
    init = lambda k: nn.unbox(_init_boxed(model_config, k))
    if mesh is None:
        return jax.jit(init)(key)
    return jax.jit(init, out_shardings=shard_params_for(model_config, mesh))(key)


# ----------------------------------------------------------------------------- trunk / heads


def key_name(k) -> str:
    """The name of a tree-path key (``DictKey``, ``GetAttrKey``) or of a plain key."""
    return str(getattr(k, "key", getattr(k, "name", k)))


def is_head_key(key) -> bool:
    """True for the top-level key of an MTP module's parameters (a str or a tree-path key)."""
    return key_name(key).startswith(HEAD_PREFIX)


def is_trunk_param(path: tuple) -> bool:
    """True for parameters of the trunk, embedding and LM head (not of an MTP module)."""
    return not is_head_key(path[0])


def is_layer_key(key) -> bool:
    """True for the top-level key of one of the trunk's decoder layers."""
    return key_name(key).startswith(LAYER_PREFIX)


def head_names(config: ModelConfig) -> list[str]:
    """The top-level keys of the MTP modules, in module order."""
    return [f"{HEAD_PREFIX}{m}" for m in range(config.num_mtp_modules)]


def head_params(params: Mapping) -> dict:
    """The MTP heads' parameters (every MTP module), as a dict that ``merge_params`` undoes."""
    return {k: v for k, v in params.items() if is_head_key(k)}


def trunk_params(params: Mapping) -> dict:
    """The trunk's parameters: embedding, decoder layers, final norm and LM head."""
    return {k: v for k, v in params.items() if not is_head_key(k)}


def layer_params(params: Mapping) -> dict:
    """The trunk's decoder layers only (no embedding, norm or LM head)."""
    return {k: v for k, v in params.items() if is_layer_key(k)}


def merge_params(*parts: Mapping) -> dict:
    """One parameter dict from disjoint parts (e.g. ``trunk_params`` and ``head_params``)."""
    out: dict = {}
    for part in parts:
        out.update(part)
    return out


# ----------------------------------------------------------------------------- fresh heads


def init_mtp_params(model_config: ModelConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    """Fresh MTP modules only: ``{"mtp_0": ..., ...}`` equal to ``init_params(model_config,
    key)["mtp_*"]``, each parameter created in its ``shard_params_for`` sharding (or on
    this process's first device). Neither the trunk's init nor a second copy of the
    trunk is ever made, which matters when the trunk is a loaded multi-billion model.
    """
    names = head_names(model_config)
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        return init_mtp_params_in(model_config, key, {n: device for n in names})
    tree = shard_params_for(model_config, mesh)
    return init_mtp_params_in(model_config, key, {n: tree[n] for n in names})


def init_mtp_params_in(config: ModelConfig, key: jax.Array, shardings: Mapping[str, Any]) -> dict:
    """Fresh MTP modules from the project's init, built directly in their shardings.

    Equal to ``init_params(config, key)["mtp_*"]`` (flax derives each parameter's
    randomness from its module path), but only the MTP modules are traced and compiled.
    """
    names = head_names(config)
    leaves, treedef = jax.tree.flatten({n: shardings[n] for n in names})
    return _mtp_initializer(config, tuple(leaves), treedef)(key)


@functools.lru_cache(maxsize=16)
def _mtp_initializer(config: ModelConfig, sharding_leaves: tuple, sharding_treedef):
    names = head_names(config)

    def touch_mtp(policy, emb_BxTxH, hidden_BxTxH, positions_BxT):
        for m in range(config.num_mtp_modules):
            policy.mtp[m](emb_BxTxH, hidden_BxTxH, positions_BxT)

    def init(key):
        x = jnp.zeros((1, 2, config.hidden_size), jnp.dtype(config.dtype))
        boxed = Policy(config).init(key, x, x, jnp.zeros((1, 2), jnp.int32), method=touch_mtp)
        params = nn.unbox(boxed["params"])
        return {n: params[n] for n in names}

    return jax.jit(init, out_shardings=jax.tree.unflatten(sharding_treedef, sharding_leaves))
