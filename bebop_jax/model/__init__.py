"""The policy (trunk + MTP), parameter initialisation, sharding metadata, checkpoints."""

from bebop_jax.model.hf import export_hf_checkpoint, load_hf_checkpoint, mtp_modules_in_checkpoint
from bebop_jax.model.layers import empty_kv_cache
from bebop_jax.model.params import (abstract_params, head_names, head_params, init_mtp_params, init_params,
                                    is_trunk_param, layer_params, merge_params, param_logical_axes,
                                    shard_params_for, trunk_params)
from bebop_jax.model.policy import Policy, PolicyOutput, shift_tokens

__all__ = ["load_hf_checkpoint", "export_hf_checkpoint", "mtp_modules_in_checkpoint", "Policy", "PolicyOutput",
           "init_params", "init_mtp_params", "abstract_params", "param_logical_axes", "shard_params_for",
           "empty_kv_cache", "shift_tokens", "is_trunk_param", "trunk_params", "head_params", "layer_params",
           "head_names", "merge_params"]
