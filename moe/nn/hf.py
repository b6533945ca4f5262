"""Our model under transformers' names, both ways: the architecture a ModelConfig is (Llama, Qwen3,
Mixtral, OLMoE, Qwen3-MoE), the ModelConfig a transformers config.json describes, and the tensor names
and RoPE permutation between the two. Pure functions on configs and tensors: `moe export --hf`
(moe/tools/hf_export.py) writes with them, `model.init_from` (moe/train/init_from.py) reads with them.

The weights map one to one except RoPE: we rotate interleaved pairs (x[2i], x[2i+1]) of each head,
transformers rotates halves (x[i], x[i + hd/2]), so the query and key rows (and a per-head QK-norm
weight) are permuted within each head on the way out (`halves_from_pairs`) and back on the way in
(`pairs_from_halves`); the two models then compute the same logits.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from moe.config import ConfigError, ModelConfig, MoEConfig, attention_heads, dense_ffn_hidden, expert_hidden, moe_layer_ids

FEATURES_NO_HF_ARCHITECTURE_HAS = (
    ("router", "topk", "a router family other than token-choice top-k"),
    ("score_func", "softmax", "sigmoid scores"),
    ("n_groups", 0, "group-limited routing"),
    ("bias_update_rate", 0.0, "the aux-loss-free selection bias"),
    ("routed_scaling_factor", 1.0, "a routed scaling factor"),
    ("eval_capacity_factor", 0.0, "an eval capacity (transformers' MoE layers are dropless)"),
    ("noisy_gating", False, "noisy gating (a learned noise projection)"),
)
HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "olmoe": "OlmoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
"""config.json `model_type` -> the architecture `model.init_from` reads (the ones `moe export` writes)."""
_DEFAULTS = {"llama": (10000.0, 1e-6), "qwen3": (10000.0, 1e-6), "mixtral": (1e6, 1e-5), "olmoe": (10000.0, 1e-5),
             "qwen3_moe": (10000.0, 1e-6), "qwen2_moe": (10000.0, 1e-6)}
"""transformers' defaults of (rope_theta, rms_norm_eps) where a config.json leaves them out."""


def hf_architecture(m: ModelConfig) -> Tuple[str, Dict[str, Any]]:
    """(transformers config class name, its keyword arguments) for ModelConfig `m`; a ConfigError
    naming the feature when no architecture computes what our model computes."""
    n_heads, n_kv, head_dim = attention_heads(m)
    common = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                  max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                  tie_word_embeddings=m.tie_embeddings, rope_theta=m.rope_theta,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)  # not the architectures' own ids
    e = m.moe
    if e.num_experts == 0:
        if m.qk_norm == "proj":
            raise ConfigError("model.qk_norm=proj on a dense model: transformers' OLMo 2 has it, but with norms after "
                              "attention and FFN, a different model; not exported")
        return ("Qwen3Config" if m.qk_norm == "head" else "LlamaConfig"), dict(intermediate_size=dense_ffn_hidden(m),
                                                                               **common)
    for key, plain, what in FEATURES_NO_HF_ARCHITECTURE_HAS:
        if getattr(e, key) != plain:
            raise ConfigError(f"model.moe.{key}={getattr(e, key)}: {what}; no transformers architecture computes it, "
                              f"so the model is not exported")
    dense_ids = sorted(set(range(m.n_layers)) - set(moe_layer_ids(m)))
    routed = dict(num_experts_per_tok=e.top_k, **common)
    if e.num_shared_experts:
        return _qwen2_moe(m, dense_ids, routed)
    if dense_ids:
        raise ConfigError(f"model.moe.moe_layers: dense blocks {dense_ids} between MoE blocks; of the exported "
                          f"architectures only Qwen2-MoE has them, and it has shared experts")
    if m.qk_norm == "proj":
        return "OlmoeConfig", dict(intermediate_size=expert_hidden(m), num_experts=e.num_experts,
                                   norm_topk_prob=e.renormalize, **routed)
    if m.qk_norm == "head":
        return "Qwen3MoeConfig", dict(moe_intermediate_size=expert_hidden(m), num_experts=e.num_experts,
                                      norm_topk_prob=e.renormalize, decoder_sparse_step=1, mlp_only_layers=[], **routed)
    if not e.renormalize:
        raise ConfigError("model.moe.renormalize=false without QK-norm: Mixtral renormalises the top-k gates (softmax "
                          "over the chosen logits); set model.moe.renormalize=true, or use QK-norm (OLMoE, Qwen3-MoE)")
    return "MixtralConfig", dict(intermediate_size=expert_hidden(m), num_local_experts=e.num_experts, **routed)


