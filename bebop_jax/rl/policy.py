"""Where an RL run's policy comes from: a pretrain_mtp policy directory or a Qwen3 checkpoint.

Checked before anything is written: speculative rollouts and online MTP strategies
need trained MTP heads, which a pretrain_base policy (``policy_info.json``) or an HF
checkpoint without ``mtp.*`` tensors does not have.
"""

from __future__ import annotations

import os
from typing import Any

from bebop_jax.config import ModelConfig
from bebop_jax.data.tokenizer import Tokenizer, load_tokenizer
from bebop_jax.model.hf import load_hf_checkpoint, mtp_modules_in_checkpoint
from bebop_jax.model.params_io import load_policy, read_policy_info
from bebop_jax.run.cli import UserError

DEFAULT_POLICY = "runs/pretrain_mtp/mtp_e2e_tv/policy"  # what experiments/pretrain_mtp.py writes


def resolve_policy(policy_dir: str, hf_checkpoint: str | None, *, heads_for: str = "") -> str:
    """The directory to load; ``heads_for`` names what needs trained MTP heads ('' if nothing)."""
    fix = "--spec.method none (and the frozen strategy)"
    if hf_checkpoint:
        if not os.path.isdir(hf_checkpoint):
            raise UserError(f"--hf_checkpoint {hf_checkpoint!r}: no such directory")
        if heads_for and not mtp_modules_in_checkpoint(hf_checkpoint):
            raise UserError(f"--hf_checkpoint {hf_checkpoint!r} ships no mtp.* heads for {heads_for}: train them "
                            f"with experiments/pretrain_mtp.py, or pass {fix}")
        return hf_checkpoint
    path = policy_dir
    if os.path.isdir(os.path.join(path, "policy")):
        path = os.path.join(path, "policy")
    if not os.path.isfile(os.path.join(path, "model_config.json")):
        if policy_dir == DEFAULT_POLICY:
            raise UserError(f"no policy at {DEFAULT_POLICY}: run `python experiments/pretrain_mtp.py` first, "
                            "or pass --policy_dir")
        raise UserError(f"--policy_dir {policy_dir!r}: no policy checkpoint (model_config.json + params/)")
    if heads_for and read_policy_info(path).get("mtp_heads_trained") is False:
        raise UserError(f"--policy_dir {policy_dir!r} has no trained MTP heads (a pretrain_base policy) for "
                        f"{heads_for}: pass a pretrain_mtp policy, or {fix}")
    return path


def load_rl_policy(path: str, *, hf: bool, tokenizer: str = "byte",
                   mesh=None) -> tuple[ModelConfig, Any, Tokenizer, bool | None]:
    """(model_config, params on ``mesh``, tokenizer, whether the MTP heads are trained (None: unknown))."""
    if hf:
        cfg, params = load_hf_checkpoint(path, mesh)
        return cfg, params, load_tokenizer(path), bool(mtp_modules_in_checkpoint(path))
    cfg, params = load_policy(path, mesh)
    return cfg, params, load_tokenizer(tokenizer), read_policy_info(path).get("mtp_heads_trained")
