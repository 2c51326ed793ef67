"""grain pipelines: tokenized examples -> padded, shuffled, host-sharded batches.

An example is `(tokens, loss_mask)` of equal length; `loss_mask[t]` weights the loss of
predicting token t (from position t-1), so the train step uses `loss_mask[:, 1:]`
against `logits[:, :-1]`. Prompts and environment turns get 0, the response and its
closing eos get 1.

Batches are `{"tokens": int32 [B, T], "loss_mask": float32 [B, T]}` with T = seq_len.
Short examples are right-padded with `pad_id` and mask 0. Under causal attention the
padding cannot change the loss of any real token, so the pad id only matters for
readability. With `pack=True` (base pretraining on short examples, where padding
would waste about half of every step) several examples share a row: batches gain
`positions` (restarting at 0 in each example) and `segment_ids` (1, 2, ... per
example, 0 on padding), and the trunk attends within a segment only, so each
example's loss is the same as alone in its own row. Packing is next-fit over a
seeded shuffle, done once; rows are then reshuffled every epoch.

Over-long examples (more than seq_len tokens) are dropped by default (a truncated
response has no eos, which would teach the model not to stop); `overlong="truncate"`
keeps their first seq_len tokens and `overlong="error"` refuses them. The count is logged
and kept in `TokenDataset.stats`.

Order: examples -> drop/truncate over-long (global, identical on every host) -> host
shard `[shard_index::shard_count]` -> shuffle (seeded, reshuffled every epoch) ->
repeat -> pad -> batch. Batches may span an epoch boundary. Iterator state is
`{"next_batch": int, ...}`: JSON-serialisable, it goes into the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import grain
import numpy as np

from bebop_jax.data.tokenizer import ROLES, Tokenizer, bos_prefix

logger = logging.getLogger(__name__)

Example = tuple[list[int], list[float]]
Batch = dict[str, np.ndarray]


def encode_example(tokenizer: Tokenizer, prompt: str, response: str) -> Example:
    """One prompt/response pair: `bos + format_prompt(prompt)` with mask 0, then
    `encode(response) + end of turn (= eos)` with mask 1. No bos for tokenizers without
    one (Qwen)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if not isinstance(response, str):
        raise ValueError(f"response must be a str, got {type(response).__name__}")
    context = bos_prefix(tokenizer) + tokenizer.format_prompt(prompt)
    answer = tokenizer.encode(response) + tokenizer.turn_footer("assistant")
    return context + answer, [0.0] * len(context) + [1.0] * len(answer)


def encode_turns(tokenizer: Tokenizer, turns: Sequence[tuple[str, str, bool]]) -> Example:
    """A multi-turn conversation, `turns` = [(role, text, trainable), ...] with role in
    system/user/assistant/env. A trainable turn gets mask 1 on its text and its footer
    (for an assistant turn: the eos it must emit), never on its header; other turns get 0.

    `encode_turns(tok, [("user", p, False), ("assistant", r, True)])` equals
    `encode_example(tok, p, r)`.
    """
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence) or not turns:
        raise ValueError(f"turns must be a non-empty list of (role, text, trainable), "
                         f"got {turns!r}")
    tokens = bos_prefix(tokenizer)
    mask = [0.0] * len(tokens)
    for i, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 3):
            raise ValueError(f"turns[{i}] must be (role, text, trainable), got {turn!r}")
        role, text, trainable = turn
        if role not in ROLES:
            raise ValueError(f"turns[{i}] role must be one of {ROLES}, got {role!r}")
        if not isinstance(text, str):
            raise ValueError(f"turns[{i}] text must be a str, got {type(text).__name__}")
        if not isinstance(trainable, (bool, np.bool_)):
            raise ValueError(f"turns[{i}] trainable must be a bool, got {trainable!r}")
        header = tokenizer.turn_header(role, first=i == 0)
        body = tokenizer.encode(text) + tokenizer.turn_footer(role)
        tokens += header + body
        mask += [0.0] * len(header) + [float(trainable)] * len(body)
    return tokens, mask


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """What make_dataset kept. Counts of over-long examples are over all shards."""

    num_input: int  # examples given
    num_overlong: int  # longer than seq_len (dropped or truncated, per `overlong`)
    num_examples: int  # examples in this host's shard, after dropping
    batches_per_epoch: int  # of this shard (rounded down; batches may span epochs)
    num_rows: int  # rows of this shard per epoch (= num_examples unless packed)


