"""`moe export RUN_OR_STEP_DIR --hf OUT`: a checkpoint as a Hugging Face transformers model folder.

The architecture follows from the model's features: dense -> Llama (Qwen3 with per-head QK-norm);
MoE -> Mixtral (softmax top-k, renormalised), OLMoE (QK-norm over the projections) or Qwen3-MoE
(per-head QK-norm). A model no transformers architecture expresses (a router family, group limits,
the aux-loss-free bias, a scaling factor, shared experts, dense layers between MoE layers, an eval
capacity) is refused with an error naming the feature, never exported approximately.

The weights map one to one except RoPE: we rotate interleaved pairs (x[2i], x[2i+1]) of each head,
transformers rotates halves (x[i], x[i + hd/2]), so the query and key rows (and a per-head QK-norm
weight) are permuted within each head; the two models then compute the same logits.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import torch

from moe.config import (ConfigError, ModelConfig, attention_heads, config_from_yaml_text, dense_ffn_hidden, expert_hidden,
                        moe_layer_ids)
from moe.data import ByteTokenizer, HFTokenizer, Tokenizer, load_saved_tokenizer
from moe.train.checkpoint.integrity import resolve_step_dir
from moe.train.checkpoint.loading import consolidated_state_dict

BYTES_EOS = "<|endoftext|>"
"""The name of the `bytes` tokenizer's EOS (id 256) in the exported tokenizer."""
FEATURES_NO_HF_ARCHITECTURE_HAS = (
    ("router", "topk", "a router family other than token-choice top-k"),
    ("score_func", "softmax", "sigmoid scores"),
    ("n_groups", 0, "group-limited routing"),
    ("bias_update_rate", 0.0, "the aux-loss-free selection bias"),
    ("routed_scaling_factor", 1.0, "a routed scaling factor"),
    ("num_shared_experts", 0, "shared experts (transformers' Qwen2-MoE gates its shared expert by a sigmoid)"),
    ("eval_capacity_factor", 0.0, "an eval capacity (transformers' MoE layers are dropless)"),
    ("noisy_gating", False, "noisy gating (a learned noise projection)"),
)


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
    if moe_layer_ids(m) != list(range(m.n_layers)):
        raise ConfigError(f"model.moe.moe_layers: dense blocks {sorted(set(range(m.n_layers)) - set(moe_layer_ids(m)))} "
                          f"between MoE blocks; the exported architectures have experts in every block")
    routed = dict(num_experts_per_tok=e.top_k, **common)
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


def halves_from_pairs(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows (dim 0) from interleaved RoPE pairs to rotate-half order."""
    heads = rows.reshape(-1, head_dim // 2, 2, *rows.shape[1:])
    return heads.transpose(1, 2).reshape(rows.shape)


def to_hf_state_dict(m: ModelConfig, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our EP=1 state dict (stacked experts) under transformers' names, RoPE rows permuted."""
    n_heads, n_kv, hd = attention_heads(m)
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
        if m.moe.num_experts:
            out.update({theirs + "mlp.gate.weight": sd[ours + "ffn.router.weight"],
                        theirs + "mlp.experts.gate_up_proj": sd[ours + "ffn.experts.w13"],
                        theirs + "mlp.experts.down_proj": sd[ours + "ffn.experts.w2"]})
        else:
            gate, up = sd[ours + "ffn.w13.weight"].chunk(2)
            out.update({theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up,
                        theirs + "mlp.down_proj.weight": sd[ours + "ffn.w2.weight"]})
    return {k: v.contiguous() for k, v in out.items()}


def hf_model(m: ModelConfig, sd: Dict[str, torch.Tensor]):
    """The transformers model of `m` holding the weights `sd` (strict: every tensor maps)."""
    import transformers  # deferred: an optional dependency (pip install moe[hf]), seconds to import

    name, kwargs = hf_architecture(m)
    config = getattr(transformers, name)(**kwargs)
    # built on the CPU (its RoPE buffers are computed at construction), then overwritten: a second
    # copy of the weights while exporting
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(to_hf_state_dict(m, sd), strict=True)
    return model.eval()


def byte_level_alphabet():
    """GPT-2's byte -> printable character map, which the `tokenizers` ByteLevel pre-tokenizer uses:
    printable Latin-1 bytes map to themselves, the other 68 to the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def hf_tokenizer(tokenizer: Tokenizer):
    """Our tokenizer as a `tokenizers` one that transformers' AutoTokenizer loads: the trained or
    pretrained BPE as it is; `bytes` as a byte-level BPE with no merges whose token ids are the byte
    values (and EOS 256), so both encode every text to the same ids."""
    from tokenizers import Tokenizer as HFTokenizerFile, decoders, models, pre_tokenizers

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.hf_tokenizer, tokenizer.hf_tokenizer.id_to_token(tokenizer.eos_id)
    assert isinstance(tokenizer, ByteTokenizer), type(tokenizer)
    alphabet = byte_level_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    vocab[BYTES_EOS] = tokenizer.eos_id
    tok = HFTokenizerFile(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTES_EOS])
    return tok, BYTES_EOS


def export_hf(path: str, out: str) -> Dict[str, Any]:
    """Write the checkpoint at `path` (a run, checkpoints or step folder) as a transformers folder:
    config.json, safetensors weights, generation config and, from the run folder, the tokenizer."""
    import transformers  # deferred: optional (pip install moe[hf]), seconds to import

    step_dir = resolve_step_dir(path)
    cfg = config_from_yaml_text(open(os.path.join(step_dir, "config.yaml")).read())
    hf_architecture(cfg.model)  # refuse before reading any tensor
    if os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"--hf {out}: the folder exists and is not empty; choose a new one")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    tokenizer = load_saved_tokenizer(run_dir)
    model = hf_model(cfg.model, consolidated_state_dict(step_dir))
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_id
    model.save_pretrained(out, safe_serialization=True)
    tok, eos = hf_tokenizer(tokenizer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos).save_pretrained(out)
    return {"architecture": type(model).__name__, "step_dir": step_dir, "tensors": len(model.state_dict()),
            "tokenizer": tokenizer.name}
