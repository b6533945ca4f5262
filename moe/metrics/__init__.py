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
import re
import uuid
from typing import Any, Dict, List, Optional

import torch

from moe.nn.moe_layer import MoELayer
from moe.config import to_dict
from moe.io import atomic_write


def router_metrics(layers: Dict[int, MoELayer]) -> Dict[str, Any]:
    """Summarise and reset each MoE layer's statistics since the last call (the logging window).

    A collective when torch.distributed is initialised with more than one rank (one all-reduce of
    every layer's statistics): call it on every rank; all ranks return the same, global, numbers.

    Per layer L, under `router/layer{L}/`:
    - `load`: fraction of routed (token, slot) pairs per expert, counted before capacity drops (expert
      choice: what each expert kept); `tokens_per_expert`: the same as counts. Both JSONL-only lists.
    - `max_over_mean`, `cv` (std / mean) of the per-expert counts; `dead_experts`: experts that got no
      token in the window.
    - `dropped_frac`: dropped fraction of the routed pairs (expert choice: of the tokens);
      `dropped_tokens_frac`: tokens that got no expert at all and only took the residual path.
    - `entropy`: mean entropy (nats) of the router's normalised scores.
    - the weighted losses the layer added: `aux_loss`, `seq_aux_loss`, `global_aux_loss`, `z_loss`
      (mean over the window's forward passes).
    - aux-loss-free balancing: `bias` (list), `bias_range` (max - min; the bias is shift-invariant)
      and `bias_std`.
    """
    active = [(lid, layer) for lid, layer in layers.items() if layer.stats.packed is not None]
    if not active:
        return {}
    # each layer's stats are already one vector: [counts E | dropped, slots, dropped_tokens, tokens,
    # entropy, calls, lse2 | losses] (moe/nn/moe_layer.py RouterStats)
    loss_names = [list(layer.stats.loss_names) for _, layer in active]
    packed = torch.cat([layer.stats.packed for _, layer in active])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    packed = packed.cpu()

    out: Dict[str, Any] = {}
    offset = 0
    for (layer_id, layer), names in zip(active, loss_names):
        E = layer.num_experts
        counts = packed[offset:offset + E]
        dropped, slots, dropped_tokens, tokens, entropy, calls, lse2 = packed[offset + E:offset + E + 7].tolist()
        losses = packed[offset + E + 7:offset + E + 7 + len(names)].tolist()
        offset += E + 7 + len(names)
        total = float(counts.sum())
        mean = total / E
        std = float(counts.std(unbiased=False)) if E > 1 else 0.0
        prefix = f"router/layer{layer_id}/"
        out[prefix + "load"] = [round(v, 6) for v in (counts / max(total, 1.0)).tolist()]
        out[prefix + "tokens_per_expert"] = [int(v) for v in counts.tolist()]
        out[prefix + "max_over_mean"] = float(counts.max()) / mean if mean > 0 else 0.0
        out[prefix + "cv"] = std / mean if mean > 0 else 0.0
        out[prefix + "dead_experts"] = int((counts == 0).sum())
        out[prefix + "dropped_frac"] = dropped / slots if slots else 0.0
        out[prefix + "dropped_tokens_frac"] = dropped_tokens / tokens if tokens else 0.0
        out[prefix + "entropy"] = entropy / tokens if tokens else 0.0
        out[prefix + "logit_lse2"] = lse2 / tokens if tokens else 0.0  # mean logsumexp(logits)^2
        for name, value in zip(names, losses):
            out[prefix + name] = value / calls
        bias = layer.router.expert_bias
        if bias is not None:
            b = bias.detach().double().cpu()
            out[prefix + "bias"] = [round(v, 6) for v in b.tolist()]
            out[prefix + "bias_range"] = float(b.max() - b.min())
            out[prefix + "bias_std"] = float(b.std(unbiased=False))
        layer.stats.reset()
    return out


