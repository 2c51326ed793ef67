"""Checkpoints: orbax `CheckpointManager` with verified restore and fall-back on damage.

One checkpoint step directory holds three orbax items:
  state     the training pytree (params, opt_state, step, ...), saved with StandardSave;
  extra     a JSON dict from the caller (data-iterator position, config, rng info);
  manifest  JSON written by this module: every state leaf's name, shape, dtype and a
            position-weighted uint32 checksum of its bits.

Why the manifest: orbax detects most damage (missing or truncated files raise on read),
but a restore may also silently cast dtypes, and flipped bytes inside a data file need
not raise at all. Comparing the restored leaves' checksums with the saved ones turns
any such damage into a fall-back to the previous checkpoint instead of a silently
different run, and comparing shapes/dtypes before reading gives a clear error for a
checkpoint written by a different model.

Crash safety comes from orbax (checked on orbax-checkpoint 0.12.8): a save writes into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only after every item is
written, so a process killed mid-save leaves only the tmp directory, which is never
listed as a step and is removed the next time a manager opens the directory. Old steps
beyond `keep` are deleted by the save's finalize step only after the new step was
committed, so the newest good checkpoint always survives a kill.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

_STATE, _EXTRA, _MANIFEST = "state", "extra", "manifest"
_ITEM_NAMES = (_STATE, _EXTRA, _MANIFEST)
_MANIFEST_FORMAT = 1
_UNFINISHED_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_CORRUPT_SUFFIX = ".corrupt"
_MAX_LISTED = 12  # differences listed in one error message


class Restored(NamedTuple):
    """What `Checkpointer.restore_latest` returns: unpack as `step, state, extra`."""

    step: int
    state: Any
    extra: dict


class CheckpointMismatchError(ValueError):
    """An intact checkpoint that does not fit what the caller restores into.

    Raised (never fallen back from) when the saved config differs in the compared
    fields, or when the saved leaves differ in name, shape or dtype from the
    abstract state: an older checkpoint of the same run would not fit either.
    """


class _Damaged(Exception):
    """A checkpoint step that cannot be read back exactly (internal)."""


# ----------------------------------------------------------------------------- checksums


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 sum over elements of bits(x[i]) * w(i), with odd position weights w.

    Any single changed element changes the sum (an odd weight is invertible mod 2^32),
    and so does moving a value to another position (weights differ per position).
    Integer sums are exact, so the result does not depend on sharding or reduction
    order. Not cryptographic: it guards against damage, not against an adversary.
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width)
        if bits.dtype == jnp.uint64:  # only reachable with jax_enable_x64
            bits = (bits ^ (bits >> 32)).astype(jnp.uint32)
        bits = bits.astype(jnp.uint32)
    # Flat index mod 2^32 from per-dimension iotas (no flat arange of a huge array).
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= x.shape[dim]
    weight = index * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)
    weight = weight | jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _tree_checksums(tree: Any) -> Any:
    return jax.tree.map(_leaf_checksum, tree)


def _leaf_name(path: Any) -> str:
    return jax.tree_util.keystr(path)


def _device_group(leaf: Any) -> tuple:
    """Leaves committed to different device sets cannot share one jit call."""
    if isinstance(leaf, jax.Array) and leaf.committed:
        return tuple(sorted(d.id for d in leaf.sharding.device_set))
    return ()


def state_manifest(state: Any) -> dict:
    """{"format", "leaves": {leaf name: {"shape", "dtype", "checksum"}}} for a state pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = [leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf) for _, leaf in leaves]
    groups: dict[tuple, list[int]] = {}
    for i, arr in enumerate(arrays):
        groups.setdefault(_device_group(arr), []).append(i)
    sums: list[Any] = [None] * len(arrays)
    for indices in groups.values():
        for i, checksum in zip(indices, _tree_checksums([arrays[i] for i in indices])):
            sums[i] = checksum
    sums = jax.device_get(sums)
    out = {}
    for (path, _), arr, checksum in zip(leaves, arrays, sums):
        out[_leaf_name(path)] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "checksum": int(checksum),
        }
    return {"format": _MANIFEST_FORMAT, "leaves": out}


def _check_manifest(manifest: Any) -> None:
    """Raises TypeError unless `manifest` has the layout `state_manifest` writes."""
    ok = isinstance(manifest, dict) and manifest.get("format") == _MANIFEST_FORMAT
    leaves = manifest.get("leaves") if ok else None
    ok = ok and isinstance(leaves, dict) and all(
        isinstance(v, dict)
        and isinstance(v.get("shape"), list)
        and isinstance(v.get("dtype"), str)
        and isinstance(v.get("checksum"), int)
        for v in leaves.values()
    )
    if not ok:
        raise TypeError(f"manifest has an unknown layout: {str(manifest)[:100]}")


# ----------------------------------------------------------------------------- comparisons


def _flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def _selected(name: str, keys: Sequence[str] | None) -> bool:
    return keys is None or any(name == k or name.startswith(k + ".") for k in keys)


