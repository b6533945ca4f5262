"""Routing by domain: which experts each data source's tokens go to, per MoE layer, for a data mixture.

The training loop tags every token of a micro-batch with the index of the `data.sources` entry its
sequence came from (`set_token_sources`); each MoE layer's `RouterStats` then counts, per source, the
(token, slot) pairs routed to each expert. `domain_metrics` reads and clears those counts once per
logging window (one all-reduce), giving per layer L:

- `router/layer{L}/domain`: a sources x experts matrix (list of rows): row s is the fraction of source
  s's routed pairs that went to each expert (each row sums to 1).
- `router/layer{L}/specialisation`: the mutual information between a routed pair's source and its
  expert, normalised by the source entropy: I(S; X) / H(S), with the joint distribution of the
  window's pairs. 0 when every source uses the experts alike; 1 when the expert alone tells the
  source (each expert serves one source). It does not depend on the mixture weights' scale, and
  is comparable across routers at the same number of experts and sources.

And, with or without MoE layers, what the mixture fed the model (`source_metrics`): per source,
`data/tokens/<source>`, the training tokens drawn from it since step 0 (counted by the ranks as they
draw them, summed over ranks), and `data/fraction/<source>`, its share of all tokens drawn, to set
against its weight.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np
import torch
import torch.distributed as dist

from moe.nn.moe_layer import MoELayer


def set_token_sources(layers: Dict[int, MoELayer], sequence_sources, seq_len: int, num_sources: int) -> None:
    """Tag the next forward's tokens: `sequence_sources[i]` is the source of sequence i (of seq_len tokens)."""
    ids = torch.as_tensor(np.asarray(sequence_sources, dtype=np.int64)).repeat_interleave(seq_len)
    for layer in layers.values():
        layer.stats.token_sources = ids
        layer.stats.num_sources = num_sources


def source_metrics(tokens: Dict[str, int]) -> Dict[str, Any]:
    """`data/tokens/<source>` and `data/fraction/<source>` from the run's cumulative tokens per source."""
    total = sum(tokens.values())
    out: Dict[str, Any] = {f"data/tokens/{name}": int(n) for name, n in tokens.items()}
    if total > 0:
        out.update({f"data/fraction/{name}": n / total for name, n in tokens.items()})
    return out


def specialisation(counts: np.ndarray) -> float:
    """I(S; X) / H(S) of a sources x experts count matrix (0 for fewer than two sources seen)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    joint = counts / total
    ps, px = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    h_s = -float(np.sum(ps[ps > 0] * np.log(ps[ps > 0])))
    if h_s <= 0:
        return 0.0
    nz = joint > 0
    mi = float(np.sum(joint[nz] * np.log(joint[nz] / (ps @ px)[nz])))
    return max(0.0, min(1.0, mi / h_s))


def domain_metrics(layers: Dict[int, MoELayer], names: Sequence[str] = ()) -> Dict[str, Any]:
    """The window's routing-by-domain matrix and specialisation score per layer, plus
    `router/domain_sources` (`names`, the matrix rows); clears the counts.

    A collective with more than one rank (when any layer has counts, which every rank of a mixture
    run has): call it on every rank."""
    active = [(lid, layer) for lid, layer in layers.items() if layer.stats.domain is not None]
    if not active:
        return {}
    stacked = torch.cat([layer.stats.domain.reshape(-1) for _, layer in active])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
    stacked = stacked.cpu().numpy()
    out: Dict[str, Any] = {"router/domain_sources": list(names)} if names else {}
    offset = 0
    for layer_id, layer in active:
        S, E = layer.stats.domain.shape
        counts = stacked[offset:offset + S * E].reshape(S, E)
        offset += S * E
        rows = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
        out[f"router/layer{layer_id}/domain"] = [[round(float(v), 6) for v in row] for row in rows]
        out[f"router/layer{layer_id}/specialisation"] = specialisation(counts)
        layer.stats.domain = None
    return out