class LoadHeatmap:
    """Per-layer expert load over time, rendered as one image for W&B (a heatmap per MoE layer:
    steps across, experts down, colour = load / uniform load).

    Fed with every logged record; bounded memory (at most `max_columns` time columns: when full,
    neighbouring columns are averaged pairwise, so the image always spans the whole run) and bounded
    cost (the caller renders it only on evaluation lines)."""

    _KEY = re.compile(r"^router/layer(\d+)/load$")

    def __init__(self, max_columns: int = 256) -> None:
        self.max_columns = max_columns
        self.steps: List[int] = []
        self.loads: Dict[int, List[List[float]]] = {}

    def add(self, record: Dict[str, Any]) -> None:
        found = {int(m.group(1)): v for k, v in record.items() if (m := self._KEY.match(k))}
        if not found:
            return
        if set(found) != set(self.loads) and self.steps:  # a layer set change cannot happen within a run
            self.steps, self.loads = [], {}
        self.steps.append(int(record["step"]))
        for layer, load in found.items():
            self.loads.setdefault(layer, []).append(list(load))
        if len(self.steps) > self.max_columns:
            self.steps = self.steps[1::2]
            for layer, cols in self.loads.items():
                pairs = zip(cols[0::2], cols[1::2])
                self.loads[layer] = [[(a + b) / 2 for a, b in zip(x, y)] for x, y in pairs]

    def __len__(self) -> int:
        return len(self.steps)

    def render(self):
        """An RGB uint8 array [H, W, 3] of the heatmaps (None when nothing was logged)."""
        if not self.steps:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        layers = sorted(self.loads)
        fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.1 * len(layers)), squeeze=False,
                                 sharex=True)
        for ax, layer in zip(axes[:, 0], layers):
            grid = np.asarray(self.loads[layer], dtype=float).T  # [E, time]
            grid = grid * grid.shape[0]  # 1 = uniform load
            im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                           extent=(self.steps[0], self.steps[-1], grid.shape[0] - 0.5, -0.5))
            ax.set_ylabel(f"layer {layer}\nexpert")
            fig.colorbar(im, ax=ax, label="load / uniform")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load per MoE layer")
        fig.tight_layout()
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return image


def training_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for a training process started from this one (`moe sweep`, `moe launch`):
    without WANDB_SERVICE, which wandb sets when this process has used W&B itself and which would
    make the child log through this process's W&B service instead of its own (its run files then
    go missing once this process exits)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(extra or {})
    return env


def wandb_mode(configured: str) -> str:
    return os.environ.get("WANDB_MODE", configured)


FLOPS_AXIS = "loss_vs_flops"
"""W&B key prefix of the losses plotted against training FLOPs (`loss/val` -> `loss_vs_flops/val`)."""


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
        self.heatmap = LoadHeatmap()
        mode = wandb_mode(cfg.logging.wandb.mode)
        if mode != "disabled":
            import wandb

            # from the config as written (secret values redacted), never from the live config
            written = to_dict(cfg)
            wc = written["logging"]["wandb"]
            self.wandb_id = wandb_id or uuid.uuid4().hex[:12]  # kept in checkpoints: restarts continue this run
            self.wandb = wandb.init(
                project=wc["project"], entity=wc["entity"], group=wc["group"], name=written["run"]["name"],
                tags=list(wc["tags"]), job_type=wc["job_type"], config=config_dict, dir=run_dir, mode=mode,
                id=self.wandb_id,
                resume="allow",
            )
            # Two x axes: every metric is plotted against tokens (equal data), and the losses again,
            # under loss_vs_flops/, against training FLOPs (equal compute): a W&B metric has one
            # step_metric, so the equal-compute view needs its own keys.
            self.wandb.define_metric("tokens")
            self.wandb.define_metric("flops")
            for key in ("loss/*", "ppl/*", "speed/*", "router/*", "lr", "grad_norm"):
                self.wandb.define_metric(key, step_metric="tokens")
            self.wandb.define_metric(f"{FLOPS_AXIS}/*", step_metric="flops")

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
        atomic_write(self.path, "".join(kept), secrets=False)

    def log(self, record: Dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            scalars.update({f"{FLOPS_AXIS}/{k[len('loss/'):]}": v for k, v in scalars.items()
                            if k.startswith("loss/")})
            self.heatmap.add(record)
            if "loss/val" in record and len(self.heatmap):  # bounded cost: one image per evaluation
                import wandb

                scalars["router/load_heatmap"] = wandb.Image(self.heatmap.render(),
                                                             caption="expert load / uniform, per MoE layer")
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