def config_differences(
    saved: Mapping[str, Any], given: Mapping[str, Any], keys: Sequence[str] | None = None
) -> list[str]:
    """Dotted field names whose values differ, as 'name: saved X, given Y' lines.

    `keys` restricts the comparison to these dotted names or prefixes (e.g. ("model",)
    compares every field under config["model"]); None compares every field.
    Values are compared after a JSON round trip, so tuples equal lists.
    """
    saved_flat = _flatten_config(json.loads(json.dumps(saved)))
    given_flat = _flatten_config(json.loads(json.dumps(given)))
    missing = object()
    diffs = []
    for name in sorted(set(saved_flat) | set(given_flat)):
        if not _selected(name, keys):
            continue
        a, b = saved_flat.get(name, missing), given_flat.get(name, missing)
        if a != b:
            show = lambda v: "<missing>" if v is missing else repr(v)  # noqa: E731
            diffs.append(f"{name}: saved {show(a)}, given {show(b)}")
    return diffs


def _structure_differences(manifest: dict, abstract_state: Any) -> list[str]:
    saved = manifest["leaves"]
    given = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        given[_leaf_name(path)] = (list(leaf.shape), str(jnp.dtype(leaf.dtype)))
    diffs = []
    for name in sorted(set(saved) | set(given)):
        if name not in given:
            diffs.append(f"{name}: in the checkpoint, not in abstract_state")
        elif name not in saved:
            diffs.append(f"{name}: in abstract_state, not in the checkpoint")
        else:
            s = (saved[name]["shape"], saved[name]["dtype"])
            if s != given[name]:
                diffs.append(
                    f"{name}: saved {s[1]}{s[0]}, abstract_state {given[name][1]}{given[name][0]}"
                )
    return diffs


def _listing(diffs: list[str]) -> str:
    shown = diffs[:_MAX_LISTED]
    more = f"\n  ... and {len(diffs) - len(shown)} more" if len(diffs) > len(shown) else ""
    return "\n  " + "\n  ".join(shown) + more


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}"