class _PaddedExamples:
    """Random-access source: example i as fixed-length numpy arrays."""

    def __init__(self, tokens: list[np.ndarray], masks: list[np.ndarray], seq_len: int,
                 pad_id: int):
        self._tokens, self._masks = tokens, masks
        self._seq_len, self._pad_id = seq_len, pad_id

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, index: int) -> Batch:
        tokens_L, mask_L = self._tokens[index], self._masks[index]
        tokens_T = np.full((self._seq_len,), self._pad_id, np.int32)
        mask_T = np.zeros((self._seq_len,), np.float32)
        tokens_T[:len(tokens_L)] = tokens_L
        mask_T[:len(mask_L)] = mask_L
        return {"tokens": tokens_T, "loss_mask": mask_T}


class _PackedRows:
    """Random-access source: packed row i (several whole examples) as fixed-length arrays."""

    def __init__(self, tokens: list[np.ndarray], masks: list[np.ndarray], rows: list[list[int]],
                 seq_len: int, pad_id: int):
        self._tokens, self._masks, self._rows = tokens, masks, rows
        self._seq_len, self._pad_id = seq_len, pad_id

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Batch:
        out = {"tokens": np.full((self._seq_len,), self._pad_id, np.int32),
               "loss_mask": np.zeros((self._seq_len,), np.float32),
               "positions": np.zeros((self._seq_len,), np.int32),
               "segment_ids": np.zeros((self._seq_len,), np.int32)}
        start = 0
        for seg, i in enumerate(self._rows[index], start=1):
            n = len(self._tokens[i])
            out["tokens"][start:start + n] = self._tokens[i]
            out["loss_mask"][start:start + n] = self._masks[i]
            out["positions"][start:start + n] = np.arange(n)
            out["segment_ids"][start:start + n] = seg
            start += n
        return out


def _pack_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Next-fit: walk ``order``, start a new row when the next example does not fit."""
    rows, row, used = [], [], 0
    for i in order:
        if used + lengths[i] > seq_len and row:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += lengths[i]
    if row:
        rows.append(row)
    return rows


class BatchIterator(Iterator[Batch]):
    """Iterator over batches whose state can be saved and restored exactly."""

    def __init__(self, dataset: grain.MapDataset, read_options: grain.ReadOptions,
                 fingerprint: dict[str, Any]):
        self._it = iter(dataset.to_iter_dataset(read_options))
        self._fingerprint = fingerprint

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """{"next_batch": int, "pipeline": {...}}: plain JSON types only."""
        state = self._it.get_state()
        return {"next_batch": int(state["next_index"]), "pipeline": dict(self._fingerprint)}

    def set_state(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Continue from `state`. With `strict`, refuse a state from a pipeline built with
        other settings (seed, seq_len, batch size, shard, dataset size): its batches
        would not continue the saved run."""
        if not isinstance(state, dict) or not isinstance(state.get("next_batch"), int):
            raise ValueError(f"state must be a dict from get_state(), got {state!r}")
        if strict and state.get("pipeline") != self._fingerprint:
            raise ValueError(f"state comes from another pipeline: saved {state.get('pipeline')}, "
                             f"this one {self._fingerprint}")
        if state["next_batch"] < 0:
            raise ValueError(f"state['next_batch'] must be >= 0, got {state['next_batch']}")
        self._it.set_state({"next_index": state["next_batch"]})


def get_state(iterator: BatchIterator) -> dict[str, Any]:
    """The iterator's position, JSON-serialisable."""
    return iterator.get_state()


def set_state(iterator: BatchIterator, state: dict[str, Any], *, strict: bool = True) -> None:
    """Moves `iterator` (e.g. a fresh `iter(dataset)`) to `state` from `get_state`."""
    iterator.set_state(state, strict=strict)


