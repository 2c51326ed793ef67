"""What happens to the MTP heads during RL: a strategy per name, picked from ``STRATEGIES``.

- ``frozen``: the pre-RL heads are never updated. They sit in ``TrainState.frozen`` (no
  gradient, no optimizer state); the update trains trunk, embedding and LM head on the
  policy loss alone.
- ``online_ce`` / ``online_kl`` / ``online_e2e_tv``: the heads are trained on the current
  rollouts with that MTP loss, in the same jitted step as the policy update. The MTP
  path reads the trunk's hidden state, the embedding and the LM head through
  stop_gradient, so no MTP gradient reaches the policy, and the heads have an optimizer
  of their own (their own clipping and learning rate): the trunk's update is the one
  the frozen strategy makes.
"""

from __future__ import annotations

import dataclasses

import optax

from bebop_jax.config import MTP_STRATEGIES, OptimizerConfig
from bebop_jax.model import is_trunk_param
from bebop_jax.train.step import make_optimizer, split_params


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    mtp_loss: str | None  # the MTP loss that trains the heads on the rollouts (None: heads frozen)

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trained, held fixed) parameters under this strategy."""
        return split_params(params, "trunk_only" if self.mtp_loss is None else "joint")

    def optimizer(self, config: OptimizerConfig, mtp_learning_rate: float,
                  trained: dict) -> optax.GradientTransformation:
        """The policy's optimizer for the trunk; for online strategies, a separate one for the heads
        (``trained``: the trained parameter dict, whose top-level keys label the two groups)."""
        if self.mtp_loss is None:
            return make_optimizer(config)
        heads = make_optimizer(dataclasses.replace(config, learning_rate=mtp_learning_rate))
        labels = {k: "trunk" if is_trunk_param((k,)) else "heads" for k in trained}
        return optax.multi_transform({"trunk": make_optimizer(config), "heads": heads}, labels)


STRATEGIES: dict[str, Strategy] = {name: Strategy(name, loss) for name, loss in MTP_STRATEGIES.items()}
