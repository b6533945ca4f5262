"""Metrics of a run, computed on every rank and written by rank 0.

- router.py   router statistics per MoE layer (load, drops, entropy, aux/z losses), one all-reduce per window
- domain.py   a data mixture: routing by domain (sources x experts, a specialisation score), tokens per source
- heatmap.py  the expert load over time, one image per evaluation for W&B
- sinks.py    MetricLogger: metrics.jsonl (always) and W&B (offline by default); training_env for child processes
- speed.py    the measured peak matmul rate that MFU divides by
"""
from moe.metrics.domain import domain_metrics, set_token_sources, source_metrics
from moe.metrics.heatmap import LoadHeatmap
from moe.metrics.router import router_metrics
from moe.metrics.sinks import FLOPS_AXIS, MetricLogger, training_env, wandb_mode
from moe.metrics.speed import measure_peak_flops

__all__ = ["FLOPS_AXIS", "LoadHeatmap", "MetricLogger", "domain_metrics", "measure_peak_flops", "router_metrics",
           "set_token_sources", "source_metrics", "training_env", "wandb_mode"]
