"""Frozen dataclass configs, validated in ``__post_init__``.

Every config fails at construction with a ``ValueError`` that names the field
and says why, so a bad command line never reaches a compile. Shrink configs in
tests with ``dataclasses.replace(cfg, num_layers=2)``; experiments get a CLI
from these dataclasses through ``tyro``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from bebop_jax.aggregations import AGGREGATIONS
from bebop_jax.sampling import SamplingConfig  # noqa: F401  (re-exported: one home per config)

DTYPES = ("float32", "bfloat16")
VOCAB_IMPLS = ("auto", "dense", "chunked", "pallas")
CHUNKED_VOCAB_FROM = 32_768  # vocab_impl="auto" reduces over vocabulary chunks from this size on


def _check(cond: bool, cls: str, field: str, why: str) -> None:
    if not cond:
        raise ValueError(f"{cls}.{field}: {why}")


def _positive_ints(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               type(obj).__name__, name, f"must be an int >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Qwen3-style decoder trunk plus K MTP depths served by M modules.

    ``num_mtp_modules`` is 1 (one module reused at every depth, Qwen3-Next) or
    ``num_mtp_depths`` (one module per depth, DeepSeek-V3).
    """

    vocab_size: int = 272
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    max_seq_len: int = 512
    num_mtp_depths: int = 3
    num_mtp_modules: int = 1
    mtp_intermediate_size: int | None = None  # MLP width of the MTP modules (None: intermediate_size)
    dtype: str = "float32"        # activations / matmul inputs
    param_dtype: str = "float32"  # stored parameters
    # How losses, log-probs and entropies reduce over the vocabulary: "dense" builds [.., V]
    # float32 logits, "chunked" walks ``vocab_chunk`` columns of the LM head at a time in XLA
    # loops (bebop_jax.ops; never [.., V]), "pallas" does the same in Pallas kernels (a power-of-
    # two chunk; interpreted on CPU: for accelerators), "auto" is chunked from
    # CHUNKED_VOCAB_FROM entries on. Results agree either way; none changes a parameter.
    vocab_impl: str = "auto"
    vocab_chunk: int = 2048

    def __post_init__(self):
        cls = "ModelConfig"
        _positive_ints(self, "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                       "head_dim", "intermediate_size", "max_seq_len", "num_mtp_depths",
                       "num_mtp_modules", "vocab_chunk")
        _check(self.vocab_impl in VOCAB_IMPLS, cls, "vocab_impl", f"must be one of {VOCAB_IMPLS}, got {self.vocab_impl!r}")
        _check(isinstance(self.vocab_size, int) and self.vocab_size >= 2, cls, "vocab_size",
               f"must be an int >= 2, got {self.vocab_size!r}")
        _check(self.num_heads % self.num_kv_heads == 0, cls, "num_kv_heads",
               f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
        _check(self.head_dim % 2 == 0, cls, "head_dim",
               f"must be even for rotary embeddings, got {self.head_dim}")
        _check(self.num_mtp_modules in (1, self.num_mtp_depths), cls, "num_mtp_modules",
               f"must be 1 (shared) or num_mtp_depths ({self.num_mtp_depths}), "
               f"got {self.num_mtp_modules}")
        _check(self.mtp_intermediate_size is None
               or (isinstance(self.mtp_intermediate_size, int) and self.mtp_intermediate_size >= 1),
               cls, "mtp_intermediate_size", f"must be None or an int >= 1, got {self.mtp_intermediate_size!r}")
        _check(math.isfinite(self.rope_theta) and self.rope_theta > 0, cls, "rope_theta", f"must be finite and > 0, got {self.rope_theta}")
        _check(math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0, cls, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        for name in ("dtype", "param_dtype"):
            _check(getattr(self, name) in DTYPES, cls, name,
                   f"must be one of {DTYPES}, got {getattr(self, name)!r}")

    @property
    def chunked_vocab(self) -> bool:
        """Whether losses and log-probs reduce over vocabulary chunks (``vocab_impl``)."""
        if self.vocab_impl == "auto":
            return self.vocab_size >= CHUNKED_VOCAB_FROM
        return self.vocab_impl in ("chunked", "pallas")

    @property
    def vocab_ops_impl(self) -> str:
        """The ``impl`` of the bebop_jax.ops calls on the chunked path."""
        return "pallas" if self.vocab_impl == "pallas" else "xla"

    @property
    def mtp_mlp_size(self) -> int:
        """MLP width of the MTP modules' decoder layer: the draft's capacity knob."""
        return self.intermediate_size if self.mtp_intermediate_size is None else self.mtp_intermediate_size

    @property
    def mtp_module_for_depth(self) -> tuple[int, ...]:
        """Index of the MTP module that serves depth k (0-based), for k = 1..K."""
        return tuple(0 if self.num_mtp_modules == 1 else k for k in range(self.num_mtp_depths))

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A test-sized config: builds and runs in milliseconds on one CPU."""
        base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=64, max_seq_len=64, num_mtp_depths=3,
                    num_mtp_modules=1)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def small(cls, **overrides) -> "ModelConfig":
        """The small-scale reproduction default: a byte-level model that trains on a laptop CPU."""
        base = dict(vocab_size=264, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
                    head_dim=64, intermediate_size=768, max_seq_len=256, num_mtp_depths=3,
                    num_mtp_modules=1)
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding: ``none`` (vanilla), ``greedy`` or ``rejection`` verification of K drafts.

    ``adaptive``: before each call a ``bebop_jax.decode.DraftController`` picks the draft
    length k in 0..num_draft (0 = vanilla) that maximises expected tokens per unit time.
    """

    method: str = "none"
    num_draft: int = 3
    adaptive: bool = False

    def __post_init__(self):
        _check(self.method in ("none", "greedy", "rejection"), "SpecConfig", "method",
               f"must be 'none', 'greedy' or 'rejection', got {self.method!r}")
        _check(isinstance(self.num_draft, int) and not isinstance(self.num_draft, bool)
               and self.num_draft >= 1, "SpecConfig", "num_draft",
               f"must be an int >= 1 (K), got {self.num_draft!r}")
        _check(isinstance(self.adaptive, bool), "SpecConfig", "adaptive", f"must be a bool, got {self.adaptive!r}")
        _check(not (self.adaptive and self.method == "none"), "SpecConfig", "adaptive",
               "needs method 'greedy' or 'rejection' (there is no draft length to adapt with 'none')")

    @property
    def drafts(self) -> int:
        """Draft tokens per step: ``num_draft``, or 0 for vanilla decoding (method ``none``)."""
        return 0 if self.method == "none" else self.num_draft

    def with_draft(self, k: int) -> "SpecConfig":
        """The fixed-length config of draft length ``k`` (0: vanilla) that an adaptive call runs."""
        _check(isinstance(k, int) and 0 <= k <= self.drafts, "SpecConfig", "num_draft",
               f"a draft length must be in 0..{self.drafts}, got {k!r}")
        return SpecConfig("none") if k == 0 else SpecConfig(self.method, k)


LossName = Literal["ce", "kl", "tv", "e2e_tv"]
LOSS_NAMES = ("ce", "kl", "tv", "e2e_tv")

# What happens to the MTP heads during RL, by name: the MTP loss that trains them on the
# rollouts, or None for frozen heads. The one source of the names (``RLConfig`` validates
# against it; ``bebop_jax.rl.strategies.STRATEGIES`` is built from it).
MTP_STRATEGIES: dict[str, str | None] = {
    "frozen": None,
    "online_ce": "ce",
    "online_kl": "kl",
    "online_e2e_tv": "e2e_tv",
}


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """How MTP heads are trained.

    mode ``mtp_only``: trunk, embedding and LM head frozen (pre-RL MTP training).
    mode ``joint``: next-token CE on the trunk plus ``mtp_weight`` times the MTP loss.
    mode ``trunk_only``: next-token CE on the trunk alone (base pretraining); the MTP
    modules are neither run nor updated.
    """

    loss: str = "e2e_tv"
    mode: str = "mtp_only"
    mtp_weight: float = 1.0
    temperature: float = 1.0  # the rollout temperature the heads are trained for

    def __post_init__(self):
        cls = "MTPConfig"
        _check(self.loss in LOSS_NAMES, cls, "loss", f"must be one of {LOSS_NAMES}, got {self.loss!r}")
        _check(self.mode in ("mtp_only", "joint", "trunk_only"), cls, "mode",
               f"must be 'mtp_only', 'joint' or 'trunk_only', got {self.mode!r}")
        _check(math.isfinite(self.mtp_weight) and self.mtp_weight >= 0, cls, "mtp_weight", f"must be >= 0, got {self.mtp_weight}")
        _check(math.isfinite(self.temperature) and self.temperature > 0, cls, "temperature",
               f"must be > 0 (a loss needs a distribution), got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * learning_rate``."""

    learning_rate: float = 1e-3
    warmup_steps: int = 50
    decay_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self):
        cls = "OptimizerConfig"
        _check(math.isfinite(self.learning_rate) and self.learning_rate > 0, cls, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, cls, "warmup_steps",
               f"must be an int >= 0, got {self.warmup_steps!r}")
        _check(isinstance(self.decay_steps, int) and self.decay_steps > self.warmup_steps, cls,
               "decay_steps", f"must be an int > warmup_steps ({self.warmup_steps}), "
               f"got {self.decay_steps!r}")
        _check(0 <= self.min_lr_ratio <= 1, cls, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay >= 0, cls, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.b1 < 1, cls, "b1", f"must be in [0, 1), got {self.b1}")
        _check(0 <= self.b2 < 1, cls, "b2", f"must be in [0, 1), got {self.b2}")
        _check(self.eps > 0, cls, "eps", f"must be > 0, got {self.eps}")
        _check(self.clip_norm > 0, cls, "clip_norm", f"must be > 0, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes. ``-1`` in at most one axis takes the remaining devices.

    data: pure data parallelism (batch split, params replicated).
    fsdp: batch split AND params/optimizer state sharded along their embed axis.
    model: tensor parallelism over heads, MLP width and vocabulary.
    """

    data: int = -1
    fsdp: int = 1
    model: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "model": self.model}
        for name, size in sizes.items():
            _check(isinstance(size, int) and (size >= 1 or size == -1), "MeshConfig", name,
                   f"must be an int >= 1 or -1 (fill), got {size!r}")
        _check(list(sizes.values()).count(-1) <= 1, "MeshConfig", "data",
               "at most one axis may be -1")

    def shape_for(self, num_devices: int) -> tuple[int, int, int]:
        """Resolve -1 and check the product equals ``num_devices``."""
        sizes = [self.data, self.fsdp, self.model]
        known = 1
        for s in sizes:
            if s != -1:
                known *= s
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"MeshConfig: fixed axes multiply to {known}, which does not "
                                 f"divide the {num_devices} available devices")
            sizes[sizes.index(-1)] = num_devices // known
        if sizes[0] * sizes[1] * sizes[2] != num_devices:
            raise ValueError(f"MeshConfig: data*fsdp*model = {sizes[0]}*{sizes[1]}*{sizes[2]} = "
                             f"{sizes[0] * sizes[1] * sizes[2]} but {num_devices} devices are available")
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop-level settings shared by the training experiments."""

    batch_size: int = 32
    seq_len: int = 128
    num_steps: int = 500
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100

    def __post_init__(self):
        _positive_ints(self, "batch_size", "num_steps", "log_every", "ckpt_every")
        _check(isinstance(self.seq_len, int) and self.seq_len >= 2, "TrainConfig", "seq_len",
               f"must be an int >= 2, got {self.seq_len!r}")


def _finite_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO-family policy loss (GRPO, DAPO clip-higher, Dr. GRPO); see ``bebop_jax.rl``.

    The ratio is clipped to [1 - clip_low, 1 + clip_high]; ``is_cap`` caps the
    decoupled-PPO behaviour weight; ``updates_per_batch`` optimizer updates per rollout batch.
    """

    group_size: int = 8
    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: str = "token-mean"
    std_normalize: bool = True
    kl_coef: float = 0.0
    is_cap: float = 2.0
    updates_per_batch: int = 1

    def __post_init__(self):
        cls = "GRPOConfig"
        _check(isinstance(self.group_size, int) and not isinstance(self.group_size, bool)
               and self.group_size >= 2, cls, "group_size",
               f"must be an int >= 2 (a group compares samples of one prompt), got {self.group_size!r}")
        _check(_finite_real(self.clip_low) and 0 <= self.clip_low < 1, cls, "clip_low",
               f"must be in [0, 1), got {self.clip_low!r}")
        _check(_finite_real(self.clip_high) and self.clip_high >= 0, cls, "clip_high",
               f"must be finite and >= 0, got {self.clip_high!r}")
        _check(self.aggregation in AGGREGATIONS, cls, "aggregation",
               f"must be one of {sorted(AGGREGATIONS)}, got {self.aggregation!r}")
        _check(isinstance(self.std_normalize, bool), cls, "std_normalize",
               f"must be a bool, got {self.std_normalize!r}")
        _check(_finite_real(self.kl_coef) and self.kl_coef >= 0, cls, "kl_coef",
               f"must be finite and >= 0, got {self.kl_coef!r}")
        _check(_finite_real(self.is_cap) and self.is_cap > 0, cls, "is_cap",
               f"must be finite and > 0, got {self.is_cap!r}")
        _positive_ints(self, "updates_per_batch")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The RL loop: rollouts per step, evaluation, checkpoints, and the MTP strategy.

    Each step samples ``group_size`` (GRPOConfig) responses to ``prompts_per_step``
    training prompts at ``temperature``, in decode calls of ``decode_batch`` rows. With
    ``async_rollouts`` they are sampled by a producer thread (on ``rollout_devices`` of
    their own, when set) up to ``max_staleness`` policy versions ahead of the learner.
    ``mtp_strategy`` is a key of ``MTP_STRATEGIES`` (``bebop_jax.rl.strategies`` builds each from it).
    """

    num_steps: int = 200
    prompts_per_step: int = 16
    max_new_tokens: int = 80
    prompt_len: int = 56            # prompts are padded to this (one compiled decode shape)
    temperature: float = 1.0
    decode_batch: int = 128
    max_turns: int = 1              # assistant turns per episode of a multi-turn task
    eval_every: int = 40            # held-out accuracy every N steps (and before / after)
    eval_prompts: int = 256         # held-out prompts per task (0: no held-out evaluation)
    eval_samples: int = 4           # T = 1 samples per held-out prompt
    ckpt_every: int = 10
    seed: int = 0
    mtp_strategy: str = "frozen"
    mtp_learning_rate: float = 1e-3  # the heads' optimizer under an online MTP strategy
    async_rollouts: bool = False    # a producer thread samples the next batches while the learner trains
    max_staleness: int = 1          # async: batch i is sampled with policy version i - max_staleness
    rollout_devices: int = 0        # async: the first N devices form the rollout mesh (0: share all)

    def __post_init__(self):
        cls = "RLConfig"
        _positive_ints(self, "num_steps", "prompts_per_step", "max_new_tokens", "prompt_len", "decode_batch",
                       "max_turns", "eval_every", "eval_samples", "ckpt_every")
        _check(isinstance(self.eval_prompts, int) and not isinstance(self.eval_prompts, bool)
               and self.eval_prompts >= 0, cls, "eval_prompts", f"must be an int >= 0, got {self.eval_prompts!r}")
        _check(_finite_real(self.temperature) and self.temperature > 0, cls, "temperature",
               f"must be > 0 (RL needs a sampling distribution), got {self.temperature!r}")
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), cls, "seed",
               f"must be an int, got {self.seed!r}")
        _check(self.mtp_strategy in MTP_STRATEGIES, cls, "mtp_strategy",
               f"must be one of {sorted(MTP_STRATEGIES)}, got {self.mtp_strategy!r}")
        _check(_finite_real(self.mtp_learning_rate) and self.mtp_learning_rate > 0, cls, "mtp_learning_rate",
               f"must be > 0, got {self.mtp_learning_rate!r}")
        _check(isinstance(self.async_rollouts, bool), cls, "async_rollouts", f"must be a bool, got {self.async_rollouts!r}")
        for name in ("max_staleness", "rollout_devices"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, cls, name,
                   f"must be an int >= 0, got {value!r}")
        _check(self.async_rollouts or self.rollout_devices == 0, cls, "rollout_devices",
               "a separate rollout mesh needs async_rollouts=True (synchronous RL samples on the train mesh)")


# The optimizer of the RL experiments (constant learning rate after a short warmup; rl.py decays it to a tenth).
RL_OPTIMIZER = OptimizerConfig(learning_rate=3e-4, warmup_steps=5, decay_steps=200, min_lr_ratio=1.0,
                               weight_decay=0.0)
