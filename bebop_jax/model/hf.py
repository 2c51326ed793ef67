"""Hugging Face Qwen3 checkpoints in and out: safetensors <-> the bebop_jax param tree.

Loading reads ``config.json``, builds a ``ModelConfig``, checks every tensor's name,
shape and dtype against it from the safetensors headers alone, and only then places
the weights: one tensor at a time, each device shard read lazily from its file
slice (``safe_open(...).get_slice``) straight into its ``NamedSharding``. On a
multi-host mesh every process reads only the slices of its own devices, so a model
larger than one host's memory never materialises whole on any host.

Layouts (HF ``nn.Linear`` weights are ``[out, in]``; flax kernels are ``[in, out]``):

    model.embed_tokens.weight [V, H]            embed_tokens [V, H]
    lm_head.weight [V, H] (untied only)         lm_head [H, V]
    ...self_attn.q_proj.weight [N*D, H]         self_attn/q_proj [H, N, D]   (k, v: Nkv)
    ...self_attn.o_proj.weight [H, N*D]         self_attn/o_proj [N, D, H]
    ...mlp.{gate,up}_proj.weight [I, H]         mlp/{gate,up}_proj [H, I]
    ...mlp.down_proj.weight [H, I]              mlp/down_proj [I, H]
    ...*norm.weight [H] or [D]                  */scale (same values: y = x_hat * w)

MTP modules use Qwen3-Next's names. With one module (M = 1, reused at every depth):
``mtp.pre_fc_norm_embedding.weight``, ``mtp.pre_fc_norm_hidden.weight``,
``mtp.fc.weight [H, 2H]`` (input = concat[norm_e(embed), norm_h(hidden)], embedding
first), ``mtp.layers.0.*`` (one decoder layer, named as ``model.layers.N.*``),
``mtp.norm.weight``. With M = K modules (one per depth) module m's tensors carry the
prefix ``mtp.{m}.`` instead of ``mtp.`` (e.g. ``mtp.2.layers.0.mlp.up_proj.weight``):
Qwen3-Next's own ``mtp.layers.{i}`` are several layers behind ONE shared fc and
norms, which is not this model's M = K layout, so that name is not reused for it.

Norm weights: a Qwen3 file stores every RMSNorm weight as the multiplier w
(y = x_hat * w, ones at init), which is exactly this codebase's ``scale``. Qwen3-Next
and Qwen3.5 files store w - 1 (y = x_hat * (1 + w), zeros at init) for ALL their
norms, trunk and ``mtp.*`` alike. The convention belongs to the file: ``mtp.*`` norms
in a Qwen3ForCausalLM file are read and written as multipliers like the trunk's, so
``mtp.layers.0.*`` reads exactly like ``model.layers.N.*`` and a round trip is
bit-exact. Qwen3-Next / Qwen3.5 checkpoints themselves are refused: their trunks
(gated-delta-net linear attention, gated attention, MoE) are not this model.

``config.json`` gains two keys of ours, ``num_mtp_depths`` and ``num_mtp_modules`` (and
``mtp_intermediate_size`` when the model sets the MTP modules' MLP width apart);
transformers keeps unknown keys and ignores ``mtp.*`` tensors, so an exported
checkpoint still loads as a plain Qwen3ForCausalLM there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reader needs it)
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from bebop_jax.config import DTYPES, ModelConfig
from bebop_jax.model.policy import LAYER_PREFIX
from bebop_jax.model.params import (abstract_params, head_names, init_mtp_params_in, is_head_key, key_name,
                                    shard_params_for)

logger = logging.getLogger(__name__)

ARCHITECTURE = "Qwen3ForCausalLM"
# Architectures people will try, with why they do not load into this model.
_REFUSED = {
    "Qwen3NextForCausalLM": "its trunk mixes gated-delta-net linear attention with gated "
                            "attention and a MoE MLP",
    "Qwen3_5ForCausalLM": "its trunk mixes gated-delta-net linear attention with gated attention",
    "Qwen3_5ForConditionalGeneration": "it is a vision-language model with a hybrid "
                                       "linear-attention trunk",
    "Qwen3MoeForCausalLM": "its MLPs are mixtures of experts",
}
SINGLE_FILE = "model.safetensors"
# A checkpoint directory's tokenizer: what HFTokenizer.from_dir reads, and the files kin to it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files ``src`` holds into ``dst`` (so an exported checkpoint loads with
    its tokenizer, as the one it came from); returns the names copied."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return names
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_NP_TO_CONFIG = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16"}


# --------------------------------------------------------------------------------------
# The name/layout table: one row per parameter.
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """One parameter: its flax path and shape, its HF name, and how the layouts relate.

    kind: "copy" (same layout), "transpose" (2-D, [in, out] <-> [out, in]),
    "heads_in" (flax [H, N, D] <-> HF [N*D, H]), "heads_out" (flax [N, D, H] <-> HF [H, N*D]).
    """

    path: tuple[str, ...]
    name: str
    kind: str
    shape: tuple[int, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        s = self.shape
        if self.kind == "copy":
            return s
        if self.kind == "transpose":
            return (s[1], s[0])
        if self.kind == "heads_in":
            return (s[1] * s[2], s[0])
        return (s[2], s[0] * s[1])  # heads_out


def _layer_specs(cfg: ModelConfig, path: tuple[str, ...], prefix: str, mlp_size: int | None = None) -> list[_Spec]:
    h, n, nkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    i = mlp_size or cfg.intermediate_size
    row = lambda sub, name, kind, shape: _Spec(path + sub, f"{prefix}.{name}", kind, shape)
    return [
        row(("input_layernorm", "scale"), "input_layernorm.weight", "copy", (h,)),
        row(("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", "copy", (h,)),
        row(("self_attn", "q_proj"), "self_attn.q_proj.weight", "heads_in", (h, n, d)),
        row(("self_attn", "k_proj"), "self_attn.k_proj.weight", "heads_in", (h, nkv, d)),
        row(("self_attn", "v_proj"), "self_attn.v_proj.weight", "heads_in", (h, nkv, d)),
        row(("self_attn", "o_proj"), "self_attn.o_proj.weight", "heads_out", (n, d, h)),
        row(("self_attn", "q_norm", "scale"), "self_attn.q_norm.weight", "copy", (d,)),
        row(("self_attn", "k_norm", "scale"), "self_attn.k_norm.weight", "copy", (d,)),
        row(("mlp", "gate_proj"), "mlp.gate_proj.weight", "transpose", (h, i)),
        row(("mlp", "up_proj"), "mlp.up_proj.weight", "transpose", (h, i)),
        row(("mlp", "down_proj"), "mlp.down_proj.weight", "transpose", (i, h)),
    ]


def mtp_prefix(module: int, num_modules: int) -> str:
    """HF name prefix of MTP module ``module``: ``mtp`` for M = 1, ``mtp.{m}`` for M > 1."""
    return "mtp" if num_modules == 1 else f"mtp.{module}"


def _mtp_specs(cfg: ModelConfig) -> list[_Spec]:
    h = cfg.hidden_size
    specs = []
    for m in range(cfg.num_mtp_modules):
        p, root = mtp_prefix(m, cfg.num_mtp_modules), (head_names(cfg)[m],)
        specs += [
            _Spec(root + ("pre_fc_norm_embedding", "scale"), f"{p}.pre_fc_norm_embedding.weight", "copy",
                  (h,)),
            _Spec(root + ("pre_fc_norm_hidden", "scale"), f"{p}.pre_fc_norm_hidden.weight", "copy",
                  (h,)),
            _Spec(root + ("fc",), f"{p}.fc.weight", "transpose", (2 * h, h)),
            *_layer_specs(cfg, root + ("layer",), f"{p}.layers.0", cfg.mtp_mlp_size),
            _Spec(root + ("norm", "scale"), f"{p}.norm.weight", "copy", (h,)),
        ]
    return specs


def _trunk_specs(cfg: ModelConfig) -> list[_Spec]:
    h, v = cfg.hidden_size, cfg.vocab_size
    specs = [_Spec(("embed_tokens",), "model.embed_tokens.weight", "copy", (v, h))]
    for li in range(cfg.num_layers):
        specs += _layer_specs(cfg, (f"{LAYER_PREFIX}{li}",), f"model.layers.{li}")
    specs.append(_Spec(("norm", "scale"), "model.norm.weight", "copy", (h,)))
    if not cfg.tie_embeddings:
        specs.append(_Spec(("lm_head",), "lm_head.weight", "transpose", (h, v)))
    return specs


def _all_specs(cfg: ModelConfig) -> list[_Spec]:
    specs = _trunk_specs(cfg) + _mtp_specs(cfg)
    _check_specs_cover_model(cfg, specs)
    return specs


def _check_specs_cover_model(cfg: ModelConfig, specs: list[_Spec]) -> None:
    """The table must name every parameter of the model, with its shape (a code invariant)."""
    flat = _param_shapes(cfg)
    table = {s.path: s.shape for s in specs}
    if flat != table:
        missing = sorted(set(flat) - set(table))
        extra = sorted(set(table) - set(flat))
        wrong = sorted(p for p in set(flat) & set(table) if flat[p] != table[p])
        raise RuntimeError(f"hf.py's tensor table is out of date with the model: params without "
                           f"an HF name {missing}, names without a param {extra}, shapes differ {wrong}")


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {tuple(key_name(k) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}


# --------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} not found: a Hugging Face checkpoint directory needs it") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for name, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise ValueError(f"{where}: {name} must be an object or null, got {block!r}")
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{where}: {name} rope_type {rope_type!r} is not implemented "
                             "(only the default, unscaled rotary embedding is)")
    theta = hf.get("rope_theta")
    if isinstance(params, Mapping) and "rope_theta" in params:
        if theta is not None and float(theta) != float(params["rope_theta"]):
            raise ValueError(f"{where}: rope_theta {theta} disagrees with "
                             f"rope_parameters.rope_theta {params['rope_theta']}")
        theta = params["rope_theta"]
    return 10_000.0 if theta is None else float(theta)


def _resolve_dtype(dtype: Any, hf: Mapping[str, Any], where: str) -> str:
    """The parameter dtype name: the argument, else the checkpoint's (float16 -> float32)."""
    if dtype is None:
        stored = hf.get("dtype", hf.get("torch_dtype")) or "float32"
        as_loaded = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float32"}
        return as_loaded.get(str(stored), "float32")
    try:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or None: the checkpoint's), got {dtype!r}")
    return name