class TokenDataset:
    """Iterable of padded batches; `iter()` gives a fresh `BatchIterator` at batch 0."""

    def __init__(self, dataset: grain.MapDataset, stats: DatasetStats,
                 fingerprint: dict[str, Any], read_options: grain.ReadOptions,
                 num_epochs: int | None):
        self.grain_dataset = dataset
        self.stats = stats
        self._fingerprint = fingerprint
        self._read_options = read_options
        self._finite = num_epochs is not None

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self.grain_dataset, self._read_options, self._fingerprint)

    def __len__(self) -> int:
        """Number of batches; only for a finite number of epochs."""
        if not self._finite:
            raise TypeError("the dataset repeats forever (num_epochs=None): it has no length")
        return len(self.grain_dataset)

    def __repr__(self) -> str:
        return f"TokenDataset({self._fingerprint}, {self.stats})"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _mix_seed(seed: int) -> int:
    # grain shuffles epoch e with seed + e, so seeds s and s + 1 would share all but one
    # epoch order; hashing the seed first makes nearby seeds unrelated.
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


def _validate_examples(examples: Sequence[Example], vocab_size: int | None
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if isinstance(examples, (str, bytes, dict)) or not isinstance(examples, Sequence):
        raise ValueError(f"examples must be a sequence of (tokens, loss_mask) pairs, got "
                         f"{type(examples).__name__}")
    if not examples:
        raise ValueError("examples is empty")
    tokens_all, masks_all = [], []
    for i, example in enumerate(examples):
        if not (isinstance(example, (tuple, list)) and len(example) == 2):
            raise ValueError(f"examples[{i}] must be a (tokens, loss_mask) pair")
        tokens = np.asarray(example[0])
        try:
            mask = np.asarray(example[1], dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"examples[{i}] loss_mask must be numbers: {e}") from None
        if tokens.ndim != 1 or len(tokens) == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"examples[{i}] tokens must be a non-empty 1-D list of ints, got "
                             f"dtype {tokens.dtype} shape {tokens.shape}")
        if mask.shape != tokens.shape:
            raise ValueError(f"examples[{i}]: tokens has length {len(tokens)} but loss_mask "
                             f"has shape {mask.shape}: they must have equal lengths")
        if tokens.min() < 0 or (vocab_size is not None and tokens.max() >= vocab_size):
            raise ValueError(f"examples[{i}] tokens must lie in [0, vocab_size={vocab_size}), "
                             f"got range [{tokens.min()}, {tokens.max()}]")
        if not np.all(np.isfinite(mask)) or mask.min() < 0:
            raise ValueError(f"examples[{i}] loss_mask must be finite and >= 0")
        tokens_all.append(tokens.astype(np.int32))
        masks_all.append(mask)
    return tokens_all, masks_all


