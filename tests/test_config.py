"""Config validation: every checked field of every config dataclass raises a ValueError
that names it, at construction, before anything is built or compiled.

The table below is checked for completeness against the dataclass fields, so a field
added to a config without a validation case (or an explicit "unchecked" entry) fails here.
"""

import dataclasses
import math

import pytest

from bebop_jax import config as C
from bebop_jax.sampling import SamplingConfig

INF = math.inf

# (config class, constructor kwargs, field the message must name). ModelConfig cases go
# through ModelConfig.tiny so every other field is valid.
BAD = [
    # ModelConfig: positive ints (0, negative, float, bool are all rejected).
    (C.ModelConfig, dict(hidden_size=0), "hidden_size"),
    (C.ModelConfig, dict(hidden_size=32.0), "hidden_size"),
    (C.ModelConfig, dict(num_layers=0), "num_layers"),
    (C.ModelConfig, dict(num_layers=True), "num_layers"),
    (C.ModelConfig, dict(num_heads=-4), "num_heads"),
    (C.ModelConfig, dict(num_kv_heads=0), "num_kv_heads"),
    (C.ModelConfig, dict(num_kv_heads=3), "num_kv_heads"),  # does not divide num_heads=4
    (C.ModelConfig, dict(head_dim=0), "head_dim"),
    (C.ModelConfig, dict(head_dim=7), "head_dim"),  # odd: no rotary pairs
    (C.ModelConfig, dict(intermediate_size=0), "intermediate_size"),
    (C.ModelConfig, dict(max_seq_len=0), "max_seq_len"),
    (C.ModelConfig, dict(num_mtp_depths=0), "num_mtp_depths"),  # K < 1
    (C.ModelConfig, dict(num_mtp_modules=0), "num_mtp_modules"),
    (C.ModelConfig, dict(mtp_intermediate_size=0), "mtp_intermediate_size"),
    (C.ModelConfig, dict(num_mtp_depths=3, num_mtp_modules=2), "num_mtp_modules"),  # not 1 or K
    (C.ModelConfig, dict(num_mtp_depths=2, num_mtp_modules=3), "num_mtp_modules"),
    (C.ModelConfig, dict(vocab_size=1), "vocab_size"),
    (C.ModelConfig, dict(vocab_impl="sparse"), "vocab_impl"),
    (C.ModelConfig, dict(vocab_chunk=0), "vocab_chunk"),
    (C.ModelConfig, dict(vocab_size=64.0), "vocab_size"),
    (C.ModelConfig, dict(rope_theta=0.0), "rope_theta"),
    (C.ModelConfig, dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (C.ModelConfig, dict(dtype="float16"), "dtype"),
    (C.ModelConfig, dict(param_dtype="int8"), "param_dtype"),
    # MTPConfig
    (C.MTPConfig, dict(loss="mse"), "loss"),
    (C.MTPConfig, dict(mode="frozen"), "mode"),
    (C.MTPConfig, dict(mtp_weight=-0.5), "mtp_weight"),
    (C.MTPConfig, dict(mtp_weight=math.nan), "mtp_weight"),
    (C.MTPConfig, dict(temperature=-1.0), "temperature"),
    (C.MTPConfig, dict(temperature=0.0), "temperature"),  # a loss needs a distribution
    (C.MTPConfig, dict(temperature=math.nan), "temperature"),
    # SpecConfig
    (C.SpecConfig, dict(method="typical"), "method"),
    (C.SpecConfig, dict(num_draft=0), "num_draft"),
    (C.SpecConfig, dict(num_draft=True), "num_draft"),
    (C.SpecConfig, dict(method="none", adaptive=True), "adaptive"),  # nothing to adapt
    (C.SpecConfig, dict(method="rejection", adaptive=1), "adaptive"),
    # GRPOConfig
    (C.GRPOConfig, dict(group_size=1), "group_size"),
    (C.GRPOConfig, dict(group_size=True), "group_size"),
    (C.GRPOConfig, dict(clip_low=-0.1), "clip_low"),
    (C.GRPOConfig, dict(clip_low=1.0), "clip_low"),
    (C.GRPOConfig, dict(clip_high=-0.1), "clip_high"),
    (C.GRPOConfig, dict(aggregation="sequence-mean"), "aggregation"),
    (C.GRPOConfig, dict(std_normalize=1), "std_normalize"),
    (C.GRPOConfig, dict(kl_coef=-0.01), "kl_coef"),
    (C.GRPOConfig, dict(is_cap=0.0), "is_cap"),
    (C.GRPOConfig, dict(is_cap=INF), "is_cap"),
    (C.GRPOConfig, dict(updates_per_batch=0), "updates_per_batch"),
    # RLConfig
    (C.RLConfig, dict(num_steps=0), "num_steps"),
    (C.RLConfig, dict(prompts_per_step=0), "prompts_per_step"),
    (C.RLConfig, dict(max_new_tokens=0), "max_new_tokens"),
    (C.RLConfig, dict(prompt_len=0), "prompt_len"),
    (C.RLConfig, dict(temperature=0.0), "temperature"),  # RL needs a sampling distribution
    (C.RLConfig, dict(temperature=INF), "temperature"),
    (C.RLConfig, dict(decode_batch=0), "decode_batch"),
    (C.RLConfig, dict(max_turns=0), "max_turns"),
    (C.RLConfig, dict(eval_every=0), "eval_every"),
    (C.RLConfig, dict(eval_prompts=-1), "eval_prompts"),
    (C.RLConfig, dict(eval_samples=0), "eval_samples"),
    (C.RLConfig, dict(ckpt_every=0), "ckpt_every"),
    (C.RLConfig, dict(seed=1.5), "seed"),
    (C.RLConfig, dict(mtp_strategy="online_mse"), "mtp_strategy"),
    (C.RLConfig, dict(mtp_learning_rate=0.0), "mtp_learning_rate"),
    (C.RLConfig, dict(async_rollouts=1), "async_rollouts"),
    (C.RLConfig, dict(max_staleness=-1), "max_staleness"),
    (C.RLConfig, dict(rollout_devices=-1), "rollout_devices"),
    (C.RLConfig, dict(rollout_devices=4), "rollout_devices"),  # a rollout mesh needs async rollouts
    # OptimizerConfig
    (C.OptimizerConfig, dict(learning_rate=0.0), "learning_rate"),
    (C.OptimizerConfig, dict(warmup_steps=-1), "warmup_steps"),
    (C.OptimizerConfig, dict(warmup_steps=1.5), "warmup_steps"),
    (C.OptimizerConfig, dict(warmup_steps=10, decay_steps=10), "decay_steps"),
    (C.OptimizerConfig, dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (C.OptimizerConfig, dict(min_lr_ratio=-0.1), "min_lr_ratio"),
    (C.OptimizerConfig, dict(weight_decay=-1e-3), "weight_decay"),
    (C.OptimizerConfig, dict(b1=1.0), "b1"),
    (C.OptimizerConfig, dict(b2=-0.1), "b2"),
    (C.OptimizerConfig, dict(eps=0.0), "eps"),
    (C.OptimizerConfig, dict(clip_norm=0.0), "clip_norm"),
    # MeshConfig
    (C.MeshConfig, dict(data=0), "data"),
    (C.MeshConfig, dict(fsdp=-2), "fsdp"),
    (C.MeshConfig, dict(model=1.5), "model"),
    (C.MeshConfig, dict(data=-1, model=-1), "data"),  # at most one fill axis
    # TrainConfig
    (C.TrainConfig, dict(batch_size=0), "batch_size"),
    (C.TrainConfig, dict(seq_len=1), "seq_len"),  # a next-token target needs two tokens
    (C.TrainConfig, dict(num_steps=0), "num_steps"),
    (C.TrainConfig, dict(log_every=0), "log_every"),
    (C.TrainConfig, dict(ckpt_every=-5), "ckpt_every"),
    # SamplingConfig (defined in sampling.py, re-exported by config.py)
    (SamplingConfig, dict(temperature=-1.0), "temperature"),
    (SamplingConfig, dict(temperature=INF), "temperature"),
    (SamplingConfig, dict(top_k=-1), "top_k"),
    (SamplingConfig, dict(top_k=2.5), "top_k"),
    (SamplingConfig, dict(top_p=0.0), "top_p"),
    (SamplingConfig, dict(top_p=1.5), "top_p"),
]

# Fields with no validity constraint, and why.
UNCHECKED = {
    ("ModelConfig", "tie_embeddings"): "a flag; both values are valid",
    ("TrainConfig", "seed"): "any int is a valid seed",
}

CONFIG_CLASSES = (C.ModelConfig, C.MTPConfig, C.SpecConfig, C.OptimizerConfig, C.MeshConfig,
                  C.TrainConfig, SamplingConfig, C.GRPOConfig, C.RLConfig)


def test_every_config_dataclass_is_listed():
    """A new config dataclass in config.py must join CONFIG_CLASSES (and the table)."""
    defined = {obj for obj in vars(C).values()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj)}
    assert defined <= set(CONFIG_CLASSES), defined - set(CONFIG_CLASSES)


def _build(cls, kwargs):
    return cls.tiny(**kwargs) if cls is C.ModelConfig else cls(**kwargs)


def _case_id(case):
    cls, kwargs, _ = case
    return f"{cls.__name__}-" + "-".join(f"{k}={v!r}" for k, v in kwargs.items())


@pytest.mark.parametrize("case", BAD, ids=[_case_id(c) for c in BAD])
def test_invalid_field_raises_naming_it(case):
    cls, kwargs, field = case
    if cls is SamplingConfig:  # sampling.py words its messages "<field> must ..."
        pattern = rf"^{field}\b"
    else:  # config.py: "<Class>.<field>: why"
        pattern = rf"^{cls.__name__}\.{field}: "
    with pytest.raises(ValueError, match=pattern):
        _build(cls, kwargs)


def test_table_covers_every_field():
    covered = {(cls.__name__, field) for cls, _, field in BAD}
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            key = (cls.__name__, f.name)
            assert key in covered or key in UNCHECKED, f"no validation case for {key}"
    assert not set(UNCHECKED) & covered


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_defaults_valid_frozen_and_strict(cls):
    cfg = cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, dataclasses.fields(cls)[0].name, None)
    with pytest.raises(TypeError):  # unknown keys fail instead of being ignored
        cls(not_a_field=1)


