"""Mixtures: `data.sources`, several datasets blended by weight into one deterministic stream of sequences.

Each source (a prepared folder, a local file or folder, the embedded corpus or a hub name) is
tokenized and split like a single `data.dataset` (`prepare_data`); all must tokenize alike.
`MixtureSampler` draws the global order of sequences: sample g of the stream comes from the source
that megatron-core's `build_blending_indices` (the greedy of its BlendedDataset: each sample goes to
the source furthest below its share) picks for g, computed once for a block of `BLOCK` samples and
repeated, so position g needs no replay from the start; within a source, its sequences are visited
in a seeded permutation per pass over it (each source's passes roll over on their own). The global
order does not depend on the data-parallel layout, which deals it out as `BatchSampler` does: one
rank with 4x the micro-batch sees what four ranks see together, and the saved position resumes
exactly at any layout.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import numpy as np

from moe.data.dataset import TokenData, TokenDataset, prepare_data
from moe.data.prepared import check_tokenizer, is_prepared, read_manifest
from moe.data.sampler import BatchSampler
from moe.data.sources import _resolve_source
from moe.errors import DataError

if TYPE_CHECKING:  # only for annotations; torch is imported when the first batch is made
    import torch

    from moe.config import DataConfig

BLOCK = 1 << 16
"""Samples per repeat of the blending pattern: within every block each source gets its share to one sample."""


@dataclass
class SourceData:
    """One source of a mixture: its name (`loss/val/<name>`), normalised weight and token streams."""

    name: str
    weight: float
    train: TokenDataset
    val: TokenDataset


def blending_pattern(weights: List[float], size: int = BLOCK) -> Tuple[np.ndarray, np.ndarray]:
    """(source of each sample, index of that sample within its source) for `size` samples, by
    megatron-core's greedy blending helper."""
    with warnings.catch_warnings():  # megatron.core's import-time notes (see cache._megatron_indexed)
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    w = np.asarray(weights, dtype=np.float64)
    source = np.zeros(size, dtype=np.int16)
    within = np.zeros(size, dtype=np.int64)
    helpers_cpp.build_blending_indices(source, within, w / w.sum(), len(w), size, False)
    return source, within