def _hf_to_model_config(hf: Mapping[str, Any], where: str, *, dtype: Any, num_mtp_depths: int | None,
                        num_mtp_modules: int) -> ModelConfig:
    archs = hf.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ValueError(f"{where}: 'architectures' must be a non-empty list, got {archs!r}; "
                         f"only {ARCHITECTURE} loads")
    for arch in archs:
        if arch != ARCHITECTURE:
            why = _REFUSED.get(arch, "it is not a Qwen3 dense decoder")
            raise ValueError(f"{where}: architecture {arch!r} is not supported ({why}); "
                             f"only {ARCHITECTURE} loads")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise ValueError(f"{where}: missing required key {key!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("attention_bias", False):
        raise ValueError(f"{where}: attention_bias=true is not supported (the model has no biases)")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported (full attention only)")
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{where}: layer_types {sorted(set(layer_types))} are not supported "
                         "(full_attention only)")
    heads = hf["num_attention_heads"]
    k_default = ModelConfig.__dataclass_fields__["num_mtp_depths"].default
    if num_mtp_depths is None:
        num_mtp_depths = hf.get("num_mtp_depths", num_mtp_modules if num_mtp_modules > 1 else k_default)
    if num_mtp_modules not in (1, num_mtp_depths):
        raise ValueError(f"num_mtp_depths={num_mtp_depths} does not fit {num_mtp_modules} MTP "
                         f"modules: M must be 1 (shared) or K")
    param_dtype = _resolve_dtype(dtype, hf, where)
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"], rope_theta=_rope_theta(hf, where),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 32768),
        num_mtp_depths=num_mtp_depths, num_mtp_modules=num_mtp_modules,
        mtp_intermediate_size=hf.get("mtp_intermediate_size"), dtype=param_dtype, param_dtype=param_dtype)


