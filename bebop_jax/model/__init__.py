"""The policy (trunk + MTP), parameter initialisation and sharding metadata."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from bebop_jax.config import ModelConfig
from bebop_jax.model.layers import empty_kv_cache
from bebop_jax.model.policy import Policy, PolicyOutput, shift_tokens
from bebop_jax.parallel import param_shardings

__all__ = ["load_hf_checkpoint", "export_hf_checkpoint", "Policy", "PolicyOutput", "init_params", "abstract_params", "param_logical_axes",
           "shard_params_for", "empty_kv_cache", "shift_tokens", "is_trunk_param"]


def _init_boxed(config: ModelConfig, key: jax.Array):
    tokens = jax.numpy.zeros((1, 2), jax.numpy.int32)
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


def is_trunk_param(path: tuple) -> bool:
    """True for parameters of the trunk, embedding and LM head (not of an MTP module)."""
    first = path[0]
    name = getattr(first, "key", getattr(first, "name", first))
    return not str(name).startswith("mtp_")


def load_hf_checkpoint(path, mesh: Mesh | None = None, **kwargs):
    """Load a Hugging Face Qwen3 checkpoint: see ``bebop_jax.model.hf.load_hf_checkpoint``."""
    from bebop_jax.model import hf
    return hf.load_hf_checkpoint(path, mesh, **kwargs)


def export_hf_checkpoint(model_config: ModelConfig, params: Any, path, **kwargs):
    """Export to safetensors + config.json: see ``bebop_jax.model.hf.export_hf_checkpoint``."""
    from bebop_jax.model import hf
    return hf.export_hf_checkpoint(model_config, params, path, **kwargs)
