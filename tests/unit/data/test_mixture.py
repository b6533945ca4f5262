"""Tests of moe/data/mixture.py: data.sources blended by weight. The blending order is checked against
megatron-core's own BlendedDataset index builder run for the whole stream; the per-rank sampler gives
the same global batches at any data-parallel size, tracks the weights to 1% over 200 steps and
resumes bitwise (in-process: no process group needed for the sampler's logic). CPU, a few seconds."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from moe.config import DataSourceConfig
from moe.data import BatchSampler, make_sampler, prepare_training_data
from moe.data.mixture import BLOCK, MixtureSampler, SourceData, blending_pattern
from moe.data.prepare import prepare
from moe.data.tokenizers import _train_bpe
from moe.errors import DataError
from tests.helpers import data_cfg, pattern_dataset, write_text_folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    a = pattern_dataset(tmp_path_factory.mktemp("a"), 20_000)  # 624 sequences of 32
    b = pattern_dataset(tmp_path_factory.mktemp("b"), 3_000)  # 93: revisited many times
    return [SourceData("a", 0.7, a, a), SourceData("b", 0.3, b, b)]


def _global(sources, dp, mbs, steps, start_state=None, seed=5):
    """The global batches of `steps` steps as (tokens, source ids), ranks concatenated in rank order."""
    samplers = [MixtureSampler(sources, 32, mbs, r, dp, seed) for r in range(dp)]
    for s in samplers:
        if start_state:
            s.load_state_dict(start_state)
    batches = []
    for _ in range(steps):
        xs, ids = zip(*[(s.next_batch()[0], s.last_sources) for s in samplers])
        batches.append((torch.cat(xs), np.concatenate(ids)))
    return batches, samplers[0].state_dict()


def test_blending_follows_megatron_blended_dataset_order():
    with warnings.catch_warnings():  # megatron.core's import-time notes
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp

    w = np.array([0.5, 0.2, 0.3])
    source, within = blending_pattern(list(w * 4), size=5000)  # weights are normalised
    ref_source, ref_within = np.zeros(5000, np.int16), np.zeros(5000, np.int64)
    helpers_cpp.build_blending_indices(ref_source, ref_within, w, 3, 5000, False)
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_array_equal(within, ref_within)


def test_same_global_batches_at_any_data_parallel_size(sources):
    one, _ = _global(sources, dp=1, mbs=8, steps=12)
    four, _ = _global(sources, dp=4, mbs=2, steps=12)
    for (x1, s1), (x4, s4) in zip(one, four):
        assert torch.equal(x1, x4) and np.array_equal(s1, s4)


def test_fractions_track_the_weights_over_200_steps(sources):
    batches, _ = _global(sources, dp=2, mbs=4, steps=200)
    ids = np.concatenate([s for _, s in batches])
    assert abs((ids == 0).mean() - 0.7) < 0.01 and abs((ids == 1).mean() - 0.3) < 0.01
    # Every window is a real window of its source (pattern tokens 33 + k % 90, consecutive).
    x = torch.cat([x for x, _ in batches]).numpy()
    assert np.all((np.diff(x, axis=1) - 1) % 90 == 0)


def test_tokens_drawn_counts_the_stream_up_to_the_position(sources):
    """What a resumed run counts from when its checkpoint predates the per-source counts: the tokens the
    whole stream (every rank) drew from each source, here across a block boundary."""
    from moe.metrics import source_metrics

    sampler = MixtureSampler(sources, 32, 8, 0, 1, seed=1)
    assert sampler.tokens_drawn() == {"a": 0, "b": 0}
    sampler.position = BLOCK + 1000
    src, _ = sampler.global_samples(0, BLOCK + 1000)
    drawn = sampler.tokens_drawn()
    assert drawn == {"a": int((src == 0).sum()) * 32, "b": int((src == 1).sum()) * 32}
    metrics = source_metrics(drawn)
    assert metrics["data/tokens/a"] == drawn["a"] and abs(metrics["data/fraction/a"] - 0.7) < 1e-3
    assert source_metrics({"a": 0, "b": 0}) == {"data/tokens/a": 0, "data/tokens/b": 0}


def test_each_pass_over_a_source_visits_every_sequence_once(sources):
    sampler = MixtureSampler(sources, 32, 8, 0, 1, seed=1)
    src, seq = sampler.global_samples(0, 3 * BLOCK // 100)
    small = seq[src == 1]
    n = sources[1].train.num_sequences(32)
    for p in range(len(small) // n):
        assert sorted(small[p * n:(p + 1) * n]) == list(range(n))
    assert not np.array_equal(small[:n], small[n:2 * n])  # each pass has its own permutation
    far_src, far_seq = sampler.global_samples(5 * BLOCK + 17, 40)  # no replay needed to get far
    assert far_src.shape == far_seq.shape == (40,)


def test_resume_is_bitwise_at_another_layout(sources):
    full, _ = _global(sources, dp=2, mbs=4, steps=30)
    _, state = _global(sources, dp=2, mbs=4, steps=18)
    rest, _ = _global(sources, dp=4, mbs=2, steps=12, start_state=state)
    for (x, s), (xr, sr) in zip(full[18:], rest):
        assert torch.equal(x, xr) and np.array_equal(s, sr)
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler(sources, 32, 4, 0, 1, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="single dataset"):
        MixtureSampler(sources, 32, 4, 0, 1, seed=5).load_state_dict({"epoch": 0, "position": 8})


def test_prepare_training_data_mixes_local_and_prepared_sources(tmp_path):
    write_text_folder(tmp_path / "one", n_docs=20)
    write_text_folder(tmp_path / "two", n_docs=12)
    cfg = data_cfg(tmp_path, "unused", val_fraction=0.25)
    prepare(data_cfg(tmp_path, tmp_path / "two", val_fraction=0.25), str(tmp_path / "two_ready"))
    cfg.sources = [_src("one", tmp_path / "one", 2.0), _src("two", tmp_path / "two_ready", 1.0)]
    data = prepare_training_data(cfg, seq_len=16, batch_sequences=2)
    assert [(s.name, round(s.weight, 4)) for s in data.sources] == [("one", 0.6667), ("two", 0.3333)]
    alone = prepare_training_data(data_cfg(tmp_path, tmp_path / "two", val_fraction=0.25))
    np.testing.assert_array_equal(np.asarray(data.sources[1].train.tokens), np.asarray(alone.train.tokens))
    assert isinstance(make_sampler(data, 16, 2, 0, 1, seed=0), MixtureSampler)
    assert isinstance(make_sampler(alone, 16, 2, 0, 1, seed=0), BatchSampler)


def test_bad_sources_fail_before_any_tokenizing(tmp_path):
    write_text_folder(tmp_path / "one", n_docs=8)
    _train_bpe(["a few words " * 30], 270).save(str(tmp_path / "tok"))
    prepare(data_cfg(tmp_path, tmp_path / "one", tokenizer=str(tmp_path / "tok")), str(tmp_path / "bpe_ready"))
    cfg = data_cfg(tmp_path / "run", "unused")
    cfg.sources = [_src("one", tmp_path / "one", 1.0), _src("other", tmp_path / "bpe_ready", 1.0)]
    with pytest.raises(DataError, match=r"data.sources 'other'=.*bpe_ready' was prepared with tokenizer .*tok'"):
        prepare_training_data(cfg)
    cfg.sources[1] = _src("gone", tmp_path / "nowhere" / "x.txt", 1.0)
    with pytest.raises(DataError, match=r"data.sources 'gone': file not found: .*nowhere/x.txt"):
        prepare_training_data(cfg)
    assert not os.path.exists(tmp_path / "run" / "cache")


def _src(name, dataset, weight):
    return DataSourceConfig(name=name, dataset=str(dataset), weight=weight)
