"""Load a trained run for sampling and evaluation (no DeepSpeed, one process)."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional

import torch

from moe.config import ConfigError, attention_heads, config_from_yaml_text
from moe.data import load_saved_tokenizer
from moe.io import RunFolder, atomic_write
from moe.nn.gpt import GPT, KVCache
from moe.train import downstream
from moe.train.checkpoint import integrity, loading
def load_run(run_dir: str, tag: Optional[str] = None, device: str = "cpu"):
    """(model in eval mode, tokenizer, config) from a run folder's latest (or `tag`) checkpoint."""
    folder = RunFolder(run_dir)
    if not os.path.isfile(folder.config):
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    ckpt_dir = folder.checkpoints
    if tag is None:
        tag, note = integrity.find_resume(ckpt_dir)
        if note:
            print(f"note: {note}")
    if tag is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint yet (nothing in {ckpt_dir})")
    weights = loading.load_model_weights(ckpt_dir, tag)  # verifies the folder, the config included
    # the config stored with the checkpoint is the one its weights were trained with
    cfg_file = os.path.join(ckpt_dir, tag, "config.yaml")
    try:
        cfg = config_from_yaml_text(open(cfg_file).read())
    except ConfigError as exc:
        raise ConfigError(f"{cfg_file}: {exc}") from None
    model = GPT(cfg.model)
    model.load_state_dict(weights)
    model.to(device).eval()
    return model, load_saved_tokenizer(run_dir), cfg


MIN_TEMPERATURE = 1e-6
"""Below this (and above 0, greedy) logits / temperature can overflow fp32 and the softmax turns NaN."""


def check_sampling_args(prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                        seed: int = 0) -> None:
    """Refuse sampling settings that cannot work, naming the `moe generate` flag; call it before
    loading the model so that a typo costs nothing."""
    if not prompt:
        raise ConfigError("--prompt must not be empty: sampling continues a prompt")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):  # NaN fails both
        raise ConfigError(f"--temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g} and finite, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:  # NaN fails too
        raise ConfigError(f"--top-p must be > 0 and <= 1 (1 = off), got {top_p}")
    if not 0 <= seed < 2**64:  # torch.Generator.manual_seed's range
        raise ConfigError(f"--seed must be >= 0 and < 2**64, got {seed}")


@torch.no_grad()
def generate(model: GPT, prompt_ids: list, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None) -> list:
    """Sample with a KV cache: the prompt is processed once, then one token per forward."""
    if not prompt_ids:
        raise ConfigError("--prompt encodes to no tokens")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cfg = model.cfg
    max_len = min(cfg.max_seq_len, len(prompt_ids) + max_new_tokens)
    prompt_ids = prompt_ids[-(cfg.max_seq_len - 1):]
    _, n_kv_heads, head_dim = attention_heads(cfg)
    cache = KVCache(cfg.n_layers, 1, n_kv_heads, max_len, head_dim, device,
                    next(model.parameters()).dtype)
    tokens = list(prompt_ids)
    logits = model(torch.tensor([tokens], device=device), cache=cache, start_pos=0).logits[0, -1]
    while len(tokens) < max_len:
        next_id = sample_token(logits.float().cpu(), temperature, top_k, top_p, gen)
        tokens.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
        if len(tokens) >= max_len:
            break
        logits = model(torch.tensor([[next_id]], device=device), cache=cache, start_pos=len(tokens) - 1).logits[0, -1]
    return tokens[len(prompt_ids):]


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def evaluate_dataset(model: GPT, dataset, seq_len: int, batch_size: int = 8, max_batches: int = 0) -> dict:
    """Token-weighted mean loss and perplexity over every full window of the dataset."""
    n = dataset.num_sequences(seq_len)
    if n == 0:
        raise ValueError(f"the evaluation data has {dataset.num_tokens} tokens, fewer than one window of {seq_len + 1}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = 0
    for start in range(0, n, batch_size):
        seqs = torch.stack([torch.from_numpy(dataset.sequence(i, seq_len)) for i in range(start, min(n, start + batch_size))])
        x, y = seqs[:, :-1].to(device), seqs[:, 1:].to(device)
        out = model(x, y)
        total += float(out.loss) * y.numel()
        count += y.numel()
        batches += 1
        if max_batches and batches >= max_batches:
            break
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count}


def evaluate_tasks(run_dir: str, tasks: str, include_path: str = "", limit: Optional[float] = None,
                   num_fewshot: Optional[int] = None, batch_size: int = 8, tag: Optional[str] = None,
                   out: Optional[str] = None) -> Dict[str, Any]:
    """`moe eval RUN --tasks a,b`: lm-eval-harness tasks on a run's latest (or `tag`) checkpoint. The
    flags and the task names are checked before the model loads; the results go to `out` as JSON."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if limit is not None and not limit > 0:
        raise ConfigError(f"--limit must be > 0 (documents per task, or below 1 a fraction), got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if out and os.path.isdir(out):
        raise ConfigError(f"--out {out}: a folder; name the JSON file to write")
    manager, names = downstream.resolve_tasks(names, include_path, "--tasks")
    model, tok, cfg = load_run(run_dir, tag)
    lm = downstream.lm_eval_model(model, cfg.model, tok, batch_size)
    result = downstream.run_tasks(lm, manager, names, limit, num_fewshot)
    report = {"run": run_dir, "tag": tag, "tasks": names, "limit": limit, "num_fewshot": num_fewshot,
              "results": result["metrics"], "samples": result["samples"]}
    if out:
        atomic_write(out, json.dumps(report, indent=2) + "\n", secrets=False)
    return report


def tasks_table(report: Dict[str, Any]) -> str:
    """The results as a Markdown table: task, metric, value, documents."""
    lines = ["| task | metric | value | documents |", "|---|---|---|---|"]
    for task, row in report["results"].items():
        for metric, value in row.items():
            lines.append(f"| {task} | {metric} | {value:.6g} | {report['samples'].get(task, '')} |")
    return "\n".join(lines)
