"""What every experiment script shares: CLI parsing, refused flags, run directories, clean failures."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import tyro

from bebop_jax.run.files import ensure_run_dir

T = TypeVar("T")


class UserError(ValueError):
    """A mistake in the command line or the inputs it names: reported in one line."""


def parse(cls: type[T], args: list[str] | None = None) -> T:
    """tyro CLI from a frozen dataclass (config validation errors exit with status 2)."""
    return tyro.cli(cls, args=args)


def prepare_run_dir(path: str) -> Path:
    """Create ``path`` (or reuse it) and check it is writable, before any compute."""
    try:
        return ensure_run_dir(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--run_dir {path!r} is not usable: {e}") from None


def config_dict(obj: Any) -> dict:
    """A JSON-able dict of a (nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def run_main(fn: Callable[[], Any]) -> None:
    """Run ``fn``; a UserError / ValueError / missing file becomes one 'error:' line and exit 2."""
    try:
        fn()
    except (UserError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the latest checkpoint is kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def refuse_flags(args: Any, why: Mapping[str, str]) -> None:
    """Refuse flags this script cannot honour, instead of silently replacing them.

    ``why`` maps a field path of ``args`` ("rl.mtp_strategy") to the reason the script
    sets that value itself. A value that differs from the script's default raises one
    UserError naming the flag as the command line spells it (``--rl.mtp-strategy``).
    """
    default = type(args)()
    for path, reason in why.items():
        given, base = args, default
        for part in path.split("."):
            given, base = getattr(given, part), getattr(base, part)
        if given != base:
            *outer, last = path.split(".")
            flag = "--" + ".".join(outer + [last.replace("_", "-") if outer else last])
            raise UserError(f"{flag}: {reason}; this script does not take it")
