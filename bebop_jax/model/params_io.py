"""Saving and loading a policy (config + parameters) as a small-scale checkpoint.

Layout of a policy directory: ``model_config.json``, ``params/`` (orbax) and, when the
writer knows it, ``policy_info.json`` (``{"mtp_heads_trained": bool}``: a pretrain_base
policy carries untrained heads, which a speculative decoder could use but never profit from).
Loading checks the config first, so a checkpoint of another model shape fails
with a message naming the differing fields before any array is read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from bebop_jax.config import ModelConfig
from bebop_jax.model.params import abstract_params, shard_params_for

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
INFO_FILE = "policy_info.json"


def save_policy(path: str | Path, model_config: ModelConfig, params: Any, *,
                mtp_heads_trained: bool | None = None) -> Path:
    """Write ``model_config.json`` and ``params/`` under ``path`` (params written first)."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, params, force=True)
    if mtp_heads_trained is not None:
        (path / INFO_FILE).write_text(json.dumps({"mtp_heads_trained": bool(mtp_heads_trained)}))
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(model_config), indent=2))
    tmp.replace(path / CONFIG_FILE)  # the config appears only once the params are complete
    return path


def read_policy_info(path: str | Path) -> dict:
    """``policy_info.json`` of a policy directory ({} when its writer did not record it)."""
    info = Path(path) / INFO_FILE
    return json.loads(info.read_text()) if info.is_file() else {}


def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(f"checkpoint {str(path)!r}: no {CONFIG_FILE} (not a policy checkpoint, or incomplete)")
    raw = json.loads(cfg_file.read_text())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"checkpoint {str(path)!r}: unknown ModelConfig fields {unknown}")
    return ModelConfig(**raw)


def load_policy(path: str | Path, mesh: Mesh | None = None, *,
                expect: ModelConfig | None = None) -> tuple[ModelConfig, Any]:
    """Load ``(model_config, params)``; with ``expect``, refuse a checkpoint of another shape.

    Fields that do not change parameter shapes (dtype, rope_theta, max_seq_len, eps, vocab_impl)
    may differ from ``expect``; the expected values are then used.
    """
    path = Path(path).absolute()
    saved = read_model_config(path)
    config = saved
    if expect is not None:
        shape_fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                        "intermediate_size", "tie_embeddings", "num_mtp_depths", "num_mtp_modules",
                        "mtp_mlp_size")
        diffs = [f"{f}: checkpoint {getattr(saved, f)!r} vs requested {getattr(expect, f)!r}"
                 for f in shape_fields if getattr(saved, f) != getattr(expect, f)]
        if diffs:
            raise ValueError(f"checkpoint {str(path)!r} does not match the model: " + "; ".join(diffs))
        config = expect
    abstract = abstract_params(config)
    if mesh is not None:
        shardings = shard_params_for(config, mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / PARAMS_DIR, abstract)
    return config, params
