"""Where metrics go: metrics.jsonl in the run folder (always) and W&B (unless disabled).

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

from moe.config import to_dict
from moe.io import RunFolder, atomic_write
from moe.metrics.heatmap import LoadHeatmap


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
DOWNSTREAM_FLOPS_AXIS = "downstream_vs_flops"
"""The same for downstream task metrics (`downstream/<task>/acc` -> `downstream_vs_flops/<task>/acc`)."""


class MetricLogger:
    """Writes metrics.jsonl (always) and W&B (unless disabled). Construct on rank 0 only."""

    def __init__(self, run_dir: str, cfg, config_dict: dict, resume_step: Optional[int],
                 wandb_id: Optional[str] = None) -> None:
        self.path = RunFolder(run_dir).metrics
        if resume_step is None:
            open(self.path, "w").close()
        else:
            self._truncate_after(resume_step)
        self.wandb = None
        self.wandb_id = wandb_id
        self.heatmap = LoadHeatmap()
        mode = wandb_mode(cfg.logging.wandb.mode)
        if mode != "disabled":
            import wandb  # deferred: seconds of import, and not needed when disabled

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
            for key in ("loss/*", "ppl/*", "speed/*", "router/*", "downstream/*", "lr", "grad_norm"):
                self.wandb.define_metric(key, step_metric="tokens")
            for axis in (FLOPS_AXIS, DOWNSTREAM_FLOPS_AXIS):
                self.wandb.define_metric(f"{axis}/*", step_metric="flops")

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
            scalars.update({f"{DOWNSTREAM_FLOPS_AXIS}/{k[len('downstream/'):]}": v for k, v in scalars.items()
                            if k.startswith("downstream/")})
            self.heatmap.add(record)
            if "loss/val" in record and len(self.heatmap):  # bounded cost: one image per evaluation
                import wandb

                scalars["router/load_heatmap"] = wandb.Image(self.heatmap.render(),
                                                             caption="expert load / uniform, per MoE layer")
                if self.heatmap.domain:  # a data mixture: which experts each source's tokens go to
                    scalars["router/domain_heatmap"] = wandb.Image(self.heatmap.render_domain(),
                                                                   caption="share of each source's tokens per expert")
            self.wandb.log(scalars, step=int(record["step"]))

    def summary(self, summary: Dict[str, Any]) -> None:
        if self.wandb is not None:
            for k, v in summary.items():
                self.wandb.summary[k] = v

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
