"""Run plumbing every stage and experiment shares, one concern per module.

- `cli`: tyro parsing, `UserError`, `refuse_flags`, `run_main` (one `error:` line, exit 2).
- `files`: the run directory, atomic JSON (`write_results_json`, `cached_json`).
- `metrics`: `MetricLogger` (TensorBoard + metrics.jsonl).
- `progress`: `Progress` / `progress` with rate and ETA.
- `tables`: `format_table` / `print_table`.
"""

from bebop_jax.run.cli import UserError, config_dict, parse, prepare_run_dir, refuse_flags, run_main
from bebop_jax.run.files import cached_json, ensure_run_dir, to_json, write_json_atomic, write_results_json
from bebop_jax.run.metrics import MetricLogger
from bebop_jax.run.progress import Progress, progress
from bebop_jax.run.tables import format_table, print_table