def model_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a Qwen3ForCausalLM with this trunk (plus our MTP keys)."""
    return {
        "architectures": [ARCHITECTURE], "model_type": "qwen3",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta,  # read by older transformers
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None, "attention_bias": False, "use_sliding_window": False,
        "layer_types": ["full_attention"] * config.num_layers,
        "dtype": config.param_dtype,
        "num_mtp_depths": config.num_mtp_depths, "num_mtp_modules": config.num_mtp_modules,
        **({} if config.mtp_intermediate_size is None else {"mtp_intermediate_size": config.mtp_intermediate_size}),
    }


# --------------------------------------------------------------------------------------
# Reading safetensors headers and slices
# --------------------------------------------------------------------------------------
class _Files:
    """Tensor name -> (file, shape, dtype) from the headers; opens each file once, lazily."""

    def __init__(self, path: str, stack: contextlib.ExitStack):
        self.path, self._stack, self._open = path, stack, {}
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: 'weight_map' must be a non-empty object")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise ValueError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self.file_of: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.exists(full):
                raise ValueError(f"{path}: {fname} is listed in {INDEX_FILE} but missing")
            handle = self._handle(fname)
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue  # the index decides which file holds a tensor
                sl = handle.get_slice(name)
                self.file_of[name] = fname
                self.shape[name], self.dtype[name] = tuple(sl.get_shape()), sl.get_dtype()
        if weight_map is not None:
            lost = sorted(n for n in weight_map if n not in self.file_of)
            if lost:
                raise ValueError(f"{path}: tensor {lost[0]!r} is listed in {INDEX_FILE} under "
                                 f"{weight_map[lost[0]]} but that file does not hold it "
                                 f"({len(lost)} such tensors)")

    def _handle(self, fname: str):
        if fname not in self._open:
            self._open[fname] = self._stack.enter_context(
                safe_open(os.path.join(self.path, fname), framework="numpy"))
        return self._open[fname]

    def slice(self, name: str):
        return self._handle(self.file_of[name]).get_slice(name)


def _mtp_modules_in_file(names: set[str], path: str) -> int:
    """Number of MTP modules whose tensors the file holds (0 when it has none)."""
    mtp = {n for n in names if n.startswith("mtp.")}
    if not mtp:
        return 0
    if "mtp.fc.weight" in mtp:
        return 1
    ids = sorted(int(m.group(1)) for n in mtp if (m := re.fullmatch(r"mtp\.(\d+)\.fc\.weight", n)))
    if not ids:
        raise ValueError(f"{path}: has tensors like {sorted(mtp)[0]!r} but neither 'mtp.fc.weight' "
                         "(one MTP module) nor 'mtp.{m}.fc.weight' (one per depth)")
    if ids != list(range(len(ids))):
        raise ValueError(f"{path}: MTP modules must be numbered 0..M-1, found fc weights of {ids}")
    return len(ids)


def mtp_modules_in_checkpoint(path: str | os.PathLike) -> int:
    """How many MTP modules a safetensors checkpoint ships (0: trunk only), from the headers.

    A checkpoint that ships ``mtp.*`` heads (pretrained with CE, as Qwen3-Next's) is
    where pre-RL MTP training should start; one without gets fresh heads.
    """
    path = os.fspath(path)
    with contextlib.ExitStack() as stack:
        return _mtp_modules_in_file(set(_Files(path, stack).shape), path)


def _validate(files: _Files, specs: list[_Spec], config: ModelConfig, with_mtp: bool) -> None:
    """Every expected tensor present with its shape and a float dtype; nothing unexplained left."""
    where = files.path
    summary = (f"hidden_size={config.hidden_size}, num_heads={config.num_heads}, "
               f"num_kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, "
               f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}")
    wanted = [s for s in specs if with_mtp or not is_head_key(s.path[0])]
    for s in wanted:
        if s.name not in files.shape:
            missing = [t.name for t in wanted if t.name not in files.shape]
            raise ValueError(f"{where}: tensor {s.name!r} is missing (expected shape {s.hf_shape} "
                             f"from config.json: {summary}); {len(missing)} expected tensors missing")
        if files.shape[s.name] != s.hf_shape:
            raise ValueError(f"{where}: tensor {s.name!r} has shape {files.shape[s.name]}, expected "
                             f"{s.hf_shape} from config.json ({summary})")
        if files.dtype[s.name] not in _ST_DTYPES:
            raise ValueError(f"{where}: tensor {s.name!r} has dtype {files.dtype[s.name]}, expected "
                             f"one of {sorted(_ST_DTYPES)}")
    known = {s.name for s in wanted}
    extra = sorted(n for n in files.shape if n not in known)
    if config.tie_embeddings and "lm_head.weight" in extra:
        logger.warning("%s: tie_word_embeddings is true; ignoring the stored lm_head.weight", where)
        extra.remove("lm_head.weight")
    if extra:
        raise ValueError(f"{where}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more) that "
                         f"config.json does not account for (num_hidden_layers="
                         f"{config.num_layers}, tie_word_embeddings={config.tie_embeddings}, "
                         f"MTP modules={config.num_mtp_modules if with_mtp else 0})")


def _norm_index(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for sl, dim in zip(index, shape):
        start, stop, step = sl.indices(dim)
        if step != 1:
            raise ValueError(f"strided shard index {index} is not supported")
        out.append((start, stop))
    return tuple(out)


def _read_block(hf_slice, spec: _Spec, block: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The flax-layout block ``block`` (per-dim [start, stop)) of ``spec``, read from its HF slice."""
    s = lambda b: slice(b[0], b[1])
    if spec.kind == "copy":
        return hf_slice[tuple(s(b) for b in block)]
    if spec.kind == "transpose":
        return hf_slice[s(block[1]), s(block[0])].T
    if spec.kind == "heads_in":  # flax [H, N, D] <- HF [N*D, H]
        bh, bn, bd = block
        d = spec.shape[2]
        rows = hf_slice[bn[0] * d:bn[1] * d, s(bh)]  # [n*D, h]
        return rows.T.reshape(bh[1] - bh[0], bn[1] - bn[0], d)[:, :, s(bd)]
    bn, bd, bh = block  # heads_out: flax [N, D, H] <- HF [H, N*D]
    d = spec.shape[1]
    cols = hf_slice[s(bh), bn[0] * d:bn[1] * d]  # [h, n*D]
    return cols.T.reshape(bn[1] - bn[0], d, bh[1] - bh[0])[:, s(bd), :]


def _place(files: _Files, spec: _Spec, sharding, dtype: np.dtype) -> jax.Array:
    """One parameter, built shard by shard from its file slices (only this host's shards)."""
    hf_slice = files.slice(spec.name)
    blocks: dict[tuple, np.ndarray] = {}  # replicated shards read once

    def read(index):
        key = _norm_index(index, spec.shape)
        if key not in blocks:
            blocks[key] = np.ascontiguousarray(_read_block(hf_slice, spec, key).astype(dtype))
        return blocks[key]

    return jax.make_array_from_callback(spec.shape, sharding, read)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_hf_checkpoint(path: str | os.PathLike, mesh: Mesh | None = None, *, dtype: Any = None,
                       num_mtp_depths: int | None = None, num_mtp_modules: int | None = None,
                       key: jax.Array | None = None) -> tuple[ModelConfig, dict]:
    """Load a Qwen3ForCausalLM safetensors checkpoint -> ``(model_config, params)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or sharded
        ``model-*.safetensors`` + ``model.safetensors.index.json``.
      mesh: place each parameter with ``shard_params_for(config, mesh)``; None puts
        everything on this process's first device. Every process of a multi-host run calls
        this with the same mesh; each reads only its own devices' slices.
      dtype: "float32" or "bfloat16" for params and activations; None keeps the
        checkpoint's (its float16 becomes float32).
      num_mtp_depths: K; default ``num_mtp_depths`` of config.json (written by
        ``export_hf_checkpoint``), else the number of MTP modules in the file when
        it has one per depth, else ``ModelConfig``'s default.
      num_mtp_modules: M; must match the file's ``mtp.*`` tensors when it has any;
        default those, else config.json's ``num_mtp_modules``, else 1.
      key: initialises the MTP modules when the file has no ``mtp.*`` tensors
        (default ``jax.random.key(0)``); they equal ``init_params(config, key)``'s.

    Raises ValueError, before any parameter is allocated, on an unsupported
    architecture or config, a missing or unexpected tensor, or a tensor whose shape
    does not match config.json (the message names the tensor and both shapes).
    """
    path = os.fspath(path)
    where = os.path.join(path, CONFIG_FILE)
    hf = _read_json(where)
    if num_mtp_modules is not None and not (isinstance(num_mtp_modules, int) and num_mtp_modules >= 1):
        raise ValueError(f"num_mtp_modules must be None or an int >= 1, got {num_mtp_modules!r}")
    if num_mtp_depths is not None and not (isinstance(num_mtp_depths, int) and num_mtp_depths >= 1):
        raise ValueError(f"num_mtp_depths must be None or an int >= 1, got {num_mtp_depths!r}")
    with contextlib.ExitStack() as stack:
        files = _Files(path, stack)
        in_file = _mtp_modules_in_file(set(files.shape), path)
        if in_file and num_mtp_modules is not None and num_mtp_modules != in_file:
            raise ValueError(f"num_mtp_modules={num_mtp_modules} but {path} holds {in_file} MTP "
                             f"module(s) ({'mtp.*' if in_file == 1 else 'mtp.{m}.*'} tensors)")
        m = in_file or num_mtp_modules or hf.get("num_mtp_modules", 1)
        config = _hf_to_model_config(hf, where, dtype=dtype, num_mtp_depths=num_mtp_depths,
                                     num_mtp_modules=m)
        specs = _all_specs(config)
        _validate(files, specs, config, with_mtp=bool(in_file))

        # -- validated: allocate ----------------------------------------------------------
        if mesh is None:
            device = SingleDeviceSharding(jax.local_devices()[0])
            shardings = {s.path: device for s in specs}
            mtp_shardings = {n: device for n in head_names(config)}
        else:
            tree = shard_params_for(config, mesh)
            shardings = {s.path: _get(tree, s.path) for s in specs}
            mtp_shardings = {n: tree[n] for n in head_names(config)}
        np_dtype = np.dtype(config.param_dtype)
        params: dict = {}
        for s in specs:
            if in_file or not is_head_key(s.path[0]):
                _set(params, s.path, _place(files, s, shardings[s.path], np_dtype))
        if not in_file:
            params.update(init_mtp_params_in(config, jax.random.key(0) if key is None else key, mtp_shardings))
    return config, params


def _get(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------
def _to_host(x) -> np.ndarray:
    """The whole array on this host; on a multi-host mesh an all-gather every process joins."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _to_hf_layout(x: np.ndarray, spec: _Spec) -> np.ndarray:
    if spec.kind == "copy":
        out = x
    elif spec.kind == "transpose":
        out = x.T
    elif spec.kind == "heads_in":
        out = x.reshape(x.shape[0], -1).T
    else:
        out = x.reshape(-1, x.shape[-1]).T
    return np.ascontiguousarray(out)


def export_hf_checkpoint(model_config: ModelConfig, params: Mapping, path: str | os.PathLike, *,
                         max_shard_bytes: int = 4 * 2**30, base_config: Mapping[str, Any] | None = None,
                         overwrite: bool = False) -> list[str]:
    """Write ``params`` as a Qwen3ForCausalLM checkpoint (MTP tensors included).

    One ``model.safetensors`` when it fits in ``max_shard_bytes``, else
    ``model-0000i-of-0000n.safetensors`` files of at most that size (a larger single
    tensor gets a file of its own) plus ``model.safetensors.index.json``; and
    ``config.json``. Tensors keep the params' dtype. Host memory holds at most one
    file's tensors at a time. On a multi-host mesh every process must call this (the
    gathers are collective); process 0 writes. ``base_config`` entries (e.g. the
    source checkpoint's token ids) are carried into config.json where this model's
    own keys do not override them. Returns the written file names.
    """
    path = os.fspath(path)
    if not (isinstance(max_shard_bytes, int) and max_shard_bytes >= 1):
        raise ValueError(f"max_shard_bytes must be an int >= 1, got {max_shard_bytes!r}")
    if base_config is not None and not isinstance(base_config, Mapping):
        raise ValueError(f"base_config must be a mapping or None, got {type(base_config).__name__}")
    specs = _all_specs(model_config)
    flat = {tuple(key_name(k) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for s in specs:
        if s.path not in flat:
            raise ValueError(f"params: missing {'/'.join(s.path)} (HF {s.name}) for this model_config")
        x = flat[s.path]
        if tuple(x.shape) != s.shape:
            raise ValueError(f"params: {'/'.join(s.path)} has shape {tuple(x.shape)}, expected "
                             f"{s.shape} from model_config")
        if np.dtype(x.dtype) not in _NP_TO_CONFIG:
            raise ValueError(f"params: {'/'.join(s.path)} has dtype {x.dtype}; export writes float32 "
                             "or bfloat16")
    extra = sorted(set(flat) - {s.path for s in specs})
    if extra:
        raise ValueError(f"params: {'/'.join(extra[0])} is not a parameter of this model_config")

    groups: list[list[_Spec]] = [[]]
    size = 0
    for s in specs:
        nbytes = int(np.prod(s.shape)) * np.dtype(flat[s.path].dtype).itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += nbytes
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        old = [f for f in os.listdir(path) if f in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(f)]
        if old and not overwrite:
            raise ValueError(f"{path} already holds a checkpoint ({sorted(old)[0]}); pass overwrite=True")
        for f in old:
            os.remove(os.path.join(path, f))
    weight_map, total = {}, 0
    for fname, group in zip(names, groups):
        tensors = {s.name: _to_hf_layout(_to_host(flat[s.path]), s) for s in group}
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: fname for name in tensors})
        if writer:
            save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
    if writer:
        if n > 1:
            with open(os.path.join(path, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        dropped = ("torch_dtype", "transformers_version")
        cfg = {k: v for k, v in (base_config or {}).items() if k not in dropped}
        cfg.update(model_config_to_hf(model_config))
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(cfg, f, indent=2)
    return names + ([INDEX_FILE] if n > 1 else []) + [CONFIG_FILE]
