"""Everything a run needs before its first step, in the one order every entry point uses.

`moe train` and the `moe parity` workers both call `build_training`, so parity checks exactly what
training runs: threads and the host-memory policy, the process group, seeds, data (resolving
model.vocab_size from the tokenizer), the model (built on `meta`), and the DeepSpeed engine (expert
parallelism, the materialisation of this rank's weights with the layout-free init of moe/nn/init.py,
activation recompute and torch.compile are applied there, from outside the model).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict

import numpy as np
import torch
import torch.distributed as dist

from moe import parallel
from moe.config import Config, ConfigError, grad_accum_steps
from moe.data import prepare_training_data
from moe.nn.gpt import GPT
from moe.nn.init import meta_device
from moe.train.host_memory import keep_freed_memory, return_freed_memory
from moe.train.init_from import load_init_source, open_init_source


@dataclass
class TrainingSetup:
    """What build_training makes: the processes' view, the data, the model and its DeepSpeed engine."""

    dist_info: Any
    data: Any
    model: GPT
    engine: Any
    optimizer: Any
    scheduler: Any
    dtype: torch.dtype
    accum: int
    """Micro-batches per optimizer step on each rank."""
    moe_layers: Dict[int, Any]
    """{block index: MoELayer}."""
    freed_memory_kept: bool
    """Whether the host-memory policy of train.keep_freed_memory is in effect (moe/train/host_memory.py)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_training(cfg: Config, world_size: int) -> TrainingSetup:
    """Threads, process group, seeds, data, model and engine (see the module docstring)."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    freed_memory_kept = cfg.train.keep_freed_memory and keep_freed_memory()
    if not cfg.train.keep_freed_memory:
        return_freed_memory()
    dist_info = parallel.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    seed_everything(cfg.run.seed)
    data = prepare_training_data(cfg.data, is_writer=dist_info.rank == 0, barrier=dist.barrier,
                                 seq_len=cfg.train.seq_len, batch_sequences=cfg.train.micro_batch_size * world_size,
                                 world_size=world_size)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.tokenizer.vocab_size
    elif cfg.model.vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({data.tokenizer.vocab_size})")
    init_source = open_init_source(cfg)  # model.init_from, checked before anything is built
    with meta_device():  # no memory: build_engine allocates and initialises this rank's weights only
        model = GPT(cfg.model)
    accum = grad_accum_steps(cfg, world_size)
    engine, optimizer, scheduler, dtype = parallel.build_engine(model, cfg, dist_info, accum)
    if init_source is not None:
        load_init_source(engine, init_source, cfg, dist_info.rank)
    moe_layers = {b.layer_id: b.ffn for b in model.blocks if b.ffn in model.moe_layers()}
    return TrainingSetup(dist_info, data, model, engine, optimizer, scheduler, dtype, accum, moe_layers,
                         freed_memory_kept)
