"""GRPO-family RL: group advantages and the clipped policy loss (DESIGN.md, "RL")."""

from bebop_jax.config import GRPOConfig
from bebop_jax.rl.advantages import group_advantages
from bebop_jax.rl.objective import AGGREGATIONS, policy_loss

__all__ = ["AGGREGATIONS", "GRPOConfig", "group_advantages", "policy_loss"]