class MixtureSampler:
    """`BatchSampler`'s interface (next_batch, state_dict, load_state_dict) over a weighted mixture.

    `last_sources` holds the source index of each sequence of the last batch (for routing-by-domain
    statistics). The state is the global position in sequences.
    """

    def __init__(self, sources: List[SourceData], seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, split: str = "train") -> None:
        if seq_len <= 0 or micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler layout: seq_len {seq_len}, micro_batch_size {micro_batch_size}, "
                             f"dp_rank {dp_rank}, dp_size {dp_size}")
        self.datasets = [getattr(s, split) for s in sources]
        self.names = [s.name for s in sources]
        self.seq_len, self.micro_batch_size, self.dp_rank, self.dp_size = seq_len, micro_batch_size, dp_rank, dp_size
        self.seed = seed
        self.chunk = micro_batch_size * dp_size
        self.counts = [ds.num_sequences(seq_len) for ds in self.datasets]
        for name, ds, n in zip(self.names, self.datasets, self.counts):
            if n == 0:
                raise DataError(f"data.sources {name!r}: {ds.num_tokens} tokens make no sequence of train.seq_len="
                                f"{seq_len}; use more text or a smaller train.seq_len")
        self.pattern, self.within = blending_pattern([s.weight for s in sources])
        self.per_block = np.bincount(self.pattern, minlength=len(sources)).astype(np.int64)
        self.position = 0
        self.last_sources: Optional[np.ndarray] = None
        self._perms: Dict[Tuple[int, int], np.ndarray] = {}

    def _order(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.datasets):
                self._perms.clear()
            rng = np.random.default_rng([self.seed, source, epoch])
            self._perms[key] = rng.permutation(self.counts[source])
        return self._perms[key]

    def global_samples(self, start: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
        """(source, sequence index within that source) of global samples start .. start+count-1."""
        g = np.arange(start, start + count, dtype=np.int64)
        block, j = g // BLOCK, g % BLOCK
        src = self.pattern[j].astype(np.int64)
        k = block * self.per_block[src] + self.within[j]  # how many of this source's samples came before
        seq = np.empty(count, dtype=np.int64)
        for s in np.unique(src):
            mask = src == s
            n = self.counts[s]
            epochs, offsets = k[mask] // n, k[mask] % n
            seq[mask] = [self._order(int(s), int(e))[o] for e, o in zip(epochs, offsets)]
        return src, seq

    def next_batch(self) -> Tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        src, seq = self.global_samples(self.position + self.dp_rank * self.micro_batch_size, self.micro_batch_size)
        self.position += self.chunk
        windows = np.empty((len(seq), self.seq_len + 1), dtype=np.int64)
        for s in np.unique(src):
            mask = src == s
            windows[mask] = self.datasets[s].sequences(seq[mask], self.seq_len)
        self.last_sources = src
        w = torch.from_numpy(windows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def tokens_drawn(self) -> Dict[str, int]:
        """Training tokens each source has given the whole stream (all ranks) up to the current position."""
        blocks, rest = divmod(self.position, BLOCK)
        counts = (blocks * self.per_block + np.bincount(self.pattern[:rest], minlength=len(self.names))) * self.seq_len
        return {name: int(n) for name, n in zip(self.names, counts)}

    def state_dict(self) -> dict:
        return {"position": self.position, "sources": self.names, "num_sequences": self.counts, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for name, ours in (("sources", self.names), ("num_sequences", self.counts), ("seed", self.seed)):
            if name in state and state[name] != ours:
                raise ValueError(f"sampler state was saved with {name}={state[name]}, but this run has {name}={ours}: "
                                 f"data.sources, train.seq_len or run.seed changed")
        if "sources" not in state:
            raise ValueError("sampler state was saved by a run on a single dataset; this run mixes data.sources")
        self.position = int(state["position"])


def prepare_training_data(cfg: DataConfig, is_writer: bool = True, barrier: Optional[Callable[[], None]] = None,
                          seq_len: int = 0, batch_sequences: int = 1, world_size: int = 1) -> TokenData:
    """`prepare_data` for `data.dataset`, or for every source of `data.sources` (each split and cached
    on its own, the barrier called once per source by every process) with one tokenizer for all."""
    if not cfg.sources:
        return prepare_data(cfg, is_writer, barrier, seq_len, batch_sequences, world_size)
    total = sum(s.weight for s in cfg.sources)
    if not total > 0:
        raise DataError(f"data.sources: the weights sum to {total}; each must be > 0")
    for src in cfg.sources:  # every source checked before any is tokenized
        where = f"data.sources {src.name!r}"
        if is_prepared(src.dataset):
            check_tokenizer(cfg, src.dataset, read_manifest(src.dataset, where), label=where)
        else:
            _resolve_source(src.dataset, cfg.dataset_config, cfg.text_field, label=where)
    parts, first = [], None
    for src in cfg.sources:
        one = dataclasses.replace(cfg, dataset=src.dataset, sources=[])
        try:
            data = prepare_data(one, is_writer, barrier, seq_len, batch_sequences, world_size)
        except DataError as exc:
            raise DataError(f"data.sources {src.name!r}: {exc}") from exc
        if first is None:
            first = data
        elif data.tokenizer.fingerprint() != first.tokenizer.fingerprint():
            raise DataError(f"data.sources {src.name!r}: tokenized with {data.tokenizer.name} "
                            f"({data.tokenizer.fingerprint()}), "
                            f"unlike {cfg.sources[0].name!r} ({first.tokenizer.fingerprint()}); every source of a "
                            f"mixture must use the same tokenizer (prepare them with the same data.tokenizer)")
        parts.append(SourceData(src.name, src.weight / total, data.train, data.val))
    return TokenData(first.tokenizer, first.train, first.val, first.cache_path, sources=parts)


def make_sampler(data: TokenData, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
    """The training sampler: a `MixtureSampler` over data.sources, else a `BatchSampler` over data.train."""
    if data.sources:
        return MixtureSampler(data.sources, seq_len, micro_batch_size, dp_rank, dp_size, seed)
    return BatchSampler(data.train, seq_len, micro_batch_size, dp_rank, dp_size, seed=seed)
