"""Per-layer router statistics, accumulated on the device between two metric logs."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


class RouterStats:
    """Per-layer routing statistics accumulated between two metric logs (detached, on device; no host
    sync until `moe.metrics.router_metrics` reads them).

    Token-choice routers: `tokens_per_expert` counts the (token, slot) pairs each expert was chosen
    for, before capacity drops; `slots` all chosen pairs, `dropped` those dropped by capacity.
    Expert choice (every token lists every expert): `tokens_per_expert` is what each expert kept,
    and `slots`/`dropped` count tokens and the tokens no expert took. `dropped_tokens` counts tokens
    that got no expert at all (they pass through the residual path) for every router.

    Everything accumulates in one float64 vector on the layer's device, `packed` = [tokens_per_expert
    (E) | SCALARS | the weighted losses named in `loss_names`] (None until the first update; the
    layout metrics all-reduces). One tensor and no Python number that changes from call to call, so a
    compiled layer is not recompiled for new values (torch.compile guards on Python numbers) nor for
    two statistics that happen to be the same tensor.
    """

    SCALARS = ("dropped", "slots", "dropped_tokens", "tokens", "entropy_sum", "calls", "lse2_sum")

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.token_sources: Optional[torch.Tensor] = None
        """Routing by domain: the data source (0 .. num_sources-1) of each flattened token of the next
        forward, set by the training loop for a data mixture (`moe.metrics.set_token_sources`); with it,
        `domain` counts each source's (token, slot) pairs per expert: the pairs a token-choice router
        chose, or the (token, expert) pairs expert-choice experts kept (eager: the count's bincount is
        data dependent)."""
        self.num_sources = 0
        self.domain: Optional[torch.Tensor] = None
        """float64 [num_sources, E]; read and cleared by `moe.metrics.domain_metrics`, not by `reset`."""
        self.reset()

    def reset(self) -> None:
        self.packed: Optional[torch.Tensor] = None
        self.loss_names: Tuple[str, ...] = ()

    def __getattr__(self, name: str):
        # the packed entries by name (tokens_per_expert, the SCALARS, losses): for readers and tests
        if "packed" in self.__dict__ and (name in RouterStats.SCALARS or name in ("tokens_per_expert", "losses")):
            packed, E = self.__dict__["packed"], self.__dict__["num_experts"]
            if packed is None:
                return None if name != "losses" else {}
            if name == "tokens_per_expert":
                return packed[:E]
            if name == "losses":
                return {n: packed[E + len(self.SCALARS) + i] for i, n in enumerate(self.loss_names)}
            return packed[E + self.SCALARS.index(name)]
        raise AttributeError(name)

    @torch.no_grad()
    def update(self, decision, index, num_tokens: int, dropless: bool) -> None:
        """dropless: the layer ran without a capacity, so nothing was dropped (static, unlike the
        kept-row count a capacity makes data dependent)."""
        E = self.num_experts
        zero = decision.scores.new_zeros((), dtype=torch.float64)
        if not decision.expert_choice and decision.slot_mask is None and dropless:
            # every chosen pair kept: the kept counts are the routed counts, nothing dropped
            routed = index.tokens_per_expert[:E].double()
            slots, dropped, dropped_tokens = zero + index.dest_rows.numel(), zero, zero
        elif decision.expert_choice:
            kept = index.dest_rows >= 0
            routed = index.tokens_per_expert[:E].double()
            slots = zero + num_tokens
            dropped_tokens = (~kept.any(dim=1)).sum().double()
            dropped = dropped_tokens
        else:
            kept = index.dest_rows >= 0
            used = decision.slot_mask if decision.slot_mask is not None else torch.ones_like(kept)
            routed = decision.routed_counts(E).double()
            slots = used.sum().double()
            dropped = (used & ~kept).sum().double()
            dropped_tokens = (~(kept & used).any(dim=1)).sum().double()
        logits = decision.logits.float()
        lse = decision.logsumexp if decision.logsumexp is not None else torch.logsumexp(logits, dim=-1)
        if decision.softmax_scores:
            # H(p) = lse(l) - sum_e p_e l_e for p = softmax(l): a product and a sum over the [T, E]
            # scores instead of a log of each (torch.special.entr: ~5x the time on CPU)
            entropy = (lse - (decision.scores * logits).sum(-1)).double().sum()
        else:
            p = decision.scores / decision.scores.sum(-1, keepdim=True)
            entropy = torch.special.entr(p).sum().double()  # -p log p, 0 at p = 0
        # the quantity the z-loss penalises, logged whatever its coefficient (0 included)
        lse2 = lse.square().sum().double()
        names = tuple(sorted(decision.losses))
        scalars = [dropped, slots, dropped_tokens, zero + num_tokens, entropy, zero + 1, lse2]
        scalars += [decision.losses[n].detach().double().reshape(()) for n in names]
        packed = torch.cat([routed, torch.stack(scalars)])
        if self.token_sources is not None and self.token_sources.numel() == num_tokens:
            self._count_domain(decision, index)
        if self.packed is None:
            self.packed, self.loss_names = packed, names
        elif names != self.loss_names:
            raise RuntimeError(f"router losses changed between forward passes: {self.loss_names} -> {names}")
        else:
            self.packed = self.packed + packed

    def _count_domain(self, decision, index) -> None:
        E, S = self.num_experts, self.num_sources
        chosen = self.token_sources.to(decision.expert_indices.device)[:, None] * E + decision.expert_indices
        if decision.expert_choice:  # every token lists every expert: the pairs the experts kept
            chosen = chosen[index.dest_rows >= 0]
        elif decision.slot_mask is not None:
            chosen = chosen[decision.slot_mask]
        counts = torch.bincount(chosen.reshape(-1), minlength=S * E).double().view(S, E)
        self.domain = counts if self.domain is None else self.domain + counts
