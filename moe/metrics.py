"""Metrics: router statistics, the local JSONL sink and the W&B sink.

Rank 0 only. Every logged step is one JSON object in `runs/<name>/metrics.jsonl` with namespaced keys
(`loss/train`, `speed/tokens_per_s`, `router/layer3/max_over_mean`, ...); W&B receives the same
scalars at the same step. W&B is offline by default so nothing needs a login; WANDB_MODE wins over
the config; `disabled` makes the W&B sink a no-op.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any, Dict, List, Optional

import torch

from moe.layer import MoELayer


def router_metrics(layers: Dict[int, MoELayer]) -> Dict[str, Any]:
    """Summarise and reset each MoE layer's statistics since the last call.

    `load` is the fraction of routed (token, slot) pairs per expert, counted before capacity drops.
    """
    out: Dict[str, Any] = {}
    for layer_id, layer in layers.items():
        s = layer.stats
        if s.tokens_per_expert is None:
            continue
        counts = s.tokens_per_expert.cpu()
        total = float(counts.sum())
        load = (counts / max(total, 1.0)).tolist()
        mean = total / len(load)
        std = float(counts.std(unbiased=False)) if len(load) > 1 else 0.0
        prefix = f"router/layer{layer_id}/"
        out[prefix + "load"] = [round(v, 6) for v in load]
        out[prefix + "max_over_mean"] = float(counts.max()) / mean if mean > 0 else 0.0
        out[prefix + "cv"] = std / mean if mean > 0 else 0.0
        out[prefix + "dead_experts"] = int((counts == 0).sum())
        out[prefix + "dropped_frac"] = s.dropped / s.slots if s.slots else 0.0
        out[prefix + "entropy"] = float(s.entropy_sum.cpu()) / s.tokens if s.tokens else 0.0
        for name, value in s.losses.items():
            out[prefix + name] = float(value.cpu()) / s.calls
        s.reset()
    return out


def wandb_mode(configured: str) -> str:
    return os.environ.get("WANDB_MODE", configured)


class MetricLogger:
    """Writes metrics.jsonl (always) and W&B (unless disabled). Construct on rank 0 only."""

    def __init__(self, run_dir: str, cfg, config_dict: dict, resume_step: Optional[int],
                 wandb_id: Optional[str] = None) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is None:
            open(self.path, "w").close()
        else:
            self._truncate_after(resume_step)
        self.wandb = None
        self.wandb_id = wandb_id
        mode = wandb_mode(cfg.logging.wandb.mode)
        if mode != "disabled":
            import wandb

            wc = cfg.logging.wandb
            self.wandb_id = wandb_id or uuid.uuid4().hex[:12]  # kept in checkpoints: restarts continue this run
            self.wandb = wandb.init(
                project=wc.project, entity=wc.entity, group=wc.group, name=cfg.run.name, tags=list(wc.tags),
                job_type=wc.job_type, config=config_dict, dir=run_dir, mode=mode, id=self.wandb_id,
                resume="allow",
            )
            self.wandb.define_metric("tokens")
            self.wandb.define_metric("flops")
            for key in ("loss/*", "ppl/*", "speed/*", "router/*", "lr", "grad_norm"):
                self.wandb.define_metric(key, step_metric="tokens")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint we resume from (they will be redone)."""
        if not os.path.exists(self.path):
            open(self.path, "w").close()
            return
        kept: List[str] = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError):
                    continue  # a line cut by a crash mid-write
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: Dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb.log(scalars, step=int(record["step"]))

    def summary(self, summary: Dict[str, Any]) -> None:
        if self.wandb is not None:
            for k, v in summary.items():
                self.wandb.summary[k] = v

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The dense matmul rate this device reaches, measured once, as MFU's denominator.

    Measuring (rather than a datasheet figure) keeps MFU meaningful on any CPU; on GPUs the measured
    rate is what a well-tuned GEMM reaches, so MFU reads as a fraction of achievable throughput.
    """
    import time

    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 3 if device.type == "cpu" else 20
    torch.matmul(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)
