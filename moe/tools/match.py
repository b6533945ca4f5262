"""`moe match`: derive the dense config that matches an MoE config on active or total parameters.

Pairs are derived, never tuned by hand, so a dense baseline cannot drift from its MoE partner when
the MoE config changes. Only the dense FFN's hidden size is solved for; everything else (width, depth,
attention, vocabulary, data, training) is copied unchanged.
"""
from __future__ import annotations

import copy
from typing import Dict, Tuple

from moe.config import Config, ModelConfig
from moe.nn.accounting import param_counts

__all__ = ["match_dense", "param_counts", "replace_vocab"]  # param_counts lives in moe/nn/accounting.py


def match_dense(cfg: Config, on: str = "active", multiple_of: int = 8) -> Tuple[Config, Dict[str, float]]:
    """A dense copy of `cfg` whose parameter count (`on`: active or total) matches the MoE model's."""
    if on not in ("active", "total"):
        raise ValueError(f"--on must be active or total, got {on!r}")
    if cfg.model.moe.num_experts == 0:
        raise ValueError("the config is already dense (model.moe.num_experts is 0)")
    cfg = copy.deepcopy(cfg)
    if cfg.model.vocab_size <= 0:  # resolved from the tokenizer at train time; it only shifts both sides
        known = {"bytes": 257, "bpe": cfg.data.bpe_vocab_size}
        if cfg.data.tokenizer not in known:
            raise ValueError(f"set model.vocab_size to match a config using tokenizer {cfg.data.tokenizer!r}")
        cfg.model.vocab_size = known[cfg.data.tokenizer]
    target = param_counts(cfg.model)[f"params_{on}"]
    dense = copy.deepcopy(cfg)
    dense.model.moe.num_experts = 0
    dense.parallel.ep_size = 1  # no experts to shard
    dense.model.ffn_hidden = 1
    base = param_counts(dense.model)["params_total"] - 3 * cfg.model.d_model * cfg.model.n_layers
    per_hidden_unit = 3 * cfg.model.d_model * cfg.model.n_layers
    exact = (target - base) / per_hidden_unit
    hidden = max(multiple_of, int(round(exact / multiple_of)) * multiple_of)
    dense.model.ffn_hidden = hidden
    dense.model.vocab_size = 0 if dense.data.tokenizer in ("bytes", "bpe") else dense.model.vocab_size
    got = param_counts(replace_vocab(dense.model, cfg.model.vocab_size))["params_total"]
    dense.run.name = f"{cfg.run.name}_dense_{on}"
    tags = [t for t in dense.logging.wandb.tags if t != "moe"]
    dense.logging.wandb.tags = tags + ["dense", f"matched-{on}"]
    info = {"target": target, "dense": got, "ffn_hidden": hidden, "rel_diff": (got - target) / target}
    return dense, info


def replace_vocab(m: ModelConfig, vocab_size: int) -> ModelConfig:
    m = copy.deepcopy(m)
    m.vocab_size = vocab_size
    return m
