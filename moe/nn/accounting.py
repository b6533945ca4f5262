"""Parameter and FLOP accounting of a GPT: total and active parameters, training FLOPs per token."""
from __future__ import annotations

from moe.config import ModelConfig, attention_heads, dense_ffn_hidden, expert_hidden, moe_layer_ids
from moe.nn.gpt import GPT


def count_params(model: GPT) -> dict:
    """Total parameters, and parameters active for one token (k of E routed experts)."""
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())  # .parameters() counts tied weights once
    inactive = 0
    for layer in model.moe_layers():
        expert_params = layer.experts.w13.numel() + layer.experts.w2.numel()
        inactive += expert_params * (cfg.moe.num_experts - cfg.moe.top_k) // cfg.moe.num_experts
    embedding = model.embed.weight.numel()
    return {
        "params_total": total,
        "params_active": total - inactive,
        "params_embedding": embedding,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict:
    """Training FLOPs per token (forward + backward = 3x forward; a matmul is 2 FLOPs per weight).

    Counts the matmuls a token actually goes through: attention projections (grouped-query: keys and
    values of n_kv_heads heads), dense FFNs, the router,
    its top_k routed experts (no capacity padding is ever computed: dropped slots are skipped), the
    shared experts, the LM head, and causal attention scores (on average seq_len/2 keys per query).
    """
    d, L = cfg.d_model, cfg.n_layers
    n_heads, n_kv_heads, head_dim = attention_heads(cfg)
    moe_ids = set(moe_layer_ids(cfg))
    fwd = 0
    for i in range(L):
        fwd += 2 * d * (n_heads + 2 * n_kv_heads) * head_dim  # q, k, v projections
        fwd += 2 * n_heads * head_dim * d  # output projection
        fwd += 2 * 2 * n_heads * head_dim * (seq_len / 2)  # QK^T and AV over the causal half on average
        if i in moe_ids:
            h = expert_hidden(cfg)
            fwd += 2 * d * cfg.moe.num_experts  # router
            fwd += (cfg.moe.top_k + cfg.moe.num_shared_experts) * 2 * 3 * d * h
        else:
            fwd += 2 * 3 * d * dense_ffn_hidden(cfg)
    fwd += 2 * d * cfg.vocab_size  # LM head
    return {"flops_per_token": 3 * fwd, "flops_per_token_forward": fwd}
