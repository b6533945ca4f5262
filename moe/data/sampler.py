"""Batches: a split's token stream cut into fixed-length windows, dealt to data-parallel ranks.

`BatchSampler` visits a `TokenDataset`'s windows in a seeded order and deals them to data-parallel
ranks; its position is saved with a checkpoint, so a resumed run continues mid-epoch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

from moe.data.dataset import TokenDataset
from moe.errors import DataError

if TYPE_CHECKING:  # only for annotations; torch is imported when the first batch is made
    import torch


class BatchSampler:
    """Deterministic, per-rank, resumable mid-epoch.

    Epoch e visits the dataset's sequences in the order of a permutation seeded by (seed, e)
    (identity when shuffle=False). That global order is cut into chunks of micro_batch_size *
    dp_size sequences; rank r takes the r-th micro_batch_size slice of each chunk. A trailing partial
    chunk is skipped, and epochs roll over forever.

    Because the global order does not depend on dp_size, one rank with micro batch 2B sees exactly
    what two ranks with micro batch B see together, and the position (in sequences of the global
    order) saved by `state_dict` stays meaningful when the data-parallel layout changes on resume.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True) -> None:
        if seq_len <= 0 or micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(f"seq_len ({seq_len}), micro_batch_size ({micro_batch_size}) and dp_size "
                             f"({dp_size}) must be > 0")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        self.dataset = dataset
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_sequences = dataset.num_sequences(seq_len)
        self.chunk = micro_batch_size * dp_size
        if self.num_sequences < self.chunk:
            raise DataError(
                f"{dataset.name}: dataset too small: {dataset.num_tokens} tokens make {self.num_sequences} "
                f"sequences of seq_len {seq_len}, fewer than one batch of micro_batch_size {micro_batch_size} x "
                f"data-parallel size {dp_size} = {self.chunk} sequences; use more data (data.max_bytes), a smaller "
                f"train.seq_len or a smaller batch")
        self.epoch = 0
        self.position = 0  # sequences of the epoch's global order already handed out (all ranks)
        self._order_epoch = -1
        self._order: Optional[np.ndarray] = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_sequences // self.chunk

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            else:
                self._order = np.arange(self.num_sequences)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> Tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        if self.position + self.chunk > self.num_sequences:  # trailing partial chunk: next epoch
            self.epoch += 1
            self.position = 0
        chunk = self._epoch_order(self.epoch)[self.position:self.position + self.chunk]
        self.position += self.chunk
        mine = chunk[self.dp_rank * self.micro_batch_size:(self.dp_rank + 1) * self.micro_batch_size]
        windows = torch.from_numpy(self.dataset.sequences(mine, self.seq_len))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        # num_sequences and seed are there to catch resuming onto different data, not to restore.
        return {"epoch": self.epoch, "position": self.position, "num_sequences": self.num_sequences,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if "sources" in state:
            raise ValueError(f"sampler state was saved by a run mixing data.sources {state['sources']}; "
                             "this run reads one data.dataset")
        for name in ("num_sequences", "seed"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"sampler state was saved with {name}={state[name]}, but this sampler has "
                                 f"{name}={getattr(self, name)}: the data, train.seq_len or run.seed changed")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

