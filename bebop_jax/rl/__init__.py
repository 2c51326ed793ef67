"""GRPO-family RL with speculative rollouts (docs/DESIGN.md, "GRPO"): group advantages, the
clipped policy loss, the rollout batch and worker, MTP strategies, and the sync / async loop."""

from bebop_jax.config import GRPOConfig, RLConfig
from bebop_jax.rl.advantages import group_advantages
from bebop_jax.rl.batch import RolloutBatch
from bebop_jax.rl.loop import RLResult, run_grpo
from bebop_jax.rl.objective import AGGREGATIONS, policy_loss
from bebop_jax.rl.rollout import Rollout, RolloutWorker
from bebop_jax.rl.strategies import STRATEGIES

__all__ = ["AGGREGATIONS", "GRPOConfig", "RLConfig", "RLResult", "Rollout", "RolloutBatch", "RolloutWorker",
           "STRATEGIES", "group_advantages", "policy_loss", "run_grpo"]
