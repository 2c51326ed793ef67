"""Rollout and train meshes: the devices of one JAX program split in two.

``rl_meshes(rollout_devices, train_config)``: the first ``rollout_devices`` devices of
the program (all processes, in ``jax.devices()`` order) form the rollout mesh
(data-parallel), the rest the train mesh (shaped by ``train_config``). 0 means both
roles share every device (on one device the overlap comes from the producer thread
alone). Nothing here assumes one process: with several, each mesh may span them.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh

from bebop_jax.config import MeshConfig
from bebop_jax.parallel import make_mesh


def split_devices(rollout_devices: int, devices: Sequence[jax.Device] | None = None) -> tuple[list, list]:
    devices = list(jax.devices() if devices is None else devices)
    if not (isinstance(rollout_devices, int) and 0 <= rollout_devices < len(devices)):
        raise ValueError(f"rollout_devices: must be 0 (share the devices) or in 1..{len(devices) - 1} so the "
                         f"train mesh keeps a device, got {rollout_devices!r} with {len(devices)} devices")
    if rollout_devices == 0:
        return devices, devices
    return devices[:rollout_devices], devices[rollout_devices:]


def rl_meshes(rollout_devices: int, train_config: MeshConfig = MeshConfig(),
              devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Mesh]:
    """(rollout mesh, train mesh); the same mesh twice when ``rollout_devices`` is 0."""
    rollout, train = split_devices(rollout_devices, devices)
    train_mesh = make_mesh(train_config, train)
    if rollout_devices == 0:
        return train_mesh, train_mesh
    return make_mesh(MeshConfig(data=-1, fsdp=1, model=1), rollout), train_mesh
