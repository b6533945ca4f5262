"""Decoder-only GPT whose FFNs are dense or MoE. Plain PyTorch: no DeepSpeed, launcher or rank logic.

token embedding -> n_layers x [RMSNorm -> causal self-attention (RoPE, SDPA) -> residual,
RMSNorm -> FFN (dense SwiGLU or MoELayer) -> residual] -> RMSNorm -> LM head (optionally tied).

Attention is multi-head, grouped-query (model.n_kv_heads < n_heads: each key/value head serves
n_heads / n_kv_heads query heads) or multi-query, with a head width independent of d_model
(model.head_dim) and optional RMSNorm of queries and keys before RoPE (model.qk_norm: per head as
Qwen3, or over the whole projection as OLMoE). With the defaults the projection is one fused
[3 d, d] matrix, as it always was.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig, attention_heads, dense_ffn_hidden, expert_hidden, moe_layer_ids
from moe.nn.ffn import DenseFFN
from moe.nn.moe_layer import MoELayer


def init_stds(init_std: float, n_layers: int) -> tuple:
    """(std of the input projections, std of the projections that write into the residual stream:
    scaled by 1/sqrt(2 n_layers), two residual writes per block)."""
    return init_std, init_std / math.sqrt(2 * n_layers)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple:
    """(cos, sin) [max_seq_len, head_dim / 2] on the default device; on meta, shapes only (a model built
    there gets its tables from moe/nn/init.py, and arange on meta would import torch._dynamo)."""
    if torch.get_default_device().type == "meta":
        half = (head_dim + 1) // 2  # the length of arange(0, head_dim, 2) below
        return torch.empty(max_seq_len, half), torch.empty(max_seq_len, half)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, hd]; cos/sin: [S, hd/2]. Rotates pairs (x[2i], x[2i+1])."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class KVCache:
    """Keys and values of every layer for incremental decoding: [B, n_kv_heads, max_len, hd] per layer."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device, dtype) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, out_std: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attention_heads(cfg)
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # one fused projection [queries; keys; values] (the names and shapes of the MHA model)
        self.qkv = nn.Linear(cfg.d_model, q_width + 2 * kv_width, bias=False)
        self.proj = nn.Linear(q_width, cfg.d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        nn.init.normal_(self.proj.weight, std=out_std)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else q_width, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else kv_width, eps=cfg.norm_eps)

    def _project(self, x):
        """q [B, H, S, hd], k and v [B, H_kv, S, hd], QK-normed, before RoPE."""
        B, S, _ = x.shape
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        """Key/value heads repeated for their group of query heads ([B, H_kv, ...] -> [B, H, ...])."""
        group = self.n_heads // self.n_kv_heads
        return t if group == 1 else t.repeat_interleave(group, dim=1)

    def forward(self, x, cos, sin, layer_id: int, cache: Optional[KVCache], start_pos: int):
        B, S, _ = x.shape
        q, k, v = self._project(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, self._expand(k), self._expand(v), is_causal=True)
        else:
            end = start_pos + S
            cache.k[layer_id][:B, :, start_pos:end] = k
            cache.v[layer_id][:B, :, start_pos:end] = v
            keys, values = cache.k[layer_id][:B, :, :end], cache.v[layer_id][:B, :, :end]
            # query i sits at absolute position start_pos + i and may see keys 0..start_pos + i
            mask = torch.ones(S, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            y = F.scaled_dot_product_attention(q, self._expand(keys), self._expand(values), attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, is_moe: bool) -> None:
        super().__init__()
        self.layer_id = layer_id
        init_std, out_std = init_stds(cfg.init_std, cfg.n_layers)
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, out_std)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn: nn.Module
        if is_moe:
            self.ffn = MoELayer(cfg.d_model, expert_hidden(cfg), cfg.moe, init_std, out_std)
        else:
            self.ffn = DenseFFN(cfg.d_model, dense_ffn_hidden(cfg), init_std, out_std)

    def forward(self, x, cos, sin, cache=None, start_pos: int = 0, token_ids=None):
        """token_ids: the model's input ids [B, S], for routers that route by token (hash routing)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, self.layer_id, cache, start_pos)
        return x + self.ffn(self.ffn_norm(x), token_ids=token_ids)


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    """Mean next-token cross-entropy (None without targets)."""
    aux_loss: torch.Tensor
    """Sum of all MoE layers' weighted auxiliary losses (0 for a dense model or in eval)."""


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building GPT")
        self.cfg = cfg
        self.moe_layer_ids = moe_layer_ids(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg, i, i in self.moe_layer_ids) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.init_std)
        cos, sin = rope_tables(attention_heads(cfg)[2], cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def moe_layers(self) -> List[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, start_pos: int = 0) -> ModelOutput:
        B, S = idx.shape
        if start_pos + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + S} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos = self.rope_cos[start_pos:start_pos + S]
        sin = self.rope_sin[start_pos:start_pos + S]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache, start_pos, token_ids=idx)
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        aux = torch.zeros((), device=idx.device)
        for layer in self.moe_layers():
            for value in layer.aux_losses.values():
                aux = aux + value
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux)
