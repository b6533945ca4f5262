"""Router statistics of every MoE layer, summarised (and all-reduced) once per logging window."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.distributed as dist

from moe.nn.moe_layer import MoELayer


def router_metrics(layers: Dict[int, MoELayer]) -> Dict[str, Any]:
    """Summarise and reset each MoE layer's statistics since the last call (the logging window).

    A collective when torch.distributed is initialised with more than one rank (one all-reduce of
    every layer's statistics): call it on every rank; all ranks return the same, global, numbers.

    Per layer L, under `router/layer{L}/`:
    - `load`: fraction of routed (token, slot) pairs per expert, counted before capacity drops (expert
      choice: what each expert kept); `tokens_per_expert`: the same as counts. Both JSONL-only lists.
    - `max_over_mean`, `cv` (std / mean) of the per-expert counts; `dead_experts`: experts that got no
      token in the window.
    - `dropped_frac`: dropped fraction of the routed pairs (expert choice: of the tokens);
      `dropped_tokens_frac`: tokens that got no expert at all and only took the residual path.
    - `entropy`: mean entropy (nats) of the router's normalised scores.
    - the weighted losses the layer added: `aux_loss`, `seq_aux_loss`, `global_aux_loss`, `z_loss`
      (mean over the window's forward passes).
    - aux-loss-free balancing: `bias` (list), `bias_range` (max - min; the bias is shift-invariant)
      and `bias_std`.
    """
    active = [(lid, layer) for lid, layer in layers.items() if layer.stats.packed is not None]
    if not active:
        return {}
    # each layer's stats are already one vector: [counts E | dropped, slots, dropped_tokens, tokens,
    # entropy, calls, lse2 | losses] (moe/nn/stats.py RouterStats)
    loss_names = [list(layer.stats.loss_names) for _, layer in active]
    packed = torch.cat([layer.stats.packed for _, layer in active])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    packed = packed.cpu()

    out: Dict[str, Any] = {}
    offset = 0
    for (layer_id, layer), names in zip(active, loss_names):
        E = layer.num_experts
        counts = packed[offset:offset + E]
        dropped, slots, dropped_tokens, tokens, entropy, calls, lse2 = packed[offset + E:offset + E + 7].tolist()
        losses = packed[offset + E + 7:offset + E + 7 + len(names)].tolist()
        offset += E + 7 + len(names)
        total = float(counts.sum())
        mean = total / E
        std = float(counts.std(unbiased=False)) if E > 1 else 0.0
        prefix = f"router/layer{layer_id}/"
        out[prefix + "load"] = [round(v, 6) for v in (counts / max(total, 1.0)).tolist()]
        out[prefix + "tokens_per_expert"] = [int(v) for v in counts.tolist()]
        out[prefix + "max_over_mean"] = float(counts.max()) / mean if mean > 0 else 0.0
        out[prefix + "cv"] = std / mean if mean > 0 else 0.0
        out[prefix + "dead_experts"] = int((counts == 0).sum())
        out[prefix + "dropped_frac"] = dropped / slots if slots else 0.0
        out[prefix + "dropped_tokens_frac"] = dropped_tokens / tokens if tokens else 0.0
        out[prefix + "entropy"] = entropy / tokens if tokens else 0.0
        out[prefix + "logit_lse2"] = lse2 / tokens if tokens else 0.0  # mean logsumexp(logits)^2
        for name, value in zip(names, losses):
            out[prefix + name] = value / calls
        bias = layer.router.expert_bias
        if bias is not None:
            b = bias.detach().double().cpu()
            out[prefix + "bias"] = [round(v, 6) for v in b.tolist()]
            out[prefix + "bias_range"] = float(b.max() - b.min())
            out[prefix + "bias_std"] = float(b.std(unbiased=False))
        layer.stats.reset()
    return out