def _all_processes_agree(ok: bool) -> bool:
    """True iff `ok` on every JAX process (so all hosts fall back to the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves and restores (step, state pytree, JSON extra) under one directory.

    Args:
      directory: where step directories live (created unless read_only).
      keep: how many most recent good checkpoints to keep (>= 1).
      save_interval_steps: `save` writes only when step % interval == 0 (the first
        save of a fresh directory is always written), unless force=True.
      async_save: write in a background thread; `save` returns once the arrays were
        copied to host memory, so the caller may donate or overwrite them at once.
      read_only: never write, delete or rename anything (evaluation, inspection).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 2,
        save_interval_steps: int = 1,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(
                f"save_interval_steps must be an int >= 1, got {save_interval_steps!r}"
            )
        self._directory = Path(directory).absolute()
        if self._directory.exists() and not self._directory.is_dir():
            raise ValueError(f"directory {str(self._directory)!r} exists and is not a directory")
        self._read_only = read_only
        self._report_unfinished()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            self._directory, options=options, item_names=_ITEM_NAMES
        )

    @property
    def directory(self) -> Path:
        return self._directory

    def _report_unfinished(self) -> None:
        """Warn about saves that a crash interrupted (orbax removes their tmp dirs)."""
        if not self._directory.is_dir():
            return
        for entry in sorted(os.listdir(self._directory)):
            match = _UNFINISHED_RE.match(entry)
            if match:
                logger.warning(
                    "checkpoint step %s in %s is partial: its save never finished "
                    "(directory %s); ignoring it",
                    match.group(1),
                    self._directory,
                    entry,
                )

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (a save still in flight is listed once requested)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    # ------------------------------------------------------------------------- save

    def save(
        self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *, force: bool = False
    ) -> bool:
        """Saves `state` and `extra` as checkpoint `step`; returns whether it wrote.

        Skips (returns False) when the interval says not to save, or when `step` is not
        newer than the latest saved step (e.g. a run resumed at its final step). `extra`
        must be JSON-serialisable (checked before anything is written). Call `wait()`
        before reading the checkpoint from another process.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        if self._read_only:
            raise ValueError(f"save: Checkpointer for {self._directory} is read_only")
        extra = {} if extra is None else dict(extra)
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra must be JSON-serialisable (no NaN/inf): {e}") from None
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            return False
        if not force and not self._manager.should_save(step):
            return False
        manifest = state_manifest(state)
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardSave(state),
                    _EXTRA: ocp.args.JsonSave(extra),
                    _MANIFEST: ocp.args.JsonSave(manifest),
                }
            ),
            force=force,
        )

    # ------------------------------------------------------------------------- restore

    def restore(
        self,
        step: int,
        abstract_state: Any,
        *,
        config: Mapping[str, Any] | None = None,
        config_keys: Sequence[str] | None = None,
    ) -> Restored:
        """Restores one step exactly or raises (no fall-back); see `restore_latest`."""
        self.wait()
        try:
            return self._restore_step(step, abstract_state, config, config_keys)
        except _Damaged as e:
            raise RuntimeError(f"checkpoint step {step} in {self._directory} is {e}") from None

    def restore_latest(
        self,
        abstract_state: Any,
        *,
        config: Mapping[str, Any] | None = None,
        config_keys: Sequence[str] | None = None,
    ) -> Restored | None:
        """Restores the newest checkpoint that reads back exactly; None if there is none.

        abstract_state: the pytree to restore into, usually `jax.eval_shape(...)` with a
          `sharding` on each leaf (arrays are placed with those shardings; leaves without
          one go to the default device). Its leaf names, shapes and dtypes must equal
          the saved ones.
        config: if given, compared with the saved `extra["config"]` on `config_keys`
          (dotted names or prefixes, e.g. ("model",); None compares every field).

        A damaged step (unreadable files, checksum mismatch) is reported with a warning
        naming the step and the reason, and the next older step is tried. Damaged steps
        newer than the one restored are renamed `<step>.corrupt` (unless read_only) so
        the resumed run can save those steps again. Raises CheckpointMismatchError if
        the newest readable step does not match `config` / `abstract_state`, and
        RuntimeError if steps exist but none is readable (starting over silently would
        overwrite them).
        """
        self.wait()
        self._manager.reload()  # see the directory as it is now
        steps = self.all_steps()
        damaged: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                result = self._restore_step(step, abstract_state, config, config_keys)
                ok, reason = True, ""
            except _Damaged as e:
                ok, reason, result = False, str(e), None
            if not _all_processes_agree(ok):
                reason = reason or "unreadable on another process"
                logger.warning(
                    "checkpoint step %d in %s is %s; falling back to an older checkpoint",
                    step,
                    self._directory,
                    reason,
                )
                damaged.append((step, reason))
                continue
            self._quarantine([s for s, _ in damaged])
            return result
        if damaged:
            lines = [f"step {s}: {r}" for s, r in damaged]
            raise RuntimeError(
                f"no readable checkpoint in {self._directory}; every step is damaged:"
                + _listing(lines)
            )
        return None

    def _restore_step(
        self,
        step: int,
        abstract_state: Any,
        config: Mapping[str, Any] | None,
        config_keys: Sequence[str] | None,
    ) -> Restored:
        try:
            meta = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{_EXTRA: ocp.args.JsonRestore(), _MANIFEST: ocp.args.JsonRestore()}
                ),
            )
            extra, manifest = meta[_EXTRA], meta[_MANIFEST]
            if not isinstance(extra, dict):
                raise TypeError(f"extra is a {type(extra).__name__}, not a dict")
            _check_manifest(manifest)
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged step
            raise _Damaged(f"unreadable ({_short(e)})") from e

        where = f"checkpoint step {step} in {self._directory}"
        if config is not None:
            if not isinstance(extra.get("config"), Mapping):
                raise CheckpointMismatchError(
                    f"{where} has no saved extra['config'] to compare the given config with"
                )
            diffs = config_differences(extra["config"], config, config_keys)
            if diffs:
                raise CheckpointMismatchError(
                    f"{where} was written with a different config (mismatched checkpoint); "
                    f"differing fields:" + _listing(diffs)
                )
        diffs = _structure_differences(manifest, abstract_state)
        if diffs:
            raise CheckpointMismatchError(
                f"{where} does not match abstract_state (leaf names, shapes or dtypes):"
                + _listing(diffs)
            )

        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)}),
            )
            state = restored[_STATE]
        except Exception as e:  # noqa: BLE001
            raise _Damaged(f"unreadable ({_short(e)})") from e
        got = state_manifest(state)["leaves"]
        saved = manifest["leaves"]
        bad = [name for name in saved if got[name]["checksum"] != saved[name]["checksum"]]
        if bad:
            raise _Damaged(f"corrupt (checksum mismatch in {', '.join(bad[:_MAX_LISTED])})")
        return Restored(step=step, state=state, extra=extra)

    def _quarantine(self, steps: list[int]) -> None:
        """Renames damaged step dirs aside so their steps can be saved again."""
        if not steps or self._read_only:
            return
        from jax.experimental import multihost_utils

        multi = jax.process_count() > 1
        if multi:
            multihost_utils.sync_global_devices("bebop_jax_checkpoint_quarantine_start")
        if jax.process_index() == 0:
            for step in steps:
                src = self._directory / str(step)
                dst = self._directory / f"{step}{_CORRUPT_SUFFIX}"
                n = 1
                while dst.exists():
                    dst = self._directory / f"{step}{_CORRUPT_SUFFIX}{n}"
                    n += 1
                if src.exists():
                    os.replace(src, dst)
                    logger.warning("moved damaged checkpoint step %d to %s", step, dst)
        if multi:
            multihost_utils.sync_global_devices("bebop_jax_checkpoint_quarantine_done")
        self._manager.reload()

    # ------------------------------------------------------------------------- lifecycle

    def wait(self) -> None:
        """Blocks until every pending save is committed (raises if one failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
