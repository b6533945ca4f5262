"""Tests of moe/data/sampler.py: BatchSampler's shifted windows, epochs, per-rank dealing, determinism,
mid-epoch resume and the too-small error naming the dataset (CPU, a few seconds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe import data
from moe.errors import DataError
from tests.helpers import data_cfg, pattern_dataset, text_of


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def numbered_dataset(tmp_path, n_windows: int, seq_len: int = 32) -> data.TokenDataset:
    """Window i of length seq_len starts with its own number i in 5 digits, so batches can be read back."""
    text = "".join(f"{i:05d}".ljust(seq_len, "-") for i in range(n_windows))
    path = tmp_path / f"numbered{n_windows}x{seq_len}.txt"
    path.write_text(text)
    ds = data.tokenize_file_for_eval(str(path), data.ByteTokenizer(), str(tmp_path / "cache"))
    assert ds.num_sequences(seq_len) == n_windows
    return ds


def window_ids(x: torch.Tensor) -> list:
    return [int(bytes(row[:5].tolist()).decode()) for row in x]


def test_sampler_batches_are_shifted_windows(tmp_path):
    ds = numbered_dataset(tmp_path, 100)
    s = data.BatchSampler(ds, seq_len=32, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    for row_x, row_y, i in zip(x, y, window_ids(x)):
        window = torch.from_numpy(ds.sequence(i, 32))
        assert torch.equal(row_x, window[:-1]) and torch.equal(row_y, window[1:])


def test_sampler_epoch_covers_every_window_once(tmp_path):
    ds = numbered_dataset(tmp_path, 103)  # 12 chunks of 4 x 2 ranks per epoch; 7 windows skipped
    ranks = [data.BatchSampler(ds, 32, 4, r, 2, seed=1) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 12
    epochs = []
    for _ in range(3):
        seen = [i for _ in range(12) for s in ranks for i in window_ids(s.next_batch()[0])]
        assert len(seen) == len(set(seen)) == 96 and all(0 <= i < 103 for i in seen)
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation every epoch
    assert ranks[0].state_dict()["epoch"] == 2
    # Exactly the permutation of (seed, epoch): a new sampler at epoch 1 replays it.
    again = [data.BatchSampler(ds, 32, 4, r, 2, seed=1) for r in (0, 1)]
    for s in again:
        s.load_state_dict({"epoch": 1, "position": 0})
    assert [i for _ in range(12) for s in again for i in window_ids(s.next_batch()[0])] == epochs[1]
    # a mixture's state (data.sources) is refused by name, not read as a position in this dataset
    with pytest.raises(ValueError, match="mixing data.sources"):
        again[0].load_state_dict({"position": 8, "sources": ["code", "docs"], "num_sequences": [3, 4], "seed": 1})


def test_sampler_unshuffled_is_in_order(tmp_path):
    ds = pattern_dataset(tmp_path, 2000)
    s = data.BatchSampler(ds, 10, 3, 1, 2, seed=0, shuffle=False)
    x, y = s.next_batch()
    expected = ds.sequences(np.array([3, 4, 5]), 10)
    assert torch.equal(x, torch.from_numpy(expected[:, :-1])) and torch.equal(y, torch.from_numpy(expected[:, 1:]))


def test_sampler_deterministic_across_instances(tmp_path):
    ds = numbered_dataset(tmp_path, 199, seq_len=20)
    a = take(data.BatchSampler(ds, 20, 4, 1, 3, seed=5), 30)
    b = take(data.BatchSampler(ds, 20, 4, 1, 3, seed=5), 30)
    c = take(data.BatchSampler(ds, 20, 4, 1, 3, seed=6), 30)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))


def test_sampler_resume_mid_epoch(tmp_path):
    ds = numbered_dataset(tmp_path, 199, seq_len=20)  # 16 chunks of 12 per epoch
    straight = data.BatchSampler(ds, 20, 6, 0, 2, seed=3)
    expected = take(straight, 40)
    first = data.BatchSampler(ds, 20, 6, 0, 2, seed=3)
    take(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # goes through a JSON checkpoint
    resumed = data.BatchSampler(ds, 20, 6, 0, 2, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(take(resumed, 27), expected[13:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    # The position counts global sequences, so the same state also resumes a dp_size=1 layout.
    single = data.BatchSampler(ds, 20, 12, 0, 1, seed=3)
    single.load_state_dict(state)
    x, _ = single.next_batch()
    assert torch.equal(x[:6], expected[13][0])
    with pytest.raises(ValueError, match="seed"):
        data.BatchSampler(ds, 20, 6, 0, 2, seed=4).load_state_dict(state)


def test_sampler_too_small_dataset(tmp_path):
    ds = pattern_dataset(tmp_path, 100)  # 101 tokens -> 3 windows of 32
    with pytest.raises(ValueError, match=r"101 tokens.*3 sequences.*seq_len 32.*micro_batch_size 2.*2 = 4"):
        data.BatchSampler(ds, 32, 2, 0, 2, seed=0)
    data.BatchSampler(ds, 32, 3, 0, 1, seed=0)  # exactly one chunk is enough


def test_sampler_too_small_names_the_dataset(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("".join(text_of(i) for i in range(4)))
    td = data.prepare_data(data_cfg(tmp_path, path))
    with pytest.raises(DataError, match=r"^data.dataset=.*small.txt.*\(validation split\): dataset too small"):
        data.BatchSampler(td.val, 64, 8, 0, 1, seed=0)
