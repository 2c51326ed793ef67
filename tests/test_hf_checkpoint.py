"""Hugging Face Qwen3 checkpoints in and out (bebop_jax.model.hf).

The reference is transformers' own Qwen3ForCausalLM on tiny random configs (torch,
CPU, float32). Every weight, norms included, is randomised so a wrong layout or norm
convention cannot hide behind ones and zeros. Most checkpoints carry injected
``mtp.*`` tensors, so only one test pays for compiling a fresh MTP init.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm

from bebop_jax.config import MeshConfig
from bebop_jax.model import Policy, hf, init_mtp_params, init_params, shard_params_for
from bebop_jax.model.hf import export_hf_checkpoint, load_hf_checkpoint
from bebop_jax.parallel import make_mesh

V, H, I, L, N, D = 64, 32, 48, 2, 4, 8
T = 12


# -- building checkpoints ----------------------------------------------------------------------
def _hf_config(num_kv_heads: int, tied: bool) -> Qwen3Config:
    return Qwen3Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                       num_attention_heads=N, num_key_value_heads=num_kv_heads, head_dim=D,
                       tie_word_embeddings=tied, max_position_embeddings=64, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0})


def _mtp_tensors(prefix: str, rng: np.random.RandomState, num_kv_heads: int) -> dict:
    """Random Qwen3-Next-named tensors of one MTP module (HF layouts, [out, in])."""
    r = lambda *s: (0.2 * rng.randn(*s)).astype(np.float32)
    norm = lambda n: (1.0 + 0.3 * rng.randn(n)).astype(np.float32)
    layer = f"{prefix}.layers.0"
    return {
        f"{prefix}.pre_fc_norm_embedding.weight": norm(H), f"{prefix}.pre_fc_norm_hidden.weight": norm(H),
        f"{prefix}.fc.weight": r(H, 2 * H), f"{prefix}.norm.weight": norm(H),
        f"{layer}.input_layernorm.weight": norm(H), f"{layer}.post_attention_layernorm.weight": norm(H),
        f"{layer}.self_attn.q_proj.weight": r(N * D, H),
        f"{layer}.self_attn.k_proj.weight": r(num_kv_heads * D, H),
        f"{layer}.self_attn.v_proj.weight": r(num_kv_heads * D, H),
        f"{layer}.self_attn.o_proj.weight": r(H, N * D),
        f"{layer}.self_attn.q_norm.weight": norm(D), f"{layer}.self_attn.k_norm.weight": norm(D),
        f"{layer}.mlp.gate_proj.weight": r(I, H), f"{layer}.mlp.up_proj.weight": r(I, H),
        f"{layer}.mlp.down_proj.weight": r(H, I),
    }


def _add_tensors_as_second_file(path, extra: dict) -> None:
    """Turn a single-file checkpoint into a two-file one (with index) whose second file holds ``extra``."""
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    os.rename(os.path.join(path, hf.SINGLE_FILE), os.path.join(path, first))
    save_file(extra, os.path.join(path, second), metadata={"format": "pt"})
    with safe_open(os.path.join(path, first), "numpy") as f:
        weight_map = {k: first for k in f.keys()}
    weight_map.update({k: second for k in extra})
    with open(os.path.join(path, hf.INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _save_hf(tmp_path_factory, num_kv_heads: int, tied: bool, seed: int, with_mtp: bool):
    """A random transformers Qwen3 saved with save_pretrained (+ injected mtp.* tensors)."""
    model = Qwen3ForCausalLM(_hf_config(num_kv_heads, tied)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.2 * noise)
    path = str(tmp_path_factory.mktemp(f"hf_kv{num_kv_heads}_tied{int(tied)}_mtp{int(with_mtp)}"))
    model.save_pretrained(path, safe_serialization=True)
    mtp = _mtp_tensors("mtp", np.random.RandomState(seed + 100), num_kv_heads) if with_mtp else {}
    if with_mtp:
        _add_tensors_as_second_file(path, mtp)
    return model, path, mtp


CASES = {"gqa1_tied": (4, True), "gqa4_untied": (1, False)}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """GQA ratio 1 with tied embeddings, GQA ratio 4 untied; both with one MTP module."""
    return {name: _save_hf(tmp_path_factory, kv, tied, seed=i, with_mtp=True)
            for i, (name, (kv, tied)) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def kv2_plain(tmp_path_factory):
    """GQA ratio 2, untied, one safetensors file, no MTP tensors: what a real Qwen3 looks like."""
    return _save_hf(tmp_path_factory, num_kv_heads=2, tied=False, seed=6, with_mtp=False)


@pytest.fixture(scope="module")
def kv2_mtp(tmp_path_factory):
    """GQA ratio 2, untied, with MTP tensors: every kind of parameter splits on a (2, 2, 2) mesh."""
    return _save_hf(tmp_path_factory, num_kv_heads=2, tied=False, seed=7, with_mtp=True)


# -- helpers ------------------------------------------------------------------------------------
def _tokens(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, V, (2, T)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens):
    return Policy(config).apply({"params": params}, tokens)


def _logits(config, params, tokens) -> np.ndarray:
    return np.asarray(_forward(config, params, jnp.asarray(tokens)).logits)


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _flat(params) -> dict:
    return {"/".join(str(k.key) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_trees_equal(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _read_all(path) -> dict:
    out = {}
    for fname in os.listdir(path):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), "numpy") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _copy(path, tmp_path) -> str:
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return str(dst)


# -- parity with transformers -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_and_survive_round_trip(hf_checkpoints, case, tmp_path):
    model, path, mtp = hf_checkpoints[case]
    tokens = _tokens()
    ref = _hf_logits(model, tokens)
    assert np.abs(ref).max() > 1.0  # logits far from zero: the tolerance below means something

    config, params = load_hf_checkpoint(path, num_mtp_depths=1)
    assert (config.num_kv_heads, config.tie_embeddings) == (model.config.num_key_value_heads,
                                                            model.config.tie_word_embeddings)
    assert config.rope_theta == 500.0 and config.rms_norm_eps == 1e-5 and config.max_seq_len == 64
    assert ("lm_head" in params) == (not config.tie_embeddings)
    np.testing.assert_allclose(_logits(config, params, tokens), ref, atol=1e-4, rtol=0)

    # load -> export (split into several files) -> load is lossless
    out = tmp_path / "exported"
    written = export_hf_checkpoint(config, params, out, max_shard_bytes=20_000)
    assert hf.INDEX_FILE in written and sum(w.endswith(".safetensors") for w in written) > 1
    config2, params2 = load_hf_checkpoint(out)
    assert config2 == config
    _assert_trees_equal(params2, params)
    np.testing.assert_allclose(_logits(config2, params2, tokens), ref, atol=1e-4, rtol=0)

    # every tensor comes back bit for bit, and transformers reads the export as a plain
    # Qwen3 (it ignores the mtp.* tensors and our two config keys)
    original, exported = _read_all(path), _read_all(out)
    assert exported.keys() == original.keys() and set(mtp) < set(exported)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    reread = Qwen3ForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(reread, tokens), ref, atol=1e-5, rtol=0)


def test_bfloat16_load_and_export_keep_dtype(hf_checkpoints, tmp_path):
    _, path, _ = hf_checkpoints["gqa4_untied"]
    _, params32 = load_hf_checkpoint(path)
    config, params = load_hf_checkpoint(path, dtype="bfloat16")
    assert config.param_dtype == config.dtype == "bfloat16"
    _assert_trees_equal(params, jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params32))
    export_hf_checkpoint(config, params, tmp_path)
    with safe_open(tmp_path / hf.SINGLE_FILE, "numpy") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    config2, params2 = load_hf_checkpoint(tmp_path)  # dtype=None keeps the file's
    assert config2 == config
    _assert_trees_equal(params2, params)


# -- MTP tensors --------------------------------------------------------------------------------
def _torch_mtp_depth1(model, mtp: dict, tokens: np.ndarray) -> np.ndarray:
    """Depth-1 draft logits in torch:
    fc(cat[norm_e(embed(x_{t+1})), norm_h(h_t)]) -> decoder layer -> norm -> LM head."""
    cfg = model.config
    captured = {}
    hook = model.model.norm.register_forward_pre_hook(lambda _, args: captured.setdefault("h", args[0]))
    tok = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        model(tok)  # h_t: the trunk's residual stream before its final norm
        hook.remove()
        next_tok = torch.cat([tok[:, 1:], torch.zeros_like(tok[:, :1])], dim=1)  # x_{t+1}, pad 0
        norm_e, norm_h, norm_out = (Qwen3RMSNorm(H, cfg.rms_norm_eps) for _ in range(3))
        norm_e.weight.copy_(torch.from_numpy(mtp["mtp.pre_fc_norm_embedding.weight"]))
        norm_h.weight.copy_(torch.from_numpy(mtp["mtp.pre_fc_norm_hidden.weight"]))
        norm_out.weight.copy_(torch.from_numpy(mtp["mtp.norm.weight"]))
        layer = Qwen3DecoderLayer(cfg, layer_idx=0).eval()
        layer.load_state_dict({k[len("mtp.layers.0."):]: torch.from_numpy(v)
                               for k, v in mtp.items() if k.startswith("mtp.layers.0.")})
        x = torch.cat([norm_e(model.model.embed_tokens(next_tok)), norm_h(captured["h"])], dim=-1)
        x = x @ torch.from_numpy(mtp["mtp.fc.weight"]).T
        pos = torch.arange(T)[None].expand(tokens.shape[0], T)
        causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
        x = layer(x, attention_mask=causal, position_ids=pos,
                  position_embeddings=model.model.rotary_emb(x, pos))
        return model.lm_head(norm_out(x)).numpy()


@pytest.mark.slow
def test_mtp_tensors_load_exactly_match_torch_and_survive_export(kv2_mtp, tmp_path):
    model, path, mtp = kv2_mtp
    config, params = load_hf_checkpoint(path, num_mtp_depths=2)
    assert (config.num_mtp_depths, config.num_mtp_modules) == (2, 1)
    assert hf.mtp_modules_in_checkpoint(path) == 1
    m0 = params["mtp_0"]
    np.testing.assert_array_equal(m0["fc"], mtp["mtp.fc.weight"].T)  # [2H, H]: embedding rows first
    np.testing.assert_array_equal(m0["pre_fc_norm_embedding"]["scale"],
                                  mtp["mtp.pre_fc_norm_embedding.weight"])
    np.testing.assert_array_equal(m0["layer"]["self_attn"]["o_proj"],
                                  mtp["mtp.layers.0.self_attn.o_proj.weight"].T.reshape(N, D, H))

    # the loaded module computes what the same weights compute in torch (depth 1)
    tokens = _tokens(3)
    out = _forward(config, params, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(out.mtp_logits[:, :, 0]), _torch_mtp_depth1(model, mtp, tokens),
                               atol=1e-4, rtol=0)

    export_hf_checkpoint(config, params, tmp_path)
    exported = _read_all(tmp_path)
    for name, value in mtp.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    config2, params2 = load_hf_checkpoint(tmp_path)
    assert config2 == config  # K = 2 comes back from config.json's num_mtp_depths
    _assert_trees_equal(params2, params)


def test_fresh_mtp_module_is_the_projects_init_in_its_sharding(kv2_plain):
    _, path, _ = kv2_plain
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, model=2))
    key = jax.random.key(7)
    config, params = load_hf_checkpoint(path, mesh, num_mtp_depths=1, key=key)
    assert hf.mtp_modules_in_checkpoint(path) == 0
    # no mtp.* tensors: the module is init_params' own, made in place (jit drops the trunk's init)
    fresh = jax.jit(lambda k: init_params(config, k)["mtp_0"])(key)
    _assert_trees_equal(params["mtp_0"], fresh)
    flat = jax.tree_util.tree_flatten_with_path(params["mtp_0"])[0]
    expected = dict(jax.tree_util.tree_flatten_with_path(shard_params_for(config, mesh)["mtp_0"])[0])
    assert all(x.sharding == expected[p] for p, x in flat)
    assert sum(any(s is not None for s in x.sharding.spec) for _, x in flat) >= 6
    again = init_mtp_params(config, key, mesh)  # the public MTP-only init gives the same
    _assert_trees_equal(again, {"mtp_0": params["mtp_0"]})
    assert jax.tree.all(jax.tree.map(lambda a, b: a.sharding == b.sharding, again["mtp_0"], params["mtp_0"]))


def test_one_module_per_depth_is_named_mtp_m_and_round_trips(kv2_plain, tmp_path):
    model, path, _ = kv2_plain
    path = _copy(path, tmp_path)
    rng = np.random.RandomState(11)
    modules = [_mtp_tensors(f"mtp.{m}", rng, num_kv_heads=2) for m in range(3)]
    _add_tensors_as_second_file(path, {k: v for t in modules for k, v in t.items()})
    config, params = load_hf_checkpoint(path)  # K defaults to the 3 modules found
    assert (config.num_mtp_depths, config.num_mtp_modules) == (3, 3)
    assert hf.mtp_modules_in_checkpoint(path) == 3
    for m in range(3):
        np.testing.assert_array_equal(params[f"mtp_{m}"]["layer"]["mlp"]["down_proj"],
                                      modules[m][f"mtp.{m}.layers.0.mlp.down_proj.weight"].T)
    export_hf_checkpoint(config, params, tmp_path / "exported",
                         base_config={"eos_token_id": 151645, "architectures": ["Other"],
                                      "rope_scaling": {"type": "yarn"}})
    with open(tmp_path / "exported" / hf.CONFIG_FILE) as f:
        written = json.load(f)  # the source's extra keys survive; the model's own keys win
    assert written["eos_token_id"] == 151645 and written["architectures"] == [hf.ARCHITECTURE]
    assert written["rope_scaling"] is None and written["num_mtp_modules"] == 3
    exported = _read_all(tmp_path / "exported")
    for name, value in {k: v for t in modules for k, v in t.items()}.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert not any(n.startswith("mtp.layers.") or n == "mtp.fc.weight" for n in exported)
    config2, params2 = load_hf_checkpoint(tmp_path / "exported")
    assert config2 == config
    _assert_trees_equal(params2, params)
    with pytest.raises(ValueError, match=r"num_mtp_modules=1 but .* holds 3 MTP"):
        load_hf_checkpoint(path, num_mtp_modules=1)
    with pytest.raises(ValueError, match="num_mtp_depths=2 does not fit 3 MTP modules"):
        load_hf_checkpoint(path, num_mtp_depths=2)  # 3 modules cannot serve 2 depths


# -- sharded placement --------------------------------------------------------------------------
def test_sharded_load_places_every_param_with_the_rules_sharding(kv2_mtp, monkeypatch):
    assert jax.device_count() == 8
    _, path, _ = kv2_mtp
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, model=2))
    reads = {}  # HF name -> element counts of every read from its file slice
    open_slice = hf._Files.slice

    class Recorder:
        def __init__(self, name, sl):
            self.name, self.sl = name, sl

        def __getitem__(self, index):
            block = self.sl[index]
            reads.setdefault(self.name, []).append(block.size)
            return block

    with monkeypatch.context() as m:
        m.setattr(hf._Files, "slice", lambda files, name: Recorder(name, open_slice(files, name)))
        config, params = load_hf_checkpoint(path, mesh)
    hf_name = {s.path: s.name for s in hf._all_specs(config)}
    _, unsharded = load_hf_checkpoint(path)
    expected = dict(jax.tree_util.tree_flatten_with_path(shard_params_for(config, mesh))[0])
    reference = dict(jax.tree_util.tree_flatten_with_path(unsharded)[0])
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(flat) == len(expected) == len(reference)
    num_split = 0
    for path_, x in flat:
        assert x.sharding == expected[path_], jax.tree_util.keystr(path_)
        split = any(s is not None for s in x.sharding.spec)
        num_split += split
        for shard in x.addressable_shards:  # every device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(reference[path_])[shard.index])
        # a split parameter is read slice by slice, never whole (and each distinct slice once)
        sizes = reads[hf_name[tuple(k.key for k in path_)]]
        distinct = len({str(shard.index) for shard in x.addressable_shards})
        assert len(sizes) == distinct and sum(sizes) == x.size
        assert max(sizes) < x.size if split else sizes == [x.size]
    assert num_split >= 20  # embedding, head, projections and MLPs (trunk and MTP) really are split


# -- config.json ---------------------------------------------------------------------------------
def test_transformers_4_style_qwen3_config_maps_to_model_config():
    """The config.json layout of the released Qwen3 checkpoints (top-level rope_theta,
    rope_scaling null, torch_dtype), here with Qwen3-0.6B's sizes."""
    released = {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936}
    config = hf._hf_to_model_config(released, "config.json", dtype=None, num_mtp_depths=None,
                                    num_mtp_modules=1)
    assert config == dataclasses.replace(
        config, vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
        head_dim=128, intermediate_size=3072, rope_theta=1e6, rms_norm_eps=1e-6, tie_embeddings=True,
        max_seq_len=40960, dtype="bfloat16", param_dtype="bfloat16")
    assert (config.num_mtp_depths, config.num_mtp_modules) == (3, 1)  # ModelConfig's default K
    specs = {s.name: s.hf_shape for s in hf._all_specs(config)}
    assert specs["model.layers.27.self_attn.q_proj.weight"] == (2048, 1024)
    assert specs["model.layers.0.self_attn.k_proj.weight"] == (1024, 1024)
    assert specs["mtp.fc.weight"] == (1024, 2048) and "lm_head.weight" not in specs
    assert hf._hf_to_model_config(released, "config.json", dtype="float32", num_mtp_depths=2,
                                  num_mtp_modules=2).param_dtype == "float32"


