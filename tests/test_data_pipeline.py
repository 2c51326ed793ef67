"""grain pipeline: padding and masks, seeded shuffling, exact resume, host sharding, and
argument checks."""

import json

import grain
import numpy as np
import pytest

from bebop_jax.data import (ByteTokenizer, encode_example, get_state, make_dataset,
                            set_state)

PAD = 999


def _examples(n, min_len=3, max_len=12, seed=0):
    """Example i starts with token 1000 + i (its identity); random lengths and masks."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        tokens = [1000 + i] + rng.integers(0, 500, size=length - 1).tolist()
        mask = [0.0] + rng.integers(0, 2, size=length - 1).astype(float).tolist()
        out.append((tokens, mask))
    return out


def _ids(batch):
    return (batch["tokens"][:, 0] - 1000).tolist()


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same_batches(a, b):
    return len(a) == len(b) and all(
        np.array_equal(x["tokens"], y["tokens"]) and np.array_equal(x["loss_mask"], y["loss_mask"])
        for x, y in zip(a, b))


def test_padding_and_masks():
    examples = _examples(10)
    ds = make_dataset(examples, seq_len=16, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                      drop_remainder=False, pad_id=PAD, shard_index=0, shard_count=1)
    batches = list(ds)
    assert [b["tokens"].shape for b in batches] == [(4, 16), (4, 16), (2, 16)]
    assert len(ds) == 3
    rows = 0
    for b in batches:
        assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
        assert set(b) == {"tokens", "loss_mask"}
        for tokens_T, mask_T in zip(b["tokens"], b["loss_mask"]):
            ex_tokens, ex_mask = examples[rows]
            length = len(ex_tokens)
            np.testing.assert_array_equal(tokens_T[:length], ex_tokens)
            np.testing.assert_array_equal(mask_T[:length], ex_mask)
            assert (tokens_T[length:] == PAD).all() and (mask_T[length:] == 0).all()
            rows += 1
    assert rows == 10


def test_byte_example_batch_exact():
    tok = ByteTokenizer()
    ds = make_dataset([encode_example(tok, "hi", "yo")], seq_len=12, batch_size=2, seed=0,
                      pad_id=tok.pad_id, shard_index=0, shard_count=1)
    batch = next(iter(ds))  # one example, repeated forever
    np.testing.assert_array_equal(
        batch["tokens"], [[257, 260, 104, 105, 258, 261, 121, 111, 258, 256, 256, 256]] * 2)
    np.testing.assert_array_equal(batch["loss_mask"], [[0] * 6 + [1] * 3 + [0] * 3] * 2)


def test_seeded_shuffle_is_deterministic_and_reshuffles_each_epoch():
    examples = _examples(24)

    def epochs(seed, n_epochs=2):
        ds = make_dataset(examples, 16, 4, seed, shard_index=0, shard_count=1)
        ids = sum((_ids(b) for b in _take(iter(ds), 6 * n_epochs)), [])
        return [ids[24 * e:24 * (e + 1)] for e in range(n_epochs)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert a == b  # same seed, same batches
    for order in a + c:
        assert sorted(order) == list(range(24))  # every epoch is a permutation of the data
    assert a[0] != list(range(24))  # shuffled
    assert a[0] != a[1]  # reshuffled per epoch
    assert a[0] != c[0] and a[1] != c[1]  # another seed, another order
    # grain shuffles epoch e with seed + e; seeds are hashed first so that seed 1 does not
    # replay seed 0's later epochs.
    assert c[0] != a[1]
    ds = make_dataset(examples, 16, 4, 0, shuffle=False, num_epochs=2, shard_index=0,
                      shard_count=1)
    assert sum((_ids(b) for b in ds), []) == list(range(24)) * 2


@pytest.mark.parametrize("read_options", [None, grain.ReadOptions(num_threads=2,
                                                                  prefetch_buffer_size=4)])
def test_resume_from_state(read_options):
    ds = make_dataset(_examples(30), 16, 4, seed=3, shard_index=0, shard_count=1,
                      read_options=read_options)
    it = iter(ds)
    _take(it, 5)
    state = json.loads(json.dumps(get_state(it)))  # survives a checkpoint as JSON
    assert state["next_batch"] == 5
    expected = _take(it, 9)  # crosses the epoch boundary at 30 examples
    fresh = iter(ds)
    set_state(fresh, state)
    assert _same_batches(_take(fresh, 9), expected)
    # A fresh iterator without state starts over, so the check above is not vacuous.
    assert not _same_batches(_take(iter(ds), 9), expected)
    # Restoring into a pipeline built differently is refused.
    other = make_dataset(_examples(30), 16, 4, seed=4, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="another pipeline"):
        set_state(iter(other), state)
    with pytest.raises(ValueError, match="state"):
        set_state(iter(ds), {"next_index": 5})


def test_packing_keeps_every_example_whole_once_per_epoch():
    examples = _examples(40, min_len=3, max_len=12)
    ds = make_dataset(examples, seq_len=24, batch_size=4, seed=3, num_epochs=1, drop_remainder=False,
                      pad_id=PAD, pack=True, shard_index=0, shard_count=1)
    seen = []
    for b in ds:
        assert set(b) == {"tokens", "loss_mask", "positions", "segment_ids"}
        for tok, mask, pos, seg in zip(b["tokens"], b["loss_mask"], b["positions"], b["segment_ids"]):
            for s_id in range(1, seg.max() + 1):
                where = np.nonzero(seg == s_id)[0]
                assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
                i = int(tok[where[0]]) - 1000
                np.testing.assert_array_equal(tok[where], examples[i][0])
                np.testing.assert_array_equal(mask[where], examples[i][1])
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                seen.append(i)
            pad = seg == 0
            assert (tok[pad] == PAD).all() and (mask[pad] == 0).all()
            assert pad.sum() == 0 or np.nonzero(pad)[0][0] == np.nonzero(~pad)[0][-1] + 1  # padding at the end
    assert sorted(seen) == list(range(40))
    assert ds.stats.num_rows < 40 / 1.5  # rows hold ~3 examples of mean length 7.5 in 24 slots


def test_packing_per_host_shards_covers_every_example_once():
    """Each host packs only its own shard, with whole examples that fit their rows."""
    examples = _examples(41, min_len=3, max_len=12)
    seen = []
    for shard in range(3):
        ds = make_dataset(examples, seq_len=24, batch_size=2, seed=1, num_epochs=1, drop_remainder=False,
                          pad_id=PAD, pack=True, shard_index=shard, shard_count=3)
        for b in ds:
            for tok, seg in zip(b["tokens"], b["segment_ids"]):
                for s_id in range(1, seg.max() + 1):
                    where = np.nonzero(seg == s_id)[0]
                    i = int(tok[where[0]]) - 1000
                    assert i % 3 == shard
                    np.testing.assert_array_equal(tok[where], examples[i][0])
                    seen.append(i)
    assert sorted(seen) == list(range(41))


def test_packed_pipeline_is_deterministic_and_resumes():
    examples = _examples(50)
    make = lambda: make_dataset(examples, seq_len=20, batch_size=3, seed=5, pack=True, shard_index=0,
                                shard_count=1)
    a = _take(iter(make()), 12)
    assert _same_batches(a, _take(iter(make()), 12))
    it = iter(make())
    _take(it, 5)
    state = json.loads(json.dumps(get_state(it)))
    resumed = iter(make())
    set_state(resumed, state)
    rest = _take(resumed, 7)
    assert _same_batches(a[5:], rest)
    assert all(np.array_equal(x["segment_ids"], y["segment_ids"]) for x, y in zip(a[5:], rest))
    unpacked = iter(make_dataset(examples, seq_len=20, batch_size=3, seed=5, shard_index=0, shard_count=1))
    with pytest.raises(ValueError, match="another pipeline"):
        set_state(unpacked, state)


def test_finite_epochs_length():
    ds = make_dataset(_examples(10), 16, 3, seed=0, num_epochs=2, shard_index=0, shard_count=1)
    assert len(ds) == 6 and len(list(ds)) == 6  # 20 examples // 3, remainder dropped
    assert ds.stats.batches_per_epoch == 3
    with pytest.raises(TypeError):
        len(make_dataset(_examples(10), 16, 3, seed=0, shard_index=0, shard_count=1))


@pytest.mark.parametrize("n", [30, 31, 32])
def test_sharding_disjoint_cover(n):
    examples = _examples(n)
    shards = []
    for index in range(3):
        ds = make_dataset(examples, 16, 1, seed=0, num_epochs=1, drop_remainder=False,
                          shard_index=index, shard_count=3)
        shards.append(sum((_ids(b) for b in ds), []))
    assert sorted(sum(shards, [])) == list(range(n))  # a cover without overlap
    # drop_remainder=True: equal shard sizes (hosts stay in lockstep), still disjoint.
    even = []
    for index in range(3):
        ds = make_dataset(examples, 16, 2, seed=5, num_epochs=1, shard_index=index,
                          shard_count=3)
        even.append(sum((_ids(b) for b in ds), []))
        assert ds.stats.num_examples == n // 3
    assert len({len(s) for s in even}) == 1
    flat = sum(even, [])
    assert len(flat) == len(set(flat))
    # The default shard comes from jax: one process here, so it sees everything.
    assert make_dataset(examples, 16, 2, seed=0).stats.num_examples == n


def test_overlong_examples():
    examples = _examples(20, min_len=3, max_len=12) + [([7] * 20, [1.0] * 20)]
    ds = make_dataset(examples, 10, 1, 0, shuffle=False, num_epochs=1, shard_index=0,
                      shard_count=1)
    long = sum(len(t) > 10 for t, _ in examples)
    assert ds.stats.num_overlong == long > 1
    assert ds.stats.num_examples == 21 - long
    kept = [b["tokens"][0, 0] for b in ds]
    assert 7 not in kept and len(kept) == 21 - long
    ds = make_dataset(examples, 10, 1, 0, shuffle=False, num_epochs=1, overlong="truncate",
                      shard_index=0, shard_count=1)
    last = list(ds)[-1]
    np.testing.assert_array_equal(last["tokens"], [[7] * 10])
    np.testing.assert_array_equal(last["loss_mask"], [[1.0] * 10])
    with pytest.raises(ValueError, match="seq_len"):
        make_dataset(examples, 10, 1, 0, overlong="error", shard_index=0, shard_count=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=1), "seq_len"),
    (dict(seq_len=2.5), "seq_len"),
    (dict(batch_size=0), "batch_size"),
    (dict(seed=-1), "seed"),
    (dict(num_epochs=0), "num_epochs"),
    (dict(shard_index=3, shard_count=3), "shard_index"),
    (dict(shard_count=0, shard_index=0), "shard_count"),
    (dict(overlong="clip"), "overlong"),
    (dict(vocab_size=100), "vocab_size"),
    (dict(examples=[]), "examples"),
    (dict(examples=[([1, 2], [0.0, 1.0]), ([1, 2, 3], [0.0, 1.0])]), r"examples\[1\].*loss_mask"),
    (dict(examples=[([1.5, 2.0], [0.0, 1.0])]), r"examples\[0\] tokens"),
    (dict(examples=[([1, -2], [0.0, 1.0])]), r"examples\[0\] tokens"),
    (dict(examples=[([1, 2], [0.0, float("nan")])]), r"examples\[0\] loss_mask"),
    (dict(examples=[([1, 2], [0.0, 1.0])], shard_count=2, shard_index=1), "shard_count"),
    (dict(num_epochs=1, batch_size=50), "batch_size"),
])
def test_bad_arguments(kwargs, match):
    args = dict(examples=_examples(12), seq_len=16, batch_size=2, seed=0, shard_index=0,
                shard_count=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_dataset(**args)