def make_dataset(examples: Sequence[Example], seq_len: int, batch_size: int, seed: int, *,
                 shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, pad_id: int = 0,
                 overlong: Literal["drop", "truncate", "error"] = "drop",
                 shard_index: int | None = None, shard_count: int | None = None,
                 vocab_size: int | None = None, pack: bool = False,
                 read_options: grain.ReadOptions | None = None) -> TokenDataset:
    """Batches `{"tokens": int32 [B, T], "loss_mask": float32 [B, T]}` from examples.

    Args:
      examples: `(tokens, loss_mask)` pairs of equal length (see `encode_example`).
      seq_len: T, every batch's length; examples are right-padded to it.
      batch_size: B, per host (each host batches its own shard).
      seed: shuffle seed; the order is a pure function of (seed, epoch).
      shuffle: False keeps the (sharded) input order in every epoch.
      num_epochs: None repeats forever; else the data is seen this many times.
      drop_remainder: drop a last batch smaller than B (only matters for finite epochs),
        and cut every shard to the same size so all hosts yield the same number of
        batches (multi-host steps stay in lockstep). False keeps every example.
      pad_id: token written at padded positions (mask 0 there).
      overlong: what to do with examples longer than seq_len: "drop", "truncate" (keep
        the first seq_len tokens) or "error".
      shard_index, shard_count: this host reads examples[shard_index::shard_count];
        default `jax.process_index()` / `jax.process_count()`.
      vocab_size: if given, token ids must lie in [0, vocab_size).
      pack: put several whole examples in one row (see the module docstring); batches
        then also hold `positions` and `segment_ids`.
      read_options: grain read options; default synchronous (no threads), which is
        fastest for in-memory token lists on few cores.
    """
    if not _is_int(seq_len) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (one input and one target), got {seq_len!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if num_epochs is not None and (not _is_int(num_epochs) or num_epochs < 1):
        raise ValueError(f"num_epochs must be None (forever) or an int >= 1, got {num_epochs!r}")
    if not _is_int(pad_id) or pad_id < 0:
        raise ValueError(f"pad_id must be an int >= 0, got {pad_id!r}")
    if overlong not in ("drop", "truncate", "error"):
        raise ValueError(f"overlong must be 'drop', 'truncate' or 'error', got {overlong!r}")
    if vocab_size is not None and (not _is_int(vocab_size) or vocab_size < 1):
        raise ValueError(f"vocab_size must be None or an int >= 1, got {vocab_size!r}")
    if shard_index is None or shard_count is None:
        import jax  # only for the multi-host defaults

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not _is_int(shard_count) or shard_count < 1:
        raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}")
    if not _is_int(shard_index) or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be an int in [0, shard_count={shard_count}), "
                         f"got {shard_index!r}")

    tokens_all, masks_all = _validate_examples(examples, vocab_size)
    num_input = len(tokens_all)
    overlong_ids = [i for i, t in enumerate(tokens_all) if len(t) > seq_len]
    if overlong_ids:
        if overlong == "error":
            raise ValueError(f"examples[{overlong_ids[0]}] has {len(tokens_all[overlong_ids[0]])} "
                             f"tokens > seq_len={seq_len} ({len(overlong_ids)} such examples; "
                             "overlong='error')")
        action = "dropped" if overlong == "drop" else "truncated"
        logger.warning("%d of %d examples are longer than seq_len=%d and were %s",
                       len(overlong_ids), num_input, seq_len, action)
        if overlong == "drop":
            keep = [i for i, t in enumerate(tokens_all) if len(t) <= seq_len]
            tokens_all = [tokens_all[i] for i in keep]
            masks_all = [masks_all[i] for i in keep]
        else:
            tokens_all = [t[:seq_len] for t in tokens_all]
            masks_all = [m[:seq_len] for m in masks_all]
    if not tokens_all:
        raise ValueError(f"examples: all {num_input} examples are longer than seq_len={seq_len}")

    num_kept = len(tokens_all)
    if drop_remainder:
        end = (num_kept // shard_count) * shard_count
    else:
        end = num_kept
    if end <= shard_index:
        raise ValueError(f"shard_count={shard_count} exceeds the {num_kept} usable examples: "
                         f"shard {shard_index} would be empty")
    if not isinstance(pack, (bool, np.bool_)):
        raise ValueError(f"pack must be a bool, got {pack!r}")
    ds = grain.MapDataset.source(_PaddedExamples(tokens_all, masks_all, seq_len, pad_id))
    ds = ds[shard_index:end:shard_count]
    num_examples = len(ds)
    if pack:
        mine = range(shard_index, end, shard_count)
        order = np.random.default_rng(_mix_seed(seed)).permutation(len(mine)) if shuffle else range(len(mine))
        rows = _pack_rows([len(t) for t in tokens_all], [mine[j] for j in order], seq_len)
        ds = grain.MapDataset.source(_PackedRows(tokens_all, masks_all, rows, seq_len, pad_id))
    if shuffle:
        ds = ds.shuffle(seed=_mix_seed(seed))
    ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    num_rows = len(rows) if pack else num_examples
    if num_epochs is not None and len(ds) == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_rows * num_epochs} "
                         f"rows this shard yields over num_epochs={num_epochs}")

    stats = DatasetStats(num_input=num_input, num_overlong=len(overlong_ids),
                         num_examples=num_examples,
                         batches_per_epoch=num_rows // batch_size, num_rows=num_rows)
    fingerprint = {"num_examples": num_examples, "seq_len": seq_len, "batch_size": batch_size,
                   "seed": seed, "shuffle": shuffle, "num_epochs": num_epochs, "overlong": overlong,
                   "shard_index": shard_index, "shard_count": shard_count}
    if pack:  # only when set, so the state of an unpacked run saved before packing existed still loads
        fingerprint["pack"] = True
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return TokenDataset(ds, stats, fingerprint, read_options, num_epochs)