def _qwen2_moe(m: ModelConfig, dense_ids: List[int], routed: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """Shared experts: Qwen2-MoE adds sigmoid(g . x) * shared(x); with g = 0 the gate is exactly 1/2,
    so our ungated shared experts are exported with their down projection doubled (exact in floating
    point) and the gate zero. Its dense blocks (mlp_only_layers) are our blocks between MoE blocks."""
    e = m.moe
    if m.qk_norm != "none":
        raise ConfigError(f"model.qk_norm={m.qk_norm} with model.moe.num_shared_experts={e.num_shared_experts}: "
                          f"transformers' architecture with shared experts (Qwen2-MoE) has no QK-norm")
    return "Qwen2MoeConfig", dict(intermediate_size=dense_ffn_hidden(m), moe_intermediate_size=expert_hidden(m),
                                  shared_expert_intermediate_size=expert_hidden(m) * e.num_shared_experts,
                                  num_experts=e.num_experts, norm_topk_prob=e.renormalize, decoder_sparse_step=1,
                                  mlp_only_layers=dense_ids, qkv_bias=False, use_sliding_window=False, **routed)


def halves_from_pairs(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows (dim 0) from interleaved RoPE pairs to rotate-half order."""
    heads = rows.reshape(-1, head_dim // 2, 2, *rows.shape[1:])
    return heads.transpose(1, 2).reshape(rows.shape)


def pairs_from_halves(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `halves_from_pairs`: each head's rows from rotate-half to interleaved-pair order."""
    heads = rows.reshape(-1, 2, head_dim // 2, *rows.shape[1:])
    return heads.transpose(1, 2).reshape(rows.shape)


def to_hf_state_dict(m: ModelConfig, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our EP=1 state dict (stacked experts) under the names of transformers' modules, RoPE rows permuted."""
    n_heads, n_kv, hd = attention_heads(m)
    moe_ids = moe_layer_ids(m)
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["embed.weight"] if m.tie_embeddings else sd["head.weight"]}
    for i in range(m.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[ours + "attn.qkv.weight"].split([n_heads * hd, n_kv * hd, n_kv * hd])
        out.update({theirs + "self_attn.q_proj.weight": halves_from_pairs(q, hd),
                    theirs + "self_attn.k_proj.weight": halves_from_pairs(k, hd),
                    theirs + "self_attn.v_proj.weight": v,
                    theirs + "self_attn.o_proj.weight": sd[ours + "attn.proj.weight"],
                    theirs + "input_layernorm.weight": sd[ours + "attn_norm.weight"],
                    theirs + "post_attention_layernorm.weight": sd[ours + "ffn_norm.weight"]})
        if m.qk_norm != "none":  # the norm's weight is permuted like the rows it scales
            for name in ("q_norm", "k_norm"):
                out[theirs + f"self_attn.{name}.weight"] = halves_from_pairs(sd[ours + f"attn.{name}.weight"], hd)
        if i in moe_ids:
            out.update({theirs + "mlp.gate.weight": sd[ours + "ffn.router.weight"],
                        theirs + "mlp.experts.gate_up_proj": sd[ours + "ffn.experts.w13"],
                        theirs + "mlp.experts.down_proj": sd[ours + "ffn.experts.w2"]})
            if m.moe.num_shared_experts:  # Qwen2-MoE: gate sigmoid(0 . x) = 1/2, down projection doubled
                gate, up = sd[ours + "ffn.shared_experts.w13.weight"].chunk(2)
                w2 = sd[ours + "ffn.shared_experts.w2.weight"]
                out.update({theirs + "mlp.shared_expert.gate_proj.weight": gate,
                            theirs + "mlp.shared_expert.up_proj.weight": up,
                            theirs + "mlp.shared_expert.down_proj.weight": 2 * w2,
                            theirs + "mlp.shared_expert_gate.weight": w2.new_zeros(1, m.d_model)})
        else:
            gate, up = sd[ours + "ffn.w13.weight"].chunk(2)
            out.update({theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up,
                        theirs + "mlp.down_proj.weight": sd[ours + "ffn.w2.weight"]})
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------ the way in


def _refuse_unless(ok: bool, file: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{file}: {what}; model.init_from reads only what our model computes")


def _check_supported(hf: Dict[str, Any], model_type: str, file: str) -> None:
    _refuse_unless(hf.get("hidden_act", "silu") == "silu", file, f"hidden_act={hf.get('hidden_act')}")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        _refuse_unless(not hf.get(key), file, f"{key}={hf.get(key)}")
    for key in ("clip_qkv", "rope_scaling"):
        _refuse_unless(hf.get(key) is None, file, f"{key}={hf.get(key)}")
    _refuse_unless(model_type != "mixtral" or hf.get("sliding_window") is None, file,
                   f"sliding_window={hf.get('sliding_window')}")
    _refuse_unless(model_type != "qwen2_moe" or hf.get("qkv_bias", True) is False, file,
                   f"qkv_bias={hf.get('qkv_bias', True)} (biases on the query, key and value projections)")
    _refuse_unless(model_type == "qwen2_moe" or (not hf.get("mlp_only_layers") and hf.get("decoder_sparse_step", 1) == 1),
                   file, "dense layers between MoE layers (mlp_only_layers, decoder_sparse_step)")
    rope = hf.get("rope_parameters") or {}
    _refuse_unless(rope.get("rope_type", "default") == "default", file, f"rope_parameters.rope_type={rope.get('rope_type')}")


def _hf_moe(hf: Dict[str, Any], model_type: str, file: str) -> MoEConfig:
    """The MoE part of a config.json (MoEConfig() for a dense architecture)."""
    if model_type in ("llama", "qwen3"):
        return MoEConfig()
    hidden = hf["intermediate_size" if model_type in ("mixtral", "olmoe") else "moe_intermediate_size"]
    shared, moe_layers = 0, None
    if model_type == "qwen2_moe":
        shared, rest = divmod(hf.get("shared_expert_intermediate_size", 0), hidden)
        _refuse_unless(rest == 0, file, f"shared_expert_intermediate_size={hf.get('shared_expert_intermediate_size')} "
                                        f"is not a multiple of moe_intermediate_size={hidden}")
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        ids = [i for i in range(hf["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]
        moe_layers = None if len(ids) == hf["num_hidden_layers"] else ids
    return MoEConfig(num_experts=hf.get("num_local_experts", hf.get("num_experts", 0)), top_k=hf["num_experts_per_tok"],
                     expert_hidden=hidden, num_shared_experts=shared, moe_layers=moe_layers,
                     renormalize=True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)))


def model_config_from_hf(hf: Dict[str, Any], file: str = "config.json") -> Tuple[str, ModelConfig]:
    """(architecture, the ModelConfig of the same function) from a transformers config.json's dict;
    a ConfigError naming the architecture or the key our model does not compute (attention or MLP
    biases, sliding windows, RoPE scaling, QKV clipping, dense layers between MoE layers but in
    Qwen2-MoE). Qwen2-MoE's shared-expert gate must also be zero: `gated_shared_experts`."""
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"{file}: model_type {model_type!r} (architectures {hf.get('architectures')}) is not one "
                          f"model.init_from reads; known: {', '.join(HF_MODEL_TYPES[t] for t in HF_MODEL_TYPES)}")
    _check_supported(hf, model_type, file)
    rope = hf.get("rope_parameters") or {}
    theta, eps = _DEFAULTS[model_type]
    n_heads = hf["num_attention_heads"]
    moe = _hf_moe(hf, model_type, file)
    m = ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                    n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                    head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
                    qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "proj"}.get(model_type, "none"),
                    ffn_hidden=hf["intermediate_size"] if model_type in ("llama", "qwen3", "qwen2_moe") else 0,
                    max_seq_len=hf.get("max_position_embeddings", 1024),
                    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", theta))),
                    norm_eps=float(hf.get("rms_norm_eps", eps)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                    moe=moe)
    return HF_MODEL_TYPES[model_type], m


def gated_shared_experts(m: ModelConfig, architecture: str) -> List[str]:
    """The tensors that must be zero for our model to compute the folder's: Qwen2-MoE's shared-expert
    gates (sigmoid(g . x) is 1/2 for every x only when g = 0; the down projection is halved on the way in)."""
    if architecture != "Qwen2MoeForCausalLM" or not m.moe.num_shared_experts:
        return []
    return [f"model.layers.{i}.mlp.shared_expert_gate.weight" for i in moe_layer_ids(m)]


Recipe = Tuple[List[Tuple[str, str]], bool]
"""How one of our tensors is made from a folder's tensors: ([(name, transform)], per expert). The
named tensors, each transformed (`rope`: RoPE rows re-paired, `half`: halved, "": as it is), are
concatenated along dim 0; a per-expert recipe's names hold `{e}` and give expert e's slice, stacked
over the experts asked for."""


def _ffn_recipes(ours: str, mlp: str, architecture: str, present, shared: bool) -> Dict[str, Recipe]:
    """The recipes of one MoE block (router, experts, Qwen2-MoE's shared expert)."""
    out: Dict[str, Recipe] = {}
    if shared:
        sh = mlp + "shared_expert."
        out[ours + "ffn.shared_experts.w13.weight"] = ([(sh + "gate_proj.weight", ""), (sh + "up_proj.weight", "")],
                                                       False)
        out[ours + "ffn.shared_experts.w2.weight"] = ([(sh + "down_proj.weight", "half")], False)
    if mlp + "experts.gate_up_proj" in present:  # the modules' fused names
        out[ours + "ffn.router.weight"] = ([(mlp + "gate.weight", "")], False)
        out[ours + "ffn.experts.w13"] = ([(mlp + "experts.gate_up_proj", "")], False)
        out[ours + "ffn.experts.w2"] = ([(mlp + "experts.down_proj", "")], False)
        return out
    if architecture == "MixtralForCausalLM":
        mlp, (gate, up, down) = mlp.replace(".mlp.", ".block_sparse_moe."), ("w1", "w3", "w2")
    else:
        gate, up, down = "gate_proj", "up_proj", "down_proj"
    out[ours + "ffn.router.weight"] = ([(mlp + "gate.weight", "")], False)
    out[ours + "ffn.experts.w13"] = ([(mlp + f"experts.{{e}}.{gate}.weight", ""),
                                      (mlp + f"experts.{{e}}.{up}.weight", "")], True)
    out[ours + "ffn.experts.w2"] = ([(mlp + f"experts.{{e}}.{down}.weight", "")], True)
    return out


def hf_recipes(m: ModelConfig, architecture: str, present) -> Dict[str, Recipe]:
    """{our tensor name: recipe} reading a transformers folder of `architecture` whose tensor names
    are `present`: the names save_pretrained writes (one tensor per expert: Mixtral's
    `block_sparse_moe.experts.{e}.w1/w3/w2`, the others' `mlp.experts.{e}.gate/up/down_proj`) or the
    fused names of transformers' modules (`mlp.experts.gate_up_proj`, [E, ...])."""
    out: Dict[str, Recipe] = {"embed.weight": ([("model.embed_tokens.weight", "")], False),
                              "norm.weight": ([("model.norm.weight", "")], False)}
    if not m.tie_embeddings:
        out["head.weight"] = ([("lm_head.weight", "")], False)
    moe_ids = moe_layer_ids(m)
    for i in range(m.n_layers):
        ours, attn, mlp = f"blocks.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[ours + "attn.qkv.weight"] = ([(attn + "q_proj.weight", "rope"), (attn + "k_proj.weight", "rope"),
                                          (attn + "v_proj.weight", "")], False)
        out[ours + "attn.proj.weight"] = ([(attn + "o_proj.weight", "")], False)
        out[ours + "attn_norm.weight"] = ([(f"model.layers.{i}.input_layernorm.weight", "")], False)
        out[ours + "ffn_norm.weight"] = ([(f"model.layers.{i}.post_attention_layernorm.weight", "")], False)
        if m.qk_norm != "none":
            for name in ("q_norm", "k_norm"):  # permuted as the rows it scales
                out[ours + f"attn.{name}.weight"] = ([(attn + f"{name}.weight", "rope")], False)
        if i in moe_ids:
            out.update(_ffn_recipes(ours, mlp, architecture, present, m.moe.num_shared_experts > 0))
        else:
            out[ours + "ffn.w13.weight"] = ([(mlp + "gate_proj.weight", ""), (mlp + "up_proj.weight", "")], False)
            out[ours + "ffn.w2.weight"] = ([(mlp + "down_proj.weight", "")], False)
    return out


def recipe_names(recipe: Recipe, num_experts: int) -> List[str]:
    """Every tensor name a recipe reads (per-expert names for experts 0..num_experts-1)."""
    parts, per_expert = recipe
    return [n.format(e=e) for e in range(num_experts) for n, _ in parts] if per_expert else [n for n, _ in parts]


def build_tensor(recipe: Recipe, read, head_dim: int, experts=None) -> torch.Tensor:
    """Our tensor from `read(name) -> tensor` by `recipe`; `experts`: the expert ids to stack (a range;
    a fused [E, ...] tensor is sliced to them)."""
    parts, per_expert = recipe

    def one(fmt: Dict[str, int]) -> torch.Tensor:
        ts = [read(n.format(**fmt)) for n, _ in parts]
        ts = [pairs_from_halves(t, head_dim) if how == "rope" else t / 2 if how == "half" else t
              for t, (_, how) in zip(ts, parts)]
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    if per_expert:
        return torch.stack([one({"e": e}) for e in experts])
    t = one({})
    return t[experts.start:experts.stop] if experts is not None else t
