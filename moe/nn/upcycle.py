"""Sparse upcycling: the routed experts of an MoE layer made from a trained dense SwiGLU FFN, so that
the MoE model computes exactly the dense model at step 0 (`model.init_from` + `model.upcycle`).

Why the function is kept. The dense FFN is a sum over its h hidden units,
    FFN(x) = sum_j w2[:, j] silu(w1_j . x) (w3_j . x),
so splitting the units into g equal chunks of h/g gives FFN(x) = sum_c FFN_c(x), each FFN_c a SwiGLU
of hidden h/g. `copy` is g = 1 (every expert the whole FFN, Komatsuzaki et al. 2023); `granular` is
g > 1 (experts of hidden model.moe.expert_hidden = h/g, as megatron-core's granular upcycling).

Expert e holds chunk c = e mod g, with its down projection scaled by s; the E experts form E/g
"virtual groups" v = e div g, each holding every chunk once, and the router rows of a group's
members are equal (the first member's fresh row), so members of a group always get the same logit.
Top-k with k a multiple of g then picks k/g whole groups (the k largest logits come in equal runs of
g; the run lengths add up to k). With renormalised gates, expert e of a chosen group v gets
    gate_e = r * score_v / sum_{chosen e'} score_e' = r * score_v / (g * sum_{chosen v'} score_v'),
(r = model.moe.routed_scaling_factor; score softmax or sigmoid; softmax's normaliser cancels), so
the total weight on chunk c, summed over the chosen groups, is r * (1/g) * sum_v score_v / sum_v'
score_v' = r / g, whatever the router's weights are. The layer's output is therefore
    sum_c (r / g) * s * FFN_c(x) = FFN(x)   exactly when   s = g / r.
For `copy` (g = 1) every expert is the whole FFN and s = 1 / r: any k experts with gates summing to r
give FFN(x).

Router initialisation. Since the output does not depend on the router's values, the router keeps
its ordinary random init (tied within groups): different tokens then pick different experts from
step 0, so the copies receive different gradients and diverge. A zero router would also keep the
function, but every logit would tie: top-k would send every token to the same first k experts, and
the others would get no tokens and no gradient until the balancing loss moved the router.

What this needs (checked by `granularity`, refused by name otherwise): token-choice top-k
(model.moe.router=topk) with gates that sum to 1 (model.moe.renormalize=true; sigmoid scores with
k > 1 are renormalised anyway), no shared experts, a dense hidden h = g * expert_hidden, and g
dividing num_experts and top_k; granular (g > 1) also needs no group-limited routing (its groups of
experts would split virtual groups). Exact at step 0 in eval; in training a capacity that drops
tokens, router noise or jitter perturb it as they perturb any MoE. `model.upcycle_noise` adds
Gaussian noise (std relative to the dense matrix's std) to each expert's copy, trading exactness for
earlier divergence of the copies.
"""
from __future__ import annotations

from typing import Tuple

import torch

from moe.config import ConfigError, ModelConfig, expert_hidden

UPCYCLE_MODES = ("copy", "granular")


def granularity(m: ModelConfig, dense_hidden: int) -> int:
    """g, the number of chunks the dense FFN (of hidden `dense_hidden`) is split into for model `m`
    (model.upcycle); a ConfigError naming the key when `m` cannot compute the dense function."""
    e, mode, h_e = m.moe, m.upcycle, expert_hidden(m)
    if mode not in UPCYCLE_MODES:
        raise ConfigError(f"model.upcycle={mode!r}: one of {', '.join(UPCYCLE_MODES)} (to start an MoE config "
                          f"from a dense model)")
    if e.router != "topk":
        raise ConfigError(f"model.moe.router={e.router}: upcycling needs token-choice top-k (model.moe.router=topk), "
                          f"whose gates can sum to 1")
    if not e.renormalize and not (e.score_func == "sigmoid" and e.top_k > 1):
        raise ConfigError("model.moe.renormalize=false: the top-k gates do not sum to a constant, so upcycled experts "
                          "would not compute the dense FFN; set model.moe.renormalize=true")
    if e.num_shared_experts:
        raise ConfigError(f"model.moe.num_shared_experts={e.num_shared_experts}: upcycling fills routed experts only")
    if mode == "copy" and h_e != dense_hidden:
        raise ConfigError(f"model.moe.expert_hidden={h_e}: model.upcycle=copy needs experts of the dense FFN's hidden "
                          f"size {dense_hidden}")
    if dense_hidden % h_e:
        raise ConfigError(f"model.moe.expert_hidden={h_e}: model.upcycle=granular splits the dense FFN's hidden size "
                          f"{dense_hidden} into equal experts, so it must divide it")
    g = dense_hidden // h_e
    if e.num_experts % g or e.top_k % g:
        raise ConfigError(f"model.moe.num_experts={e.num_experts}, model.moe.top_k={e.top_k}: granular upcycling "
                          f"into {g} chunks of {h_e} needs both to be multiples of {g}")
    if g > 1 and e.n_groups:
        raise ConfigError(f"model.moe.n_groups={e.n_groups}: group-limited routing would split the virtual groups of "
                          f"granular upcycling; use model.upcycle=copy or model.moe.n_groups=0")
    return g


def expert_weights(m: ModelConfig, w13: torch.Tensor, w2: torch.Tensor, experts: range, layer: int,
                   seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stacked (w13 [n, 2 h_e, d], w2 [n, d, h_e]) of `experts` upcycled from the dense FFN's
    w13 [2h, d] ([gate; up]) and w2 [d, h] (see the module docstring). The noise of expert e depends
    only on (seed, layer, e), so every expert-parallel layout gets the same experts."""
    h = w2.shape[1]
    g = granularity(m, h)
    h_e, scale = h // g, g / m.moe.routed_scaling_factor
    gate, up = w13.float().chunk(2)
    std13, std2 = float(w13.float().std()), float(w2.float().std())
    out13, out2 = [], []
    for e in experts:
        rows = slice((e % g) * h_e, (e % g + 1) * h_e)
        a, b = torch.cat([gate[rows], up[rows]]), w2.float()[:, rows] * scale
        if m.upcycle_noise > 0:
            gen = torch.Generator().manual_seed(hash((seed, layer, e)) & 0x7FFFFFFF)
            a = a + torch.randn(a.shape, generator=gen) * (m.upcycle_noise * std13)
            b = b + torch.randn(b.shape, generator=gen) * (m.upcycle_noise * std2 * scale)
        out13.append(a)
        out2.append(b)
    return torch.stack(out13), torch.stack(out2)


def tied_router(router: torch.Tensor, g: int) -> torch.Tensor:
    """The router weight [E, d] with each virtual group's rows (experts v*g .. v*g+g-1) equal to the
    group's first row, so its members always get the same logit."""
    return router.reshape(-1, g, router.shape[-1])[:, :1].expand(-1, g, -1).reshape(router.shape).clone()
