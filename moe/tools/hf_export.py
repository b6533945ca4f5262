"""`moe export RUN_OR_STEP_DIR --hf OUT`: a checkpoint as a Hugging Face transformers model folder.

The architecture follows from the model's features: dense -> Llama (Qwen3 with per-head QK-norm);
MoE -> Mixtral (softmax top-k, renormalised), OLMoE (QK-norm over the projections), Qwen3-MoE
(per-head QK-norm) or, with shared experts, Qwen2-MoE (its sigmoid shared-expert gate exported as
zero, exactly 1/2, with the shared down projection doubled; it also has dense blocks between MoE
blocks). A model no transformers architecture expresses (a router family, group limits, the
aux-loss-free bias, a scaling factor, shared experts with QK-norm, dense blocks without shared
experts, an eval capacity) is refused with an error naming the feature, never exported approximately.

The weights map one to one except RoPE: we rotate interleaved pairs (x[2i], x[2i+1]) of each head,
transformers rotates halves (x[i], x[i + hd/2]), so the query and key rows (and a per-head QK-norm
weight) are permuted within each head; the two models then compute the same logits. The mapping and
the permutation (both ways, `model.init_from` reads with them) are in moe/nn/hf.py.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from moe.config import ConfigError, ModelConfig, config_from_yaml_text
from moe.data import ByteTokenizer, HFTokenizer, Tokenizer, load_saved_tokenizer
from moe.nn.hf import hf_architecture, to_hf_state_dict
from moe.train.checkpoint.integrity import resolve_step_dir
from moe.train.checkpoint.loading import consolidated_state_dict

BYTES_EOS = "<|endoftext|>"
"""The name of the `bytes` tokenizer's EOS (id 256) in the exported tokenizer."""


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