# -- validation before allocation ---------------------------------------------------------------
@pytest.fixture()
def no_allocation(monkeypatch):
    """Record (and refuse) any allocation the loader attempts."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("allocated before validation finished")

    monkeypatch.setattr(hf, "_place", refuse)
    monkeypatch.setattr(hf, "init_mtp_params_in", refuse)
    return calls


def _broken(good, tmp_path, *, config=None, edit=None) -> str:
    path = _copy(good, tmp_path)
    if config:
        with open(os.path.join(path, hf.CONFIG_FILE)) as f:
            cfg = json.load(f)
        cfg.update(config)
        with open(os.path.join(path, hf.CONFIG_FILE), "w") as f:
            json.dump(cfg, f)
    if edit:
        file = os.path.join(path, hf.SINGLE_FILE)
        with safe_open(file, "numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("config, edit, match", [
    (None, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"tensor 'model.layers.1.mlp.up_proj.weight' is missing \(expected shape \(48, 32\)"),
    ({"intermediate_size": 40}, None,
     r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(48, 32\), expected \(40, 32\)"),
    ({"num_key_value_heads": 4}, None,
     r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(16, 32\), expected \(32, 32\)"),
    ({"num_hidden_layers": 1}, None, r"unexpected tensor 'model.layers.1\."),
    ({"tie_word_embeddings": True}, lambda t: t.pop("model.embed_tokens.weight"),
     r"tensor 'model.embed_tokens.weight' is missing"),
    ({"architectures": ["LlamaForCausalLM"]}, None, r"architecture 'LlamaForCausalLM' is not supported"),
    ({"architectures": ["Qwen3NextForCausalLM"]}, None,
     r"architecture 'Qwen3NextForCausalLM' is not supported \(its trunk mixes"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0}}, None,
     r"rope_type 'yarn' is not implemented"),
    ({"attention_bias": True}, None, r"attention_bias=true is not supported"),
    (None, lambda t: t.update({"mtp.fc.weight": np.zeros((H, 2 * H), np.float32)}),
     r"tensor 'mtp.pre_fc_norm_embedding.weight' is missing"),
    (None, lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"].astype(np.int32)}),
     r"tensor 'model.embed_tokens.weight' has dtype I32"),
], ids=["missing", "wrong_mlp_width", "wrong_kv_heads", "extra_layer", "tied_without_embed",
        "llama", "qwen3_next", "yarn", "bias", "partial_mtp", "int_dtype"])
def test_bad_checkpoint_fails_naming_the_problem_before_allocating(kv2_plain, tmp_path, no_allocation,
                                                                   config, edit, match):
    path = _broken(kv2_plain[1], tmp_path, config=config, edit=edit)
    with pytest.raises(ValueError, match=match):
        load_hf_checkpoint(path, make_mesh(MeshConfig(data=2, fsdp=2, model=2)))
    assert no_allocation == []


def test_good_checkpoint_does_allocate(kv2_plain, no_allocation):
    """The guard above is live: a valid checkpoint reaches the allocation step."""
    with pytest.raises(AssertionError, match="allocated"):
        load_hf_checkpoint(kv2_plain[1])
    assert len(no_allocation) == 1


def test_export_refuses_params_that_do_not_fit_the_config(kv2_mtp, tmp_path):
    config, params = load_hf_checkpoint(kv2_mtp[1])
    good = dict(params)
    params["layers_0"] = dict(params["layers_0"], mlp=dict(params["layers_0"]["mlp"]))
    params["layers_0"]["mlp"]["up_proj"] = params["layers_0"]["mlp"]["up_proj"][:, :40]
    with pytest.raises(ValueError, match=r"layers_0/mlp/up_proj has shape \(32, 40\), expected \(32, 48\)"):
        export_hf_checkpoint(config, params, tmp_path / "a")
    export_hf_checkpoint(config, good, tmp_path / "b")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        export_hf_checkpoint(config, good, tmp_path / "b")
    export_hf_checkpoint(config, good, tmp_path / "b", overwrite=True)


def test_narrow_mtp_mlp_round_trips_and_is_named_in_config_json(tmp_path):
    from bebop_jax.config import ModelConfig
    config = ModelConfig.tiny(num_mtp_depths=2, mtp_intermediate_size=8)
    params = init_params(config, jax.random.key(5))
    export_hf_checkpoint(config, params, tmp_path / "narrow")
    with open(tmp_path / "narrow" / hf.CONFIG_FILE) as f:
        assert json.load(f)["mtp_intermediate_size"] == 8
    assert _read_all(tmp_path / "narrow")["mtp.layers.0.mlp.up_proj.weight"].shape == (8, config.hidden_size)
    config2, params2 = load_hf_checkpoint(tmp_path / "narrow")
    assert config2 == config
    _assert_trees_equal(params2, params)
    plain = ModelConfig.tiny(num_mtp_depths=2)  # the same width as the trunk writes no extra key
    export_hf_checkpoint(plain, init_params(plain, jax.random.key(5)), tmp_path / "plain")
    with open(tmp_path / "plain" / hf.CONFIG_FILE) as f:
        assert "mtp_intermediate_size" not in json.load(f)
