"""Meshes, the logical-axis rules table, and multi-host start-up.

Parameters and activations carry *logical* axis names ("embed", "heads", ...).
One table, ``RULES``, maps each logical name to mesh axes; nothing else in the
codebase names a mesh axis for a parameter. A logical axis whose size does not
divide the mesh axes it maps to is replicated instead (e.g. 2 KV heads on a
4-way model axis), so every config runs on every mesh.

Nothing here assumes one global mesh: functions take the mesh they work on, so
rollout and training can live on disjoint sub-meshes of one program.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bebop_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "model")

# logical axis -> mesh axes (None = replicated). Checked for collisions below.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("head_dim", None),
    ("norm", None),
    ("seq", None),
    ("mtp_in", None),
)
_RULES = dict(RULES)
if len(_RULES) != len(RULES):
    raise ValueError("parallel.RULES: a logical axis appears twice")


def _mesh_axes_of(logical: str | None) -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in _RULES:
        raise ValueError(f"logical axis {logical!r} has no entry in parallel.RULES")
    target = _RULES[logical]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array of ``shape`` with the given logical axes on ``mesh``.

    Mesh axes of size 1 are dropped; a dimension that the mapped mesh axes do not
    divide is replicated; a mesh axis is used at most once per array.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = tuple(a for a in _mesh_axes_of(name) if mesh.shape.get(a, 1) > 1 and a not in used)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "model") mesh over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape_for(len(devices))
    # jax.make_mesh orders devices by the physical topology (TPU torus, GPU hosts);
    # Auto axes: shardings are propagated by the compiler from the ones we set.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def param_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a param tree, from its logical-axes tree and shapes."""
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)),
        logical_tree, shape_tree, is_leaf=lambda t: isinstance(t, tuple))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch-major arrays: rows split over the data and fsdp axes."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when launched on several hosts.

    Detects a multi-host launch by the environment the usual launchers set
    (SLURM sets SLURM_NTASKS, GKE TPU pods TPU_WORKER_HOSTNAMES), an explicit
    JAX_COORDINATOR_ADDRESS, or the opt-in BEBOP_MULTIHOST=1 (gcloud TPU VMs,
    where jax finds the pod through the metadata server). Returns True if it initialised.
    """
    multi = (
        os.environ.get("BEBOP_MULTIHOST") == "1"
        or "JAX_COORDINATOR_ADDRESS" in os.environ
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    )
    if multi:
        jax.distributed.initialize()
    return multi
