"""What happens to the MTP heads during RL: a strategy per name, picked from ``STRATEGIES``.

- ``frozen``: the pre-RL heads are never updated; they sit in ``TrainState.frozen``
  (no gradient, no optimizer state), and the update trains the trunk, embedding and
  LM head on the policy loss alone.
"""

from __future__ import annotations

import dataclasses

from bebop_jax.train.step import split_params


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    mtp_loss: str | None  # the MTP loss that trains the heads on the rollouts (None: heads frozen)

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trained, held fixed) parameters under this strategy."""
        return split_params(params, "trunk_only" if self.mtp_loss is None else "joint")


STRATEGIES: dict[str, Strategy] = {"frozen": Strategy("frozen", None)}
