"""What every router returns, and the base class routers share.

A router maps hidden states [T, d] to a RoutingDecision. Subclasses implement `route()`; the base
class owns what every family shares: fp32 logits with the optional training noise (Switch input
jitter, Shazeer noisy gating), the score function, the auxiliary-loss-free selection bias, the
balancing losses (see losses.py) and the per-step load that feeds the bias and the global-batch loss
(see balancing.py).

Balancing state lives in registered buffers, so DeepSpeed saves and restores it with the model:
- `expert_bias` [E] fp32 (bias_update_rate > 0): added to the scores for selection only.
- `global_load` [E] fp32 (global_aux_loss_coef > 0): the previous step's load fraction f.
- `step_load` [E] int64 (either of the above; not saved): experts chosen so far this step. It is
  summed over data-parallel ranks and cleared by `end_step` after each optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe.errors import ConfigError
from moe import ops
from moe.ops import expert_counts
from moe.routing import losses as L

_TINY = torch.finfo(torch.float32).tiny
"""The floor of every score normaliser (fp32's smallest normal number): it only guards 0 / 0."""


@dataclass
class RoutingDecision:
    """A router's output for T tokens. Dispatch only moves tokens; it never looks inside this."""

    expert_indices: torch.Tensor
    """[T, k] int64: the experts each token goes to (expert choice: all E experts, [T, E])."""
    gate_weights: torch.Tensor
    """[T, k] fp32: the weight of each expert's output in the token's combination."""
    priority: Optional[torch.Tensor]
    """[T, k]: which (token, slot) an over-full expert keeps first (higher first); None = by position."""
    logits: torch.Tensor
    """[T, E] fp32 router logits (for z-loss and statistics)."""
    scores: torch.Tensor
    """[T, E] fp32 router scores over experts (softmax or sigmoid of the logits, without any bias)."""
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Coefficient-weighted auxiliary losses (`aux_loss`, `seq_aux_loss`, `global_aux_loss`, `z_loss`),
    added to the training loss. Filled in training only."""
    slot_mask: Optional[torch.Tensor] = None
    """[T, k] bool or None: False marks a slot the router chose not to use (GShard random routing);
    such a slot gets no expert compute, no capacity and no weight."""
    softmax_scores: bool = False
    """True when `scores` is exactly softmax(logits) over the experts (score_func=softmax): the
    statistics then take the routing entropy from the logits (moe/nn/stats.py)."""
    logsumexp: Optional[torch.Tensor] = None
    """[T] fp32 logsumexp of the logits over the experts, detached, when the z-loss computed it (the
    statistics reuse it instead of a second pass over the [T, E] logits)."""
    expert_choice: bool = False
    """True when every token lists every expert and the capacity does the selection (expert choice):
    the load is then what the routing index keeps, not what the router listed."""

    def routed_counts(self, num_experts: int) -> torch.Tensor:
        """[E] int64: (token, slot) pairs the router sent to each expert, before any capacity drop."""
        return expert_counts(self.expert_indices, num_experts, self.slot_mask)


class Router(nn.Module):
    """Maps hidden states [T, d] to a RoutingDecision. Runs in fp32 whatever the model dtype."""

    capacity_based: bool = False
    """True for routers whose selection is the capacity itself (expert choice): they need a capacity in
    eval too (eval_capacity_factor 0 then means capacity_factor)."""

    def __init__(self, d_model: int, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.noise_weight: Optional[nn.Parameter] = None
        if cfg.noisy_gating:  # Shazeer et al. 2017 initialise W_noise to zero
            self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, d_model))
        self.expert_bias: Optional[torch.Tensor]
        self.global_load: Optional[torch.Tensor]
        self.step_load: Optional[torch.Tensor]
        E = cfg.num_experts
        self.register_buffer("expert_bias", torch.zeros(E) if cfg.bias_update_rate > 0 else None)
        self.register_buffer("global_load", torch.full((E,), 1.0 / E) if cfg.global_aux_loss_coef > 0 else None)
        tracks = cfg.bias_update_rate > 0 or cfg.global_aux_loss_coef > 0
        self.register_buffer("step_load", torch.zeros(E, dtype=torch.long) if tracks else None, persistent=False)
        self.dispatch_backend = ops.dispatch_backend(cfg.dispatch)  # "extension": the compiled top-k on CPU

    @classmethod
    def validate_config(cls, cfg) -> None:
        """Raise moe.errors.ConfigError for settings this router cannot honour."""

    # ------------------------------------------------------------------------------------ routing

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None,
                num_sequences: int = 1) -> RoutingDecision:
        """x: [T, d]; token_ids: [T] input token ids (hash routing); num_sequences: how many equal
        consecutive sequences the T tokens are (sequence-level balancing loss)."""
        self._keep_fp32_buffers()
        decision = self.route(x, token_ids)
        if self.training:
            decision.losses = self.balancing_losses(decision, num_sequences)
            if self.step_load is not None:
                with torch.no_grad():
                    self.step_load += decision.routed_counts(self.num_experts)
        return decision

    def route(self, x: torch.Tensor, token_ids: Optional[torch.Tensor]) -> RoutingDecision:
        raise NotImplementedError  # each router family implements it

    def top_k_indices(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """[T, E] -> [T, k]: the indices of each row's k largest scores, descending (moe.ops.topk_indices:
        torch.topk, or the compiled one-pass selection on CPU)."""
        return ops.topk_indices(scores, k, backend=self.dispatch_backend)

    def token_choice_decision(self, expert_indices: torch.Tensor, gate_weights: torch.Tensor, logits: torch.Tensor,
                              scores: torch.Tensor, slot_mask: Optional[torch.Tensor] = None) -> RoutingDecision:
        """The decision of a token-choice router; under a capacity, drop_policy=probs keeps an over-full
        expert's highest-gate pairs (priority = gate weight), position its earliest (no priority)."""
        return RoutingDecision(
            expert_indices=expert_indices,
            gate_weights=gate_weights,
            priority=gate_weights if self.cfg.drop_policy == "probs" else None,
            logits=logits,
            scores=scores,
            slot_mask=slot_mask,
            softmax_scores=self.cfg.score_func == "softmax",
        )

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, E], with input jitter and noisy gating applied in training when configured."""
        # fp32 routing: bf16 logits flip top-k choices between otherwise identical runs
        x = x.float()
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        logits = _linear(x, self.weight.float())
        if self.training and self.noise_weight is not None:
            noise_std = F.softplus(_linear(x, self.noise_weight.float()))
            # torch.randn, not randn_like: the same draw for each (token, expert) whatever the layout
            logits = logits + torch.randn(logits.shape, dtype=logits.dtype, device=logits.device) * noise_std
        return logits

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.score_func == "sigmoid":
            return torch.sigmoid(logits)
        if _expert_major(logits, logits.shape[-1]):
            return torch.softmax(logits.t(), dim=0).t()  # see _linear: over dim 0 of [E, T] is ~10x faster
        return torch.softmax(logits, dim=-1)

    def selection_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores that pick experts: plus the balancing bias when aux-loss-free balancing is on."""
        return scores if self.expert_bias is None else scores + self.expert_bias

    def gates(self, chosen_scores: torch.Tensor) -> torch.Tensor:
        """Gate weights from the (unbiased) scores of the chosen experts [T, k]."""
        k = chosen_scores.shape[-1]
        if self.cfg.renormalize or (self.cfg.score_func == "sigmoid" and k > 1):
            return chosen_scores / chosen_scores.sum(dim=-1, keepdim=True).clamp_min(_TINY)
        return chosen_scores

    # ---------------------------------------------------------------------------------- balancing

    def balance_probs(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores normalised over experts (so each balancing loss is 1 at perfect balance). The floor
        of the sigmoid normaliser is fp32's smallest normal number, not megatron-core's 1e-20: with
        1e-20 a router can drive every score below it and the balancing loss towards 0 instead of
        balancing (megatron-core issue #1545, OLMo-core PR #255)."""
        if self.cfg.score_func == "softmax":
            return scores
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(_TINY)

    def balance_indices(self, d: RoutingDecision) -> torch.Tensor:
        """The experts the balancing losses count for f_e: the top-k of the scores themselves, as
        megatron-core and the DeepSeek-V3 paper count them. The selection after the aux-loss-free
        bias or the group limit is what the bias already balances; counting it would make the loss
        and the bias pull on each other (with neither active the two are the same)."""
        if self.expert_bias is None and self.cfg.n_groups == 0:
            return d.expert_indices
        return self.top_k_indices(d.scores, d.expert_indices.shape[-1])

    def balancing_losses(self, d: RoutingDecision, num_sequences: int) -> Dict[str, torch.Tensor]:
        c, E = self.cfg, self.num_experts
        out: Dict[str, torch.Tensor] = {}
        if c.aux_loss_coef > 0 or c.seq_aux_loss_coef > 0 or c.global_aux_loss_coef > 0:
            probs, counted = self.balance_probs(d.scores), self.balance_indices(d)
            if c.aux_loss_coef > 0:
                out["aux_loss"] = c.aux_loss_coef * L.load_balancing_loss(probs, counted, E)
            if c.seq_aux_loss_coef > 0:
                out["seq_aux_loss"] = c.seq_aux_loss_coef * L.sequence_load_balancing_loss(
                    probs, counted, E, num_sequences)
            if c.global_aux_loss_coef > 0:
                out["global_aux_loss"] = c.global_aux_loss_coef * L.global_load_balancing_loss(
                    probs, self.global_load, E)
        if c.z_loss_coef > 0:
            lse = torch.logsumexp(d.logits, dim=-1)
            d.logsumexp = lse.detach()  # the statistics need it too (moe/nn/stats.py)
            out["z_loss"] = c.z_loss_coef * L.z_loss_of_logsumexp(lse)
        return out

    @torch.no_grad()
    def end_step(self, load: torch.Tensor) -> None:
        """After an optimizer step: `load` [E] is the step's routed count per expert, summed over every
        micro-batch and data-parallel rank (the same on every rank, so the buffers stay in sync)."""
        load = load.to(torch.float64)
        if self.expert_bias is not None:  # Wang et al. 2024: b_e += u * sign(mean load - load_e)
            delta = self.cfg.bias_update_rate * torch.sign(load.mean() - load)
            self.expert_bias += delta.to(self.expert_bias.dtype)
        if self.global_load is not None and float(load.sum()) > 0:
            self.global_load.copy_((load / load.sum()).to(self.global_load.dtype))
        if self.step_load is not None:
            self.step_load.zero_()

    def _keep_fp32_buffers(self) -> None:
        # a mixed-precision wrapper may cast float buffers; a bf16 bias cannot hold 1e-3 updates
        for name in ("expert_bias", "global_load"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                buf.data = buf.data.float()


EXPERT_MAJOR_BELOW = 32
"""Routers with fewer experts keep their CPU logits and scores expert-major (see `_linear`)."""


def _expert_major(x: torch.Tensor, num_experts: int) -> bool:
    return x.device.type == "cpu" and x.dim() == 2 and num_experts < EXPERT_MAJOR_BELOW


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, d] @ weight[E, d]^T. On CPU with fewer than EXPERT_MAJOR_BELOW experts the result is the
    transpose of a contiguous [E, T]: PyTorch's CPU kernels over a short last dimension are slow (for
    E=8, softmax over the experts of a [T, E] tensor was ~10x slower than over dim 0 of [E, T];
    logsumexp and sums ~2x). From 32 experts the plain [T, E] layout is faster: the whole router,
    forward + backward, one process taking turns, 2,048 tokens: 7.3 -> 6.2 ms at 128 experts
    (d=128, one thread), 3.5 -> 3.0 ms at 64, 2.1 -> 1.9 ms at 32, level at 16, and 1.15 -> 1.25 ms
    (slower) at 8. Same values, another memory layout (up to the GEMM's rounding)."""
    if _expert_major(x, weight.shape[0]):
        return torch.mm(weight, x.t()).t()
    return F.linear(x, weight)


def check_unused(cfg, router: str, reason: str, *keys: str) -> None:
    """ConfigError when any of `keys` (MoEConfig fields) is set (non-zero/true) for a router that
    does not use it; the message names the keys and why."""
    bad = [k for k in keys if getattr(cfg, k)]
    if bad:
        settings = ", ".join(f"model.moe.{k}={getattr(cfg, k)}" for k in bad)
        zero = ", ".join(f"model.moe.{k}={'false' if isinstance(getattr(cfg, k), bool) else 0}" for k in bad)
        raise ConfigError(f"model.moe.router={router} {reason}: {settings} makes no sense with it (set {zero})")