def test_model_presets_and_replace_revalidate():
    tiny, small = C.ModelConfig.tiny(), C.ModelConfig.small()
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_layers) == (64, 32, 2)
    assert small.num_layers > tiny.num_layers and small.hidden_size > tiny.hidden_size
    assert C.ModelConfig.tiny(num_layers=3).num_layers == 3
    with pytest.raises(TypeError):
        C.ModelConfig.tiny(num_layer=3)  # typo of a field name
    per_depth = C.ModelConfig.tiny(num_mtp_depths=3, num_mtp_modules=3)
    # Shrinking K without M breaks "M is 1 or K": replace() re-runs __post_init__.
    with pytest.raises(ValueError, match=r"^ModelConfig\.num_mtp_modules: "):
        dataclasses.replace(per_depth, num_mtp_depths=2)


def test_mtp_module_for_depth():
    assert C.ModelConfig.tiny(num_mtp_depths=3, num_mtp_modules=1).mtp_module_for_depth == (0, 0, 0)
    assert C.ModelConfig.tiny(num_mtp_depths=3, num_mtp_modules=3).mtp_module_for_depth == (0, 1, 2)
    assert C.ModelConfig.tiny(num_mtp_depths=1, num_mtp_modules=1).mtp_module_for_depth == (0,)


