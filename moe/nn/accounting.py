"""Accounting of a GPT: total, active and expert parameters (counted on the meta device), training
FLOPs per token, and the bytes its forward saves for backward per token (`moe plan`'s activations)."""
from __future__ import annotations

from typing import Dict

from moe.config import ModelConfig, attention_heads, dense_ffn_hidden, expert_hidden, moe_layer_ids
from moe.nn.gpt import GPT
from moe.nn.init import meta_device


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


def param_counts(m: ModelConfig) -> Dict[str, int]:
    """Parameter counts of the model `m` describes: built on the meta device (no memory, no init
    cost, seconds even for Mixtral-8x7B) and counted as training counts them (`count_params`), plus
    `params_expert`: the routed experts' weights (what expert parallelism shards)."""
    if m.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (e.g. 257 for the bytes tokenizer) to count parameters")
    with meta_device():
        model = GPT(m)
    counts = count_params(model)
    counts["params_expert"] = sum(layer.experts.w13.numel() + layer.experts.w2.numel() for layer in model.moe_layers())
    return counts


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


# ------------------------------------------------------------------------------------ activations


def _attention_bytes(m: ModelConfig, a: int) -> float:
    """Saved for backward by one attention sub-block, per token (a: bytes of an activation element)."""
    d = m.d_model
    H, Hk, hd = attention_heads(m)
    gqa = Hk < H
    norm = 2 * d * 4 + 4  # RMSNorm runs in fp32: its input and the normalised rows, and 1/rms
    qkv_in = d * a
    sdpa = (3 * H if gqa else H + Hk) * hd * a + H * hd * a + H * 4  # q, k, v (expanded) or q, k; out; lse
    keeps_qkv = (not gqa) or (m.qk_norm != "none" and a == 4)  # v is a view of the projection (or the norm's input)
    qkv_out = (H + 2 * Hk) * hd * a if keeps_qkv else 0
    qk = 0.0
    if m.qk_norm != "none":
        rows = (H + Hk) if m.qk_norm == "head" else 2
        qk = rows * 4 + (H + Hk) * hd * 4 + ((H + Hk) * hd * 4 if a != 4 else 0)  # 1/rms, normalised, fp32 copy
    proj_in = H * hd * a
    return norm + qkv_in + sdpa + qkv_out + qk + proj_in


def _swiglu_bytes(d: int, hidden: int, a: int) -> float:
    """A SwiGLU FFN's saved tensors per row: its input, the fused gate/up output, silu(gate), the product."""
    return (d + 4 * hidden) * a


def _moe_parts(m: ModelConfig, a: int, device: str, ep_size: int) -> Dict[str, float]:
    """An MoE FFN's saved bytes per token, by part: the router, the routed-expert region (what
    train.recompute=moe recomputes), the region's inputs kept instead, the shared experts."""
    d, E, k, h = m.d_model, m.moe.num_experts, m.moe.top_k, expert_hidden(m)
    router = (d + 2 * E + 1) * a + 8 * k  # its input, logits and scores (E x T both ways), the top-k ids
    hidden = 4 * h if device == "cuda" else 3 * h  # grouped_mm keeps silu(gate) too; the CPU op recomputes it
    # On CPU with one EP rank, permute, experts and combine are one compiled op (moe.ops.routed_swiglu):
    # it keeps the layer's input instead of the permuted rows, and no expert outputs (the gates'
    # gradients come from the activation gradients); that input is the router's own in fp32 (in bf16
    # the router keeps an fp32 copy) and the shared experts' input, so it counts only in bf16 without
    # shared experts. Elsewhere the permuted rows and the expert outputs are kept.
    if device == "cuda" or ep_size > 1:
        rows_in, outputs = k * d * a, k * d * a
    else:
        rows_in, outputs = (d * a if a != 4 and not m.moe.num_shared_experts else 0), 0
    region = 8 * k + k * a + rows_in + k * hidden * a + outputs  # rows index, gates, expert rows + hidden, outputs
    if ep_size > 1:
        region += 2 * 8 * k  # the exchange's row orders (received -> local expert and back)
    kept = 8 * k + 8 * k + 4 * k + (d * 4 if a != 4 else 0)  # recompute=moe: index, gates, the fp32 input
    shared = 0.0
    if m.moe.num_shared_experts:
        shared = _swiglu_bytes(d, h * m.moe.num_shared_experts, a) - (d * a if a == 4 else 0)
    return {"router": router, "experts": region, "experts_kept": kept, "shared": shared}


def activation_bytes_per_token(m: ModelConfig, a: int, device: str = "cuda", ep_size: int = 1,
                               recompute: str = "none") -> Dict[str, float]:
    """Bytes saved for backward per token: `layers` (all blocks), `block_max` (the largest block),
    `head` (embedding ids, final norm, head input, fp32 log-probabilities, the logits the step keeps).
    recompute: `moe` keeps the expert region's inputs only, `full` keeps each block's input (the
    largest block is recomputed in backward and lives again, once: `block_max`)."""
    d, V = m.d_model, m.vocab_size
    moe_ids = set(moe_layer_ids(m))
    attn = _attention_bytes(m, a)
    norm = 2 * d * 4 + 4
    dense = attn + norm + _swiglu_bytes(d, dense_ffn_hidden(m), a)
    parts = _moe_parts(m, a, device, ep_size) if moe_ids else {}
    moe_full = attn + norm + parts.get("router", 0) + parts.get("experts", 0) + parts.get("shared", 0)
    moe_kept = moe_full - parts.get("experts", 0) + parts.get("experts_kept", 0)
    block_max = max(moe_full if moe_ids else 0, dense if len(moe_ids) < m.n_layers else 0)
    if recompute == "full":
        layers = m.n_layers * d * a
    else:
        per_moe = moe_kept if recompute == "moe" else moe_full
        layers = len(moe_ids) * per_moe + (m.n_layers - len(moe_ids)) * dense
        block_max = 0.0
    head = 8 + norm + d * a + V * 4 + V * a
    return {"layers": layers, "block_max": block_max, "head": head}