def test_mesh_shape_for():
    assert C.MeshConfig().shape_for(8) == (8, 1, 1)
    assert C.MeshConfig(data=2, fsdp=2, model=2).shape_for(8) == (2, 2, 2)
    assert C.MeshConfig(data=1, fsdp=-1, model=2).shape_for(8) == (1, 4, 2)
    with pytest.raises(ValueError, match="MeshConfig"):
        C.MeshConfig(data=2, fsdp=2, model=2).shape_for(4)  # product 8 != 4 devices
    with pytest.raises(ValueError, match="MeshConfig"):
        C.MeshConfig(data=-1, model=3).shape_for(8)  # 3 does not divide 8


@pytest.mark.parametrize("cls,field", [
    (C.MTPConfig, "temperature"),
    (C.MTPConfig, "mtp_weight"),
    (C.OptimizerConfig, "learning_rate"),
    (C.ModelConfig, "rope_theta"),
    (C.ModelConfig, "rms_norm_eps"),
])
def test_non_finite_floats_rejected(cls, field):
    """inf passes a bare `> 0` check; it must fail at construction like nan does.

    (SamplingConfig already rejects an infinite temperature; an infinite MTP temperature
    or learning rate otherwise surfaces only at trace time or as nan parameters.)
    """
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field}: "):
        _build(cls, {field: INF})


def test_valid_enumerations_accepted():
    from bebop_jax import losses
    assert set(C.LOSS_NAMES) == set(losses.LOSSES)
    for name in C.LOSS_NAMES:
        assert C.MTPConfig(loss=name).loss == name
    for mode in ("mtp_only", "joint", "trunk_only"):
        assert C.MTPConfig(mode=mode).mode == mode
    for method in ("none", "greedy", "rejection"):
        assert C.SpecConfig(method=method).method == method
    assert SamplingConfig(temperature=0.0).greedy  # 0 = greedy is valid for sampling, not losses


def test_vocab_impl_auto_chunks_large_vocabularies_only():
    assert not C.ModelConfig.tiny().chunked_vocab
    assert C.ModelConfig.tiny(vocab_size=C.CHUNKED_VOCAB_FROM).chunked_vocab
    assert not C.ModelConfig.tiny(vocab_size=151_936, vocab_impl="dense").chunked_vocab
    assert C.ModelConfig.tiny(vocab_impl="chunked").chunked_vocab
